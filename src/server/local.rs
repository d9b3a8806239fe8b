//! Per-connection commands redfuse answers itself, byte-identical to Redis: `PING`, `ECHO`,
//! `HELLO`, `CLIENT SETNAME/GETNAME/ID/SETINFO`, and the parsing half of `AUTH`.
//!
//! Each is a pure function from the request and the connection state to a [`Local`]
//! decision; the session carries it out (and checks credentials where one is given).

use bytes::Bytes;

use super::state::ConnState;
use crate::auth::Credentials;
use crate::command::{Classified, ids};
use crate::resp::{Args, Proto, reply};

/// What a local command comes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Local {
    /// Answer with this reply.
    Reply(Bytes),
    /// `CLIENT SETNAME`: set the name, answer `OK`.
    SetName(Bytes),
    /// `HELLO`: once its credentials (if any) are accepted, switch protocol and name and
    /// answer with the server's map.
    Hello(Hello),
    /// `AUTH` with these credentials.
    Auth(Credentials),
    /// Not answered here after all: Redis has the answer (an unknown `CLIENT` subcommand,
    /// an arity error it words itself).
    Forward,
    /// `CLIENT TRACKING|REPLY|...`: connection state only Redis can keep; the connection
    /// becomes a raw pipe.
    Tunnel,
}

/// A parsed `HELLO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub proto: Proto,
    pub auth: Option<Credentials>,
    pub name: Option<Bytes>,
}

/// Decides a command routed `Local` by the table (`PING`, `ECHO`, `HELLO`, `AUTH`,
/// `CLIENT`, `ASKING`, `READONLY`, `READWRITE`; `QUIT` and `RESET` are the session's).
pub fn decide(cls: &Classified, args: Args<'_>, state: &ConnState, client_id: u64) -> Local {
    match cls.id {
        ids::PING => Local::Reply(match args.len() {
            1 => Bytes::from_static(reply::PONG),
            2 => reply::bulk(&args[1]),
            _ => reply::wrong_arity("ping"),
        }),
        ids::ECHO if args.len() == 2 => Local::Reply(reply::bulk(&args[1])),
        ids::HELLO => hello(args, state),
        ids::AUTH => auth(args),
        ids::CLIENT => client(args, state, client_id),
        _ => Local::Forward,
    }
}

/// `AUTH [username] password`.
pub fn auth(args: Args<'_>) -> Local {
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    match args.len() {
        2 => Local::Auth(Credentials {
            username: None,
            password: text(&args[1]),
        }),
        3 => Local::Auth(Credentials {
            username: Some(text(&args[1])),
            password: text(&args[2]),
        }),
        _ => Local::Reply(reply::error("ERR syntax error")),
    }
}

/// `HELLO [protover [AUTH username password] [SETNAME clientname]]`.
pub fn hello(args: Args<'_>, state: &ConnState) -> Local {
    let mut proto = state.proto;
    if let Some(v) = args.get(1) {
        match crate::resp::parse_int(v) {
            Some(2) => proto = Proto::Resp2,
            Some(3) => proto = Proto::Resp3,
            Some(_) => {
                return Local::Reply(reply::error("NOPROTO unsupported protocol version"));
            }
            None => {
                return Local::Reply(reply::error(
                    "ERR Protocol version is not an integer or out of range",
                ));
            }
        }
    }
    let mut auth = None;
    let mut name = None;
    let mut j = 2;
    while j < args.len() {
        let more = args.len() - 1 - j;
        if args[j].eq_ignore_ascii_case(b"AUTH") && more >= 2 {
            auth = Some(Credentials {
                username: Some(String::from_utf8_lossy(&args[j + 1]).into_owned()),
                password: String::from_utf8_lossy(&args[j + 2]).into_owned(),
            });
            j += 3;
        } else if args[j].eq_ignore_ascii_case(b"SETNAME") && more >= 1 {
            name = Some(Bytes::copy_from_slice(&args[j + 1]));
            j += 2;
        } else {
            return Local::Reply(reply::error(&format!(
                "ERR Syntax error in HELLO option '{}'",
                String::from_utf8_lossy(&args[j])
            )));
        }
    }
    if let Some(n) = &name
        && let Err(e) = check_client_name(n)
    {
        return Local::Reply(e);
    }
    if auth.is_none() && state.identity().is_none() {
        return Local::Reply(Bytes::from_static(reply::NOAUTH_HELLO));
    }
    Local::Hello(Hello { proto, auth, name })
}

/// `CLIENT <subcommand> ...`: the subcommands about this connection's own bookkeeping.
pub fn client(args: Args<'_>, state: &ConnState, client_id: u64) -> Local {
    let Some(sub) = args.get(1) else {
        return Local::Forward;
    };
    let is = |name: &[u8]| sub.eq_ignore_ascii_case(name);
    match args.len() {
        3 if is(b"setname") => match check_client_name(&args[2]) {
            Ok(()) => Local::SetName(Bytes::copy_from_slice(&args[2])),
            Err(e) => Local::Reply(e),
        },
        2 if is(b"getname") => Local::Reply(match &state.name {
            Some(n) => reply::bulk(n),
            None => reply::null(state.proto),
        }),
        2 if is(b"id") => Local::Reply(reply::integer(client_id as i64)),
        4 if is(b"setinfo") => Local::Reply(client_setinfo(&args[2], &args[3])),
        _ if is(b"setinfo") => Local::Reply(reply::wrong_arity("client|setinfo")),
        _ if is(b"tracking")
            || is(b"reply")
            || is(b"no-evict")
            || is(b"no-touch")
            || is(b"caching") =>
        {
            Local::Tunnel
        }
        _ => Local::Forward,
    }
}

