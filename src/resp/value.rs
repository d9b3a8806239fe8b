//! Configured reply values: what a fail-open rule or a miss reply answers with.
//!
//! A value is written in the config file in a compact form (`"+OK"`, `":1"`, `"[]"`,
//! `"nil"`, `"$text"`) or as raw RESP, parsed and validated once at start-up (decoded with
//! `redis-protocol`: this is the cold path), and stored pre-encoded for both protocol
//! versions, so answering is a reference-count bump.

use std::borrow::Cow;
use std::fmt;

use bytes::Bytes;
use bytes::BytesMut;
use redis_protocol::resp3::types::{OwnedFrame as Resp3, Resp3Frame};
use serde::{Deserialize, Serialize};

use super::{Proto, ReplyScanner, reply, split_aggregate};

/// Nesting limit for configured values: a configured reply has no business being deep.
pub const MAX_VALUE_DEPTH: usize = 16;

/// A configured RESP reply, parsed once and pre-encoded for both protocol versions.
///
/// Accepted forms ([`ReplyValue::parse`]):
///
/// | form            | meaning                 | RESP2                | RESP3           |
/// |-----------------|-------------------------|----------------------|-----------------|
/// | `+OK`           | simple string           | `+OK\r\n`            | same            |
/// | `-ERR msg`      | error                   | `-ERR msg\r\n`       | same            |
/// | `:1`            | integer                 | `:1\r\n`             | same            |
/// | `$text`         | bulk string `text`      | `$4\r\ntext\r\n`     | same            |
/// | `nil`           | null                    | `$-1\r\n`            | `_\r\n`         |
/// | `[]`            | empty array             | `*0\r\n`             | same            |
/// | `{}`            | empty map               | `*0\r\n`             | `%0\r\n`        |
/// | `...\r\n`       | raw RESP2/RESP3, one complete value, validated | downgraded | as given |
///
/// Other single-line RESP values may also omit the trailing `\r\n` (`*0`, `_`, `#t`,
/// `,1.5`, `%0`). A string ending in `\r\n` is always raw RESP, so a bulk string that
/// itself ends in `\r\n` must be written raw. RESP3-only types are downgraded for RESP2
/// clients the way Redis does it: maps and sets become arrays, null becomes `$-1`,
/// booleans become `:1`/`:0`, doubles, big numbers and verbatim strings become bulk
/// strings, blob errors become simple errors. Attributes and pushes are rejected: they are
/// not replies to a command.
#[derive(Clone)]
pub struct ReplyValue {
    /// The configured text, kept for display and for writing the config back out.
    source: Cow<'static, str>,
    resp2: Bytes,
    resp3: Bytes,
    is_error: bool,
}

pub static NIL: ReplyValue = ReplyValue::from_static("nil", b"$-1\r\n", b"_\r\n", false);

impl ReplyValue {
    pub const fn from_static(
        source: &'static str,
        resp2: &'static [u8],
        resp3: &'static [u8],
        is_error: bool,
    ) -> ReplyValue {
        ReplyValue {
            source: Cow::Borrowed(source),
            resp2: Bytes::from_static(resp2),
            resp3: Bytes::from_static(resp3),
            is_error,
        }
    }

    /// Parses the compact syntax described on [`ReplyValue`].
    pub fn parse(s: &str) -> Result<ReplyValue, String> {
        let (resp2, resp3) = match s {
            "" => {
                return Err(
                    "empty reply (use \"nil\" for null or \"$\" for an empty string)".into(),
                );
            }
            "nil" => return Ok(NIL.clone()),
            "[]" => (b"*0\r\n".to_vec(), b"*0\r\n".to_vec()),
            "{}" => (b"*0\r\n".to_vec(), b"%0\r\n".to_vec()),
            _ if s.ends_with("\r\n") => encode_raw(s.as_bytes(), s)?,
            _ if s.starts_with('$') => {
                let mut out = format!("${}\r\n", s.len() - 1).into_bytes();
                out.extend_from_slice(&s.as_bytes()[1..]);
                out.extend_from_slice(b"\r\n");
                (out.clone(), out)
            }
            _ if s.starts_with(['+', '-', ':', '*', '%', '~', '_', ',', '#', '(']) => {
                // Single-line values read naturally without the terminator; adding it and
                // going through the raw parser gives one set of validation rules.
                encode_raw(format!("{s}\r\n").as_bytes(), s)?
            }
            _ => {
                return Err(format!(
                    "unrecognised reply {s:?}: expected +simple, -error, :integer, $bulk, nil, \
                     [], {{}} or raw RESP ending in \\r\\n"
                ));
            }
        };
        let is_error = matches!(resp2.first(), Some(b'-'));
        let resp2 = Bytes::from(resp2);
        // Most values are the same in both protocols; share the buffer.
        let resp3 = if resp3 == resp2 {
            resp2.clone()
        } else {
            Bytes::from(resp3)
        };
        Ok(ReplyValue {
            source: Cow::Owned(s.to_owned()),
            resp2,
            resp3,
            is_error,
        })
    }

