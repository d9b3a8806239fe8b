//! Property tests of the public `redfuse::resp` API: the client request framer and the
//! upstream reply scanner, on random and hostile input.
//!
//! Run in CI with the other tests; case counts are bounded so that the whole file takes a
//! few seconds on two cores. `PROPTEST_CASES` raises them for a longer local run.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use redfuse::resp::request::{Framer, Peer};
use redfuse::resp::{Limits, ProtocolError, ReplyScanner, encode_command, parse_request};

fn config(cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(cases);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Every request in `input`, read at once with the stateless parser; the error if one
/// comes, with what was read before it.
fn parse_whole(input: &[u8], limits: &Limits) -> (Vec<Vec<Bytes>>, Option<ProtocolError>) {
    let mut buf = BytesMut::from(input);
    let mut out = Vec::new();
    loop {
        match parse_request(&mut buf, limits) {
            Ok(Some(r)) => out.push(r.arg_list()),
            Ok(None) => return (out, None),
            Err(e) => return (out, Some(e)),
        }
    }
}

/// The same with a [`Framer`] fed `input` in the chunks `cuts` says, checking on every call
/// that the framer reserves nothing and points only at bytes it has.
fn parse_chunked(
    input: &[u8],
    cuts: &[usize],
    limits: &Limits,
    peer: Peer,
) -> (Vec<Vec<Bytes>>, Option<ProtocolError>) {
    let mut framer = Framer::new();
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut at = 0;
    let mut bounds: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
    bounds.sort_unstable();
    bounds.push(input.len());
    for end in bounds {
        if end < at {
            continue;
        }
        buf.extend_from_slice(&input[at..end]);
        at = end;
        loop {
            let capacity = buf.capacity();
            let result = framer.next(&mut buf, limits, peer);
            assert!(
                buf.capacity() <= capacity,
                "the framer grew the buffer from {capacity} to {}",
                buf.capacity()
            );
            assert!(framer.partial_len() <= buf.len());
            match result {
                Ok(Some(r)) => out.push(r.arg_list()),
                Ok(None) => break,
                Err(e) => return (out, Some(e)),
            }
        }
    }
    (out, None)
}

fn arg() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..24),
        Just(b"a\r\nb".to_vec()),
        Just(b"\r\n".to_vec()),
        Just(Vec::new()),
        "[A-Z]{1,8}".prop_map(String::into_bytes),
    ]
}

fn command() -> impl Strategy<Value = Vec<Vec<u8>>> {
    proptest::collection::vec(arg(), 1..6)
}

/// An inline command line that Redis reads as the given words.
fn inline_line() -> impl Strategy<Value = (Vec<u8>, Vec<Vec<u8>>)> {
    proptest::collection::vec("[a-zA-Z0-9:_-]{1,8}", 1..5).prop_map(|words| {
        let line = format!("{}\r\n", words.join(" ")).into_bytes();
        (line, words.into_iter().map(String::into_bytes).collect())
    })
}

/// What Redis 7 answers to `*-1\r\n$\r\n"\n`: the empty multibulk is skipped, `$` is an
/// inline command (`-ERR unknown command '$'`), and `"` an unbalanced quote (a protocol
/// error). Found by `random_headers_never_panic`.
#[test]
fn an_empty_multibulk_is_skipped_and_an_inline_request_follows() {
    let (requests, error) = parse_whole(b"*-1\r\n$\r\n\"\n", &Limits::default());
    assert_eq!(requests, vec![vec![Bytes::from_static(b"$")]]);
    let error = error.expect("a protocol error");
    assert!(error.0.starts_with("unbalanced quotes"), "{}", error.0);
}

