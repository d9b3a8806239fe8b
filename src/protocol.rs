//! RESP framing: where a frame ends, and the few replies the proxy makes itself.
//!
//! redfuse never decodes a frame it only forwards. A client request is split into
//! argument slices that share the read buffer (`Bytes::slice`), and the request's original
//! bytes travel upstream unchanged. Upstream replies are only *measured*: [`ReplyScanner`]
//! walks a RESP2/RESP3 frame to find its end without building a value, and it is resumable,
//! so a large array arriving in many reads is walked once, not once per read.
//!
//! Limits are checked on the length headers before anything is buffered or reserved, so a
//! hostile `$999999999999` or `*2147483647` costs a header parse and an error, nothing more.
//! Error texts match Redis's (`Protocol error: invalid bulk length` ...) so that clients that
//! match on them keep working.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Bounds on what a client may send (and an upstream may nest), checked before allocating.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_bulk_len: usize,
    pub max_array_len: usize,
    pub max_inline_len: usize,
    pub max_nesting_depth: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bulk_len: 512 * 1024 * 1024,
            max_array_len: 1024 * 1024,
            max_inline_len: 64 * 1024,
            max_nesting_depth: 128,
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

/// RESP protocol version spoken on a connection (`HELLO 2|3`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Proto {
    #[default]
    Resp2,
    Resp3,
}

impl Proto {
    pub fn as_u8(self) -> u8 {
        match self {
            Proto::Resp2 => 2,
            Proto::Resp3 => 3,
        }
    }
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
    put_decimal(&mut out, args.len() as i64);
    for a in args {
        let a = a.as_ref();
        out.put_u8(b'$');
        put_decimal(&mut out, a.len() as i64);
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out.freeze()
}

fn put_decimal(out: &mut BytesMut, n: i64) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Parses a decimal integer the way Redis does for length headers (no `+`, no spaces).
fn parse_int(line: &[u8]) -> Option<i64> {
    let (neg, digits) = match line.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, line),
    };
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    let mut v: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add((d - b'0') as i64)?;
    }
    Some(if neg { -v } else { v })
}

