//! Client request framing: where a request ends, with Redis's limits and error texts.
//!
//! A request is its frame (a `Bytes` cut from the read buffer) and the offsets of its
//! arguments in it; its original bytes travel upstream unchanged. A request longer than
//! `u32` offsets can name (4 GiB) is refused. Limits are checked on the length headers,
//! and nothing is ever reserved or allocated from a declared length: a hostile
//! `$999999999` or `*2147483647` costs a header parse, and what a client can make redfuse
//! hold is bounded by the bytes it actually sends (and by `max_bulk_len` per argument).
//! [`Framer`] remembers how far it got in a partial request, so a large array or a slow
//! client is walked once, not once per read.
//!
//! The limits and error texts are Redis 7.0's (`networking.c`): a multibulk may have up to
//! `INT_MAX` elements and a bulk up to `proto-max-bulk-len` (512 MiB); a client that has not
//! authenticated where authentication is required ([`Peer::Unauthenticated`]) may send at
//! most 10 elements and 16 KiB per bulk (`Protocol error: unauthenticated multibulk
//! length`, `... bulk length`). Lengths are read like Redis's `string2ll` (no sign, no
//! leading zeros, no spaces). redfuse is at least as strict as Redis everywhere, so a frame
//! it forwards is read by Redis exactly as redfuse read it; where Redis is laxer (it skips
//! the two bytes after a bulk without looking at them) redfuse refuses.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use smallvec::SmallVec;

use super::put_line;

/// Redis's `PROTO_INLINE_MAX_SIZE`: the longest header or inline line looked for.
const MAX_LINE: usize = 64 * 1024;

/// Bounds on what a client may send, checked on the length headers, before anything is
/// buffered for them.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Longest bulk string (`max_bulk_len`, Redis's `proto-max-bulk-len`; 512 MiB).
    pub max_bulk_len: usize,
    /// Most elements in a request (`max_array_len`; Redis's `INT_MAX` by default).
    pub max_array_len: usize,
    /// Longest inline command line (Redis: 64 KiB).
    pub max_inline_len: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bulk_len: 512 * 1024 * 1024,
            max_array_len: i32::MAX as usize,
            max_inline_len: MAX_LINE,
        }
    }
}

impl Limits {
    /// Most elements Redis accepts from a client that has not authenticated.
    pub const UNAUTHENTICATED_MAX_ARRAY_LEN: i64 = 10;
    /// Longest bulk Redis accepts from a client that has not authenticated.
    pub const UNAUTHENTICATED_MAX_BULK_LEN: i64 = 16384;
}

/// Whether the client has authenticated, which changes Redis's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Peer {
    /// Authenticated, or no authentication is required: the configured [`Limits`].
    #[default]
    Authenticated,
    /// Authentication is required and the client has not given it yet: at most 10
    /// elements and 16 KiB per bulk, with Redis's own error texts.
    Unauthenticated,
}

/// A malformed frame. The message is the text after `Protocol error: `.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Protocol error: {0}")]
pub struct ProtocolError(pub String);

fn perr(msg: impl Into<String>) -> ProtocolError {
    ProtocolError(msg.into())
}

/// Where each argument of a request lies in its frame: start and end offsets. Four fit
/// inline, which covers GET, SET and the other commands of the hot path.
type Spans = SmallVec<[(u32, u32); 4]>;

/// The longest request redfuse reads: argument offsets are kept as `u32`. Redis's own
/// `client-query-buffer-limit` is 1 GiB by default, so no default Redis takes more.
const MAX_REQUEST_LEN: usize = u32::MAX as usize;

/// One client command: its wire bytes, and where its arguments lie in them.
///
/// The arguments are offsets into `raw`, not handles of their own: reading a command costs
/// no allocation for up to four arguments and no shared-count traffic per argument (each
/// `Bytes` slice raised and lowered the buffer's count, and showed in profiles).
#[derive(Clone)]
pub struct Request {
    /// The exact bytes to forward upstream (inline requests are re-encoded as RESP).
    pub raw: Bytes,
    /// At least one: the command name comes first.
    spans: Spans,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Request").field(&self.args()).finish()
    }
}

