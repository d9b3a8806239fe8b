//! Deployment artifacts: Dockerfile, docker-compose.yml, deploy/ (Kubernetes manifests,
//! Prometheus rules and config, Grafana dashboard, configs).
//!
//! No container engine runs here, so the image is checked by what can be run: the binary built
//! with the image's cargo profile, started with exactly the image's ENV, ENTRYPOINT/CMD and
//! config file (ports rewritten to free ones). The other artifacts are checked against the
//! binary itself (`--help`, `--check-config`, a real `/metrics` scrape), the Kubernetes schemas
//! (`kubernetes-validate`, offline), `promtool`, and a real Prometheus server.
//!
//! Tools: python3 with kubernetes-validate (brings PyYAML), prometheus and promtool. They are
//! installed by scripts/install-deps.sh; a missing one fails the test that needs it.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;

/// Kubernetes versions the manifests are validated against: the oldest they support (native
/// sidecars are on by default from 1.29, the preStop `sleep` action from 1.30) and the newest
/// kubernetes-validate ships.
const K8S_VERSIONS: [&str; 2] = ["1.30.0", "1.37.0"];

/// Labels Prometheus adds to every scraped series (not in redfuse's own output).
const TARGET_LABELS: [&str; 2] = ["instance", "job"];

/// Memory the sidecar needs beyond its cache and write queue (runtime, pipelines, buffers).
const BASE_MEMORY: u64 = 32 << 20;

/// Heavy tests (the image build, a Prometheus server) take turns on the 2-core machine, so
/// that neither starves the other's bounded waits.
static HEAVY: Mutex<()> = Mutex::new(());

fn heavy() -> std::sync::MutexGuard<'static, ()> {
    HEAVY.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------------------
// Files and tools
// ---------------------------------------------------------------------------------------

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    let p = repo().join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

/// Files under `dir` (relative to the repo) whose names end with one of `exts`, sorted.
fn files_under(dir: &str, exts: &[&str]) -> Vec<PathBuf> {
    fn walk(p: &Path, exts: &[&str], out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(p) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            if path.is_dir() {
                walk(&path, exts, out);
            } else if exts
                .iter()
                .any(|x| path.to_string_lossy().ends_with(&format!(".{x}")))
            {
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    walk(&repo().join(dir), exts, &mut out);
    out.sort();
    out
}

fn rel(p: &Path) -> String {
    p.strip_prefix(repo()).unwrap_or(p).display().to_string()
}

/// Runs `program args`, panicking with an install hint if it cannot be started.
fn run_tool(program: &str, args: &[&str], cwd: Option<&Path>) -> Output {
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(Stdio::null());
    if let Some(d) = cwd {
        cmd.current_dir(d);
    }
    cmd.output().unwrap_or_else(|e| {
        panic!(
            "cannot run `{program}` ({e}): it is needed by tests/deploy.rs; \
             install it with scripts/install-deps.sh"
        )
    })
}

fn out_text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `python3` that can import `module`, or a panic that says how to get it.
fn python_with(module: &str) {
    let o = run_tool("python3", &["-c", &format!("import {module}")], None);
    assert!(
        o.status.success(),
        "python3 cannot import {module} (pip install kubernetes-validate, which brings PyYAML; \
         scripts/install-deps.sh does): {}",
        out_text(&o)
    );
}

/// Every YAML document of a file, as JSON (PyYAML's safe loader).
fn yaml_docs(path: &Path) -> Vec<Value> {
    python_with("yaml");
    let script = "import json, sys, yaml\n\
                  docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None]\n\
                  print(json.dumps(docs))";
    let o = run_tool("python3", &["-c", script, &path.to_string_lossy()], None);
    assert!(
        o.status.success(),
        "{} is not valid YAML: {}",
        rel(path),
        out_text(&o)
    );
    match serde_json::from_slice(&o.stdout) {
        Ok(Value::Array(docs)) => docs,
        other => panic!("{}: unexpected YAML conversion result {other:?}", rel(path)),
    }
}

fn yaml_doc(rel_path: &str) -> Value {
    let mut docs = yaml_docs(&repo().join(rel_path));
    assert_eq!(docs.len(), 1, "{rel_path}: expected one YAML document");
    docs.remove(0)
}

fn s<'a>(v: &'a Value, what: &str) -> &'a str {
    v.as_str()
        .unwrap_or_else(|| panic!("{what}: expected a string, got {v}"))
}

fn arr<'a>(v: &'a Value, what: &str) -> &'a Vec<Value> {
    v.as_array()
        .unwrap_or_else(|| panic!("{what}: expected a list, got {v}"))
}

// ---------------------------------------------------------------------------------------
// Dockerfile
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Instr {
    op: String,
    args: String,
}

#[derive(Debug, Default)]
struct Stage {
    from: String,
    name: Option<String>,
    instrs: Vec<Instr>,
}

/// The Dockerfile's stages: comments dropped, continuation lines joined.
fn dockerfile() -> Vec<Stage> {
    let text = read("Dockerfile");
    let mut logical = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        let t = line.trim();
        if cur.is_empty() && (t.is_empty() || t.starts_with('#')) {
            continue;
        }
        if t.starts_with('#') {
            continue; // a comment inside a continued instruction
        }
        if let Some(body) = t.strip_suffix('\\') {
            cur.push_str(body);
            cur.push(' ');
        } else {
            cur.push_str(t);
            logical.push(std::mem::take(&mut cur));
        }
    }
    assert!(cur.is_empty(), "Dockerfile ends inside a continued line");
    let mut stages: Vec<Stage> = Vec::new();
    for l in logical {
        let (op, args) = l.split_once(char::is_whitespace).unwrap_or((&l, ""));
        let op = op.to_ascii_uppercase();
        let args = args.trim().to_string();
        if op == "FROM" {
            let words: Vec<&str> = args.split_whitespace().collect();
            let name = match words.as_slice() {
                [_, as_, n] if as_.eq_ignore_ascii_case("as") => Some(n.to_string()),
                _ => None,
            };
            stages.push(Stage {
                from: words.first().unwrap_or(&"").to_string(),
                name,
                instrs: Vec::new(),
            });
        } else if let Some(st) = stages.last_mut() {
            st.instrs.push(Instr { op, args });
        } else {
            assert!(op == "ARG", "Dockerfile: {op} before the first FROM");
        }
    }
    stages
}

impl Stage {
    fn all(&self, op: &str) -> Vec<&Instr> {
        self.instrs.iter().filter(|i| i.op == op).collect()
    }

    fn last(&self, op: &str) -> Option<&Instr> {
        self.instrs.iter().rev().find(|i| i.op == op)
    }

    /// `ENV K=V K2=V2` (and the legacy `ENV K V`), in order.
    fn env(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for i in self.all("ENV") {
            assert!(
                !i.args.contains('"') && !i.args.contains('\''),
                "ENV {}: quoted values are not parsed here; keep them plain",
                i.args
            );
            if !i.args.contains('=') {
                let (k, v) = i.args.split_once(' ').expect("ENV K V");
                out.push((k.to_string(), v.trim().to_string()));
                continue;
            }
            for pair in i.args.split_whitespace() {
                let (k, v) = pair
                    .split_once('=')
                    .unwrap_or_else(|| panic!("ENV {}: `{pair}` is not K=V", i.args));
                out.push((k.to_string(), v.to_string()));
            }
        }
        out
    }

    /// ENTRYPOINT + CMD in exec (JSON) form.
    fn command(&self) -> Vec<String> {
        let exec = |op: &str| -> Vec<String> {
            match self.last(op) {
                None => Vec::new(),
                Some(i) => serde_json::from_str(&i.args).unwrap_or_else(|e| {
                    panic!(
                        "{op} {}: use the exec (JSON array) form, so that SIGTERM reaches \
                         redfuse and not a shell ({e})",
                        i.args
                    )
                }),
            }
        };
        let mut c = exec("ENTRYPOINT");
        c.extend(exec("CMD"));
        c
    }

    /// `COPY [--from=x] src... dest`: (from, sources, dest).
    fn copies(&self) -> Vec<(Option<String>, Vec<String>, String)> {
        self.all("COPY")
            .into_iter()
            .map(|i| {
                let mut from = None;
                let mut words = Vec::new();
                for w in i.args.split_whitespace() {
                    if let Some(f) = w.strip_prefix("--from=") {
                        from = Some(f.to_string());
                    } else if !w.starts_with("--") {
                        words.push(w.to_string());
                    }
                }
                let dest = words.pop().expect("COPY needs a destination");
                (from, words, dest)
            })
            .collect()
    }
}