    /// The bytes to send to a client speaking `proto`. Cheap: a reference-count increment.
    pub fn encode(&self, proto: Proto) -> Bytes {
        match proto {
            Proto::Resp3 => self.resp3.clone(),
            Proto::Resp2 => self.resp2.clone(),
        }
    }

    /// The configured text this value was parsed from.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether the reply is an error (`-...` or a blob error).
    pub fn is_error(&self) -> bool {
        self.is_error
    }
}

/// Two values are equal when they put the same bytes on the wire, whatever their spelling
/// (`"+OK"` and `"+OK\r\n"` are equal).
impl PartialEq for ReplyValue {
    fn eq(&self, other: &Self) -> bool {
        self.resp2 == other.resp2 && self.resp3 == other.resp3
    }
}

impl Eq for ReplyValue {}

impl fmt::Debug for ReplyValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ReplyValue({:?})", self.source)
    }
}

impl fmt::Display for ReplyValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

impl TryFrom<String> for ReplyValue {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        ReplyValue::parse(&s)
    }
}

impl From<ReplyValue> for String {
    fn from(v: ReplyValue) -> String {
        v.source.into_owned()
    }
}

impl Serialize for ReplyValue {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.source)
    }
}

impl<'de> Deserialize<'de> for ReplyValue {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        ReplyValue::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Validates one complete raw RESP value and encodes it for RESP2 and RESP3; `shown` is the
/// configured text, for error messages.
fn encode_raw(input: &[u8], shown: &str) -> Result<(Vec<u8>, Vec<u8>), String> {
    let bad = |e: String| format!("invalid reply {shown:?}: {e}");
    // Framing, depth and trailing bytes first: the decoder below recurses and would also
    // accept a value followed by more.
    match ReplyScanner::new().scan(input, MAX_VALUE_DEPTH) {
        Ok(Some(n)) if n == input.len() => {}
        Ok(Some(n)) => {
            return Err(bad(format!(
                "{} trailing bytes after the first complete value",
                input.len() - n
            )));
        }
        Ok(None) => return Err(bad("truncated value".into())),
        Err(e) if e.0.contains("deep") => {
            return Err(bad(format!("nested deeper than {MAX_VALUE_DEPTH}")));
        }
        Err(e) => return Err(bad(e.0)),
    }
    let resp3_input = as_resp3(&Bytes::copy_from_slice(input)).map_err(bad)?;
    let frame = match redis_protocol::resp3::decode::complete::decode(&resp3_input) {
        Ok(Some((frame, n))) if n == resp3_input.len() => frame,
        Ok(_) => return Err(bad("truncated value".into())),
        Err(e) => return Err(bad(format!("not a valid RESP value ({})", e.details()))),
    };
    check(&frame).map_err(bad)?;
    // The decoder validated the value; the bytes themselves are kept, so maps keep their
    // order and doubles their spelling.
    let resp2 = if input == b"*-1\r\n" {
        // RESP2's null array, which RESP3 folds into `_`: kept for RESP2 clients.
        input.to_vec()
    } else {
        downgrade(&Bytes::from(resp3_input.clone())).map_err(bad)?
    };
    Ok((resp2, resp3_input))
}

/// The RESP3 spelling of a scanned value: RESP2's nulls (`$-1`, `*-1`) become `_`, which is
/// all the RESP3 decoder needs to read RESP2 input too.
fn as_resp3(frame: &Bytes) -> Result<Vec<u8>, String> {
    match &frame[..] {
        b"$-1\r\n" | b"*-1\r\n" | b"_\r\n" => Ok(b"_\r\n".to_vec()),
        [b'_', ..] => Err("null carries no data".into()),
        [b'*' | b'~' | b'%', ..] => {
            let header = frame.iter().position(|&b| b == b'\n').map_or(0, |i| i + 1);
            let mut out = frame[..header].to_vec();
            for child in split_aggregate(frame).ok_or("malformed aggregate")? {
                out.extend(as_resp3(&child)?);
            }
            Ok(out)
        }
        _ => Ok(frame.to_vec()),
    }
}

/// What the decoder accepts but a reply to a command cannot be.
fn check(frame: &Resp3) -> Result<(), String> {
    if frame.attributes().is_some_and(|a| !a.is_empty()) {
        return Err("attributes are not supported in configured replies".into());
    }
    let line_ok = |d: &[u8]| !d.iter().any(|&b| b == b'\r' || b == b'\n');
    match frame {
        Resp3::SimpleString { data, .. } if !line_ok(data) => {
            Err("bare \\r or \\n inside a line".into())
        }
        Resp3::SimpleError { data, .. } if !line_ok(data.as_bytes()) => {
            Err("bare \\r or \\n inside a line".into())
        }
        Resp3::BlobError { data, .. } if !line_ok(data) => {
            Err("blob error with \\r or \\n cannot be sent to RESP2 clients".into())
        }
        Resp3::BigNumber { data, .. } => {
            let digits = data
                .strip_prefix(b"-")
                .or_else(|| data.strip_prefix(b"+"))
                .unwrap_or(data);
            if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
                return Err("invalid big number".into());
            }
            Ok(())
        }
        Resp3::Push { .. } => Err("a push is not a reply to a command".into()),
        Resp3::Hello { .. } | Resp3::ChunkedString(_) => Err("not a reply value".into()),
        Resp3::Array { data, .. } => data.iter().try_for_each(check),
        Resp3::Set { data, .. } => data.iter().try_for_each(check),
        Resp3::Map { data, .. } => data.iter().try_for_each(|(k, v)| {
            check(k)?;
            check(v)
        }),
        _ => Ok(()),
    }
}