impl Request {
    /// Builds a request from arguments, encoding it as a RESP array (used for inline commands
    /// and for commands the proxy sends on its own behalf). `args` must not be empty.
    pub fn from_args<A: AsRef<[u8]>>(args: &[A]) -> Request {
        assert!(!args.is_empty(), "a request names a command");
        let mut spans = Spans::with_capacity(args.len());
        let raw = encode(args, |start, end| spans.push((start as u32, end as u32)));
        Request { raw, spans }
    }

    pub fn name(&self) -> &[u8] {
        self.args().arg(0)
    }

    /// The arguments, name first.
    pub fn args(&self) -> Args<'_> {
        Args {
            frame: &self.raw,
            spans: &self.spans,
        }
    }

    /// Every argument as a handle on the frame (each raises its shared count: not for the
    /// path of every request).
    pub fn arg_list(&self) -> Vec<Bytes> {
        (0..self.spans.len()).map(|i| self.arg_bytes(i)).collect()
    }

    /// Where argument `i` lies in the frame (start and end offsets).
    pub fn arg_span(&self, i: usize) -> (u32, u32) {
        self.spans[i]
    }

    /// Argument `i` as a handle on the frame, for what outlives the request.
    pub fn arg_bytes(&self, i: usize) -> Bytes {
        let (start, end) = self.spans[i];
        self.raw.slice(start as usize..end as usize)
    }
}

/// A request's arguments, borrowed: indexing (`args[i]`) gives an argument's bytes.
#[derive(Clone, Copy, Default)]
pub struct Args<'a> {
    frame: &'a [u8],
    spans: &'a [(u32, u32)],
}

impl<'a> Args<'a> {
    pub fn len(self) -> usize {
        self.spans.len()
    }

    pub fn is_empty(self) -> bool {
        self.spans.is_empty()
    }

    /// Argument `i`; panics past the end, as indexing does.
    pub fn arg(self, i: usize) -> &'a [u8] {
        let (start, end) = self.spans[i];
        &self.frame[start as usize..end as usize]
    }

    pub fn get(self, i: usize) -> Option<&'a [u8]> {
        (i < self.len()).then(|| self.arg(i))
    }

    pub fn first(self) -> Option<&'a [u8]> {
        self.get(0)
    }

    /// The arguments from `i` on (none if `i` is past the end).
    pub fn skip(self, i: usize) -> Args<'a> {
        Args {
            frame: self.frame,
            spans: self.spans.get(i..).unwrap_or_default(),
        }
    }

    pub fn iter(self) -> impl DoubleEndedIterator<Item = &'a [u8]> + ExactSizeIterator + Clone {
        let frame = self.frame;
        self.spans
            .iter()
            .map(move |&(start, end)| &frame[start as usize..end as usize])
    }
}

impl std::ops::Index<usize> for Args<'_> {
    type Output = [u8];

    fn index(&self, i: usize) -> &[u8] {
        self.arg(i)
    }
}

impl std::fmt::Debug for Args<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.iter().map(|a| String::from_utf8_lossy(a)))
            .finish()
    }
}

/// Encodes a command as a RESP array of bulk strings.
pub fn encode_command<A: AsRef<[u8]>>(args: &[A]) -> Bytes {
    encode(args, |_, _| {})
}

