//! RESP2/RESP3 encoding, framing and a small value decoder for assertions.

use std::fmt::Write as _;

/// Encode a command as a RESP array of bulk strings.
///
/// Accepts anything byte-like: `resp_cmd(&["SET", "k", "v"])`,
/// `resp_cmd(&[&b"SET"[..], &value])`.
pub fn resp_cmd<A: AsRef<[u8]>>(args: &[A]) -> Vec<u8> {
    let mut out =
        Vec::with_capacity(16 + args.iter().map(|a| a.as_ref().len() + 16).sum::<usize>());
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        let a = a.as_ref();
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Encode a bulk string reply (`$N\r\n...\r\n`), handy for expected values.
pub fn bulk(data: impl AsRef<[u8]>) -> Vec<u8> {
    let data = data.as_ref();
    let mut out = format!("${}\r\n", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    out
}

/// Printable, escaped rendering of raw bytes for assertion messages,
/// truncated for very long inputs.
pub fn esc(bytes: &[u8]) -> String {
    const MAX: usize = 400;
    let mut s = String::new();
    let shown = &bytes[..bytes.len().min(MAX)];
    write!(s, "{}", shown.escape_ascii()).unwrap();
    if bytes.len() > MAX {
        write!(s, "...({} bytes total)", bytes.len()).unwrap();
    }
    s
}

fn find_crlf(buf: &[u8], from: usize) -> Option<usize> {
    if from >= buf.len() {
        return None;
    }
    buf[from..]
        .windows(2)
        .position(|w| w == b"\r\n")
        .map(|p| from + p)
}

fn parse_len(line: &[u8], at: usize) -> Result<i64, String> {
    std::str::from_utf8(line)
        .ok()
        .and_then(|s| s.parse::<i64>().ok())
        .ok_or_else(|| format!("invalid RESP length {:?} at offset {}", esc(line), at))
}

/// End offset of the complete RESP frame starting at `pos`, `Ok(None)` if
/// more bytes are needed, `Err` if the bytes are not valid RESP.
fn frame_end(buf: &[u8], pos: usize) -> Result<Option<usize>, String> {
    if pos >= buf.len() {
        return Ok(None);
    }
    let t = buf[pos];
    let Some(crlf) = find_crlf(buf, pos + 1) else {
        return Ok(None);
    };
    let line = &buf[pos + 1..crlf];
    let after = crlf + 2;
    match t {
        b'+' | b'-' | b':' | b'_' | b',' | b'#' | b'(' => Ok(Some(after)),
        b'$' | b'!' | b'=' => {
            if line == b"?" {
                return Err(format!("streamed strings ($?) unsupported at offset {pos}"));
            }
            let n = parse_len(line, pos)?;
            if n < 0 {
                return Ok(Some(after));
            }
            let end = after + n as usize;
            if buf.len() < end + 2 {
                return Ok(None);
            }
            if &buf[end..end + 2] != b"\r\n" {
                return Err(format!(
                    "bulk payload at offset {pos} not terminated by CRLF"
                ));
            }
            Ok(Some(end + 2))
        }
        b'*' | b'~' | b'>' | b'%' | b'|' => {
            if line == b"?" {
                return Err(format!("streamed aggregates unsupported at offset {pos}"));
            }
            let n = parse_len(line, pos)?;
            if n < 0 {
                return Ok(Some(after));
            }
            let count = if t == b'%' || t == b'|' { 2 * n } else { n };
            let mut p = after;
            for _ in 0..count {
                match frame_end(buf, p)? {
                    Some(e) => p = e,
                    None => return Ok(None),
                }
            }
            if t == b'|' {
                // An attribute map is followed by the frame it annotates.
                return frame_end(buf, p);
            }
            Ok(Some(p))
        }
        other => Err(format!(
            "invalid RESP type byte {:?} at offset {pos} (data: {})",
            other as char,
            esc(&buf[pos..buf.len().min(pos + 80)])
        )),
    }
}

/// Length of the first complete frame in `buf`, `Ok(None)` if incomplete.
pub fn frame_len(buf: &[u8]) -> Result<Option<usize>, String> {
    frame_end(buf, 0)
}

/// Split a byte string holding several complete frames into frames.
/// Panics if there are trailing incomplete bytes.
pub fn split_frames(mut buf: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        match frame_len(buf) {
            Ok(Some(n)) => {
                out.push(buf[..n].to_vec());
                buf = &buf[n..];
            }
            Ok(None) => panic!("incomplete trailing RESP data: {}", esc(buf)),
            Err(e) => panic!("invalid RESP: {e}"),
        }
    }
    out
}

/// Decoded RESP value (for structural assertions).
#[derive(Debug, Clone, PartialEq)]
pub enum Resp {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Vec<u8>),
    /// `$-1` (RESP2 nil bulk)
    NilBulk,
    /// `*-1` (RESP2 nil array)
    NilArray,
    /// `_` (RESP3 null)
    Null,
    Array(Vec<Resp>),
    Map(Vec<(Resp, Resp)>),
    Set(Vec<Resp>),
    Push(Vec<Resp>),
    Bool(bool),
    Double(String),
    BigNum(String),
    Verbatim(String, Vec<u8>),
    BlobError(Vec<u8>),
    /// An attribute map together with the value it annotates.
    Attributed(Vec<(Resp, Resp)>, Box<Resp>),
}