/// A validated RESP3 value as Redis sends it to a RESP2 client.
pub fn downgrade(frame: &Bytes) -> Result<Vec<u8>, String> {
    let header_end = frame
        .iter()
        .position(|&b| b == b'\n')
        .ok_or("missing \\r\\n")?;
    let line = &frame[1..header_end - 1];
    let body = &frame[header_end + 1..];
    let mut out = BytesMut::with_capacity(frame.len() + 8);
    let kind = frame[0];
    match kind {
        b'_' => out.extend_from_slice(b"$-1\r\n"),
        b'#' => out.extend_from_slice(if line == b"t" { b":1\r\n" } else { b":0\r\n" }),
        b',' | b'(' => reply::put_bulk(&mut out, line),
        // `<len>\r\nfmt:data\r\n`
        b'=' => reply::put_bulk(&mut out, body.get(4..body.len() - 2).unwrap_or_default()),
        b'!' => {
            out.extend_from_slice(b"-");
            out.extend_from_slice(&body[..body.len() - 2]);
            out.extend_from_slice(b"\r\n");
        }
        b'*' | b'~' | b'%' | b'>' => {
            let children = split_aggregate(frame).ok_or("malformed aggregate")?;
            reply::put_header(&mut out, b'*', children.len());
            for child in children {
                out.extend_from_slice(&downgrade(&child)?);
            }
        }
        _ => out.extend_from_slice(frame),
    }
    Ok(out.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(s: &str) -> (Vec<u8>, Vec<u8>) {
        let v = ReplyValue::parse(s).unwrap_or_else(|e| panic!("{s:?}: {e}"));
        (
            v.encode(Proto::Resp2).to_vec(),
            v.encode(Proto::Resp3).to_vec(),
        )
    }

    fn same(s: &str, wire: &[u8]) {
        assert_eq!(enc(s), (wire.to_vec(), wire.to_vec()), "{s:?}");
    }

    #[test]
    fn compact_forms() {
        same("+OK", b"+OK\r\n");
        same("-ERR nope", b"-ERR nope\r\n");
        same(":1", b":1\r\n");
        same(":-42", b":-42\r\n");
        same("$text", b"$4\r\ntext\r\n");
        same("$", b"$0\r\n\r\n");
        same("$a\r\nb", b"$4\r\na\r\nb\r\n");
        same("[]", b"*0\r\n");
        same("*0", b"*0\r\n");
        assert_eq!(enc("nil"), (b"$-1\r\n".to_vec(), b"_\r\n".to_vec()));
        assert_eq!(enc("{}"), (b"*0\r\n".to_vec(), b"%0\r\n".to_vec()));
        assert_eq!(enc("_"), (b"$-1\r\n".to_vec(), b"_\r\n".to_vec()));
        assert_eq!(enc("#t"), (b":1\r\n".to_vec(), b"#t\r\n".to_vec()));
        assert_eq!(
            enc(",1.5"),
            (b"$3\r\n1.5\r\n".to_vec(), b",1.5\r\n".to_vec())
        );
        assert!(ReplyValue::parse("-ERR x").unwrap().is_error());
        assert!(!ReplyValue::parse("+OK").unwrap().is_error());
    }

    #[test]
    fn raw_forms_are_downgraded_for_resp2() {
        same(":0\r\n", b":0\r\n");
        same("+OK\r\n", b"+OK\r\n");
        same("*2\r\n$1\r\na\r\n:1\r\n", b"*2\r\n$1\r\na\r\n:1\r\n");
        assert_eq!(enc("$-1\r\n"), (b"$-1\r\n".to_vec(), b"_\r\n".to_vec()));
        assert_eq!(enc("*-1\r\n"), (b"*-1\r\n".to_vec(), b"_\r\n".to_vec()));
        assert_eq!(
            enc("%2\r\n+k\r\n:1\r\n+a\r\n:2\r\n"),
            (
                b"*4\r\n+k\r\n:1\r\n+a\r\n:2\r\n".to_vec(),
                b"%2\r\n+k\r\n:1\r\n+a\r\n:2\r\n".to_vec()
            )
        );
        assert_eq!(
            enc("~1\r\n_\r\n"),
            (b"*1\r\n$-1\r\n".to_vec(), b"~1\r\n_\r\n".to_vec())
        );
        assert_eq!(
            enc("=8\r\ntxt:abcd\r\n"),
            (b"$4\r\nabcd\r\n".to_vec(), b"=8\r\ntxt:abcd\r\n".to_vec())
        );
        assert_eq!(
            enc("!7\r\nERR bad\r\n"),
            (b"-ERR bad\r\n".to_vec(), b"!7\r\nERR bad\r\n".to_vec())
        );
        assert!(ReplyValue::parse("!7\r\nERR bad\r\n").unwrap().is_error());
        assert_eq!(
            enc("(12345678901234567890\r\n"),
            (
                b"$20\r\n12345678901234567890\r\n".to_vec(),
                b"(12345678901234567890\r\n".to_vec()
            )
        );
        assert_eq!(
            ReplyValue::parse("+OK").unwrap(),
            ReplyValue::parse("+OK\r\n").unwrap()
        );
        assert_ne!(
            ReplyValue::parse("[]").unwrap(),
            ReplyValue::parse("{}").unwrap()
        );
    }

    #[test]
    fn malformed_values_are_refused() {
        for bad in [
            "",
            "OK",
            "nope",
            ":abc",
            ":1.5",
            "+a\r\nb",
            "*2",
            "*1\r\n",
            "$5\r\nab\r\n",
            "$2\r\nabc\r\n",
            "+OK\r\n+OK\r\n",
            "$-2\r\n",
            "~-1\r\n",
            "#x",
            ",abc",
            "(12a",
            "_x",
            "=3\r\nabc\r\n",
            "!3\r\na\nb\r\n",
            ">1\r\n+x\r\n",
            "|1\r\n+a\r\n+b\r\n+c\r\n",
            "*99999999999\r\n",
            "+OK\n",
        ] {
            assert!(ReplyValue::parse(bad).is_err(), "{bad:?} accepted");
        }
        let deep = format!("{}:1\r\n", "*1\r\n".repeat(MAX_VALUE_DEPTH + 1));
        assert!(ReplyValue::parse(&deep).unwrap_err().contains("nested"));
        let shallow = format!("{}:1\r\n", "*1\r\n".repeat(MAX_VALUE_DEPTH - 1));
        assert!(ReplyValue::parse(&shallow).is_ok());
    }

    #[test]
    fn nil_matches_its_source() {
        assert_eq!(NIL, ReplyValue::parse(NIL.as_str()).unwrap());
    }
}
