//! Client request framing: where a request ends, with Redis's limits and error texts.
//!
//! A request is split into argument slices that share the read buffer (`Bytes::slice`), and
//! its original bytes travel upstream unchanged. Limits are checked on the length headers
//! before anything is buffered or reserved, so a hostile `$999999999999` or `*2147483647`
//! costs a header parse and an error, nothing more. Error texts match Redis's
//! (`Protocol error: invalid bulk length` ...) so that clients that match on them keep
//! working.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::{parse_int, put_line};

/// Bounds on what a client may send, checked before anything is buffered or allocated.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_bulk_len: usize,
    pub max_array_len: usize,
    pub max_inline_len: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bulk_len: 512 * 1024 * 1024,
            max_array_len: 1024 * 1024,
            max_inline_len: 64 * 1024,
        }
    }
}

/// A malformed frame. The message is the text after `Protocol error: `.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Protocol error: {0}")]
pub struct ProtocolError(pub String);

fn perr(msg: impl Into<String>) -> ProtocolError {
    ProtocolError(msg.into())
}

/// One client command: its wire bytes and its arguments (slices of the same buffer).
#[derive(Debug, Clone)]
pub struct Request {
    /// The exact bytes to forward upstream (inline requests are re-encoded as RESP).
    pub raw: Bytes,
    /// `args[0]` is the command name. Never empty.
    pub args: Vec<Bytes>,
}

impl Request {
    /// Builds a request from arguments, encoding it as a RESP array (used for inline commands
    /// and for commands the proxy sends on its own behalf).
    pub fn from_args(args: Vec<Bytes>) -> Request {
        let raw = encode_command(&args);
        Request { raw, args }
    }

    pub fn name(&self) -> &[u8] {
        &self.args[0]
    }
}