impl Resp {
    /// Text of simple strings, bulk strings, verbatim strings, errors.
    pub fn text(&self) -> Option<String> {
        match self {
            Resp::Simple(s) | Resp::Error(s) | Resp::Double(s) | Resp::BigNum(s) => Some(s.clone()),
            Resp::Bulk(b) | Resp::BlobError(b) | Resp::Verbatim(_, b) => {
                Some(String::from_utf8_lossy(b).into_owned())
            }
            _ => None,
        }
    }

    pub fn int(&self) -> Option<i64> {
        match self {
            Resp::Int(i) => Some(*i),
            _ => None,
        }
    }

    pub fn is_error(&self) -> bool {
        matches!(self, Resp::Error(_) | Resp::BlobError(_))
    }

    /// Elements of arrays, sets and pushes.
    pub fn items(&self) -> Option<&[Resp]> {
        match self {
            Resp::Array(v) | Resp::Set(v) | Resp::Push(v) => Some(v),
            _ => None,
        }
    }

    /// Key/value pairs of a RESP3 map, or of a RESP2 flat array of pairs.
    pub fn pairs(&self) -> Option<Vec<(Resp, Resp)>> {
        match self {
            Resp::Map(v) => Some(v.clone()),
            Resp::Array(v) if v.len() % 2 == 0 => {
                Some(v.chunks(2).map(|c| (c[0].clone(), c[1].clone())).collect())
            }
            _ => None,
        }
    }

    /// Look up a string key in a map (or RESP2 flat key/value array).
    pub fn get(&self, key: &str) -> Option<Resp> {
        self.pairs()?
            .into_iter()
            .find(|(k, _)| k.text().as_deref() == Some(key))
            .map(|(_, v)| v)
    }
}

/// Decode exactly one complete frame. Panics on malformed or incomplete input.
pub fn parse_resp(buf: &[u8]) -> Resp {
    let (v, end) = decode_at(buf, 0);
    assert_eq!(end, buf.len(), "trailing bytes after frame: {}", esc(buf));
    v
}

fn decode_at(buf: &[u8], pos: usize) -> (Resp, usize) {
    let t = buf[pos];
    let crlf = find_crlf(buf, pos + 1).unwrap_or_else(|| panic!("incomplete frame: {}", esc(buf)));
    let line = &buf[pos + 1..crlf];
    let text = String::from_utf8_lossy(line).into_owned();
    let after = crlf + 2;
    let num = || parse_len(line, pos).unwrap_or_else(|e| panic!("{e}"));
    match t {
        b'+' => (Resp::Simple(text), after),
        b'-' => (Resp::Error(text), after),
        b':' => (Resp::Int(num()), after),
        b'_' => (Resp::Null, after),
        b',' => (Resp::Double(text), after),
        b'(' => (Resp::BigNum(text), after),
        b'#' => (Resp::Bool(line == b"t"), after),
        b'$' | b'!' | b'=' => {
            let n = num();
            if n < 0 {
                return (if t == b'$' { Resp::NilBulk } else { Resp::Null }, after);
            }
            let data = buf[after..after + n as usize].to_vec();
            let end = after + n as usize + 2;
            let v = match t {
                b'$' => Resp::Bulk(data),
                b'!' => Resp::BlobError(data),
                _ => {
                    let fmt = String::from_utf8_lossy(&data[..3.min(data.len())]).into_owned();
                    Resp::Verbatim(fmt, data[4.min(data.len())..].to_vec())
                }
            };
            (v, end)
        }
        b'*' | b'~' | b'>' => {
            let n = num();
            if n < 0 {
                return (
                    if t == b'*' {
                        Resp::NilArray
                    } else {
                        Resp::Null
                    },
                    after,
                );
            }
            let mut p = after;
            let mut items = Vec::with_capacity(n as usize);
            for _ in 0..n {
                let (v, e) = decode_at(buf, p);
                items.push(v);
                p = e;
            }
            let v = match t {
                b'*' => Resp::Array(items),
                b'~' => Resp::Set(items),
                _ => Resp::Push(items),
            };
            (v, p)
        }
        b'%' | b'|' => {
            let n = num();
            let mut p = after;
            let mut pairs = Vec::new();
            for _ in 0..n.max(0) {
                let (k, e) = decode_at(buf, p);
                let (v, e2) = decode_at(buf, e);
                pairs.push((k, v));
                p = e2;
            }
            if t == b'%' {
                (Resp::Map(pairs), p)
            } else {
                let (inner, e) = decode_at(buf, p);
                (Resp::Attributed(pairs, Box::new(inner)), e)
            }
        }
        other => panic!("invalid RESP type byte {:?}: {}", other as char, esc(buf)),
    }
}
