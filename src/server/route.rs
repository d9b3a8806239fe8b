//! Where one classified request goes, given the connection's state: a pure decision, so the
//! rules that keep a client unable to tell redfuse from Redis are unit-tested here, and the
//! session only carries them out.

use bytes::Bytes;

use super::local::{self, Local};
use super::state::{ConnState, Mode};
use crate::command::{Classified, Flags, Route, ids};
use crate::resp::{Args, parse_u32, reply};

/// The state change a command makes once it has reached the dedicated connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Then {
    Nothing,
    Multi,
    Watch,
    /// `EXEC`, `DISCARD`, or `UNWATCH` outside `MULTI`.
    TransactionEnded,
    /// `SELECT` queued inside `MULTI`.
    SelectQueued,
}

/// What the session does with a request. `Shared` means: on the client's shared connection,
/// unless it holds a dedicated one it cannot release yet (see `ConnState::releasable`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dispatch {
    /// Answered here, with no upstream involved.
    Local(Local),
    Quit,
    Reset,
    /// On the client's shared connection, releasing a dedicated one first if it can be.
    Shared,
    /// On the client's dedicated connection (opened if need be).
    Pinned {
        blocking: bool,
        then: Then,
    },
    /// `SELECT n` (n ≠ 0, or leaving another db): on the dedicated connection, and the
    /// database changes when Redis says `OK`.
    Select(u32),
    /// `EXEC` of a transaction that queued a `SELECT`: the database is read back after it.
    ExecWithSelect,
    /// `WAIT` / `WAITAOF`: they count replicas that have this connection's writes.
    WaitReplication,
    /// The connection becomes a raw pipe, starting with this command.
    EnterTunnel,
    /// Already a pipe: the bytes go straight to it.
    Tunnel,
    /// `SCRIPT KILL`, `FUNCTION KILL`, `SHUTDOWN`: must reach Redis while a script keeps it
    /// busy, so they go on a connection of their own (not queued behind the script) and
    /// past an open breaker.
    Bypass,
}

/// Decides where a request goes.
pub fn decide(state: &ConnState, cls: &Classified, args: Args<'_>, client_id: u64) -> Dispatch {
    if state.mode == Mode::Tunnel {
        return Dispatch::Tunnel;
    }
    let no_auth = cls.spec.is_some_and(|s| s.flags.contains(Flags::NO_AUTH));
    if state.identity().is_none() && !no_auth {
        return Dispatch::Local(Local::Reply(Bytes::from_static(reply::NOAUTH)));
    }
    if state.in_multi() {
        // Inside MULTI, Redis queues everything except what ends the connection.
        return match cls.id {
            ids::QUIT => Dispatch::Quit,
            ids::RESET => Dispatch::Reset,
            ids::EXEC if has_queued_select(state) => Dispatch::ExecWithSelect,
            ids::EXEC | ids::DISCARD => Dispatch::Pinned {
                blocking: false,
                then: Then::TransactionEnded,
            },
            ids::SELECT => Dispatch::Pinned {
                blocking: false,
                then: Then::SelectQueued,
            },
            _ => Dispatch::Pinned {
                blocking: false,
                then: Then::Nothing,
            },
        };
    }
    match cls.route {
        Route::Local => match cls.id {
            ids::QUIT => Dispatch::Quit,
            ids::RESET => Dispatch::Reset,
            _ => match local::decide(cls, args, state, client_id) {
                Local::Forward => Dispatch::Shared,
                Local::Tunnel => Dispatch::EnterTunnel,
                other => Dispatch::Local(other),
            },
        },
        Route::Pin => match cls.id {
            ids::SELECT => select(state, args),
            ids::EXEC | ids::DISCARD | ids::UNWATCH if !state.is_pinned() => {
                // Nothing to end: Redis answers (an error, or OK for UNWATCH) anywhere.
                Dispatch::Shared
            }
            ids::EXEC | ids::DISCARD | ids::UNWATCH => Dispatch::Pinned {
                blocking: false,
                then: Then::TransactionEnded,
            },
            ids::MULTI => Dispatch::Pinned {
                blocking: false,
                then: Then::Multi,
            },
            ids::WATCH => Dispatch::Pinned {
                blocking: false,
                then: Then::Watch,
            },
            _ => Dispatch::Pinned {
                blocking: false,
                then: Then::Nothing,
            },
        },
        Route::Blocking if matches!(cls.id, ids::WAIT | ids::WAITAOF) => Dispatch::WaitReplication,
        Route::Blocking => Dispatch::Pinned {
            blocking: true,
            then: Then::Nothing,
        },
        Route::Tunnel => Dispatch::EnterTunnel,
        Route::Shared if cls.blocking => Dispatch::Pinned {
            blocking: true,
            then: Then::Nothing,
        },
        Route::Shared if ends_busy_script(cls.id, args) => Dispatch::Bypass,
        Route::Shared => Dispatch::Shared,
    }
}