proptest! {
    #![proptest_config(config(256))]

    /// Random bytes: no panic, nothing reserved, and the framer agrees with itself however
    /// the bytes are cut.
    #[test]
    fn random_bytes_never_panic_or_grow_the_buffer(
        input in proptest::collection::vec(any::<u8>(), 0..512),
        cuts in proptest::collection::vec(any::<usize>(), 0..8),
    ) {
        let limits = Limits::default();
        let whole = parse_whole(&input, &limits);
        let chunked = parse_chunked(&input, &cuts, &limits, Peer::Authenticated);
        prop_assert_eq!(&whole.0, &chunked.0);
        // An error may come earlier in the chunked run only where the whole run was still
        // waiting for bytes; with all bytes in, the two agree.
        if chunked.1.is_none() {
            prop_assert!(whole.1.is_none(), "{:?}", whole.1);
        }
        let _ = parse_chunked(&input, &cuts, &limits, Peer::Unauthenticated);
    }

    /// Random bytes after a `*` or inside a multibulk: the same, on input more likely to
    /// reach the length checks.
    #[test]
    fn random_headers_never_panic(
        count in "[-+0-9 ]{0,22}",
        len in "[-+0-9 ]{0,22}",
        tail in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut input = format!("*{count}\r\n${len}\r\n").into_bytes();
        input.extend_from_slice(&tail);
        let whole = parse_whole(&input, &Limits::default());
        // A count of zero or less is an empty request, skipped as Redis skips it: what
        // follows is a new request, inline unless it starts with `*` (see
        // `an_empty_multibulk_is_skipped_and_an_inline_request_follows`).
        let skipped = count.parse::<i64>().is_ok_and(|n| n <= 0);
        if let Some(e) = &whole.1 {
            prop_assert!(
                ["invalid multibulk length", "invalid bulk length", "expected '$', got"]
                    .iter()
                    .any(|m| e.0.starts_with(m))
                    || (skipped && e.0.starts_with("unbalanced quotes")),
                "{}", e
            );
        }
    }

    /// Commands encoded as RESP come back as the same arguments, in a pipeline cut at any
    /// points, and each frame's raw bytes are exactly what was sent.
    #[test]
    fn pipelines_resume_at_any_cut(
        commands in proptest::collection::vec(command(), 1..6),
        cuts in proptest::collection::vec(any::<usize>(), 0..10),
    ) {
        let mut input = Vec::new();
        for c in &commands {
            input.extend_from_slice(&encode_command(c));
        }
        let want: Vec<Vec<Bytes>> = commands
            .iter()
            .map(|c| c.iter().map(|a| Bytes::copy_from_slice(a)).collect())
            .collect();
        let (got, err) = parse_chunked(&input, &cuts, &Limits::default(), Peer::Authenticated);
        prop_assert!(err.is_none(), "{:?}", err);
        prop_assert_eq!(got, want);
    }

    /// A frame truncated at every split point waits, then completes identically.
    #[test]
    fn truncated_frames_resume_at_every_split_point(command in command()) {
        let frame = encode_command(&command);
        let mut whole = BytesMut::from(&frame[..]);
        let want = parse_request(&mut whole, &Limits::default()).unwrap().unwrap();
        for split in 0..frame.len() {
            let mut framer = Framer::new();
            let mut buf = BytesMut::from(&frame[..split]);
            prop_assert!(
                framer.next(&mut buf, &Limits::default(), Peer::Authenticated).unwrap().is_none(),
                "complete after {} of {} bytes", split, frame.len()
            );
            buf.extend_from_slice(&frame[split..]);
            let r = framer.next(&mut buf, &Limits::default(), Peer::Authenticated).unwrap().unwrap();
            prop_assert_eq!(r.arg_list(), want.arg_list());
            prop_assert_eq!(&r.raw, &frame);
            prop_assert!(buf.is_empty());
        }
    }

    /// Inline commands mixed with RESP frames, cut anywhere.
    #[test]
    fn inline_and_resp_interleave(
        lines in proptest::collection::vec(inline_line(), 1..4),
        command in command(),
        cuts in proptest::collection::vec(any::<usize>(), 0..6),
    ) {
        let mut input = Vec::new();
        let mut want = Vec::new();
        for (line, words) in &lines {
            input.extend_from_slice(line);
            want.push(words.iter().map(|w| Bytes::copy_from_slice(w)).collect::<Vec<_>>());
            input.extend_from_slice(&encode_command(&command));
            want.push(command.iter().map(|a| Bytes::copy_from_slice(a)).collect());
        }
        let (got, err) = parse_chunked(&input, &cuts, &Limits::default(), Peer::Authenticated);
        prop_assert!(err.is_none(), "{:?}", err);
        prop_assert_eq!(got, want);
    }

    /// Huge declared lengths cost nothing: the framer waits (or refuses with Redis's text),
    /// without reserving for them.
    #[test]
    fn huge_declared_lengths_are_refused_or_cost_nothing(
        count in 1i64..=i64::MAX,
        len in 0i64..=i64::MAX,
        sent in proptest::collection::vec(any::<u8>(), 0..32),
    ) {
        let limits = Limits::default();
        let mut input = format!("*{count}\r\n${len}\r\n").into_bytes();
        input.extend_from_slice(&sent);
        let mut buf = BytesMut::with_capacity(input.len());
        buf.extend_from_slice(&input);
        let capacity = buf.capacity();
        let result = Framer::new().next(&mut buf, &limits, Peer::Authenticated);
        prop_assert_eq!(buf.capacity(), capacity);
        match result {
            Err(e) if count > i64::from(i32::MAX) => prop_assert_eq!(e.0, "invalid multibulk length"),
            Err(e) if len > limits.max_bulk_len as i64 => prop_assert_eq!(e.0, "invalid bulk length"),
            // The bulk's bytes all arrived but its CRLF did not match.
            Err(e) => prop_assert!(len < 32 && e.0 == "invalid bulk length", "{}", e),
            Ok(Some(r)) => prop_assert!(count == 1 && r.args()[0].len() as i64 == len),
            Ok(None) => prop_assert!(count <= i64::from(i32::MAX) && len <= limits.max_bulk_len as i64),
        }
        let unauthenticated = Framer::new().next(&mut BytesMut::from(&input[..]), &limits, Peer::Unauthenticated);
        if count > 10 {
            prop_assert!(unauthenticated.is_err());
        }
    }

    /// Arrays declared with a million elements or more, and a few of them sent: waiting,
    /// holding only what was sent.
    #[test]
    fn million_element_arrays_wait_for_their_bytes(
        count in 1_000_000i64..=i64::from(i32::MAX),
        sent in 0usize..200,
    ) {
        let mut input = format!("*{count}\r\n").into_bytes();
        for i in 0..sent {
            let a = i.to_string();
            input.extend_from_slice(format!("${}\r\n{a}\r\n", a.len()).as_bytes());
        }
        let mut framer = Framer::new();
        let mut buf = BytesMut::from(&input[..]);
        let capacity = buf.capacity();
        prop_assert!(framer.next(&mut buf, &Limits::default(), Peer::Authenticated).unwrap().is_none());
        prop_assert_eq!(buf.capacity(), capacity);
        prop_assert_eq!(framer.partial_len(), input.len());
        prop_assert_eq!(
            Framer::new()
                .next(&mut BytesMut::from(&input[..]), &Limits::default(), Peer::Unauthenticated)
                .unwrap_err()
                .0,
            "unauthenticated multibulk length"
        );
    }

    /// Inline commands with a quote that is never closed: Redis's error, never a panic or
    /// a partial command.
    #[test]
    fn unbalanced_quotes_in_inline_commands_are_refused(
        before in "[a-zA-Z0-9 ]{0,12}",
        quote in prop_oneof![Just('"'), Just('\'')],
        after in "[a-zA-Z0-9 ]{0,12}",
    ) {
        let line = format!("{before} {quote}{after}\r\n");
        let (got, err) = parse_whole(line.as_bytes(), &Limits::default());
        prop_assert!(got.is_empty());
        prop_assert_eq!(err.map(|e| e.0), Some("unbalanced quotes in request".to_owned()));
    }
}

