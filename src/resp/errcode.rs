//! What an error reply says, by its code (the first word), compared ASCII
//! case-insensitively, so `-BUSYKEY` or `-BUSYGROUP` (ordinary command errors) are not
//! mistaken for `-BUSY`. Who acts on it (the breaker, the replay, the probe) decides what it
//! means for them.

use super::parse_int;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    Loading,
    Busy,
    MasterDown,
    ClusterDown,
    TryAgain,
    ReadOnly,
    Oom,
    NoAuth,
    WrongPass,
    NoPerm,
    WrongType,
    /// `-ERR max number of clients reached`: this connection was refused, not the server down.
    MaxClients,
    /// Any other code (`ERR`, `EXECABORT`, `NOSCRIPT` ...).
    Other,
    /// Not an error reply at all.
    NotAnError,
    /// An error reply whose framing cannot be read (a blob error with a bad length).
    Malformed,
}

impl ErrorCode {
    /// Reads the code of a raw reply: a simple error (`-CODE message\r\n`) or a RESP3 blob
    /// error (`!<len>\r\nCODE message\r\n`).
    pub fn of(reply: &[u8]) -> ErrorCode {
        let message = match reply.first() {
            None => return ErrorCode::Malformed,
            Some(b'-') => &reply[1..],
            Some(b'!') => match blob_body(&reply[1..]) {
                Some(body) => body,
                None => return ErrorCode::Malformed,
            },
            Some(_) => return ErrorCode::NotAnError,
        };
        let end = message
            .iter()
            .position(|&b| b == b' ' || b == b'\r' || b == b'\n')
            .unwrap_or(message.len());
        let code = &message[..end];
        let is = |name: &[u8]| code.eq_ignore_ascii_case(name);
        if is(b"LOADING") {
            ErrorCode::Loading
        } else if is(b"BUSY") {
            ErrorCode::Busy
        } else if is(b"MASTERDOWN") {
            ErrorCode::MasterDown
        } else if is(b"CLUSTERDOWN") {
            ErrorCode::ClusterDown
        } else if is(b"TRYAGAIN") {
            ErrorCode::TryAgain
        } else if is(b"READONLY") {
            ErrorCode::ReadOnly
        } else if is(b"OOM") {
            ErrorCode::Oom
        } else if is(b"NOAUTH") {
            ErrorCode::NoAuth
        } else if is(b"WRONGPASS") {
            ErrorCode::WrongPass
        } else if is(b"NOPERM") {
            ErrorCode::NoPerm
        } else if is(b"WRONGTYPE") {
            ErrorCode::WrongType
        } else if is(b"ERR") && message[end..].starts_with(b" max number of clients reached") {
            ErrorCode::MaxClients
        } else {
            ErrorCode::Other
        }
    }

    /// NOAUTH, WRONGPASS, NOPERM: the identity, not the server, is the problem.
    pub fn is_auth(self) -> bool {
        matches!(
            self,
            ErrorCode::NoAuth | ErrorCode::WrongPass | ErrorCode::NoPerm
        )
    }
}

/// The payload of a blob error after its `!`: `<len>\r\n<payload>\r\n`. A truncated payload
/// is read as far as it goes: only the code is needed.
fn blob_body(rest: &[u8]) -> Option<&[u8]> {
    let header_end = rest.windows(2).position(|w| w == b"\r\n")?;
    let len = usize::try_from(parse_int(&rest[..header_end])?).ok()?;
    let body = &rest[header_end + 2..];
    Some(&body[..len.min(body.len())])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_read_from_simple_and_blob_errors() {
        assert_eq!(
            ErrorCode::of(b"-LOADING Redis is loading\r\n"),
            ErrorCode::Loading
        );
        assert_eq!(ErrorCode::of(b"-busy x\r\n"), ErrorCode::Busy);
        assert_eq!(
            ErrorCode::of(b"-BUSYKEY Target key name\r\n"),
            ErrorCode::Other
        );
        assert_eq!(ErrorCode::of(b"!12\r\nNOPERM user\r\n"), ErrorCode::NoPerm);
        assert_eq!(ErrorCode::of(b"!x\r\nNOPERM\r\n"), ErrorCode::Malformed);
        assert_eq!(ErrorCode::of(b"+OK\r\n"), ErrorCode::NotAnError);
        assert_eq!(ErrorCode::of(b""), ErrorCode::Malformed);
        assert_eq!(
            ErrorCode::of(b"-ERR max number of clients reached\r\n"),
            ErrorCode::MaxClients
        );
        assert_eq!(ErrorCode::of(b"-ERR syntax error\r\n"), ErrorCode::Other);
        assert!(ErrorCode::of(b"-WRONGPASS invalid\r\n").is_auth());
        assert!(!ErrorCode::of(b"-WRONGTYPE x\r\n").is_auth());
    }
}
