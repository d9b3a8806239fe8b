//! Replies redfuse makes itself, byte-identical to what Redis would send.

use bytes::{BufMut, Bytes, BytesMut};

use super::{Proto, put_line};

pub const OK: &[u8] = b"+OK\r\n";
pub const PONG: &[u8] = b"+PONG\r\n";
pub const QUEUED: &[u8] = b"+QUEUED\r\n";

/// Redis's reply to a command from a client that has not authenticated.
pub const NOAUTH: &[u8] = b"-NOAUTH Authentication required.\r\n";
/// Redis's reply to `AUTH` with credentials it does not accept.
pub const WRONGPASS: &[u8] = b"-WRONGPASS invalid username-password pair or user is disabled.\r\n";
/// Redis's reply to `HELLO` without `AUTH` from a client that has not authenticated.
pub const NOAUTH_HELLO: &[u8] = b"-NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time\r\n";

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

/// An error reply; `msg` includes the code (`ERR ...`). CR/LF are replaced so the reply
/// stays one line whatever the message.
pub fn error(msg: &str) -> Bytes {
    let mut b = BytesMut::with_capacity(msg.len() + 3);
    b.put_u8(b'-');
    for &c in msg.as_bytes() {
        b.put_u8(if c == b'\r' || c == b'\n' { b' ' } else { c });
    }
    b.extend_from_slice(b"\r\n");
    b.freeze()
}

/// Redis's arity error for `name` (a command, or `container|sub`).
pub fn wrong_arity(name: &str) -> Bytes {
    error(&format!(
        "ERR wrong number of arguments for '{name}' command"
    ))
}

pub fn integer(n: i64) -> Bytes {
    let mut b = BytesMut::with_capacity(24);
    b.put_u8(b':');
    put_line(&mut b, n);
    b.freeze()
}

pub fn bulk(data: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(data.len() + 16);
    put_bulk(&mut b, data);
    b.freeze()
}

pub fn put_bulk(b: &mut BytesMut, data: &[u8]) {
    b.put_u8(b'$');
    put_line(b, data.len() as i64);
    b.extend_from_slice(data);
    b.extend_from_slice(b"\r\n");
}

pub fn put_header(b: &mut BytesMut, kind: u8, n: usize) {
    b.put_u8(kind);
    put_line(b, n as i64);
}

/// The null reply: `$-1` in RESP2, `_` in RESP3.
pub fn null(proto: Proto) -> Bytes {
    Bytes::from_static(match proto {
        Proto::Resp2 => b"$-1\r\n",
        Proto::Resp3 => b"_\r\n",
    })
}

/// The null *array* reply (GEOPOS of a missing member): `*-1` in RESP2, `_` in RESP3.
pub fn null_array(proto: Proto) -> Bytes {
    Bytes::from_static(match proto {
        Proto::Resp2 => b"*-1\r\n",
        Proto::Resp3 => b"_\r\n",
    })
}

/// Whether a reply is a null of either protocol (`$-1`, `*-1`, `_`).
pub fn is_null(reply: &[u8]) -> bool {
    reply == b"$-1\r\n" || reply == b"_\r\n" || reply == b"*-1\r\n"
}

/// What Redis answers for a key that does not exist, per command: the shape of the reply
/// a degraded read gets when it misses the cache (see `command::absent_reply`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Absent {
    Nil,
    /// `*-1` in RESP2, `_` in RESP3 (ZRANK ... WITHSCORE).
    NullArray,
    Integer(i64),
    EmptyBulk,
    /// `+none` (TYPE).
    Status(&'static str),
    EmptyArray,
    /// An empty map in RESP3, an empty array in RESP2 (HGETALL).
    EmptyMap,
    /// An empty set in RESP3, an empty array in RESP2 (SMEMBERS).
    EmptySet,
    /// An array of `n` nulls (HMGET, ZMSCORE, GEOHASH).
    Nils(usize),
    /// An array of `n` null arrays (GEOPOS).
    NullArrays(usize),
    /// An array of `n` zeros (SMISMEMBER).
    Zeros(usize),
}

impl Absent {
    pub fn encode(self, proto: Proto) -> Bytes {
        let resp3 = proto.is_resp3();
        let repeat = |n: usize, item: &[u8]| {
            let mut b = BytesMut::with_capacity(16 + n * item.len());
            put_header(&mut b, b'*', n);
            for _ in 0..n {
                b.extend_from_slice(item);
            }
            b.freeze()
        };
        match self {
            Absent::Nil => null(proto),
            Absent::NullArray => null_array(proto),
            Absent::Integer(n) => integer(n),
            Absent::EmptyBulk => Bytes::from_static(b"$0\r\n\r\n"),
            Absent::Status(s) => simple(s),
            Absent::EmptyArray => Bytes::from_static(b"*0\r\n"),
            Absent::EmptyMap if resp3 => Bytes::from_static(b"%0\r\n"),
            Absent::EmptySet if resp3 => Bytes::from_static(b"~0\r\n"),
            Absent::EmptyMap | Absent::EmptySet => Bytes::from_static(b"*0\r\n"),
            Absent::Nils(n) => repeat(n, &null(proto)),
            Absent::NullArrays(n) => repeat(n, &null_array(proto)),
            Absent::Zeros(n) => repeat(n, b":0\r\n"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builders_make_redis_bytes() {
        assert_eq!(&error("ERR a\r\nb")[..], b"-ERR a  b\r\n");
        assert_eq!(&integer(-3)[..], b":-3\r\n");
        assert_eq!(&null(Proto::Resp3)[..], b"_\r\n");
        assert_eq!(&bulk(b"ab")[..], b"$2\r\nab\r\n");
        assert_eq!(
            &wrong_arity("ping")[..],
            b"-ERR wrong number of arguments for 'ping' command\r\n"
        );
    }

    #[test]
    fn absent_replies_follow_the_protocol() {
        use Proto::*;
        assert_eq!(&Absent::EmptyMap.encode(Resp2)[..], b"*0\r\n");
        assert_eq!(&Absent::EmptyMap.encode(Resp3)[..], b"%0\r\n");
        assert_eq!(&Absent::EmptySet.encode(Resp3)[..], b"~0\r\n");
        assert_eq!(&Absent::Nils(2).encode(Resp2)[..], b"*2\r\n$-1\r\n$-1\r\n");
        assert_eq!(&Absent::NullArrays(1).encode(Resp2)[..], b"*1\r\n*-1\r\n");
        assert_eq!(&Absent::Zeros(2).encode(Resp3)[..], b"*2\r\n:0\r\n:0\r\n");
        assert_eq!(&Absent::Status("none").encode(Resp2)[..], b"+none\r\n");
        assert_eq!(&Absent::EmptyBulk.encode(Resp2)[..], b"$0\r\n\r\n");
    }
}