/// A random RESP2/RESP3 reply frame, nested.
fn reply() -> impl Strategy<Value = Vec<u8>> {
    let text = "[a-zA-Z0-9 .:_-]{0,12}";
    let leaf = prop_oneof![
        text.prop_map(|t| format!("+{t}\r\n").into_bytes()),
        text.prop_map(|t| format!("-ERR {t}\r\n").into_bytes()),
        any::<i64>().prop_map(|n| format!(":{n}\r\n").into_bytes()),
        proptest::collection::vec(any::<u8>(), 0..20).prop_map(|b| {
            let mut f = format!("${}\r\n", b.len()).into_bytes();
            f.extend_from_slice(&b);
            f.extend_from_slice(b"\r\n");
            f
        }),
        Just(b"$-1\r\n".to_vec()),
        Just(b"*-1\r\n".to_vec()),
        Just(b"_\r\n".to_vec()),
        Just(b",1.5\r\n".to_vec()),
        Just(b"#t\r\n".to_vec()),
        Just(b"(12345678901234567890\r\n".to_vec()),
        Just(b"!3\r\nERR\r\n".to_vec()),
        Just(b"=8\r\ntxt:a\r\nb\r\n".to_vec()),
    ];
    leaf.prop_recursive(4, 48, 5, |inner| {
        prop_oneof![
            (
                prop_oneof![Just(b'*'), Just(b'~'), Just(b'>')],
                proptest::collection::vec(inner.clone(), 0..5)
            )
                .prop_map(|(kind, parts)| {
                    let mut f = vec![kind];
                    f.extend_from_slice(format!("{}\r\n", parts.len()).as_bytes());
                    parts.iter().for_each(|p| f.extend_from_slice(p));
                    f
                }),
            proptest::collection::vec((inner.clone(), inner.clone()), 0..3).prop_map(|pairs| {
                let mut f = format!("%{}\r\n", pairs.len()).into_bytes();
                for (k, v) in &pairs {
                    f.extend_from_slice(k);
                    f.extend_from_slice(v);
                }
                f
            }),
            (
                proptest::collection::vec((inner.clone(), inner.clone()), 1..2),
                inner
            )
                .prop_map(|(pairs, value)| {
                    let mut f = format!("|{}\r\n", pairs.len()).into_bytes();
                    for (k, v) in &pairs {
                        f.extend_from_slice(k);
                        f.extend_from_slice(v);
                    }
                    f.extend_from_slice(&value);
                    f
                }),
        ]
    })
}

