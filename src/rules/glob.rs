//! Key patterns: Redis's glob semantics, binary-safe, in linear time.

/// Redis glob matching (`stringmatchlen` without `nocase`), binary-safe.
///
/// `*` any run of bytes, `?` any one byte, `[abc]` / `[^abc]` / `[a-z]` classes, `\x` the
/// literal `x` (also inside classes). Malformed patterns behave as in Redis: an
/// unterminated class runs to the end of the pattern (`[ab` matches `a`), `[]` matches
/// nothing and `[^]` any byte, `[a-]` is a range up to `]`, a trailing `\` is literal.
///
/// Deliberate differences from Redis, both in corner cases no key pattern relies on:
/// a pattern made only of `*` matches the empty string (Redis's matcher says no, although
/// `KEYS *` and `SCAN` special-case `*` to match everything); range bounds are compared as
/// unsigned bytes (Redis compares C `char`s, signed on most platforms); and there is no
/// nesting cut-off, because nothing recurses.
///
/// Runs in O(pattern × subject) time at worst, without allocating: on a mismatch only the
/// most recent `*` is widened, which suffices because every other token matches exactly
/// one byte.
pub fn glob_match(pattern: &[u8], subject: &[u8]) -> bool {
    let (mut p, mut s) = (0, 0);
    // Pattern index just after the latest `*`, and the subject index where what follows
    // it is being tried.
    let mut star: Option<(usize, usize)> = None;
    while s < subject.len() {
        if p < pattern.len() {
            if pattern[p] == b'*' {
                while p < pattern.len() && pattern[p] == b'*' {
                    p += 1;
                }
                if p == pattern.len() {
                    return true;
                }
                star = Some((p, s));
                continue;
            }
            if let Some(next) = match_token(pattern, p, subject[s]) {
                p = next;
                s += 1;
                continue;
            }
        }
        match star {
            Some((after, tried)) => {
                p = after;
                s = tried + 1;
                star = Some((after, s));
            }
            None => return false,
        }
    }
    pattern[p..].iter().all(|&b| b == b'*')
}

/// Matches the single-byte token (anything but `*`) at `pattern[p]` against `c`; returns
/// the index of the next token on a match.
fn match_token(pattern: &[u8], p: usize, c: u8) -> Option<usize> {
    match pattern[p] {
        b'?' => Some(p + 1),
        b'[' => match_class(pattern, p + 1, c),
        b'\\' if p + 1 < pattern.len() => (pattern[p + 1] == c).then_some(p + 2),
        literal => (literal == c).then_some(p + 1),
    }
}

/// A `[...]` class whose body starts at `pattern[start]`.
fn match_class(pattern: &[u8], start: usize, c: u8) -> Option<usize> {
    let len = pattern.len();
    let mut i = start;
    let negate = pattern.get(i) == Some(&b'^');
    if negate {
        i += 1;
    }
    let mut matched = false;
    // `i` ends on the closing `]`, or on the last byte when the class is unterminated, so
    // that the next token is at `i + 1` either way.
    loop {
        if i >= len {
            i -= 1;
            break;
        }
        match pattern[i] {
            b'\\' if len - i >= 2 => {
                i += 1;
                matched |= pattern[i] == c;
            }
            b']' => break,
            lo if len - i >= 3 && pattern[i + 1] == b'-' => {
                let hi = pattern[i + 2];
                let (lo, hi) = if lo <= hi { (lo, hi) } else { (hi, lo) };
                matched |= (lo..=hi).contains(&c);
                i += 2;
            }
            b => matched |= b == c,
        }
        i += 1;
    }
    (matched != negate).then_some(i + 1)
}

/// A glob compiled for matching many keys: the shapes real configurations use (`*`,
/// `prefix*`, literal keys) skip the general matcher.
#[derive(Debug, Clone)]
pub(crate) enum Glob {
    Any,
    Exact(Box<[u8]>),
    Prefix(Box<[u8]>),
    General(Box<[u8]>),
}