/// Finds `\r\n` at or after `from`; returns the index of `\r`.
fn find_crlf(buf: &[u8], from: usize) -> Option<usize> {
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

/// Finds the end of one RESP2/RESP3 reply frame without decoding it.
///
/// State survives between calls on the same (growing) buffer, so a frame split over many
/// reads is walked once. Call [`ReplyScanner::scan`] with the whole unconsumed buffer each
/// time; after it returns `Some(len)`, consume `len` bytes and the scanner is ready for the
/// next frame.
#[derive(Debug, Default)]
pub struct ReplyScanner {
    pos: usize,
    /// Children still expected by each open aggregate, innermost last.
    open: Vec<u64>,
}

impl ReplyScanner {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn scan(&mut self, buf: &[u8], max_depth: usize) -> Result<Option<usize>, ProtocolError> {
        loop {
            if self.pos >= buf.len() {
                return Ok(None);
            }
            let Some(cr) = find_crlf(buf, self.pos + 1) else {
                return Ok(None);
            };
            let kind = buf[self.pos];
            let header = &buf[self.pos + 1..cr];
            let after = cr + 2;
            match kind {
                b'+' | b'-' | b':' | b'_' | b',' | b'#' | b'(' => {
                    self.pos = after;
                    if self.element_done() {
                        return Ok(Some(self.finish()));
                    }
                }
                b'$' | b'!' | b'=' => {
                    let len =
                        parse_int(header).ok_or_else(|| perr("invalid bulk length in reply"))?;
                    if len < 0 {
                        self.pos = after;
                    } else {
                        let end = after + len as usize + 2;
                        if end > buf.len() {
                            return Ok(None);
                        }
                        self.pos = end;
                    }
                    if self.element_done() {
                        return Ok(Some(self.finish()));
                    }
                }
                b'*' | b'~' | b'>' | b'%' | b'|' => {
                    let n = parse_int(header)
                        .ok_or_else(|| perr("invalid multibulk length in reply"))?;
                    self.pos = after;
                    let children = match kind {
                        b'%' => n.max(0) as u64 * 2,
                        // An attribute map is followed by the value it annotates.
                        b'|' => n.max(0) as u64 * 2 + 1,
                        _ => n.max(0) as u64,
                    };
                    if children == 0 {
                        if self.element_done() {
                            return Ok(Some(self.finish()));
                        }
                    } else {
                        if self.open.len() >= max_depth {
                            return Err(perr("reply nesting too deep"));
                        }
                        self.open.push(children);
                    }
                }
                other => {
                    return Err(perr(format!(
                        "unexpected reply type byte '{}'",
                        other.escape_ascii()
                    )));
                }
            }
        }
    }

    /// Marks one element complete; true when that completes the whole frame.
    fn element_done(&mut self) -> bool {
        while let Some(top) = self.open.last_mut() {
            *top -= 1;
            if *top > 0 {
                return false;
            }
            self.open.pop();
        }
        true
    }

    fn finish(&mut self) -> usize {
        let len = self.pos;
        self.pos = 0;
        len
    }

    /// Forgets a partially scanned frame (after the connection it belonged to is gone).
    pub fn reset(&mut self) {
        self.pos = 0;
        self.open.clear();
    }
}

/// Whether a raw reply is an error reply (`-ERR ...` or RESP3 blob error).
pub fn is_error_reply(reply: &[u8]) -> bool {
    matches!(reply.first(), Some(b'-') | Some(b'!'))
}

/// Replies the proxy makes itself.
pub mod reply {
    use super::*;

    pub const OK: &[u8] = b"+OK\r\n";
    pub const PONG: &[u8] = b"+PONG\r\n";

    pub fn ok() -> Bytes {
        Bytes::from_static(OK)
    }

    pub fn simple(s: &str) -> Bytes {
        let mut b = BytesMut::with_capacity(s.len() + 3);
        b.put_u8(b'+');
        b.extend_from_slice(s.as_bytes());
        b.extend_from_slice(b"\r\n");
        b.freeze()
    }

    /// An error reply; `msg` includes the code (`ERR ...`). CR/LF are replaced so the
    /// reply stays one line whatever the message.
    pub fn error(msg: &str) -> Bytes {
        let mut b = BytesMut::with_capacity(msg.len() + 3);
        b.put_u8(b'-');
        for &c in msg.as_bytes() {
            b.put_u8(if c == b'\r' || c == b'\n' { b' ' } else { c });
        }
        b.extend_from_slice(b"\r\n");
        b.freeze()
    }

    pub fn integer(n: i64) -> Bytes {
        let mut b = BytesMut::with_capacity(24);
        b.put_u8(b':');
        put_decimal(&mut b, n);
        b.freeze()
    }

    pub fn bulk(data: &[u8]) -> Bytes {
        let mut b = BytesMut::with_capacity(data.len() + 16);
        put_bulk(&mut b, data);
        b.freeze()
    }

    pub fn put_bulk(b: &mut BytesMut, data: &[u8]) {
        b.put_u8(b'$');
        put_decimal(b, data.len() as i64);
        b.extend_from_slice(data);
        b.extend_from_slice(b"\r\n");
    }

    pub fn put_header(b: &mut BytesMut, kind: u8, n: usize) {
        b.put_u8(kind);
        put_decimal(b, n as i64);
    }

    /// The null reply: `$-1` in RESP2, `_` in RESP3.
    pub fn null(proto: Proto) -> Bytes {
        Bytes::from_static(match proto {
            Proto::Resp2 => b"$-1\r\n",
            Proto::Resp3 => b"_\r\n",
        })
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

    fn scan_one(input: &[u8]) -> Option<usize> {
        ReplyScanner::new().scan(input, 16).unwrap()
    }

    #[test]
    fn reply_scanner_finds_frame_ends() {
        let frames: &[&[u8]] = &[
            b"+OK\r\n",
            b"-ERR x\r\n",
            b":12\r\n",
            b"$-1\r\n",
            b"$5\r\nab\r\nc\r\n",
            b"*-1\r\n",
            b"*0\r\n",
            b"*2\r\n$1\r\na\r\n*1\r\n:1\r\n",
            b"%1\r\n+k\r\n*2\r\n_\r\n,1.5\r\n",
            b">3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$1\r\nm\r\n",
            b"|1\r\n+key\r\n+val\r\n:5\r\n",
            b"!3\r\nERR\r\n",
            b"=8\r\ntxt:abcd\r\n",
            b"~2\r\n#t\r\n(123\r\n",
        ];
        for f in frames {
            let mut input = f.to_vec();
            input.extend_from_slice(b"+NEXT\r\n");
            assert_eq!(
                scan_one(&input),
                Some(f.len()),
                "{:?}",
                String::from_utf8_lossy(f)
            );
            for split in 0..f.len() {
                assert_eq!(scan_one(&f[..split]), None);
            }
        }
    }

    #[test]
    fn reply_scanner_resumes_across_reads() {
        let frame = b"*3\r\n$3\r\nabc\r\n*2\r\n:1\r\n:2\r\n$2\r\nxy\r\n";
        for split in 1..frame.len() {
            let mut s = ReplyScanner::new();
            assert_eq!(s.scan(&frame[..split], 8).unwrap(), None);
            assert_eq!(s.scan(frame, 8).unwrap(), Some(frame.len()));
            assert_eq!(s.scan(b"+OK\r\n", 8).unwrap(), Some(5));
        }
    }

    #[test]
    fn reply_scanner_bounds_depth_and_rejects_garbage() {
        let deep = b"*1\r\n".repeat(20);
        assert!(ReplyScanner::new().scan(&deep, 16).is_err());
        assert!(ReplyScanner::new().scan(b"?what\r\n", 16).is_err());
    }

    #[test]
    fn encodes_commands_and_replies() {
        assert_eq!(
            &encode_command(&["GET", "k"])[..],
            b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"
        );
        assert_eq!(&reply::error("ERR a\r\nb")[..], b"-ERR a  b\r\n");
        assert_eq!(&reply::integer(-3)[..], b":-3\r\n");
        assert_eq!(&reply::null(Proto::Resp3)[..], b"_\r\n");
    }
}