/// The image's `cargo build` arguments (from the build stage's last `RUN ... cargo build`).
fn image_cargo_args(build: &Stage) -> Vec<String> {
    let run = build
        .all("RUN")
        .into_iter()
        .rev()
        .find(|i| i.args.contains("cargo build"))
        .expect("the build stage runs `cargo build`");
    let cmd = run
        .args
        .split("&&")
        .map(str::trim)
        .find(|c| c.starts_with("cargo build"))
        .expect("a `cargo build` command");
    cmd.split_whitespace().skip(2).map(str::to_string).collect()
}

fn profile_of(args: &[String]) -> String {
    if let Some(i) = args.iter().position(|a| a == "--profile") {
        return args[i + 1].clone();
    }
    if let Some(p) = args.iter().find_map(|a| a.strip_prefix("--profile=")) {
        return p.to_string();
    }
    panic!("the image's cargo build should name its profile with --profile: {args:?}")
}

/// The local file a path inside the final image comes from (a `COPY` from the context).
fn image_file_source(stage: &Stage, container_path: &str) -> PathBuf {
    for (from, srcs, dest) in stage.copies() {
        if from.is_some() {
            continue;
        }
        if dest == container_path && srcs.len() == 1 {
            return repo().join(&srcs[0]);
        }
        if dest.ends_with('/') {
            for s in &srcs {
                let name = Path::new(s).file_name().unwrap().to_string_lossy();
                if format!("{dest}{name}") == container_path {
                    return repo().join(s);
                }
            }
        }
    }
    panic!("nothing in the final stage is COPYed to {container_path}")
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or_else(|| panic!("`{addr}` is not host:port"))
}

fn host_of(addr: &str) -> &str {
    addr.rsplit_once(':')
        .map(|(h, _)| h)
        .unwrap_or_else(|| panic!("`{addr}` is not host:port"))
}

#[test]
fn dockerfile_builds_in_stages_and_runs_unprivileged() {
    let stages = dockerfile();
    assert!(
        stages.len() >= 2,
        "the Dockerfile should be multi-stage (build, then runtime): {stages:?}"
    );
    let build = &stages[0];
    let runtime = stages.last().unwrap();
    assert!(
        build.from.contains("rust"),
        "the first stage should build with a Rust image, not {}",
        build.from
    );
    let build_name = build
        .name
        .clone()
        .expect("the build stage is named (AS ...)");

    // Dependency caching: the manifests are copied and built before the sources.
    let copies = build.copies();
    let first_src = copies
        .iter()
        .position(|(_, srcs, _)| srcs.iter().any(|s| s.starts_with("src")))
        .expect("the build stage copies src/");
    let manifests = copies
        .iter()
        .position(|(_, srcs, _)| {
            srcs.iter().any(|s| s == "Cargo.toml") && srcs.iter().any(|s| s == "Cargo.lock")
        })
        .expect("the build stage copies Cargo.toml and Cargo.lock");
    assert!(
        manifests < first_src,
        "Cargo.toml/Cargo.lock must be copied before src/ so dependencies are cached"
    );
    let ops: Vec<&str> = build.instrs.iter().map(|i| i.op.as_str()).collect();
    let copy_positions: Vec<usize> = ops
        .iter()
        .enumerate()
        .filter(|(_, o)| **o == "COPY")
        .map(|(i, _)| i)
        .collect();
    let dummy_build = build.instrs[copy_positions[manifests]..copy_positions[first_src]]
        .iter()
        .any(|i| i.op == "RUN" && i.args.contains("cargo build"));
    assert!(
        dummy_build,
        "a `cargo build` of stand-in sources should run between copying the manifests and src/"
    );

    // The profile: inherits release, no debug info, stripped.
    let args = image_cargo_args(build);
    assert!(
        args.iter().any(|a| a == "--locked"),
        "build with --locked: {args:?}"
    );
    let profile = profile_of(&args);
    let cargo: toml::Table = toml::from_str(&read("Cargo.toml")).unwrap();
    let p = cargo
        .get("profile")
        .and_then(|p| p.get(&profile))
        .unwrap_or_else(|| panic!("Cargo.toml has no [profile.{profile}]"));
    assert_eq!(
        p.get("inherits").and_then(|v| v.as_str()),
        Some("release"),
        "[profile.{profile}]"
    );
    assert!(
        matches!(
            p.get("debug"),
            Some(toml::Value::Integer(0)) | Some(toml::Value::Boolean(false))
        ),
        "[profile.{profile}] debug should be 0: {p:?}"
    );
    assert_eq!(
        p.get("strip").and_then(|v| v.as_bool()),
        Some(true),
        "[profile.{profile}] strip"
    );
    // Every RUN that builds uses the same profile (the dummy build caches that profile's deps).
    for r in build.all("RUN") {
        if r.args.contains("cargo build") {
            assert!(
                r.args.contains(&format!("--profile {profile}")),
                "every cargo build in the Dockerfile should use --profile {profile}: {}",
                r.args
            );
        }
    }

    // The runtime stage gets the binary of that profile from the build stage.
    let bin = runtime
        .copies()
        .into_iter()
        .find(|(from, _, _)| from.as_deref() == Some(build_name.as_str()))
        .expect("the runtime stage copies the binary from the build stage");
    assert!(
        bin.1
            .iter()
            .any(|s| s.ends_with(&format!("target/{profile}/redfuse"))),
        "the runtime stage should copy target/{profile}/redfuse: {bin:?}"
    );
    let command = runtime.command();
    assert_eq!(
        command.first().map(String::as_str),
        Some(bin.2.as_str()),
        "ENTRYPOINT should run the copied binary"
    );

    // Non-root, numerically.
    let user = runtime.last("USER").expect("the runtime stage sets USER");
    let uid = user.args.split(':').next().unwrap();
    let uid: u32 = uid
        .parse()
        .unwrap_or_else(|_| panic!("USER should be numeric (uid[:gid]), not {}", user.args));
    assert_ne!(uid, 0, "USER must not be root");

    // The environment: config path, listeners on all interfaces.
    let env: BTreeMap<String, String> = runtime.env().into_iter().collect();
    let config = env.get("REDFUSE_CONFIG").expect("ENV REDFUSE_CONFIG");
    assert_eq!(config, "/etc/redfuse/redfuse.toml");
    let source = image_file_source(runtime, config);
    assert!(source.is_file(), "{} is missing", source.display());
    let listen = env.get("REDFUSE_LISTEN").expect("ENV REDFUSE_LISTEN");
    let admin = env
        .get("REDFUSE_ADMIN_LISTEN")
        .expect("ENV REDFUSE_ADMIN_LISTEN");
    assert_eq!(host_of(listen), "0.0.0.0", "REDFUSE_LISTEN");
    assert_eq!(host_of(admin), "0.0.0.0", "REDFUSE_ADMIN_LISTEN");

    let exposed: BTreeSet<u16> = runtime
        .all("EXPOSE")
        .iter()
        .flat_map(|i| i.args.split_whitespace())
        .map(|p| p.trim_end_matches("/tcp").parse().expect("EXPOSE port"))
        .collect();
    assert_eq!(
        exposed,
        BTreeSet::from([port_of(listen), port_of(admin)]),
        "EXPOSE should list the client and admin ports"
    );
    assert_eq!(
        runtime.last("STOPSIGNAL").map(|i| i.args.as_str()),
        Some("SIGTERM")
    );

    // .dockerignore is an allow-list that lets every COPY source through.
    let ignore = read(".dockerignore");
    let lines: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert_eq!(
        lines.first(),
        Some(&"*"),
        ".dockerignore should start with `*` (allow-list)"
    );
    let allowed: Vec<&str> = lines
        .iter()
        .filter_map(|l| l.strip_prefix('!'))
        .map(|l| l.trim_end_matches('/'))
        .collect();
    for st in &stages {
        for (from, srcs, _) in st.copies() {
            if from.is_some() {
                continue;
            }
            for src in srcs {
                let src = src.trim_end_matches('/');
                assert!(
                    allowed
                        .iter()
                        .any(|a| src == *a || src.starts_with(&format!("{a}/"))),
                    "COPY {src}: not let through by .dockerignore ({allowed:?})"
                );
                assert!(repo().join(src).exists(), "COPY {src}: no such file");
            }
        }
    }
}

/// Builds redfuse exactly as the image does (same cargo arguments), returns the binary.
fn build_image_binary(args: &[String]) -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let manifest = repo().join("Cargo.toml");
    let started = Instant::now();
    // nice: the build shares the machine with the other tests' bounded waits.
    let o = Command::new("nice")
        .args(["-n", "10"])
        .arg(&cargo)
        .arg("build")
        .args(args)
        .arg("--manifest-path")
        .arg(&manifest)
        .arg("--message-format=json-render-diagnostics")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cargo}: {e}"));
    assert!(
        o.status.success(),
        "cargo build {args:?} failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    eprintln!(
        "cargo build {args:?}: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "redfuse")
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .expect("cargo reported no redfuse executable")
}

