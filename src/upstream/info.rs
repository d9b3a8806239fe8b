//! What redfuse learnt about an upstream server from its `HELLO` reply, to answer clients'
//! `HELLO` locally, byte-identical to the server's own.

use bytes::{Bytes, BytesMut};

use crate::resp::{Proto, reply, split_aggregate};

/// What `HELLO` told us about the server, for answering clients' `HELLO` locally.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerInfo {
    pub server: Bytes,
    pub version: Bytes,
    pub mode: Bytes,
    pub role: Bytes,
    /// The raw `modules` value as the server sent it.
    pub modules: Bytes,
}

impl Default for ServerInfo {
    fn default() -> Self {
        ServerInfo {
            server: Bytes::from_static(b"redis"),
            version: Bytes::from_static(b"7.0.0"),
            mode: Bytes::from_static(b"standalone"),
            role: Bytes::from_static(b"master"),
            modules: Bytes::from_static(b"*0\r\n"),
        }
    }
}

fn decode_string(raw: &[u8]) -> Option<Bytes> {
    use redis_protocol::resp3::decode::complete::decode;
    use redis_protocol::resp3::types::OwnedFrame;
    match decode(raw).ok()??.0 {
        OwnedFrame::BlobString { data, .. } | OwnedFrame::SimpleString { data, .. } => {
            Some(Bytes::from(data))
        }
        OwnedFrame::VerbatimString { data, .. } => Some(Bytes::from(data)),
        _ => None,
    }
}

impl ServerInfo {
    /// Reads a `HELLO` reply (RESP2 array or RESP3 map of field/value pairs).
    pub fn parse(reply: &Bytes) -> Option<ServerInfo> {
        if !matches!(reply.first(), Some(b'*') | Some(b'%')) {
            return None;
        }
        let items = split_aggregate(reply)?;
        let mut info = ServerInfo::default();
        for pair in items.chunks(2) {
            let [key, value] = pair else { break };
            match &decode_string(key)?[..] {
                b"server" => info.server = decode_string(value)?,
                b"version" => info.version = decode_string(value)?,
                b"mode" => info.mode = decode_string(value)?,
                b"role" => info.role = decode_string(value)?,
                b"modules" => info.modules = value.clone(),
                _ => {}
            }
        }
        Some(info)
    }

    /// The `HELLO` reply Redis would send to a client with this id and protocol.
    pub fn hello_reply(&self, proto: Proto, client_id: u64) -> Bytes {
        let mut b = BytesMut::with_capacity(160);
        match proto {
            Proto::Resp2 => reply::put_header(&mut b, b'*', 14),
            Proto::Resp3 => reply::put_header(&mut b, b'%', 7),
        }
        let field = |b: &mut BytesMut, k: &[u8], v: &[u8]| {
            reply::put_bulk(b, k);
            reply::put_bulk(b, v);
        };
        field(&mut b, b"server", &self.server);
        field(&mut b, b"version", &self.version);
        reply::put_bulk(&mut b, b"proto");
        b.extend_from_slice(&reply::integer(proto.as_u8() as i64));
        reply::put_bulk(&mut b, b"id");
        b.extend_from_slice(&reply::integer(client_id as i64));
        field(&mut b, b"mode", &self.mode);
        field(&mut b, b"role", &self.role);
        reply::put_bulk(&mut b, b"modules");
        b.extend_from_slice(&self.modules);
        b.freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hello_and_answers_in_both_protocols() {
        let resp3 = Bytes::from_static(
            b"%7\r\n$6\r\nserver\r\n$5\r\nredis\r\n$7\r\nversion\r\n$6\r\n7.0.15\r\n$5\r\nproto\r\n:3\r\n$2\r\nid\r\n:9\r\n$4\r\nmode\r\n$10\r\nstandalone\r\n$4\r\nrole\r\n$6\r\nmaster\r\n$7\r\nmodules\r\n*0\r\n",
        );
        let info = ServerInfo::parse(&resp3).unwrap();
        assert_eq!(&info.version[..], b"7.0.15");
        let mine = info.hello_reply(Proto::Resp3, 9);
        assert_eq!(mine, resp3);
        let two = info.hello_reply(Proto::Resp2, 4);
        assert!(two.starts_with(b"*14\r\n$6\r\nserver\r\n$5\r\nredis\r\n"));
        assert!(two.ends_with(b"$7\r\nmodules\r\n*0\r\n"));
    }
}