/// [`encode_command`], telling `placed` where each argument's bytes landed.
fn encode<A: AsRef<[u8]>>(args: &[A], mut placed: impl FnMut(usize, usize)) -> Bytes {
    let size: usize = args.iter().map(|a| a.as_ref().len() + 16).sum::<usize>() + 16;
    let mut out = BytesMut::with_capacity(size);
    out.put_u8(b'*');
    put_line(&mut out, args.len() as i64);
    for a in args {
        let a = a.as_ref();
        out.put_u8(b'$');
        put_line(&mut out, a.len() as i64);
        placed(out.len(), out.len() + a.len());
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

/// Reads a length header the way Redis's `string2ll` does: an optional `-`, then either
/// `0` alone or a digit 1-9 followed by digits, within `i64`. No `+`, no spaces, no leading
/// zeros, no `-0`.
/// A length header's digits and the `\r\n` after them, read in one pass from `at` (the
/// reply scanner's [`super::scan::digits_crlf`]): the length and where its `\r` is, for a
/// plain length (no sign, at most 18 digits) whose line is complete and, as Redis's
/// `string2ll` wants in requests, has no leading zero. Anything else, a line not yet
/// complete included, gives `None` and goes the general way (`Framer::line_end` and
/// [`parse_len`]), which answers it as Redis does; what this accepts, that way accepts
/// with the same value.
fn plain_len(buf: &[u8], at: usize) -> Option<(i64, usize)> {
    if buf.get(at) == Some(&b'0') && buf.get(at + 1) != Some(&b'\r') {
        return None;
    }
    let (n, after) = super::scan::digits_crlf(buf, at)?;
    Some((i64::try_from(n).ok()?, after - 2))
}

fn parse_len(s: &[u8]) -> Option<i64> {
    let (neg, digits) = match s.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, s),
    };
    match digits {
        [b'0'] if !neg => return Some(0),
        [b'1'..=b'9', ..] => {}
        _ => return None,
    }
    let mut v: u64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
    }
    if neg {
        if v > i64::MAX as u64 + 1 {
            return None;
        }
        Some((v as i64).wrapping_neg())
    } else {
        i64::try_from(v).ok()
    }
}

/// `expected '$', got 'x'` as Redis writes it: a CR or LF shows as a space.
fn expected_dollar(got: u8) -> ProtocolError {
    let shown = match got {
        b'\r' | b'\n' => ' ',
        b => b as char,
    };
    perr(format!("expected '$', got '{shown}'"))
}

/// Takes the next complete request out of `buf`, as an authenticated client.
///
/// Stateless: it walks `buf` from its start on every call. Fine for a buffer that holds
/// whole frames (a journal entry, a test); a connection uses a [`Framer`], which resumes.
pub fn parse_request(
    buf: &mut BytesMut,
    limits: &Limits,
) -> Result<Option<Request>, ProtocolError> {
    Framer::new().next(buf, limits, Peer::Authenticated)
}

/// Splits a client's byte stream into requests, resuming where the previous call stopped.
///
/// Call [`Framer::next`] with the connection's whole unconsumed buffer each time (bytes are
/// only ever appended to it between calls); it returns `Ok(None)` when more bytes are
/// needed, and skips empty inline lines and `*0`/`*-1` arrays as Redis does. Its state is
/// the position reached in the current request and one span per argument already read, so
/// it costs memory in proportion to the bytes received, whatever the declared lengths.
#[derive(Debug, Default)]
pub struct Framer {
    /// Where the unread part of the current request starts in the buffer.
    pos: usize,
    /// Elements still expected in the current multibulk; 0 between requests.
    remaining: u64,
    /// The length of the bulk whose header has been read, while waiting for its bytes.
    bulk: Option<usize>,
    /// The arguments read so far, as ranges of the buffer; handed to the request whole.
    spans: Spans,
    /// How far the line being looked for (a header or an inline command) was searched
    /// without finding its end.
    searched: usize,
}

impl Framer {
    pub fn new() -> Framer {
        Framer::default()
    }

    /// Forgets a partial request (the buffer it pointed into was discarded).
    pub fn reset(&mut self) {
        self.pos = 0;
        self.remaining = 0;
        self.bulk = None;
        self.spans.clear();
        self.searched = 0;
    }

    /// Bytes of `buf` that belong to a request not yet complete.
    pub fn partial_len(&self) -> usize {
        self.pos
    }