/// Section names of a little-endian ELF64 file.
fn elf_section_names(b: &[u8]) -> Vec<String> {
    assert!(
        b.len() > 64 && &b[..4] == b"\x7fELF" && b[4] == 2 && b[5] == 1,
        "not an ELF64 LE file"
    );
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap()) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap()) as usize;
    let (shoff, shentsize, shnum, shstrndx) =
        (u64_at(0x28), u16_at(0x3A), u16_at(0x3C), u16_at(0x3E));
    let header = |i: usize| shoff + i * shentsize;
    let strtab = u64_at(header(shstrndx) + 0x18);
    (0..shnum)
        .map(|i| {
            let name = strtab + u32_at(header(i));
            let end = b[name..].iter().position(|&c| c == 0).unwrap() + name;
            String::from_utf8_lossy(&b[name..end]).into_owned()
        })
        .collect()
}

/// A child process (any binary) whose stdout and stderr lines are collected; killed on drop.
/// Inherited `REDFUSE_*` and `RUST_LOG` variables are removed, so only `env` applies.
struct Proc {
    child: std::process::Child,
    logs: std::sync::Arc<Mutex<Vec<String>>>,
}

impl Proc {
    fn spawn(bin: &Path, args: &[String], env: &[(String, String)]) -> Proc {
        use std::io::BufRead;
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, _) in std::env::vars() {
            if k.starts_with("REDFUSE_") || k == "RUST_LOG" {
                cmd.env_remove(k);
            }
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
        let logs = std::sync::Arc::new(Mutex::new(Vec::new()));
        for r in [
            Box::new(child.stderr.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stdout.take().unwrap()),
        ] {
            let logs = logs.clone();
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(r).lines() {
                    let Ok(line) = line else { break };
                    logs.lock().unwrap().push(line);
                }
            });
        }
        Proc { child, logs }
    }

    fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn image_binary_serves_with_the_images_environment_and_config() {
    let _turn = heavy();
    let stages = dockerfile();
    let runtime = stages.last().unwrap();
    let args = image_cargo_args(&stages[0]);
    let bin = build_image_binary(&args);
    let profile = profile_of(&args);
    assert!(
        bin.ends_with(format!("{profile}/redfuse")),
        "{} is not the {profile} profile's binary",
        bin.display()
    );
    // Stripped, without debug info.
    let sections = elf_section_names(&std::fs::read(&bin).unwrap());
    assert!(sections.iter().any(|s| s == ".text"), "{sections:?}");
    for s in &sections {
        assert!(
            !s.starts_with(".debug_") && s != ".symtab",
            "{} still has a {s} section: the image profile should strip it ({sections:?})",
            bin.display()
        );
    }

    // Exactly the image's environment; only the ports change (and the config path, which is
    // the file the image copies there).
    let image_env = runtime.env();
    let mut env = Vec::new();
    let mut client_port = 0;
    let mut admin_port = 0;
    for (k, v) in &image_env {
        let v = match k.as_str() {
            "REDFUSE_LISTEN" => {
                client_port = free_port();
                format!("{}:{client_port}", host_of(v))
            }
            "REDFUSE_ADMIN_LISTEN" => {
                admin_port = free_port();
                format!("{}:{admin_port}", host_of(v))
            }
            "REDFUSE_CONFIG" => image_file_source(runtime, v).to_string_lossy().into_owned(),
            _ => v.clone(),
        };
        env.push((k.clone(), v));
    }
    assert!(client_port != 0 && admin_port != 0, "{image_env:?}");
    let command = runtime.command();
    let p = Proc::spawn(&bin, &command[1..], &env);
    let listening = wait_until(secs(20), || {
        p.logs().lines().any(|l| {
            l.contains("listening")
                && log_field(l, "client_addr").as_deref()
                    == Some(format!("0.0.0.0:{client_port}").as_str())
                && log_field(l, "admin_addr").as_deref()
                    == Some(format!("0.0.0.0:{admin_port}").as_str())
        })
    });
    assert!(
        listening,
        "redfuse with the image's environment {env:?} did not log `listening` on 0.0.0.0; \
         output:\n{}",
        p.logs()
    );
    // The image's config asks for JSON logs: every line is a JSON object.
    for line in p.logs().lines() {
        assert!(
            serde_json::from_str::<Value>(line).is_ok(),
            "the image logs JSON (log_format in its config), got: {line}"
        );
    }
    let admin = format!("127.0.0.1:{admin_port}");
    let (status, body) = http_get(&admin, "/healthz");
    assert_eq!(status, 200, "/healthz: {body}");
    let (status, body) = http_get(&admin, "/ready");
    assert_eq!(status, 200, "/ready: {body}");
    let (status, metrics) = http_get(&admin, "/metrics");
    assert_eq!(status, 200);
    assert!(
        metric_exists(&metrics, "redfuse_breaker_state"),
        "{metrics}"
    );
    // The client port speaks RESP (the image's upstream, redis:6379, does not resolve here:
    // any reply will do, local or an error naming the upstream).
    let mut c = RawClient::connect(&format!("127.0.0.1:{client_port}"));
    c.send_cmd(&["PING"]);
    let reply = c
        .try_read_frame(secs(10))
        .unwrap_or_else(|e| panic!("PING through the image's client port: {e:?}"));
    assert!(
        reply == b"+PONG\r\n" || reply.starts_with(b"-ERR redfuse"),
        "PING: {}",
        esc(&reply)
    );
    drop(c);

    // STOPSIGNAL: the image's stop signal ends it cleanly.
    let sig = runtime.last("STOPSIGNAL").unwrap().args.clone();
    let mut p = p;
    let st = Command::new("kill")
        .arg(format!("-{}", sig.trim_start_matches("SIG")))
        .arg(p.child.id().to_string())
        .status()
        .unwrap();
    assert!(st.success());
    let exited = wait_until(secs(15), || matches!(p.child.try_wait(), Ok(Some(_))));
    assert!(exited, "redfuse did not exit on {sig}:\n{}", p.logs());
    let status = p.child.wait().unwrap();
    assert!(
        status.success(),
        "exit on {sig}: {status}; output:\n{}",
        p.logs()
    );
}

// ---------------------------------------------------------------------------------------
// Flags and environment variables
// ---------------------------------------------------------------------------------------

struct Help {
    flags: BTreeSet<String>,
    env: BTreeSet<String>,
}

/// The flags and `[env: REDFUSE_...]` variables the binary documents in `--help`.
fn help() -> Help {
    let o = run_redfuse(&["--help"], &[], secs(10));
    assert!(o.status.success(), "redfuse --help: {}", out_text(&o));
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    let mut flags = BTreeSet::new();
    let mut env = BTreeSet::new();
    for line in text.lines() {
        let t = line.trim_start();
        for w in t.split([' ', ',', '[', ']', '=', '<', '>']) {
            if let Some(f) = w.strip_prefix("--")
                && !f.is_empty()
                && t.starts_with('-')
            {
                flags.insert(format!("--{f}"));
            }
            if w.starts_with("REDFUSE_") {
                env.insert(w.to_string());
            }
        }
    }
    assert!(
        flags.len() >= 10 && flags.contains("--upstream") && env.contains("REDFUSE_LISTEN"),
        "could not read flags and env vars from --help:\n{text}"
    );
    Help { flags, env }
}

/// `REDFUSE_*` names anywhere in a text.
fn redfuse_env_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("REDFUSE_") {
        let name: String = rest[i..]
            .chars()
            .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        // `REDFUSE_<NAME>` and `REDFUSE_*` in prose are patterns, not variables.
        if !name.ends_with('_') {
            out.insert(name.clone());
        }
        rest = &rest[i + name.len()..];
    }
    out
}

/// Flags among a redfuse command line (`--flag` or `--flag=value`).
fn flags_in(args: &[String]) -> Vec<String> {
    args.iter()
        .filter(|a| a.starts_with("--"))
        .map(|a| a.split('=').next().unwrap().to_string())
        .collect()
}

/// Kubernetes workloads' containers (init and regular) that run the redfuse image.
fn redfuse_containers(doc: &Value) -> Vec<(&'static str, Value)> {
    let spec = &doc["spec"]["template"]["spec"];
    let mut out = Vec::new();
    for (kind, list) in [
        ("initContainers", &spec["initContainers"]),
        ("containers", &spec["containers"]),
    ] {
        if let Some(list) = list.as_array() {
            for c in list {
                if c["image"].as_str().is_some_and(|i| i.contains("redfuse")) {
                    out.push((kind, c.clone()));
                }
            }
        }
    }
    out
}

