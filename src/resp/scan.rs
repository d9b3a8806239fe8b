//! Upstream replies: where a reply frame ends, found without decoding it.
//!
//! [`ReplyScanner`] walks a RESP2/RESP3 frame to find its end without building a value, and
//! it is resumable, so a large array arriving in many reads is walked once, not once per
//! read. Its only state is one counter per open aggregate, so nesting costs eight bytes a
//! level and never recursion.

use bytes::Bytes;

use super::parse_int;
use super::request::{ProtocolError, find_crlf};

fn perr(msg: impl Into<String>) -> ProtocolError {
    ProtocolError(msg.into())
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
            // Most frames are bulk strings (`GET`'s, each element of `MGET`'s): their length
            // is read where it lies, without a search for the line's end first.
            if let Some(end) = bulk_end(buf, self.pos) {
                if end > buf.len() {
                    return Ok(None);
                }
                self.pos = end;
                if self.element_done() {
                    return Ok(Some(self.finish()));
                }
                continue;
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

/// Where the bulk string frame at `at` (`$<len>\r\n<len bytes>\r\n`) ends, read off its
/// header; possibly past the end of `buf`, when the rest has yet to arrive. `None` when
/// `at` holds no bulk string with a plain length header (see [`digits_crlf`]).
fn bulk_end(buf: &[u8], at: usize) -> Option<usize> {
    if buf.get(at) != Some(&b'$') {
        return None;
    }
    let (len, after) = digits_crlf(buf, at + 1)?;
    Some(after.saturating_add(len).saturating_add(2))
}

/// A non-negative length header at `at`: 1 to 18 digits and CRLF, read where it lies.
/// `None` for anything else (a negative length, a header not all here yet, a malformed
/// one), which the caller reads the general way.
pub(super) fn digits_crlf(buf: &[u8], at: usize) -> Option<(usize, usize)> {
    let mut n: u64 = 0;
    let mut i = at;
    while let Some(&d) = buf.get(i) {
        if !d.is_ascii_digit() || i - at == 18 {
            break;
        }
        n = n * 10 + u64::from(d - b'0');
        i += 1;
    }
    if i == at || buf.get(i..i + 2) != Some(b"\r\n") {
        return None;
    }
    Some((usize::try_from(n).ok()?, i + 2))
}

/// Splits an aggregate frame (array, set, map or push) into its elements' raw frames, as
/// zero-copy slices of `frame`; a map's keys and values alternate. `None` for anything else,
/// including a truncated frame or one with bytes after its end.
pub fn split_aggregate(frame: &Bytes) -> Option<Vec<Bytes>> {
    Some(
        element_ranges(frame)?
            .into_iter()
            .map(|r| frame.slice(r))
            .collect(),
    )
}

/// Where in `frame` each element of [`split_aggregate`] lies, for a caller that only reads
/// them (no shared-buffer count taken per element).
pub fn element_ranges(frame: &[u8]) -> Option<Vec<std::ops::Range<usize>>> {
    if !matches!(frame.first(), Some(b'*' | b'~' | b'%' | b'>')) {
        return None;
    }
    let cr = find_crlf(frame, 1)?;
    let n = usize::try_from(parse_int(&frame[1..cr])?).ok()?;
    let n = if frame[0] == b'%' {
        n.checked_mul(2)?
    } else {
        n
    };
    // Every element takes at least three bytes, so a lying header cannot make this
    // allocate more than the frame's size.
    let mut out = Vec::with_capacity(n.min(frame.len() / 3));
    let mut pos = cr + 2;
    for _ in 0..n {
        let rest = &frame[pos..];
        // A bulk string (MGET's elements) says where it ends in its header.
        let len = match bulk_end(rest, 0) {
            Some(end) => end,
            None => ReplyScanner::new().scan(rest, usize::MAX).ok()??,
        };
        if len > rest.len() {
            return None;
        }
        out.push(pos..pos + len);
        pos += len;
    }
    (pos == frame.len()).then_some(out)
}

/// Builds an array frame from element frames (the inverse of [`split_aggregate`] for
/// arrays).
pub fn join_array(parts: &[Bytes]) -> Bytes {
    let mut buf = bytes::BytesMut::with_capacity(24 + parts.iter().map(Bytes::len).sum::<usize>());
    super::reply::put_header(&mut buf, b'*', parts.len());
    for part in parts {
        buf.extend_from_slice(part);
    }
    buf.freeze()
}

/// Whether a raw reply is an error reply (`-ERR ...` or RESP3 blob error).
pub fn is_error_reply(reply: &[u8]) -> bool {
    matches!(reply.first(), Some(b'-') | Some(b'!'))
}

#[cfg(test)]
mod split_tests {
    use super::*;

    #[test]
    fn aggregates_split_into_element_frames_and_join_back() {
        let f = Bytes::from_static(b"*3\r\n$1\r\na\r\n$-1\r\n*1\r\n:1\r\n");
        let parts = split_aggregate(&f).unwrap();
        assert_eq!(
            parts,
            vec![
                Bytes::from_static(b"$1\r\na\r\n"),
                Bytes::from_static(b"$-1\r\n"),
                Bytes::from_static(b"*1\r\n:1\r\n"),
            ]
        );
        assert_eq!(join_array(&parts), f);
        let map = Bytes::from_static(b"%1\r\n+k\r\n:2\r\n");
        assert_eq!(split_aggregate(&map).unwrap().len(), 2);
        assert!(split_aggregate(&Bytes::from_static(b"*2\r\n:1\r\n")).is_none());
        assert!(split_aggregate(&Bytes::from_static(b"*1\r\n:1\r\n:2\r\n")).is_none());
        assert!(split_aggregate(&Bytes::from_static(b"$1\r\na\r\n")).is_none());
        assert!(split_aggregate(&Bytes::from_static(b"*99999999\r\n")).is_none());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            b"$007\r\nabcdefg\r\n",
            b"$12\r\nhello\r\nworld\r\n",
            b"$0\r\n\r\n",
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
        // A bulk length that is not all digits is an error, not a frame of some length.
        assert!(ReplyScanner::new().scan(b"$1x\r\na\r\n", 16).is_err());
        assert!(ReplyScanner::new().scan(b"$\r\n\r\n", 16).is_err());
        // A length too long for the fast read is read the general way.
        assert_eq!(
            ReplyScanner::new()
                .scan(b"$0000000000000000003\r\nabc\r\n", 16)
                .unwrap(),
            Some(27)
        );
    }

    #[test]
    fn element_ranges_of_bulk_strings_read_their_headers() {
        let f = b"*4\r\n$3\r\nabc\r\n$-1\r\n$12\r\nhello\r\nworld\r\n$0\r\n\r\n";
        let ranges = element_ranges(f).unwrap();
        let parts: Vec<&[u8]> = ranges.iter().map(|r| &f[r.clone()]).collect();
        assert_eq!(
            parts,
            [
                b"$3\r\nabc\r\n".as_slice(),
                b"$-1\r\n",
                b"$12\r\nhello\r\nworld\r\n",
                b"$0\r\n\r\n"
            ]
        );
        // A bulk string whose header promises more than the frame holds.
        assert!(element_ranges(b"*1\r\n$9\r\nabc\r\n").is_none());
        assert!(element_ranges(b"*2\r\n$3\r\nabc\r\n").is_none());
    }
}