    /// The next complete request in `buf`, with Redis's limits for `peer`.
    pub fn next(
        &mut self,
        buf: &mut BytesMut,
        limits: &Limits,
        peer: Peer,
    ) -> Result<Option<Request>, ProtocolError> {
        loop {
            if self.remaining == 0 {
                if buf.is_empty() {
                    return Ok(None);
                }
                if buf[0] != b'*' {
                    match self.inline(buf, limits)? {
                        InlineOutcome::Incomplete => return Ok(None),
                        InlineOutcome::Empty => continue,
                        InlineOutcome::Request(r) => return Ok(Some(r)),
                    }
                }
                // Multibulk: `*<n>\r\n` followed by n bulk strings.
                let (count, cr) = match plain_len(buf, 1) {
                    Some(header) => {
                        self.searched = 0;
                        header
                    }
                    None => {
                        let Some(cr) = self.line_end(buf, 1) else {
                            if buf.len() > MAX_LINE {
                                return Err(perr("too big mbulk count string"));
                            }
                            return Ok(None);
                        };
                        (parse_len(&buf[1..cr]).unwrap_or(i64::MAX), cr)
                    }
                };
                if count > i64::from(i32::MAX) {
                    return Err(perr("invalid multibulk length"));
                }
                if peer == Peer::Unauthenticated && count > Limits::UNAUTHENTICATED_MAX_ARRAY_LEN {
                    return Err(perr("unauthenticated multibulk length"));
                }
                if count > 0 && count as u64 > limits.max_array_len as u64 {
                    return Err(perr("invalid multibulk length"));
                }
                if count <= 0 {
                    buf.advance(cr + 2);
                    continue;
                }
                self.remaining = count as u64;
                self.pos = cr + 2;
                self.spans.clear();
            }
            while self.remaining > 0 {
                let Some(len) = self.bulk else {
                    if self.pos >= buf.len() {
                        return Ok(None);
                    }
                    if buf[self.pos] != b'$' {
                        return Err(expected_dollar(buf[self.pos]));
                    }
                    let (len, cr) = match plain_len(buf, self.pos + 1) {
                        Some(header) => {
                            self.searched = 0;
                            header
                        }
                        None => {
                            let Some(cr) = self.line_end(buf, self.pos + 1) else {
                                if buf.len() - self.pos > MAX_LINE {
                                    return Err(perr("too big bulk count string"));
                                }
                                return Ok(None);
                            };
                            (parse_len(&buf[self.pos + 1..cr]).unwrap_or(-1), cr)
                        }
                    };
                    if len < 0 || len as u64 > limits.max_bulk_len as u64 {
                        return Err(perr("invalid bulk length"));
                    }
                    if peer == Peer::Unauthenticated && len > Limits::UNAUTHENTICATED_MAX_BULK_LEN {
                        return Err(perr("unauthenticated bulk length"));
                    }
                    self.bulk = Some(len as usize);
                    self.pos = cr + 2;
                    continue;
                };
                // Nothing is reserved for the declared length: the buffer grows with what
                // actually arrives.
                let end = self.pos + len;
                if end > MAX_REQUEST_LEN {
                    return Err(perr("too big request"));
                }
                if buf.len() < end + 2 {
                    return Ok(None);
                }
                if &buf[end..end + 2] != b"\r\n" {
                    return Err(perr("invalid bulk length"));
                }
                self.spans.push((self.pos as u32, end as u32));
                self.pos = end + 2;
                self.bulk = None;
                self.remaining -= 1;
            }
            let raw = buf.split_to(self.pos).freeze();
            let spans = std::mem::take(&mut self.spans);
            self.pos = 0;
            return Ok(Some(Request { raw, spans }));
        }
    }

    /// Finds the `\r\n` ending the header line that starts before `from`, resuming the
    /// search where the last call gave up.
    fn line_end(&mut self, buf: &[u8], from: usize) -> Option<usize> {
        // Back one byte: a `\r` at the end of the searched part may meet its `\n` now.
        let start = self.searched.saturating_sub(1).max(from);
        match find_crlf(buf, start) {
            Some(cr) => {
                self.searched = 0;
                Some(cr)
            }
            None => {
                self.searched = buf.len();
                None
            }
        }
    }