fn kubernetes_docs() -> Vec<(PathBuf, Value)> {
    let files = files_under("deploy/kubernetes", &["yaml", "yml"]);
    assert!(!files.is_empty(), "no manifests under deploy/kubernetes");
    files
        .into_iter()
        .flat_map(|f| yaml_docs(&f).into_iter().map(move |d| (f.clone(), d)))
        .collect()
}

#[test]
fn every_flag_and_env_var_the_artifacts_use_exists() {
    let help = help();
    // (where, name)
    let mut envs: Vec<(String, String)> = Vec::new();
    let mut flags: Vec<(String, String)> = Vec::new();

    // Dockerfile: ENV and the command line.
    let stages = dockerfile();
    let runtime = stages.last().unwrap();
    for (k, _) in runtime.env() {
        envs.push(("Dockerfile ENV".into(), k));
    }
    for f in flags_in(&runtime.command()) {
        flags.push(("Dockerfile ENTRYPOINT/CMD".into(), f));
    }

    // docker-compose.yml: the service built from this repo.
    let compose = yaml_doc("docker-compose.yml");
    let services = compose["services"].as_object().expect("compose services");
    let mut saw_redfuse = false;
    for (name, svc) in services {
        let is_redfuse = svc.get("build").is_some()
            || svc["image"].as_str().is_some_and(|i| i.contains("redfuse"));
        if !is_redfuse {
            continue;
        }
        saw_redfuse = true;
        match &svc["environment"] {
            Value::Object(m) => {
                for k in m.keys() {
                    envs.push((format!("compose {name}"), k.clone()));
                }
            }
            Value::Array(a) => {
                for kv in a {
                    let k = s(kv, "environment").split('=').next().unwrap();
                    envs.push((format!("compose {name}"), k.to_string()));
                }
            }
            _ => {}
        }
        for key in ["command", "entrypoint"] {
            if let Some(list) = svc[key].as_array() {
                let args: Vec<String> = list.iter().map(|v| s(v, key).to_string()).collect();
                for f in flags_in(&args) {
                    flags.push((format!("compose {name} {key}"), f));
                }
            }
        }
    }
    assert!(saw_redfuse, "docker-compose.yml has no redfuse service");

    // Kubernetes: every container running the redfuse image.
    let mut k8s_containers = 0;
    for (file, doc) in kubernetes_docs() {
        for (_, c) in redfuse_containers(&doc) {
            k8s_containers += 1;
            let at = format!("{} container {}", rel(&file), c["name"]);
            for e in c["env"].as_array().into_iter().flatten() {
                envs.push((at.clone(), s(&e["name"], "env name").to_string()));
            }
            for key in ["command", "args"] {
                if let Some(list) = c[key].as_array() {
                    let args: Vec<String> = list.iter().map(|v| s(v, key).to_string()).collect();
                    for f in flags_in(&args) {
                        flags.push((at.clone(), f));
                    }
                }
            }
        }
    }
    assert!(
        k8s_containers >= 2,
        "expected redfuse containers in both Deployment variants"
    );

    // Any REDFUSE_* name mentioned in any artifact (READMEs, comments, scripts) too.
    let mut texts = vec![PathBuf::from("Dockerfile"), "docker-compose.yml".into()];
    texts.extend(files_under(
        "deploy",
        &["yaml", "yml", "toml", "md", "sh", "json"],
    ));
    for f in texts {
        let text = std::fs::read_to_string(repo().join(&f)).unwrap();
        for name in redfuse_env_names(&text) {
            envs.push((rel(&repo().join(&f)), name));
        }
    }

    let mut missing = Vec::new();
    for (at, name) in &envs {
        if name.starts_with("REDFUSE_") && !help.env.contains(name) {
            missing.push(format!("{at}: env {name}"));
        }
    }
    for (at, flag) in &flags {
        if !help.flags.contains(flag) {
            missing.push(format!("{at}: flag {flag}"));
        }
    }
    assert!(
        missing.is_empty(),
        "used by the deployment artifacts but unknown to `redfuse --help`:\n  {}\n\
         known flags: {:?}\nknown env: {:?}",
        missing.join("\n  "),
        help.flags,
        help.env
    );
    assert!(
        envs.iter().any(|(_, n)| n == "REDFUSE_PASSWORD"),
        "nothing passes REDFUSE_PASSWORD"
    );
}

// ---------------------------------------------------------------------------------------
// Configuration files
// ---------------------------------------------------------------------------------------

/// Every redfuse TOML among the artifacts: (name, contents).
fn artifact_configs() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for f in files_under("deploy", &["toml"]) {
        out.push((rel(&f), std::fs::read_to_string(&f).unwrap()));
    }
    for (file, doc) in kubernetes_docs() {
        if doc["kind"] == "ConfigMap" {
            for (k, v) in doc["data"].as_object().into_iter().flatten() {
                if k.ends_with(".toml") {
                    out.push((
                        format!(
                            "{} ConfigMap {} key {k}",
                            rel(&file),
                            doc["metadata"]["name"]
                        ),
                        s(v, k).to_string(),
                    ));
                }
            }
        }
    }
    out.push(("config/redfuse.toml".into(), read("config/redfuse.toml")));
    out
}

fn check_config(text: &str) -> Output {
    let dir = TempDir::new("deploy-config");
    let path = dir.write("redfuse.toml", text);
    run_redfuse(&["--check-config", &path.to_string_lossy()], &[], secs(10))
}

