//! The RESP toolkit: everything redfuse knows about the wire format, in one place.
//!
//! - [`request`]: client request framing with Redis's limits and error texts, inline
//!   commands, and encoding of the commands redfuse sends itself.
//! - [`scan`]: the resumable reply scanner that finds where an upstream reply ends without
//!   decoding it, and zero-copy splitting of an aggregate into its elements.
//! - [`reply`]: builders for the replies redfuse makes itself, including what Redis answers
//!   for a key that does not exist.
//! - [`errcode`]: what an error reply's code says (LOADING, BUSY, NOAUTH ...).
//! - [`value`]: configured reply values, parsed and validated once (with `redis-protocol`,
//!   this is the cold path) and pre-encoded for RESP2 and RESP3.
//!
//! redfuse never decodes a frame it only forwards: requests travel upstream as the client's
//! own bytes and replies travel back as Redis's. The hot path (framing, scanning) is
//! hand-written and allocation-light; anything that needs a decoded value is cold and uses
//! `redis-protocol`. One integer parser ([`parse_int`]) and one number writer
//! ([`put_decimal`]) serve every module.

pub mod errcode;
pub mod reply;
pub mod request;
pub mod scan;
pub mod value;

use bytes::BytesMut;

pub use errcode::ErrorCode;
pub use request::{Args, Limits, ProtocolError, Request, encode_command, parse_request};
pub use scan::{ReplyScanner, is_error_reply, split_aggregate};

/// RESP protocol version spoken on a connection (`HELLO 2|3`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
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

    /// `HELLO`'s protocol argument.
    pub fn from_arg(arg: &[u8]) -> Option<Proto> {
        match parse_int(arg)? {
            2 => Some(Proto::Resp2),
            3 => Some(Proto::Resp3),
            _ => None,
        }
    }

    pub fn is_resp3(self) -> bool {
        self == Proto::Resp3
    }
}

/// Parses a decimal integer the way Redis reads length headers and numeric arguments: an
/// optional `-`, then 1 to 19 digits, nothing else (no `+`, no spaces).
pub fn parse_int(line: &[u8]) -> Option<i64> {
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

/// [`parse_int`] for arguments that must be a non-negative `u32` (database numbers).
pub fn parse_u32(arg: &[u8]) -> Option<u32> {
    u32::try_from(parse_int(arg)?).ok()
}

/// Appends `n` in decimal, without a terminator.
pub fn put_decimal(out: &mut BytesMut, n: i64) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// Appends `n` in decimal followed by `\r\n`: the end of every RESP header line.
pub fn put_line(out: &mut BytesMut, n: i64) {
    put_decimal(out, n);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_parse_like_redis() {
        assert_eq!(parse_int(b"0"), Some(0));
        assert_eq!(parse_int(b"-12"), Some(-12));
        assert_eq!(parse_int(b"9223372036854775807"), Some(i64::MAX));
        for bad in [
            &b""[..],
            b"-",
            b"+1",
            b" 1",
            b"1 ",
            b"1a",
            b"99999999999999999999",
        ] {
            assert_eq!(parse_int(bad), None, "{bad:?}");
        }
        assert_eq!(parse_u32(b"15"), Some(15));
        assert_eq!(parse_u32(b"-1"), None);
        assert_eq!(Proto::from_arg(b"3"), Some(Proto::Resp3));
        assert_eq!(Proto::from_arg(b"4"), None);
        let mut b = BytesMut::new();
        put_line(&mut b, -7);
        assert_eq!(&b[..], b"-7\r\n");
    }
}