fn check_client_name(name: &[u8]) -> Result<(), Bytes> {
    if name.iter().any(|&c| !(b'!'..=b'~').contains(&c)) {
        return Err(reply::error(
            "ERR Client names cannot contain spaces, newlines or special characters.",
        ));
    }
    Ok(())
}

fn client_setinfo(attr: &[u8], value: &[u8]) -> Bytes {
    let label = if attr.eq_ignore_ascii_case(b"lib-name") {
        "lib-name"
    } else if attr.eq_ignore_ascii_case(b"lib-ver") {
        "lib-ver"
    } else {
        return reply::error(&format!(
            "ERR Unrecognized option '{}'",
            String::from_utf8_lossy(attr)
        ));
    };
    if value.iter().any(|&c| !(b'!'..=b'~').contains(&c)) {
        return reply::error(&format!(
            "ERR {label} cannot contain spaces, newlines or special characters."
        ));
    }
    reply::ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Identity;
    use crate::command::classify;
    use crate::server::state::Auth;

    fn args(parts: &[&str]) -> crate::resp::Request {
        crate::resp::Request::from_args(parts)
    }

    fn run(parts: &[&str], state: &ConnState) -> Local {
        let a = args(parts);
        decide(&classify(a.args()), a.args(), state, 7)
    }

    fn open() -> ConnState {
        ConnState::new(Auth::Implicit(Identity::anonymous()))
    }

    fn reply_of(l: Local) -> Vec<u8> {
        match l {
            Local::Reply(b) => b.to_vec(),
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    #[test]
    fn ping_and_echo() {
        let s = open();
        assert_eq!(reply_of(run(&["PING"], &s)), b"+PONG\r\n");
        assert_eq!(reply_of(run(&["ping", "hi"], &s)), b"$2\r\nhi\r\n");
        assert_eq!(
            reply_of(run(&["PING", "a", "b"], &s)),
            b"-ERR wrong number of arguments for 'ping' command\r\n"
        );
        assert_eq!(reply_of(run(&["ECHO", "x"], &s)), b"$1\r\nx\r\n");
        assert_eq!(run(&["ECHO"], &s), Local::Forward);
    }

    #[test]
    fn hello_parses_protocol_auth_and_name() {
        let s = open();
        assert_eq!(
            run(&["HELLO", "3", "AUTH", "u", "p", "SETNAME", "n"], &s),
            Local::Hello(Hello {
                proto: Proto::Resp3,
                auth: Some(Credentials {
                    username: Some("u".into()),
                    password: "p".into()
                }),
                name: Some(Bytes::from_static(b"n")),
            })
        );
        assert_eq!(
            run(&["HELLO"], &s),
            Local::Hello(Hello {
                proto: Proto::Resp2,
                auth: None,
                name: None
            })
        );
        assert_eq!(
            reply_of(run(&["HELLO", "4"], &s)),
            b"-NOPROTO unsupported protocol version\r\n"
        );
        assert_eq!(
            reply_of(run(&["HELLO", "x"], &s)),
            b"-ERR Protocol version is not an integer or out of range\r\n"
        );
        assert_eq!(
            reply_of(run(&["HELLO", "3", "AUTH", "u"], &s)),
            b"-ERR Syntax error in HELLO option 'AUTH'\r\n"
        );
        assert_eq!(
            reply_of(run(&["HELLO", "3", "SETNAME", "a b"], &s)),
            b"-ERR Client names cannot contain spaces, newlines or special characters.\r\n"
        );
    }

    #[test]
    fn hello_without_auth_needs_an_identity() {
        let s = ConnState::new(Auth::Required);
        assert_eq!(reply_of(run(&["HELLO", "3"], &s)), reply::NOAUTH_HELLO);
        assert!(matches!(
            run(&["HELLO", "3", "AUTH", "default", "pw"], &s),
            Local::Hello(_)
        ));
    }

    #[test]
    fn auth_arguments() {
        assert_eq!(
            auth(args(&["AUTH", "pw"]).args()),
            Local::Auth(Credentials {
                username: None,
                password: "pw".into()
            })
        );
        assert_eq!(
            reply_of(auth(args(&["AUTH", "a", "b", "c"]).args())),
            b"-ERR syntax error\r\n"
        );
    }

    #[test]
    fn client_bookkeeping() {
        let mut s = open();
        assert_eq!(
            run(&["CLIENT", "SETNAME", "app"], &s),
            Local::SetName(Bytes::from_static(b"app"))
        );
        assert_eq!(reply_of(run(&["client", "getname"], &s)), b"$-1\r\n");
        s.set_name(Bytes::from_static(b"app"));
        assert_eq!(reply_of(run(&["CLIENT", "GETNAME"], &s)), b"$3\r\napp\r\n");
        assert_eq!(reply_of(run(&["CLIENT", "ID"], &s)), b":7\r\n");
        assert_eq!(
            reply_of(run(&["CLIENT", "SETINFO", "lib-name", "redis-py"], &s)),
            b"+OK\r\n"
        );
        assert_eq!(
            reply_of(run(&["CLIENT", "SETINFO", "bogus", "x"], &s)),
            b"-ERR Unrecognized option 'bogus'\r\n"
        );
        assert_eq!(
            reply_of(run(&["CLIENT", "SETINFO", "lib-ver"], &s)),
            b"-ERR wrong number of arguments for 'client|setinfo' command\r\n"
        );
        assert_eq!(run(&["CLIENT", "TRACKING", "on"], &s), Local::Tunnel);
        assert_eq!(run(&["CLIENT", "LIST"], &s), Local::Forward);
        assert_eq!(run(&["CLIENT"], &s), Local::Forward);
        s.hello(Proto::Resp3, None);
        s.set_name(Bytes::new());
        assert_eq!(reply_of(run(&["CLIENT", "GETNAME"], &s)), b"_\r\n");
    }
}