#[test]
fn every_config_file_passes_check_config() {
    let configs = artifact_configs();
    let names: Vec<&str> = configs.iter().map(|(n, _)| n.as_str()).collect();
    assert!(
        names.iter().any(|n| n.contains("ConfigMap"))
            && names.iter().any(|n| n.starts_with("deploy/docker/"))
            && names.iter().any(|n| n.starts_with("deploy/compose/")),
        "expected the image's, the compose demo's and the ConfigMap's configs: {names:?}"
    );
    for (name, text) in &configs {
        let o = check_config(text);
        assert!(
            o.status.success(),
            "redfuse --check-config rejects {name}:\n{}",
            out_text(&o)
        );
    }
    // The check can fail: a misspelled key is rejected, naming it.
    let o = check_config("log_levl = \"info\"\n");
    assert_eq!(o.status.code(), Some(2), "{}", out_text(&o));
    assert!(out_text(&o).contains("log_levl"), "{}", out_text(&o));

    // The files mounted over the image's config exist and are the ones checked above.
    let compose = yaml_doc("docker-compose.yml");
    for (name, svc) in compose["services"].as_object().unwrap() {
        for v in svc["volumes"].as_array().into_iter().flatten() {
            let v = s(v, "volume");
            let src = v.split(':').next().unwrap();
            if src.starts_with("./") {
                assert!(
                    repo().join(src).exists(),
                    "compose {name} mounts {src}, which does not exist"
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Kubernetes
// ---------------------------------------------------------------------------------------

#[test]
fn kubernetes_manifests_validate_against_the_schemas() {
    python_with("kubernetes_validate");
    let files = files_under("deploy/kubernetes", &["yaml", "yml"]);
    let names: Vec<String> = files
        .iter()
        .map(|f| f.to_string_lossy().into_owned())
        .collect();
    let mut resources = 0;
    let mut crds = 0;
    for (_, doc) in kubernetes_docs() {
        if s(&doc["apiVersion"], "apiVersion").contains(".coreos.com/") {
            crds += 1;
        } else {
            resources += 1;
        }
    }
    for version in K8S_VERSIONS {
        let mut args = vec!["-m", "kubernetes_validate", "--strict", "-k", version];
        args.extend(names.iter().map(String::as_str));
        let o = run_tool("python3", &args, None);
        let text = out_text(&o);
        assert!(
            o.status.success() && !text.contains("ERROR"),
            "kubernetes-validate --strict -k {version} failed:\n{text}"
        );
        let passed = text.matches(" passed for resource ").count();
        assert_eq!(
            passed, resources,
            "every built-in resource should be validated against {version}:\n{text}"
        );
        // CRDs have no schema in kubernetes-validate: it warns, and the structure is checked
        // in `kubernetes_sidecar_wiring` below.
        assert_eq!(
            text.matches("Couldn't find schema").count(),
            crds,
            "only the CRDs (ServiceMonitor) may lack a schema:\n{text}"
        );
    }
    // Negative control: the validator rejects a misspelled field.
    let native = read("deploy/kubernetes/deployment-native-sidecar.yaml");
    let bad = native.replacen("periodSeconds:", "periodSecondz:", 1);
    assert_ne!(bad, native);
    let dir = TempDir::new("deploy-k8s");
    let path = dir.write("bad.yaml", &bad);
    let o = run_tool(
        "python3",
        &[
            "-m",
            "kubernetes_validate",
            "--strict",
            "-k",
            K8S_VERSIONS[0],
            &path.to_string_lossy(),
        ],
        None,
    );
    assert!(
        !o.status.success(),
        "kubernetes-validate accepted a misspelled field:\n{}",
        out_text(&o)
    );
}

/// Bytes of a Kubernetes memory quantity (`128Mi`, `1Gi`, `500M`, `1048576`).
fn quantity_bytes(q: &str) -> u64 {
    let units: [(&str, u64); 8] = [
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("k", 1000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
    ];
    for (u, m) in units {
        if let Some(n) = q.strip_suffix(u) {
            return n.parse::<u64>().expect("quantity") * m;
        }
    }
    q.parse().unwrap_or_else(|_| panic!("memory quantity {q}"))
}

fn env_value<'a>(c: &'a Value, name: &str) -> Option<&'a Value> {
    c["env"].as_array()?.iter().find(|e| e["name"] == name)
}

#[test]
fn kubernetes_sidecar_wiring() {
    let docs = kubernetes_docs();
    let find = |kind: &str| -> Vec<&(PathBuf, Value)> {
        docs.iter().filter(|(_, d)| d["kind"] == kind).collect()
    };
    let stages = dockerfile();
    let runtime = stages.last().unwrap();
    let image_env: BTreeMap<String, String> = runtime.env().into_iter().collect();
    let image_uid: i64 = runtime
        .last("USER")
        .unwrap()
        .args
        .split(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();

    let configmaps = find("ConfigMap");
    assert_eq!(configmaps.len(), 1, "one ConfigMap");
    let cm = &configmaps[0].1;
    let cm_name = s(&cm["metadata"]["name"], "ConfigMap name");
    let toml_text = s(&cm["data"]["redfuse.toml"], "ConfigMap data redfuse.toml");
    let config: toml::Table = toml::from_str(toml_text).expect("ConfigMap redfuse.toml");
    let int = |section: Option<&str>, key: &str, default: i64| -> i64 {
        let t = match section {
            Some(sec) => config.get(sec).and_then(|v| v.as_table()),
            None => Some(&config),
        };
        t.and_then(|t| t.get(key))
            .and_then(|v| v.as_integer())
            .unwrap_or(default)
    };
    let shutdown_ms = int(None, "shutdown_timeout_ms", 10_000);
    let cache_bytes = int(Some("cache"), "max_bytes", 64 << 20) as u64;
    let queue_bytes = int(Some("write_queue"), "max_bytes", 16 << 20) as u64;
    assert!(
        config.get("listen").is_none() && config.get("admin_listen").is_none(),
        "the pod's listeners are set by env in the Deployments, not in the ConfigMap"
    );
    assert!(
        config.get("password").is_none(),
        "the password belongs in the Secret"
    );

    let secrets = find("Secret");
    assert_eq!(secrets.len(), 1, "one Secret");
    let secret = &secrets[0].1;
    let secret_name = s(&secret["metadata"]["name"], "Secret name");
    let secret_keys: BTreeSet<String> = ["data", "stringData"]
        .iter()
        .flat_map(|k| {
            secret[*k]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, _)| k.clone())
        })
        .collect();

    let deployments = find("Deployment");
    assert_eq!(
        deployments.len(),
        2,
        "a native and a classic sidecar Deployment"
    );
    let mut variants = BTreeMap::new();
    let mut sidecars = Vec::new();
    let mut pod_labels = Vec::new();
    for (file, d) in &deployments {
        let at = rel(file);
        let pod = &d["spec"]["template"];
        let spec = &pod["spec"];
        let sel = d["spec"]["selector"]["matchLabels"]
            .as_object()
            .expect("selector");
        for (k, v) in sel {
            assert_eq!(
                &pod["metadata"]["labels"][k], v,
                "{at}: selector vs pod labels"
            );
        }
        pod_labels.push(pod["metadata"]["labels"].clone());
        let containers = redfuse_containers(d);
        assert_eq!(containers.len(), 1, "{at}: one redfuse container");
        let (kind, c) = &containers[0];
        let app = arr(&spec["containers"], "containers")
            .iter()
            .find(|c| c["name"] != "redfuse")
            .unwrap_or_else(|| panic!("{at}: an application container"));
        let app_env = serde_json::to_string(&app["env"]).unwrap();
        assert!(
            app_env.contains("127.0.0.1:6380"),
            "{at}: the app should reach redfuse on 127.0.0.1:6380"
        );
        let pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"].as_i64();
        if *kind == "initContainers" {
            assert_eq!(
                c["restartPolicy"], "Always",
                "{at}: a native sidecar restarts always"
            );
            variants.insert("native", at.clone());
        } else {
            let secs = pre_stop.unwrap_or_else(|| {
                panic!("{at}: a classic sidecar needs a preStop pause to let the app finish")
            });
            assert!(secs >= 1, "{at}: preStop sleep {secs}");
            variants.insert("classic", at.clone());
        }
        // Listeners: clients on loopback only, admin on the pod IP.
        let get = |name: &str| -> String {
            env_value(c, name)
                .and_then(|e| e["value"].as_str())
                .map(str::to_string)
                .or_else(|| image_env.get(name).cloned())
                .unwrap_or_else(|| panic!("{at}: {name} is neither set nor in the image"))
        };
        let listen = get("REDFUSE_LISTEN");
        let admin = get("REDFUSE_ADMIN_LISTEN");
        assert_eq!(listen, "127.0.0.1:6380", "{at}: REDFUSE_LISTEN");
        assert_eq!(host_of(&admin), "0.0.0.0", "{at}: REDFUSE_ADMIN_LISTEN");
        let admin_port = port_of(&admin) as i64;
        // Password from the Secret.
        let pw =
            env_value(c, "REDFUSE_PASSWORD").unwrap_or_else(|| panic!("{at}: REDFUSE_PASSWORD"));
        let r = &pw["valueFrom"]["secretKeyRef"];
        assert_eq!(r["name"], secret_name, "{at}: REDFUSE_PASSWORD's Secret");
        assert!(
            secret_keys.contains(s(&r["key"], "secretKeyRef.key")),
            "{at}: the Secret has no key {}",
            r["key"]
        );
        // Config from the ConfigMap, where REDFUSE_CONFIG points.
        let config_path = get("REDFUSE_CONFIG");
        let (dir, file) = config_path.rsplit_once('/').unwrap();
        let mount = arr(&c["volumeMounts"], "volumeMounts")
            .iter()
            .find(|m| m["mountPath"] == dir || m["mountPath"] == config_path.as_str())
            .unwrap_or_else(|| panic!("{at}: nothing mounted at {dir}"));
        let volume = arr(&spec["volumes"], "volumes")
            .iter()
            .find(|v| v["name"] == mount["name"])
            .unwrap_or_else(|| panic!("{at}: volume {}", mount["name"]));
        assert_eq!(volume["configMap"]["name"], cm_name, "{at}: config volume");
        assert!(
            cm["data"].get(file).is_some(),
            "{at}: the ConfigMap has no {file}"
        );
        // Probes on the admin port.
        for (probe, path) in [
            ("startupProbe", "/healthz"),
            ("livenessProbe", "/healthz"),
            ("readinessProbe", "/ready"),
        ] {
            let h = &c[probe]["httpGet"];
            assert_eq!(h["path"], path, "{at}: {probe} path");
            assert_eq!(h["port"].as_i64(), Some(admin_port), "{at}: {probe} port");
        }
        let ports: Vec<i64> = arr(&c["ports"], "ports")
            .iter()
            .filter_map(|p| p["containerPort"].as_i64())
            .collect();
        assert!(
            ports.contains(&admin_port),
            "{at}: containerPort {admin_port}"
        );
        // Scrape annotations.
        let ann = &pod["metadata"]["annotations"];
        assert_eq!(ann["prometheus.io/scrape"], "true", "{at}");
        assert_eq!(ann["prometheus.io/port"], admin_port.to_string(), "{at}");
        assert_eq!(ann["prometheus.io/path"], "/metrics", "{at}");
        // Grace period above the preStop pause plus the drain deadline.
        let grace = spec["terminationGracePeriodSeconds"]
            .as_i64()
            .unwrap_or_else(|| panic!("{at}: terminationGracePeriodSeconds"));
        let needed_ms = pre_stop.unwrap_or(0) * 1000 + shutdown_ms;
        assert!(
            grace * 1000 > needed_ms,
            "{at}: terminationGracePeriodSeconds {grace} s must exceed preStop + \
             shutdown_timeout_ms ({needed_ms} ms)"
        );
        // Memory from the caps.
        let res = &c["resources"];
        let request = quantity_bytes(s(&res["requests"]["memory"], "memory request"));
        let limit = quantity_bytes(s(&res["limits"]["memory"], "memory limit"));
        let needed = cache_bytes + queue_bytes + BASE_MEMORY;
        assert!(
            request >= needed,
            "{at}: memory request {request} below cache {cache_bytes} + write queue \
             {queue_bytes} + {BASE_MEMORY}"
        );
        assert!(limit >= request, "{at}: memory limit below the request");
        assert!(res["requests"]["cpu"].is_string(), "{at}: cpu request");
        // Unprivileged, as the image.
        let sc = &c["securityContext"];
        assert_eq!(sc["runAsNonRoot"], true, "{at}");
        assert_eq!(
            sc["runAsUser"].as_i64(),
            Some(image_uid),
            "{at}: runAsUser vs Dockerfile USER"
        );
        assert_eq!(sc["readOnlyRootFilesystem"], true, "{at}");
        assert_eq!(sc["allowPrivilegeEscalation"], false, "{at}");

        let mut same = c.clone();
        let o = same.as_object_mut().unwrap();
        o.remove("restartPolicy");
        o.remove("lifecycle");
        sidecars.push((at, same));
    }
    assert_eq!(variants.len(), 2, "one native, one classic: {variants:?}");
    assert_eq!(
        sidecars[0].1, sidecars[1].1,
        "the redfuse container should be the same in {} and {} (but for restartPolicy and \
         lifecycle)",
        sidecars[0].0, sidecars[1].0
    );

    // Service -> pods of both variants; ServiceMonitor -> Service port.
    let services = find("Service");
    assert_eq!(services.len(), 1, "one Service");
    let svc = &services[0].1;
    let sel = svc["spec"]["selector"]
        .as_object()
        .expect("Service selector");
    for labels in &pod_labels {
        for (k, v) in sel {
            assert_eq!(&labels[k], v, "Service selector {k} vs pod labels {labels}");
        }
    }
    let admin_port_name;
    {
        let ports = arr(&svc["spec"]["ports"], "Service ports");
        let p = ports
            .iter()
            .find(|p| p["targetPort"].as_i64() == Some(9380))
            .expect(
                "a Service port targeting 9380 by number (named ports of native sidecars \
                     resolve only from Kubernetes 1.32)",
            );
        admin_port_name = s(&p["name"], "Service port name").to_string();
    }
    let monitors = find("ServiceMonitor");
    assert_eq!(monitors.len(), 1, "one ServiceMonitor");
    let sm = &monitors[0].1;
    // Structure of monitoring.coreos.com/v1 ServiceMonitor (no schema offline).
    assert_eq!(sm["apiVersion"], "monitoring.coreos.com/v1");
    assert!(sm["metadata"]["name"].is_string());
    let allowed_spec: BTreeSet<&str> = [
        "selector",
        "endpoints",
        "namespaceSelector",
        "jobLabel",
        "targetLabels",
        "podTargetLabels",
        "sampleLimit",
    ]
    .into();
    for k in sm["spec"].as_object().expect("spec").keys() {
        assert!(
            allowed_spec.contains(k.as_str()),
            "ServiceMonitor spec.{k} is not a field"
        );
    }
    let svc_labels = &svc["metadata"]["labels"];
    for (k, v) in sm["spec"]["selector"]["matchLabels"]
        .as_object()
        .expect("ServiceMonitor selector.matchLabels")
    {
        assert_eq!(
            &svc_labels[k], v,
            "ServiceMonitor selects Service label {k}"
        );
    }
    let endpoints = arr(&sm["spec"]["endpoints"], "endpoints");
    assert!(!endpoints.is_empty());
    let allowed_ep: BTreeSet<&str> = [
        "port",
        "targetPort",
        "path",
        "scheme",
        "interval",
        "scrapeTimeout",
        "honorLabels",
        "relabelings",
        "metricRelabelings",
    ]
    .into();
    for ep in endpoints {
        for k in ep.as_object().expect("endpoint").keys() {
            assert!(
                allowed_ep.contains(k.as_str()),
                "ServiceMonitor endpoint field {k}"
            );
        }
        assert_eq!(
            ep["port"],
            admin_port_name.as_str(),
            "endpoint port: the Service port name"
        );
        assert_eq!(ep["path"], "/metrics");
        for d in ["interval", "scrapeTimeout"] {
            if let Some(v) = ep[d].as_str() {
                assert!(
                    v.ends_with('s') && v[..v.len() - 1].parse::<u32>().is_ok(),
                    "endpoint {d} `{v}` is not a duration"
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Prometheus rules and the dashboard
// ---------------------------------------------------------------------------------------

#[test]
fn promtool_checks_and_unit_tests_the_rules() {
    let dir = repo().join("deploy/prometheus");
    for args in [
        vec!["check", "rules", "alerts.yml"],
        vec!["check", "config", "prometheus.yml"],
        vec!["test", "rules", "alerts_test.yml"],
    ] {
        let o = run_tool("promtool", &args, Some(&dir));
        assert!(
            o.status.success(),
            "promtool {} failed:\n{}",
            args.join(" "),
            out_text(&o)
        );
    }
    // Every alert in alerts.yml has a unit test.
    let rules = yaml_doc("deploy/prometheus/alerts.yml");
    let tests = read("deploy/prometheus/alerts_test.yml");
    for g in arr(&rules["groups"], "groups") {
        for r in arr(&g["rules"], "rules") {
            let name = s(&r["alert"], "alert");
            assert!(
                tests.contains(&format!("alertname: {name}\n")),
                "{name} has no test in alerts_test.yml"
            );
        }
    }
}

/// A metric selector found in PromQL: name and `label op value` matchers.
#[derive(Debug, Clone)]
struct Selector {
    name: String,
    matchers: Vec<(String, String, String)>,
}

/// Metric selectors and grouping labels (`by`, `without`, `on`, `ignoring`, `group_*`) of a
/// PromQL expression. Functions, keywords, strings, numbers, durations, ranges and Grafana
/// variables (`$x`) are skipped.
fn promql(expr: &str) -> (Vec<Selector>, Vec<String>) {
    const GROUPING: [&str; 6] = [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    const KEYWORDS: [&str; 8] = [
        "and", "or", "unless", "bool", "offset", "inf", "nan", "atan2",
    ];
    // Aggregations may put their `by (...)` before the parenthesis: `sum by (x) (...)`.
    const AGGREGATIONS: [&str; 14] = [
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
    ];
    let c: Vec<char> = expr.chars().collect();
    let mut i = 0;
    let mut sels = Vec::new();
    let mut groups = Vec::new();
    let skip_ws = |i: &mut usize| {
        while *i < c.len() && c[*i].is_whitespace() {
            *i += 1;
        }
    };
    let read_string = |i: &mut usize| -> String {
        let q = c[*i];
        *i += 1;
        let mut out = String::new();
        while *i < c.len() && c[*i] != q {
            if c[*i] == '\\' && *i + 1 < c.len() {
                *i += 1;
            }
            out.push(c[*i]);
            *i += 1;
        }
        *i += 1;
        out
    };
    let is_ident_start = |ch: char| ch.is_ascii_alphabetic() || ch == '_' || ch == ':';
    let is_ident = |ch: char| ch.is_ascii_alphanumeric() || ch == '_' || ch == ':';
    while i < c.len() {
        let ch = c[i];
        if ch == '"' || ch == '\'' || ch == '`' {
            read_string(&mut i);
        } else if ch == '#' {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if ch == '[' {
            while i < c.len() && c[i] != ']' {
                i += 1;
            }
            i += 1;
        } else if ch == '$' {
            i += 1;
            if i < c.len() && c[i] == '{' {
                while i < c.len() && c[i] != '}' {
                    i += 1;
                }
                i += 1;
            } else {
                while i < c.len() && is_ident(c[i]) {
                    i += 1;
                }
            }
        } else if ch.is_ascii_digit() || ch == '.' {
            while i < c.len() && (c[i].is_ascii_alphanumeric() || c[i] == '.') {
                i += 1;
            }
        } else if ch == '{' {
            // A selector without a metric name: {__name__="..."}.
            panic!("selectors without a metric name are not supported here: {expr}");
        } else if is_ident_start(ch) {
            let start = i;
            while i < c.len() && is_ident(c[i]) {
                i += 1;
            }
            let word: String = c[start..i].iter().collect();
            let mut j = i;
            skip_ws(&mut j);
            let next = c.get(j).copied();
            let lower = word.to_ascii_lowercase();
            if GROUPING.contains(&lower.as_str()) {
                if next == Some('(') {
                    let close = c[j..].iter().position(|&x| x == ')').unwrap() + j;
                    let list: String = c[j + 1..close].iter().collect();
                    groups.extend(
                        list.split(',')
                            .map(|l| l.trim().to_string())
                            .filter(|l| !l.is_empty()),
                    );
                    i = close + 1;
                }
            } else if KEYWORDS.contains(&lower.as_str())
                || AGGREGATIONS.contains(&lower.as_str())
                || next == Some('(')
            {
                // keyword, or a function / aggregation call
            } else {
                let mut matchers = Vec::new();
                if next == Some('{') {
                    i = j + 1;
                    loop {
                        skip_ws(&mut i);
                        if i >= c.len() {
                            panic!("unterminated selector in {expr}");
                        }
                        if c[i] == '}' {
                            i += 1;
                            break;
                        }
                        if c[i] == ',' {
                            i += 1;
                            continue;
                        }
                        let ls = i;
                        while i < c.len() && is_ident(c[i]) {
                            i += 1;
                        }
                        let label: String = c[ls..i].iter().collect();
                        skip_ws(&mut i);
                        let os = i;
                        while i < c.len() && matches!(c[i], '=' | '!' | '~') {
                            i += 1;
                        }
                        let op: String = c[os..i].iter().collect();
                        skip_ws(&mut i);
                        assert!(
                            i < c.len() && matches!(c[i], '"' | '\'' | '`'),
                            "matcher {label}{op} without a quoted value in {expr}"
                        );
                        let value = read_string(&mut i);
                        matchers.push((label, op, value));
                    }
                }
                sels.push(Selector {
                    name: word,
                    matchers,
                });
            }
        } else {
            i += 1;
        }
    }
    (sels, groups)
}

#[test]
fn grafana_dashboard_and_provisioning_fit_together() {
    let dash: Value = serde_json::from_str(&read("deploy/grafana/redfuse.json"))
        .expect("deploy/grafana/redfuse.json is JSON");
    assert!(
        dash["uid"].is_string() && dash["title"].is_string(),
        "uid and title"
    );
    let mut ids = BTreeSet::new();
    let mut queries = 0;
    for p in arr(&dash["panels"], "panels") {
        let id = p["id"].as_i64().expect("panel id");
        assert!(ids.insert(id), "panel id {id} is used twice");
        for k in ["h", "w", "x", "y"] {
            assert!(
                p["gridPos"][k].is_i64(),
                "panel {}: gridPos.{k}",
                p["title"]
            );
        }
        for t in p["targets"].as_array().into_iter().flatten() {
            queries += 1;
            assert_eq!(
                t["datasource"]["uid"], "${datasource}",
                "panel {}: queries use the datasource variable",
                p["title"]
            );
        }
    }
    assert!(queries >= 20, "{queries} queries");
    let vars = arr(&dash["templating"]["list"], "templating");
    let ds = vars
        .iter()
        .find(|v| v["name"] == "datasource" && v["type"] == "datasource")
        .expect("a datasource variable");
    assert_eq!(ds["query"], "prometheus");
    // Provisioning: the data source's uid is the variable's default, the dashboard provider
    // reads the folder compose mounts the dashboard into.
    let source = yaml_doc("deploy/grafana/provisioning/datasources/prometheus.yml");
    let source = &arr(&source["datasources"], "datasources")[0];
    assert_eq!(source["type"], "prometheus");
    assert_eq!(source["uid"], ds["current"]["value"], "data source uid");
    let provider = yaml_doc("deploy/grafana/provisioning/dashboards/redfuse.yml");
    let folder = s(
        &arr(&provider["providers"], "providers")[0]["options"]["path"],
        "provider path",
    )
    .to_string();
    let compose = yaml_doc("docker-compose.yml");
    let mounts = serde_json::to_string(&compose["services"]["grafana"]["volumes"]).unwrap();
    assert!(
        mounts.contains(&format!(
            "./deploy/grafana/redfuse.json:{folder}/redfuse.json"
        )),
        "compose should mount the dashboard into {folder}: {mounts}"
    );
    assert!(
        mounts.contains("./deploy/grafana/provisioning:/etc/grafana/provisioning"),
        "{mounts}"
    );
}

/// Every PromQL expression of the dashboard (panels, nested rows, `label_values` variables)
/// and of the alert rules, with where it comes from.
fn dashboard_and_alert_exprs() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let dash: Value = serde_json::from_str(&read("deploy/grafana/redfuse.json"))
        .expect("deploy/grafana/redfuse.json is JSON");
    fn panels(v: &Value, out: &mut Vec<(String, String)>) {
        for p in v.as_array().into_iter().flatten() {
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(e) = t["expr"].as_str() {
                    out.push((format!("panel {}", p["title"]), e.to_string()));
                }
            }
            panels(&p["panels"], out);
        }
    }
    panels(&dash["panels"], &mut out);
    for v in dash["templating"]["list"].as_array().into_iter().flatten() {
        if v["type"] != "query" {
            continue;
        }
        let q = v["query"]["query"]
            .as_str()
            .or(v["query"].as_str())
            .unwrap_or("");
        let inner = q
            .strip_prefix("label_values(")
            .and_then(|r| r.strip_suffix(')'))
            .unwrap_or_else(|| {
                panic!(
                    "variable {}: only label_values(metric, label): {q}",
                    v["name"]
                )
            });
        let (metric, label) = inner.rsplit_once(',').expect("label_values(metric, label)");
        // As a PromQL grouping, so that the label is checked like the others.
        out.push((
            format!("variable {}", v["name"]),
            format!("max by ({}) ({})", label.trim(), metric.trim()),
        ));
    }
    let rules = yaml_doc("deploy/prometheus/alerts.yml");
    for g in arr(&rules["groups"], "groups") {
        for r in arr(&g["rules"], "rules") {
            out.push((
                format!("alert {}", r["alert"]),
                s(&r["expr"], "expr").to_string(),
            ));
        }
    }
    out
}

/// A redis-server and a redfuse in front of it with every lazily created series made to
/// exist: commands (ok and error), a forced-open breaker (transitions, fallback replies).
fn exercised_redfuse() -> (RedisServer, Redfuse) {
    let (redis, rf) = setup(&["--admin-token", "t0ken"]);
    let mut c = rf.client();
    assert_frame(&c.cmd(&["SET", "product:1", "v"]), b"+OK\r\n", "SET");
    assert_frame(&c.cmd(&["GET", "product:1"]), b"$1\r\nv\r\n", "GET");
    assert_frame(&c.cmd(&["INCR", "counter:views"]), b":1\r\n", "INCR");
    assert_frame(&c.cmd(&["SET", "plain", "v"]), b"+OK\r\n", "SET");
    let wrongtype = c.cmd(&["LPUSH", "plain", "x"]);
    assert!(wrongtype.starts_with(b"-WRONGTYPE"), "{}", esc(&wrongtype));
    let upstream = redis.addr();
    let (status, body) = http_post(
        &rf.admin_addr(),
        &format!("/breakers/{upstream}/force-open"),
        Some("t0ken"),
    );
    assert_eq!(status, 200, "force-open: {body}");
    // Degraded: a cached read (fallback) and a refused write.
    assert_frame(
        &c.cmd(&["GET", "product:1"]),
        b"$1\r\nv\r\n",
        "GET while open",
    );
    let refused = c.cmd(&["SET", "product:2", "w"]);
    assert!(
        refused.starts_with(b"-"),
        "SET while open: {}",
        esc(&refused)
    );
    let (status, body) = http_post(
        &rf.admin_addr(),
        &format!("/breakers/{upstream}/normal"),
        Some("t0ken"),
    );
    assert_eq!(status, 200, "normal: {body}");
    (redis, rf)
}

#[test]
fn dashboard_and_alert_metrics_exist_in_a_real_scrape() {
    let (_redis, rf) = exercised_redfuse();
    let scrape = rf.metrics();
    let samples = parse_metrics(&scrape);
    // name -> label -> values
    let mut series: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for smp in &samples {
        let e = series.entry(smp.name.clone()).or_default();
        for (k, v) in &smp.labels {
            e.entry(k.clone()).or_default().insert(v.clone());
        }
    }
    let exprs = dashboard_and_alert_exprs();
    assert!(exprs.len() >= 20, "too few expressions found: {exprs:?}");
    let mut problems = Vec::new();
    let mut used = BTreeSet::new();
    for (at, expr) in &exprs {
        let (sels, groups) = promql(expr);
        if sels.is_empty() {
            problems.push(format!("{at}: no metric in `{expr}`"));
        }
        for sel in &sels {
            used.insert(sel.name.clone());
            let Some(labels) = series.get(&sel.name) else {
                problems.push(format!("{at}: metric {} is not in the scrape", sel.name));
                continue;
            };
            for (label, op, value) in &sel.matchers {
                if TARGET_LABELS.contains(&label.as_str()) {
                    continue;
                }
                let Some(values) = labels.get(label) else {
                    problems.push(format!("{at}: {} has no label {label}", sel.name));
                    continue;
                };
                let wanted: Vec<&str> = match op.as_str() {
                    "=" => vec![value.as_str()],
                    "=~" if value
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "_|".contains(c)) =>
                    {
                        value.split('|').collect()
                    }
                    _ => vec![],
                };
                for w in wanted {
                    if !values.contains(w) {
                        problems.push(format!(
                            "{at}: {}{{{label}=\"{w}\"}} does not occur (values: {values:?})",
                            sel.name
                        ));
                    }
                }
            }
        }
        for g in &groups {
            let known = TARGET_LABELS.contains(&g.as_str())
                || sels
                    .iter()
                    .any(|sel| series.get(&sel.name).is_some_and(|l| l.contains_key(g)));
            if !known {
                problems.push(format!(
                    "{at}: grouping label {g} is on none of its metrics"
                ));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "checked against a real scrape:\n  {}\n\nscrape:\n{scrape}",
        problems.join("\n  ")
    );
    // The dashboard shows the families the issue asks for.
    for must in [
        "redfuse_breaker_state",
        "redfuse_breaker_transitions_total",
        "redfuse_commands_total",
        "redfuse_operations_total",
        "redfuse_upstream_request_duration_seconds_bucket",
        "redfuse_cache_entries",
        "redfuse_cache_bytes",
        "redfuse_cache_requests_total",
        "redfuse_write_queue_depth",
        "redfuse_write_queue_replayed_total",
        "redfuse_client_connections",
    ] {
        assert!(used.contains(must), "nothing uses {must}");
    }
}

#[test]
fn promql_extraction_finds_names_and_skips_the_rest() {
    let (sels, groups) = promql(
        "histogram_quantile(0.99, sum by (upstream, le) (rate(a_bucket{instance=~\"$instance\", \
         x!=\"y}\"}[$__rate_interval]))) / on (job) b offset 1h > bool 2 and c[5m:1m] # d",
    );
    let names: Vec<&str> = sels.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["a_bucket", "b", "c"]);
    assert_eq!(groups, ["upstream", "le", "job"]);
    assert_eq!(
        sels[0].matchers,
        [
            ("instance".into(), "=~".into(), "$instance".into()),
            ("x".into(), "!=".into(), "y}".into())
        ]
    );
}

// ---------------------------------------------------------------------------------------
// A real Prometheus
// ---------------------------------------------------------------------------------------

fn urlencode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

struct Prometheus {
    proc: Proc,
    addr: String,
    _dir: TempDir,
}

impl Prometheus {
    /// /usr/bin/prometheus scraping `target` every second, with alerts.yml loaded.
    fn start(target: &str) -> Prometheus {
        let bin = "prometheus";
        let o = run_tool(bin, &["--version"], None);
        assert!(o.status.success(), "prometheus --version: {}", out_text(&o));
        let dir = TempDir::new("deploy-prometheus");
        let alerts = repo().join("deploy/prometheus/alerts.yml");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {}\n\
             scrape_configs:\n  - job_name: redfuse\n    static_configs:\n      - targets: ['{target}']\n",
            alerts.display()
        );
        let config_path = dir.write("prometheus.yml", &config);
        let mut last = String::new();
        for _ in 0..3 {
            let addr = format!("127.0.0.1:{}", free_port());
            let args: Vec<String> = vec![
                format!("--config.file={}", config_path.display()),
                format!("--storage.tsdb.path={}", dir.path().join("data").display()),
                format!("--web.listen-address={addr}"),
                "--log.level=warn".into(),
            ];
            let proc = Proc::spawn(Path::new(bin), &args, &[]);
            let mut proc = proc;
            let up = wait_until(secs(30), || {
                if matches!(proc.child.try_wait(), Ok(Some(_))) {
                    return true;
                }
                std::net::TcpStream::connect(&addr).is_ok() && http_get(&addr, "/-/ready").0 == 200
            });
            if up && matches!(proc.child.try_wait(), Ok(None)) {
                return Prometheus {
                    proc,
                    addr,
                    _dir: dir,
                };
            }
            last = proc.logs();
            if !last.contains("address already in use") {
                break;
            }
        }
        panic!("prometheus did not become ready; output:\n{last}");
    }

    fn query(&self, q: &str) -> Value {
        let body = format!("query={}", urlencode(q));
        let (status, text) = http_request(
            &self.addr,
            "POST",
            "/api/v1/query",
            &[("Content-Type", "application/x-www-form-urlencoded")],
            body.as_bytes(),
        );
        let v: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("query {q}: HTTP {status}, not JSON ({e}): {text}"));
        assert_eq!(v["status"], "success", "query `{q}` failed: {text}");
        v
    }
}

#[test]
fn prometheus_scrapes_redfuse_and_evaluates_the_dashboard_and_rules() {
    let _turn = heavy();
    let (_redis, rf) = exercised_redfuse();
    let prom = Prometheus::start(&rf.admin_addr());
    let deadline = Instant::now() + Duration::from_secs(60);
    let result = loop {
        let v = prom.query("redfuse_breaker_state");
        let r = v["data"]["result"].as_array().cloned().unwrap_or_default();
        if !r.is_empty() {
            break r;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus did not get redfuse_breaker_state within 60 s; its targets: {}\n\
             output:\n{}",
            http_get(&prom.addr, "/api/v1/targets").1,
            prom.proc.logs()
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    let series = &result[0];
    assert_eq!(series["metric"]["job"], "redfuse", "{series}");
    assert_eq!(
        series["metric"]["instance"],
        rf.admin_addr().as_str(),
        "{series}"
    );
    assert!(series["metric"]["upstream"].is_string(), "{series}");

    // Every dashboard and alert expression parses and evaluates in the real engine.
    for (at, expr) in dashboard_and_alert_exprs() {
        let q = expr
            .replace("$__rate_interval", "1m")
            .replace("$__interval", "1m")
            .replace("$instance", ".*");
        assert!(
            !q.contains('$'),
            "{at}: unknown Grafana variable in `{expr}`"
        );
        prom.query(&q);
    }

    // The alert rules loaded and evaluate without errors.
    let ok = wait_until(secs(30), || {
        let (_, text) = http_get(&prom.addr, "/api/v1/rules");
        let v: Value = serde_json::from_str(&text).unwrap_or_default();
        let rules: Vec<&Value> = v["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().into_iter().flatten())
            .collect();
        !rules.is_empty()
            && rules
                .iter()
                .all(|r| r["health"] == "ok" && r["lastEvaluation"] != "0001-01-01T00:00:00Z")
    });
    assert!(
        ok,
        "alert rules not all evaluated with health ok: {}",
        http_get(&prom.addr, "/api/v1/rules").1
    );
}

// ---------------------------------------------------------------------------------------
// The compose demo's load generator
// ---------------------------------------------------------------------------------------

#[test]
fn compose_load_generator_drives_redfuse() {
    let (_redis, rf) = setup(&[]);
    let port = port_of(&rf.addr()).to_string();
    let script = repo().join("deploy/compose/loadgen.sh");
    let o = Command::new("sh")
        .arg(&script)
        .env("LOADGEN_HOST", "127.0.0.1")
        .env("LOADGEN_PORT", &port)
        .env("LOADGEN_ROUNDS", "2")
        .env("LOADGEN_PAUSE", "0")
        .env("LOADGEN_REPORT_EVERY", "1")
        .stdin(Stdio::null())
        .output()
        .expect("run sh deploy/compose/loadgen.sh");
    let text = out_text(&o);
    assert!(o.status.success(), "loadgen.sh: {text}");
    assert!(text.contains("round 2, 0 error replies"), "{text}");
    let m = rf.metrics();
    for (cmd, n) in [
        ("get", 200.0),
        ("incr", 400.0),
        ("set", 300.0),
        ("lrange", 200.0),
    ] {
        let got = metric_sum(
            &m,
            "redfuse_commands_total",
            &[("command", cmd), ("result", "ok")],
        );
        assert!(got >= n, "{cmd}: {got} ok replies, expected {n}");
    }
    // The compose file runs this script against the redfuse service.
    let compose = yaml_doc("docker-compose.yml");
    let lg = &compose["services"]["loadgen"];
    let entry = serde_json::to_string(&lg["entrypoint"]).unwrap();
    assert!(entry.contains("loadgen.sh"), "{entry}");
    assert_eq!(lg["environment"]["LOADGEN_HOST"], "redfuse");
}