    fn inline(
        &mut self,
        buf: &mut BytesMut,
        limits: &Limits,
    ) -> Result<InlineOutcome, ProtocolError> {
        let from = self.searched.min(buf.len());
        let Some(nl) = buf[from..]
            .iter()
            .position(|&b| b == b'\n')
            .map(|i| i + from)
        else {
            if buf.len() > limits.max_inline_len {
                return Err(perr("too big inline request"));
            }
            self.searched = buf.len();
            return Ok(InlineOutcome::Incomplete);
        };
        self.searched = 0;
        if nl > limits.max_inline_len {
            return Err(perr("too big inline request"));
        }
        let line = buf.split_to(nl + 1);
        let mut content = &line[..nl];
        if content.last() == Some(&b'\r') {
            content = &content[..content.len() - 1];
        }
        let args =
            split_inline_args(content).ok_or_else(|| perr("unbalanced quotes in request"))?;
        if args.is_empty() {
            return Ok(InlineOutcome::Empty);
        }
        Ok(InlineOutcome::Request(Request::from_args(&args)))
    }
}

enum InlineOutcome {
    Incomplete,
    Empty,
    Request(Request),
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
            out.push(r.args().iter().map(|a| a.to_vec()).collect());
        }
        Ok(out)
    }

    #[test]
    fn a_request_longer_than_its_offsets_can_name_is_refused_before_its_bytes() {
        // Only a configured `max_bulk_len` past 4 GiB lets a header get here; nothing is
        // buffered for it. This bulk would end one byte past `u32::MAX`; one byte shorter
        // is read (it waits for its bytes).
        let limits = Limits {
            max_bulk_len: usize::MAX,
            ..Limits::default()
        };
        let mut buf = BytesMut::from(&b"*2\r\n$3\r\nSET\r\n$4294967270\r\nab"[..]);
        let err = Framer::new()
            .next(&mut buf, &limits, Peer::Authenticated)
            .unwrap_err();
        assert_eq!(err.to_string(), "Protocol error: too big request");
        let mut buf = BytesMut::from(&b"*2\r\n$3\r\nSET\r\n$4294967269\r\nab"[..]);
        let pending = Framer::new().next(&mut buf, &limits, Peer::Authenticated);
        assert!(matches!(pending, Ok(None)), "{pending:?}");
    }

    /// The one-pass header read agrees with the general one (the line's end, then
    /// `parse_len`) wherever it answers, and leaves to it everything it does not take.
    #[test]
    fn plain_lengths_read_as_the_general_way_reads_them() {
        let mut lines: Vec<Vec<u8>> = [
            &b"0\r\n"[..],
            b"7\r\n",
            b"42\r\nx",
            b"00\r\n",
            b"01\r\n",
            b"-1\r\n",
            b"+5\r\n",
            b"5\n",
            b"5\r",
            b"5",
            b"",
            b"\r\n",
            b"12a\r\n",
            b" 3\r\n",
            b"3 \r\n",
            b"99999999999999999\r\n",
            b"999999999999999999\r\n",
            b"9999999999999999999\r\n",
            b"99999999999999999999\r\n",
            b"9223372036854775807\r\n",
        ]
        .iter()
        .map(|l| l.to_vec())
        .collect();
        // Every length up to six digits, with and without the line's end.
        for n in (0..1_000_000u32).step_by(7) {
            lines.push(format!("{n}\r\n").into_bytes());
            lines.push(format!("{n}").into_bytes());
        }
        let mut taken = 0;
        for line in &lines {
            let buf = [b"$".as_slice(), line].concat();
            let general = find_crlf(&buf, 1).map(|cr| (parse_len(&buf[1..cr]), cr));
            match plain_len(&buf, 1) {
                Some((n, cr)) => {
                    taken += 1;
                    assert_eq!(
                        general,
                        Some((Some(n), cr)),
                        "{:?}",
                        String::from_utf8_lossy(line)
                    );
                    assert!(n >= 0);
                }
                None => assert!(
                    !matches!(general, Some((Some(n), _)) if n >= 0 && n < 10i64.pow(17)),
                    "left a plain length to the general way: {:?}",
                    String::from_utf8_lossy(line)
                ),
            }
        }
        assert!(taken > lines.len() / 3, "{taken} of {}", lines.len());
    }

    #[test]
    fn arguments_are_views_of_the_frame() {
        let mut buf = BytesMut::from(&b"*4\r\n$4\r\nMGET\r\n$1\r\na\r\n$0\r\n\r\n$2\r\nbc\r\n"[..]);
        let r = parse_request(&mut buf, &Limits::default())
            .unwrap()
            .unwrap();
        let args = r.args();
        assert_eq!(args.len(), 4);
        assert_eq!(r.name(), b"MGET");
        assert_eq!(
            args.iter().collect::<Vec<_>>(),
            [&b"MGET"[..], b"a", b"", b"bc"]
        );
        assert_eq!(args.skip(2).iter().collect::<Vec<_>>(), [&b""[..], b"bc"]);
        assert!(args.skip(9).is_empty());
        assert_eq!((args.get(3), args.get(4)), (Some(&b"bc"[..]), None));
        assert_eq!(r.arg_bytes(3), Bytes::from("bc"));
        // Built from arguments, the frame is their RESP encoding and the views agree.
        let built = Request::from_args(&["MGET", "a", "", "bc"]);
        assert_eq!(built.raw, r.raw);
        assert_eq!(built.arg_list(), r.arg_list());
    }

    #[test]
    fn parses_pipelined_multibulk_and_keeps_raw_bytes() {
        let input = b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n*1\r\n$4\r\nPING\r\n";
        let mut buf = BytesMut::from(&input[..]);
        let a = parse_request(&mut buf, &Limits::default())
            .unwrap()
            .unwrap();
        assert_eq!(&a.raw[..], b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n");
        assert_eq!(a.arg_list(), vec![Bytes::from("GET"), Bytes::from("k")]);
        let b = parse_request(&mut buf, &Limits::default())
            .unwrap()
            .unwrap();
        assert_eq!(b.arg_list(), vec![Bytes::from("PING")]);
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
            assert_eq!(&r.args()[2], &Bytes::from_static(b"v\r\nx"));
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
    fn lengths_are_read_like_redis_string2ll() {
        for (input, msg) in [
            (&b"*01\r\n"[..], "invalid multibulk length"),
            (b"*+1\r\n", "invalid multibulk length"),
            (b"* 1\r\n", "invalid multibulk length"),
            (b"*1 \r\n", "invalid multibulk length"),
            (b"*\r\n", "invalid multibulk length"),
            (b"*2147483648\r\n", "invalid multibulk length"),
            (b"*9223372036854775808\r\n", "invalid multibulk length"),
            (b"*1\r\n$-0\r\n", "invalid bulk length"),
            (b"*1\r\n$03\r\nabc\r\n", "invalid bulk length"),
            (b"*1\r\n$\r\n", "invalid bulk length"),
            (b"*1\r\n$-2147483648\r\n", "invalid bulk length"),
            (b"*1\r\n$536870913\r\n", "invalid bulk length"),
            (b"*1\r\n\r\n", "expected '$', got ' '"),
        ] {
            let mut buf = BytesMut::from(input);
            assert_eq!(
                parse_request(&mut buf, &Limits::default()).unwrap_err().0,
                msg,
                "{}",
                input.escape_ascii()
            );
        }
        assert_eq!(parse_len(b"0"), Some(0));
        assert_eq!(parse_len(b"-9223372036854775808"), Some(i64::MIN));
        assert_eq!(parse_len(b"9223372036854775807"), Some(i64::MAX));
        assert_eq!(parse_len(b"-"), None);
        // Negative counts are skipped like `*0`, as Redis does.
        assert_eq!(
            parse_all(b"*-5\r\n*-9223372036854775808\r\nPING\r\n")
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn unauthenticated_clients_get_redis_tighter_limits() {
        let limits = Limits::default();
        let run = |input: &[u8], peer| {
            let mut buf = BytesMut::from(input);
            Framer::new().next(&mut buf, &limits, peer)
        };
        let ten = encode_command(&["DEL"; 10]);
        assert!(run(&ten, Peer::Unauthenticated).unwrap().is_some());
        let eleven = encode_command(&["DEL"; 11]);
        assert_eq!(
            run(&eleven, Peer::Unauthenticated).unwrap_err().0,
            "unauthenticated multibulk length"
        );
        assert!(run(&eleven, Peer::Authenticated).unwrap().is_some());
        assert_eq!(
            run(b"*2147483647\r\n", Peer::Unauthenticated)
                .unwrap_err()
                .0,
            "unauthenticated multibulk length"
        );
        let at_limit = encode_command(&[&b"AUTH"[..], &[b'x'; 16384]]);
        assert!(run(&at_limit, Peer::Unauthenticated).unwrap().is_some());
        assert_eq!(
            run(b"*2\r\n$4\r\nAUTH\r\n$16385\r\n", Peer::Unauthenticated)
                .unwrap_err()
                .0,
            "unauthenticated bulk length"
        );
        // Redis checks the hard limits first.
        assert_eq!(
            run(b"*2147483648\r\n", Peer::Unauthenticated)
                .unwrap_err()
                .0,
            "invalid multibulk length"
        );
        assert_eq!(
            run(b"*1\r\n$-1\r\n", Peer::Unauthenticated).unwrap_err().0,
            "invalid bulk length"
        );
    }

    #[test]
    fn declared_lengths_cost_nothing_until_the_bytes_arrive() {
        let mut framer = Framer::new();
        let mut buf = BytesMut::with_capacity(64);
        buf.extend_from_slice(b"*2147483647\r\n$536870912\r\nabc");
        assert!(
            framer
                .next(&mut buf, &Limits::default(), Peer::Authenticated)
                .unwrap()
                .is_none()
        );
        assert_eq!(
            buf.capacity(),
            64,
            "nothing reserved for the declared sizes"
        );
        assert!(framer.spans.capacity() <= 64);
    }

    #[test]
    fn a_million_element_command_is_accepted_and_read_once() {
        // SADD with 1.1M members: more than the old 1M cap, well within Redis's.
        let n = 1_100_000;
        let mut input = Vec::with_capacity(n * 16);
        input.extend_from_slice(format!("*{}\r\n$4\r\nSADD\r\n$1\r\ns\r\n", n + 2).as_bytes());
        for i in 0..n {
            let m = i.to_string();
            input.extend_from_slice(format!("${}\r\n{m}\r\n", m.len()).as_bytes());
        }
        // Arriving in 64 KiB reads: each read is walked once.
        let mut framer = Framer::new();
        let mut buf = BytesMut::new();
        let mut got = None;
        for chunk in input.chunks(64 * 1024) {
            buf.extend_from_slice(chunk);
            if let Some(r) = framer
                .next(&mut buf, &Limits::default(), Peer::Authenticated)
                .unwrap()
            {
                got = Some(r);
            }
        }
        let r = got.expect("complete");
        assert_eq!(r.args().len(), n + 2);
        assert_eq!(&r.args()[n + 1], (n - 1).to_string().as_bytes());
        assert_eq!(r.raw.len(), input.len());
        assert!(buf.is_empty());
    }

    #[test]
    fn a_frame_fed_one_byte_at_a_time_resumes_at_every_point() {
        let mut input = encode_command(&["SET", "key", "a value\r\nwith CRLF"]).to_vec();
        input.extend_from_slice(b"GET 'inline key'\r\n*0\r\n");
        input.extend_from_slice(&encode_command(&["PING"]));
        let want: Vec<Vec<Bytes>> = {
            let mut buf = BytesMut::from(&input[..]);
            std::iter::from_fn(|| parse_request(&mut buf, &Limits::default()).unwrap())
                .map(|r| r.arg_list())
                .collect()
        };
        assert_eq!(want.len(), 3);
        let mut framer = Framer::new();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for &b in &input {
            buf.extend_from_slice(&[b]);
            while let Some(r) = framer
                .next(&mut buf, &Limits::default(), Peer::Authenticated)
                .unwrap()
            {
                got.push(r.arg_list());
            }
        }
        assert_eq!(got, want);
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