/// Encodes a command as a RESP array of bulk strings.
pub fn encode_command<A: AsRef<[u8]>>(args: &[A]) -> Bytes {
    let size: usize = args.iter().map(|a| a.as_ref().len() + 16).sum::<usize>() + 16;
    let mut out = BytesMut::with_capacity(size);
    out.put_u8(b'*');
    put_line(&mut out, args.len() as i64);
    for a in args {
        let a = a.as_ref();
        out.put_u8(b'$');
        put_line(&mut out, a.len() as i64);
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out.freeze()
}

/// Finds `\r\n` at or after `from`; returns the index of `\r`.
pub(crate) fn find_crlf(buf: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while i < buf.len() {
        let nl = buf[i..].iter().position(|&b| b == b'\n')? + i;
        if nl > from && buf[nl - 1] == b'\r' {
            return Some(nl - 1);
        }
        i = nl + 1;
    }
    None
}

/// Takes the next complete request out of `buf`.
///
/// Returns `Ok(None)` when more bytes are needed (after reserving room for a large bulk whose
/// length has been checked), and skips empty inline lines and `*0`/`*-1` arrays as Redis does.
pub fn parse_request(
    buf: &mut BytesMut,
    limits: &Limits,
) -> Result<Option<Request>, ProtocolError> {
    loop {
        if buf.is_empty() {
            return Ok(None);
        }
        if buf[0] != b'*' {
            match parse_inline(buf, limits)? {
                InlineOutcome::Incomplete => return Ok(None),
                InlineOutcome::Empty => continue,
                InlineOutcome::Request(r) => return Ok(Some(r)),
            }
        }
        // Multibulk: `*<n>\r\n` followed by n bulk strings.
        let Some(cr) = find_crlf(buf, 1) else {
            if buf.len() > 1024 * 64 {
                return Err(perr("too big mbulk count string"));
            }
            return Ok(None);
        };
        let count = parse_int(&buf[1..cr]).ok_or_else(|| perr("invalid multibulk length"))?;
        if count > limits.max_array_len as i64 || count > i32::MAX as i64 {
            return Err(perr("invalid multibulk length"));
        }
        if count <= 0 {
            buf.advance(cr + 2);
            continue;
        }
        let count = count as usize;
        let mut pos = cr + 2;
        // Offsets of each argument, collected before any allocation sized by `count`.
        let mut spans: Vec<(usize, usize)> = Vec::with_capacity(count.min(64));
        for _ in 0..count {
            if pos >= buf.len() {
                return Ok(None);
            }
            if buf[pos] != b'$' {
                return Err(perr(format!("expected '$', got '{}'", buf[pos] as char)));
            }
            let Some(cr) = find_crlf(buf, pos + 1) else {
                if buf.len() - pos > 1024 * 64 {
                    return Err(perr("too big bulk count string"));
                }
                return Ok(None);
            };
            let len = parse_int(&buf[pos + 1..cr]).ok_or_else(|| perr("invalid bulk length"))?;
            if len < 0 || len > limits.max_bulk_len as i64 {
                return Err(perr("invalid bulk length"));
            }
            let len = len as usize;
            let start = cr + 2;
            let end = start + len;
            if end + 2 > buf.len() {
                // The length is checked: reserving for it avoids repeated doubling of a large value.
                buf.reserve(end + 2 - buf.len());
                return Ok(None);
            }
            if &buf[end..end + 2] != b"\r\n" {
                return Err(perr("invalid bulk length"));
            }
            spans.push((start, end));
            pos = end + 2;
        }
        let raw = buf.split_to(pos).freeze();
        let args = spans.into_iter().map(|(s, e)| raw.slice(s..e)).collect();
        return Ok(Some(Request { raw, args }));
    }
}

enum InlineOutcome {
    Incomplete,
    Empty,
    Request(Request),
}

fn parse_inline(buf: &mut BytesMut, limits: &Limits) -> Result<InlineOutcome, ProtocolError> {
    let Some(nl) = buf.iter().position(|&b| b == b'\n') else {
        if buf.len() > limits.max_inline_len {
            return Err(perr("too big inline request"));
        }
        return Ok(InlineOutcome::Incomplete);
    };
    if nl > limits.max_inline_len {
        return Err(perr("too big inline request"));
    }
    let line = buf.split_to(nl + 1);
    let mut content = &line[..nl];
    if content.last() == Some(&b'\r') {
        content = &content[..content.len() - 1];
    }
    let args = split_inline_args(content).ok_or_else(|| perr("unbalanced quotes in request"))?;
    if args.is_empty() {
        return Ok(InlineOutcome::Empty);
    }
    Ok(InlineOutcome::Request(Request::from_args(args)))
}

/// Splits an inline command line like Redis's `sdssplitargs`: whitespace separated, with
/// "double quotes" (escapes `\n \r \t \b \a \\ \" \xHH`) and 'single quotes' (`\'`).
pub fn split_inline_args(line: &[u8]) -> Option<Vec<Bytes>> {
    let mut args = Vec::new();
    let mut i = 0;
    let n = line.len();
    loop {
        while i < n && line[i].is_ascii_whitespace() {
            i += 1;
        }
        if i >= n {
            return Some(args);
        }
        let mut cur = Vec::new();
        let mut in_dq = false;
        let mut in_sq = false;
        loop {
            if in_dq {
                if i >= n {
                    return None;
                }
                let c = line[i];
                if c == b'\\'
                    && i + 3 < n
                    && line[i + 1] == b'x'
                    && is_hex(line[i + 2])
                    && is_hex(line[i + 3])
                {
                    cur.push(hex(line[i + 2]) * 16 + hex(line[i + 3]));
                    i += 3;
                } else if c == b'\\' && i + 1 < n {
                    i += 1;
                    cur.push(match line[i] {
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        b'b' => 8,
                        b'a' => 7,
                        other => other,
                    });
                } else if c == b'"' {
                    // A closing quote must be followed by a space or the end.
                    if i + 1 < n && !line[i + 1].is_ascii_whitespace() {
                        return None;
                    }
                    i += 1;
                    break;
                } else {
                    cur.push(c);
                }
            } else if in_sq {
                if i >= n {
                    return None;
                }
                let c = line[i];
                if c == b'\\' && i + 1 < n && line[i + 1] == b'\'' {
                    i += 1;
                    cur.push(b'\'');
                } else if c == b'\'' {
                    if i + 1 < n && !line[i + 1].is_ascii_whitespace() {
                        return None;
                    }
                    i += 1;
                    break;
                } else {
                    cur.push(c);
                }
            } else {
                if i >= n {
                    break;
                }
                match line[i] {
                    b' ' | b'\n' | b'\r' | b'\t' | 0 => {
                        i += 1;
                        break;
                    }
                    b'"' => in_dq = true,
                    b'\'' => in_sq = true,
                    c => cur.push(c),
                }
            }
            i += 1;
        }
        args.push(Bytes::from(cur));
    }
}

fn is_hex(c: u8) -> bool {
    c.is_ascii_hexdigit()
}

fn hex(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        b'a'..=b'f' => c - b'a' + 10,
        _ => c - b'A' + 10,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(input: &[u8]) -> Result<Vec<Vec<Vec<u8>>>, ProtocolError> {
        let mut buf = BytesMut::from(input);
        let mut out = Vec::new();
        while let Some(r) = parse_request(&mut buf, &Limits::default())? {
            out.push(r.args.iter().map(|a| a.to_vec()).collect());
        }
        Ok(out)
    }

    #[test]
    fn parses_pipelined_multibulk_and_keeps_raw_bytes() {
        let input = b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n*1\r\n$4\r\nPING\r\n";
        let mut buf = BytesMut::from(&input[..]);
        let a = parse_request(&mut buf, &Limits::default())
            .unwrap()
            .unwrap();
        assert_eq!(&a.raw[..], b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n");
        assert_eq!(a.args, vec![Bytes::from("GET"), Bytes::from("k")]);
        let b = parse_request(&mut buf, &Limits::default())
            .unwrap()
            .unwrap();
        assert_eq!(b.args, vec![Bytes::from("PING")]);
        assert!(
            parse_request(&mut buf, &Limits::default())
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn waits_for_partial_frames_at_every_split_point() {
        let input = b"*3\r\n$3\r\nSET\r\n$2\r\nk\n\r\n$4\r\nv\r\nx\r\n";
        for split in 0..input.len() {
            let mut buf = BytesMut::from(&input[..split]);
            assert!(
                parse_request(&mut buf, &Limits::default())
                    .unwrap()
                    .is_none(),
                "split {split}"
            );
            buf.extend_from_slice(&input[split..]);
            let r = parse_request(&mut buf, &Limits::default())
                .unwrap()
                .unwrap();
            assert_eq!(r.args[2], Bytes::from_static(b"v\r\nx"));
        }
    }

    #[test]
    fn inline_commands_split_like_redis() {
        let got = parse_all(b"PING\r\nSET a \"b c\\n\"\r\n\r\nGET 'it\\'s'\n").unwrap();
        assert_eq!(got[0], vec![b"PING".to_vec()]);
        assert_eq!(
            got[1],
            vec![b"SET".to_vec(), b"a".to_vec(), b"b c\n".to_vec()]
        );
        assert_eq!(got[2], vec![b"GET".to_vec(), b"it's".to_vec()]);
        assert_eq!(
            parse_all(b"SET a \"b\r\n").unwrap_err().0,
            "unbalanced quotes in request"
        );
        assert_eq!(
            split_inline_args(b"\"\\x41\\x42\"").unwrap(),
            vec![Bytes::from_static(b"AB")]
        );
    }

    #[test]
    fn rejects_malformed_and_oversized_input_before_buffering() {
        let limits = Limits {
            max_bulk_len: 10,
            max_array_len: 3,
            ..Limits::default()
        };
        let check = |input: &[u8], msg: &str| {
            let mut buf = BytesMut::from(input);
            assert_eq!(
                parse_request(&mut buf, &limits).unwrap_err().0,
                msg,
                "{input:?}"
            );
        };
        check(b"*1\r\n$abc\r\n", "invalid bulk length");
        check(b"*2\r\n:1\r\n", "expected '$', got ':'");
        check(b"*x\r\n", "invalid multibulk length");
        check(b"*4\r\n", "invalid multibulk length");
        check(b"*1\r\n$11\r\n", "invalid bulk length");
        check(b"*1\r\n$-5\r\n", "invalid bulk length");
        check(b"*1\r\n$3\r\nabcd\r\n", "invalid bulk length");
        // No reservation happens for a rejected length.
        let mut buf = BytesMut::from(&b"*1\r\n$99999999999\r\n"[..]);
        assert!(parse_request(&mut buf, &limits).is_err());
        assert!(buf.capacity() < 1024);
    }

    #[test]
    fn empty_arrays_are_skipped() {
        assert_eq!(
            parse_all(b"*0\r\n*-1\r\n*1\r\n$4\r\nPING\r\n")
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn encodes_commands() {
        assert_eq!(
            &encode_command(&["GET", "k"])[..],
            b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"
        );
    }
}