proptest! {
    #![proptest_config(config(256))]

    /// Scanning a frame split at any point equals scanning it whole: the frame's length,
    /// and the scanner is ready for the next frame.
    #[test]
    fn reply_scanner_resumes_at_every_split_point(frame in reply()) {
        let mut input = frame.clone();
        input.extend_from_slice(b"+NEXT\r\n");
        let whole = ReplyScanner::new().scan(&input, 64).unwrap();
        prop_assert_eq!(whole, Some(frame.len()));
        for split in 0..frame.len() {
            let mut s = ReplyScanner::new();
            prop_assert_eq!(s.scan(&frame[..split], 64).unwrap(), None, "split {}", split);
            prop_assert_eq!(s.scan(&input, 64).unwrap(), Some(frame.len()));
            prop_assert_eq!(s.scan(b"+NEXT\r\n", 64).unwrap(), Some(7));
        }
    }

    /// Fed in growing prefixes of random sizes, the scanner finds the same end.
    #[test]
    fn reply_scanner_resumes_across_many_reads(
        frame in reply(),
        cuts in proptest::collection::vec(any::<usize>(), 0..8),
    ) {
        let mut ends: Vec<usize> = cuts.iter().map(|c| c % (frame.len() + 1)).collect();
        ends.sort_unstable();
        let mut s = ReplyScanner::new();
        for end in ends {
            if end < frame.len() {
                prop_assert_eq!(s.scan(&frame[..end], 64).unwrap(), None);
            }
        }
        prop_assert_eq!(s.scan(&frame, 64).unwrap(), Some(frame.len()));
    }

    /// Garbage: an error or a wait, never a panic, and never an end past the input.
    #[test]
    fn reply_scanner_survives_garbage(
        input in proptest::collection::vec(any::<u8>(), 0..256),
        prefix in prop_oneof![Just(&b""[..]), Just(&b"*3\r\n"[..]), Just(&b"%2\r\n"[..]), Just(&b"$5\r\n"[..])],
        depth in 0usize..8,
    ) {
        let mut buf = prefix.to_vec();
        buf.extend_from_slice(&input);
        let mut s = ReplyScanner::new();
        for end in [buf.len() / 3, buf.len() / 2, buf.len()] {
            match s.scan(&buf[..end], depth) {
                Ok(Some(n)) => {
                    prop_assert!(n <= end);
                    break;
                }
                Ok(None) => {}
                Err(_) => break,
            }
        }
    }

    /// Deep nesting: accepted up to the limit, refused past it, with no recursion (a
    /// hundred thousand levels would overflow a recursive scanner's stack).
    #[test]
    fn deep_nesting_is_bounded_without_recursion(depth in 1usize..100_000, limit in 1usize..200_000) {
        let mut frame = b"*1\r\n".repeat(depth);
        frame.extend_from_slice(b":1\r\n");
        match ReplyScanner::new().scan(&frame, limit) {
            Ok(Some(n)) => prop_assert!(depth <= limit && n == frame.len()),
            Ok(None) => prop_assert!(false, "a complete frame was not found"),
            Err(e) => prop_assert!(depth > limit && e.0 == "reply nesting too deep", "{}", e),
        }
    }
}

/// Declared sizes never allocate on the reply side either: a `*2147483647` header then a
/// few elements is a wait, found in microseconds.
#[test]
fn huge_reply_headers_wait_without_allocating() {
    for header in [
        &b"*2147483647\r\n:1\r\n"[..],
        b"%9223372036854775807\r\n+k\r\n",
        b"$536870912\r\nabc",
        b"~1000000\r\n",
    ] {
        assert_eq!(
            ReplyScanner::new().scan(header, 64).unwrap(),
            None,
            "{}",
            header.escape_ascii()
        );
    }
}