fn has_queued_select(state: &ConnState) -> bool {
    matches!(
        state.pin(),
        Some(super::state::Pin::Transaction {
            select_queued: true,
            ..
        })
    )
}

fn select(state: &ConnState, args: Args<'_>) -> Dispatch {
    let db = (args.len() == 2).then(|| parse_u32(&args[1])).flatten();
    match db {
        // Malformed: Redis's own error text, from any connection.
        None => Dispatch::Shared,
        Some(0) if state.db == Some(0) && !state.is_pinned() => {
            Dispatch::Local(Local::Reply(reply::ok()))
        }
        Some(db) => Dispatch::Select(db),
    }
}

/// `SCRIPT KILL`, `FUNCTION KILL` and `SHUTDOWN`, which Redis runs while a script is busy.
fn ends_busy_script(id: usize, args: Args<'_>) -> bool {
    let sub_is = |name: &[u8]| args.get(1).is_some_and(|a| a.eq_ignore_ascii_case(name));
    match id {
        ids::SCRIPT | ids::FUNCTION => sub_is(b"kill"),
        ids::SHUTDOWN => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Identity;
    use crate::command::classify;
    use crate::server::state::{Auth, Pin};

    fn go(state: &ConnState, parts: &[&str]) -> Dispatch {
        let a = crate::resp::Request::from_args(parts);
        decide(state, &classify(a.args()), a.args(), 1)
    }

    fn open() -> ConnState {
        ConnState::new(Auth::Implicit(Identity::anonymous()))
    }

    const PINNED: Dispatch = Dispatch::Pinned {
        blocking: false,
        then: Then::Nothing,
    };

    #[test]
    fn stateless_commands_share() {
        let s = open();
        assert_eq!(go(&s, &["GET", "k"]), Dispatch::Shared);
        assert_eq!(go(&s, &["FOO.BAR", "k"]), Dispatch::Shared);
        assert_eq!(go(&s, &["CLIENT", "LIST"]), Dispatch::Shared);
        assert_eq!(
            go(&s, &["ECHO"]),
            Dispatch::Shared,
            "Redis words the arity error"
        );
    }

    #[test]
    fn connection_state_pins() {
        let s = open();
        assert_eq!(go(&s, &["SELECT", "2"]), Dispatch::Select(2));
        assert_eq!(
            go(&s, &["SELECT", "0"]),
            Dispatch::Local(Local::Reply(reply::ok()))
        );
        assert_eq!(go(&s, &["SELECT", "x"]), Dispatch::Shared);
        assert_eq!(
            go(&s, &["MULTI"]),
            Dispatch::Pinned {
                blocking: false,
                then: Then::Multi
            }
        );
        assert_eq!(
            go(&s, &["WATCH", "k"]),
            Dispatch::Pinned {
                blocking: false,
                then: Then::Watch
            }
        );
        assert_eq!(go(&s, &["EXEC"]), Dispatch::Shared, "nothing to end");
        assert_eq!(
            go(&s, &["BLPOP", "k", "0"]),
            Dispatch::Pinned {
                blocking: true,
                then: Then::Nothing
            }
        );
        assert_eq!(
            go(&s, &["XREAD", "BLOCK", "0", "STREAMS", "s", "$"]),
            Dispatch::Pinned {
                blocking: true,
                then: Then::Nothing
            }
        );
        assert_eq!(go(&s, &["XREAD", "STREAMS", "s", "0"]), Dispatch::Shared);
        assert_eq!(go(&s, &["WAIT", "1", "0"]), Dispatch::WaitReplication);
        assert_eq!(go(&s, &["SUBSCRIBE", "c"]), Dispatch::EnterTunnel);
        assert_eq!(go(&s, &["CLIENT", "TRACKING", "on"]), Dispatch::EnterTunnel);
    }

    #[test]
    fn inside_multi_everything_queues() {
        let mut s = open();
        s.multi();
        assert_eq!(go(&s, &["GET", "k"]), PINNED);
        assert_eq!(go(&s, &["PING"]), PINNED);
        assert_eq!(
            go(&s, &["BLPOP", "k", "0"]),
            PINNED,
            "not blocking inside MULTI"
        );
        assert_eq!(
            go(&s, &["SELECT", "1"]),
            Dispatch::Pinned {
                blocking: false,
                then: Then::SelectQueued
            }
        );
        assert_eq!(
            go(&s, &["EXEC"]),
            Dispatch::Pinned {
                blocking: false,
                then: Then::TransactionEnded
            }
        );
        assert_eq!(go(&s, &["QUIT"]), Dispatch::Quit);
        assert_eq!(go(&s, &["RESET"]), Dispatch::Reset);
        s.select_queued();
        assert_eq!(go(&s, &["EXEC"]), Dispatch::ExecWithSelect);
    }

    #[test]
    fn pinned_transaction_commands() {
        let mut s = open();
        s.watched();
        assert_eq!(
            go(&s, &["UNWATCH"]),
            Dispatch::Pinned {
                blocking: false,
                then: Then::TransactionEnded
            }
        );
        assert_eq!(
            s.pin(),
            Some(Pin::Transaction {
                multi: false,
                watched: true,
                select_queued: false
            })
        );
    }

    #[test]
    fn unauthenticated_clients_get_noauth_except_for_no_auth_commands() {
        let s = ConnState::new(Auth::Required);
        let noauth = Dispatch::Local(Local::Reply(Bytes::from_static(reply::NOAUTH)));
        assert_eq!(go(&s, &["GET", "k"]), noauth);
        assert_eq!(go(&s, &["PING"]), noauth);
        assert_eq!(go(&s, &["SELECT", "0"]), noauth);
        assert_eq!(go(&s, &["NOSUCHCMD"]), noauth);
        assert_eq!(go(&s, &["QUIT"]), Dispatch::Quit);
        assert_eq!(go(&s, &["RESET"]), Dispatch::Reset);
        assert!(matches!(
            go(&s, &["AUTH", "pw"]),
            Dispatch::Local(Local::Auth(_))
        ));
        assert!(matches!(
            go(&s, &["HELLO", "3", "AUTH", "u", "p"]),
            Dispatch::Local(Local::Hello(_))
        ));
    }

    #[test]
    fn busy_enders_bypass() {
        let s = open();
        assert_eq!(go(&s, &["SCRIPT", "KILL"]), Dispatch::Bypass);
        assert_eq!(go(&s, &["function", "kill"]), Dispatch::Bypass);
        assert_eq!(go(&s, &["SHUTDOWN", "NOSAVE"]), Dispatch::Bypass);
        assert_eq!(go(&s, &["SCRIPT", "FLUSH"]), Dispatch::Shared);
    }

    #[test]
    fn tunnels_take_everything() {
        let mut s = open();
        s.tunnel();
        assert_eq!(go(&s, &["PING"]), Dispatch::Tunnel);
        assert_eq!(go(&s, &["QUIT"]), Dispatch::Tunnel);
    }
}
