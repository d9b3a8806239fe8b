//! Records the git commit redfuse is built from, for `redfuse_build_info{commit}`.
//! Cheap: two `git rev-parse` calls, re-run only when HEAD or the branch moves. Outside a
//! git checkout (a container build's context, a source tarball) the commit is the
//! `GIT_COMMIT` environment variable (the Dockerfile's build argument), else "unknown".
//!
//! The variable it sets is not prefixed `REDFUSE_`: cargo also sets it when it runs the
//! tests, whose redfuse processes inherit it, and every `REDFUSE_*` variable is read as
//! configuration.

use std::path::Path;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (!s.is_empty()).then_some(s)
}

fn watch(path: &Path) {
    // A path that does not exist would re-run this script on every build.
    if path.exists() {
        println!("cargo:rerun-if-changed={}", path.display());
    }
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=GIT_COMMIT");
    let given = std::env::var("GIT_COMMIT")
        .ok()
        .filter(|c| !c.is_empty() && c != "unknown");
    let commit = given.or_else(|| git(&["rev-parse", "--short=12", "HEAD"]));
    if commit.is_some() {
        if let Some(dir) = git(&["rev-parse", "--path-format=absolute", "--git-dir"]) {
            watch(&Path::new(&dir).join("HEAD"));
        }
        if let (Some(common), Some(head_ref)) = (
            git(&["rev-parse", "--path-format=absolute", "--git-common-dir"]),
            git(&["symbolic-ref", "-q", "HEAD"]),
        ) {
            watch(&Path::new(&common).join(head_ref));
            watch(&Path::new(&common).join("packed-refs"));
        }
    }
    println!(
        "cargo:rustc-env=BUILD_GIT_COMMIT={}",
        commit.as_deref().unwrap_or("unknown")
    );
}