impl Glob {
    pub(crate) fn compile(pattern: &[u8]) -> Glob {
        let mut literal = Vec::with_capacity(pattern.len());
        let mut i = 0;
        while i < pattern.len() {
            match pattern[i] {
                b'*' if pattern[i..].iter().all(|&b| b == b'*') => {
                    return if literal.is_empty() {
                        Glob::Any
                    } else {
                        Glob::Prefix(literal.into())
                    };
                }
                b'*' | b'?' | b'[' => return Glob::General(pattern.into()),
                b'\\' if i + 1 < pattern.len() => {
                    literal.push(pattern[i + 1]);
                    i += 2;
                }
                b => {
                    literal.push(b);
                    i += 1;
                }
            }
        }
        Glob::Exact(literal.into())
    }

    pub(crate) fn matches(&self, key: &[u8]) -> bool {
        match self {
            Glob::Any => true,
            Glob::Exact(lit) => key == &lit[..],
            Glob::Prefix(prefix) => key.starts_with(prefix),
            Glob::General(pattern) => glob_match(pattern, key),
        }
    }
}

/// Compiles a configured glob; `field` is its path for the error message.
pub(crate) fn compile_glob(pattern: &str, field: &str) -> Result<Glob, String> {
    if pattern.is_empty() {
        return Err(format!(
            "{field}: empty pattern (it would match only the empty key; use \"*\" for every key)"
        ));
    }
    Ok(Glob::compile(pattern.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn m(pattern: &str, subject: &str) -> bool {
        glob_match(pattern.as_bytes(), subject.as_bytes())
    }

    #[test]
    fn glob_question_mark() {
        assert!(m("h?llo", "hello"));
        assert!(m("h?llo", "hallo"));
        assert!(m("h?llo", "hxllo"));
        assert!(!m("h?llo", "hllo"));
        assert!(!m("h?llo", "heello"));
    }

    #[test]
    fn glob_star() {
        assert!(m("h*llo", "hllo"));
        assert!(m("h*llo", "heeeello"));
        assert!(!m("h*llo", "heeeellox"));
        assert!(m("*", "anything"));
        assert!(m("*", ""));
        assert!(m("**", ""));
        assert!(m("ratelimit:*", "ratelimit:"));
        assert!(m("ratelimit:*", "ratelimit:user:42"));
        assert!(!m("ratelimit:*", "ratelimit"));
        assert!(m("*:*:*", "a:b:c"));
        assert!(!m("*:*:*", "a:b"));
        assert!(m("a*b*c", "abc"));
        assert!(m("a*b*c", "axxbyyc"));
        assert!(!m("a*b*c", "axxbyy"));
        assert!(!m("", "a"));
        assert!(m("", ""));
        assert!(!m("a", ""));
    }

    #[test]
    fn glob_classes() {
        assert!(m("h[ae]llo", "hello"));
        assert!(m("h[ae]llo", "hallo"));
        assert!(!m("h[ae]llo", "hillo"));
        assert!(m("h[^e]llo", "hallo"));
        assert!(m("h[^e]llo", "hbllo"));
        assert!(!m("h[^e]llo", "hello"));
        assert!(m("h[a-b]llo", "hallo"));
        assert!(m("h[a-b]llo", "hbllo"));
        assert!(!m("h[a-b]llo", "hcllo"));
        // Reversed ranges are normalised, as in Redis.
        assert!(m("h[b-a]llo", "hallo"));
        assert!(m("[a-cx]", "x"));
        assert!(!m("[^a-c]", "b"));
    }

    #[test]
    fn glob_escapes() {
        assert!(m(r"h\*llo", "h*llo"));
        assert!(!m(r"h\*llo", "hello"));
        assert!(m(r"h\?llo", "h?llo"));
        assert!(!m(r"h\?llo", "hallo"));
        assert!(m(r"\[a]", "[a]"));
        assert!(m(r"a\\b", r"a\b"));
        assert!(m(r"[\]]", "]"));
        assert!(m(r"[\-]", "-"));
        assert!(!m(r"[\-]", r"\"));
        // A trailing backslash is a literal backslash.
        assert!(m(r"a\", r"a\"));
        assert!(!m(r"a\", "a"));
    }

    #[test]
    fn glob_malformed_classes_follow_redis() {
        // Unterminated: the class runs to the end of the pattern.
        assert!(m("[ab", "a"));
        assert!(m("x[ab", "xb"));
        assert!(!m("x[ab", "xc"));
        // Empty class matches nothing, its negation any byte.
        assert!(!m("[]", "a"));
        assert!(m("[^]", "a"));
        assert!(!m("[", "["));
        assert!(m("[^", "z"));
        // `[a-]` is the range a..=] (reversed to ]..=a), and swallows the `]`.
        assert!(m("[a-]", "^"));
        assert!(!m("[a-]", "b"));
    }

    #[test]
    fn glob_binary() {
        assert!(glob_match(b"\x00\xff*", b"\x00\xff\x01\x02"));
        assert!(!glob_match(b"\x00\xff*", b"\x00\xfe"));
        assert!(glob_match(b"?\x00?", b"\xff\x00\x80"));
        assert!(glob_match(b"[\x80-\xff]", b"\x90"));
        assert!(!glob_match(b"[\x80-\xff]", b"\x10"));
        assert!(glob_match(b"a\\\xffb", b"a\xffb"));
        assert!(glob_match(b"*\r\n*", b"x\r\ny"));
    }

    #[test]
    fn glob_pathological_patterns_stay_fast() {
        let subject = vec![b'a'; 200_000];
        let started = Instant::now();
        assert!(!glob_match(b"a*a*a*a*a*a*a*a*a*a*b", &subject));
        assert!(!glob_match(
            b"*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*b",
            &subject
        ));
        assert!(glob_match(b"a*a*a*a*a*a*a*a*a*a*", &subject));
        assert!(!glob_match(b"*[^a]*", &subject));
        // A naive backtracking matcher needs years for these; allow generous slack for
        // unoptimised builds on a loaded machine.
        assert!(
            started.elapsed().as_secs() < 5,
            "took {:?}",
            started.elapsed()
        );
    }

    /// Exponential but obviously correct star handling, to check the iterative matcher
    /// and the compiled fast paths against.
    fn naive(pattern: &[u8], subject: &[u8]) -> bool {
        match pattern.first() {
            None => subject.is_empty(),
            Some(b'*') => (0..=subject.len()).any(|k| naive(&pattern[1..], &subject[k..])),
            Some(_) => match subject.first() {
                None => false,
                Some(&c) => match match_token(pattern, 0, c) {
                    Some(next) => naive(&pattern[next..], &subject[1..]),
                    None => false,
                },
            },
        }
    }

    #[test]
    fn glob_agrees_with_naive_matcher_and_fast_paths() {
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let pattern_bytes = b"ab*?[]^-\\";
        let subject_bytes = b"ab-]^\\";
        let mut matches = 0;
        for _ in 0..50_000 {
            let plen = (next() % 8) as usize;
            let slen = (next() % 8) as usize;
            let pattern: Vec<u8> = (0..plen)
                .map(|_| pattern_bytes[(next() % pattern_bytes.len() as u64) as usize])
                .collect();
            let subject: Vec<u8> = (0..slen)
                .map(|_| subject_bytes[(next() % subject_bytes.len() as u64) as usize])
                .collect();
            let expected = naive(&pattern, &subject);
            matches += usize::from(expected);
            assert_eq!(
                glob_match(&pattern, &subject),
                expected,
                "pattern {:?} subject {:?}",
                String::from_utf8_lossy(&pattern),
                String::from_utf8_lossy(&subject)
            );
            assert_eq!(
                Glob::compile(&pattern).matches(&subject),
                expected,
                "compiled pattern {:?} subject {:?}",
                String::from_utf8_lossy(&pattern),
                String::from_utf8_lossy(&subject)
            );
        }
        // Guard against a generator that only ever produces mismatches.
        assert!(matches > 1_000, "only {matches} matches");
    }

    #[test]
    fn glob_compiles_common_shapes() {
        assert!(matches!(Glob::compile(b"*"), Glob::Any));
        assert!(matches!(Glob::compile(b"**"), Glob::Any));
        assert!(matches!(Glob::compile(b"user:*"), Glob::Prefix(p) if &*p == b"user:"));
        assert!(matches!(Glob::compile(br"a\*b"), Glob::Exact(p) if &*p == b"a*b"));
        assert!(matches!(Glob::compile(b"a*b"), Glob::General(_)));
        assert!(matches!(Glob::compile(br"a\*"), Glob::Exact(p) if &*p == b"a*"));
    }
}
