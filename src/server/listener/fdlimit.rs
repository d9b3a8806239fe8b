//! File descriptors, like Redis: raise the soft `RLIMIT_NOFILE` to the hard limit at start,
//! and derive how many clients fit from what the process may open.
//!
//! Redis reserves 32 descriptors for itself (`CONFIG_MIN_RESERVED_FDS`) plus its listeners
//! and lowers `maxclients` to what is left, logging it; a client beyond that gets
//! `-ERR max number of clients reached` instead of a connection that hangs. redfuse does the
//! same, reserving on top of Redis's 32 what it opens itself: its listeners and a few admin
//! connections, the journal's files, and per upstream the shared connections (one pool per
//! protocol), the warm dedicated connections, the health probe and the replay connection.
//!
//! A client holding a dedicated upstream connection (`MULTI`, `BLPOP`, pub/sub ...) uses a
//! second descriptor that is not reserved here: if descriptors run out, that client's
//! upstream connect fails with an error reply, and a new client is refused at accept with
//! the max-clients error (see `serve`), never left hanging.

use std::io;

use crate::config::Config;
use crate::upstream::dedicated::WARM_PER_SETUP;

/// What Redis keeps for itself (`CONFIG_MIN_RESERVED_FDS`): stdio, logs, the event loop's
/// own descriptors (epoll, eventfd, signal pipe), resolver sockets.
pub const MIN_RESERVED_FDS: u64 = 32;
/// The client and admin listeners.
const LISTENERS: u64 = 2;
/// Admin HTTP connections (scrapes, probes) counted on at once.
const ADMIN_CONNECTIONS: u64 = 16;
/// The journal, its dead letters, a compaction's temporary file, a directory fsync.
const JOURNAL_FDS: u64 = 4;

/// The descriptor budget redfuse runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdBudget {
    /// `RLIMIT_NOFILE` (soft) after trying to raise it.
    pub limit: u64,
    /// The hard limit it could be raised to.
    pub hard_limit: u64,
    /// Descriptors kept for redfuse's own use.
    pub reserved: u64,
    /// The configured `max_clients`.
    pub configured: usize,
    /// The clients that fit: `configured`, or fewer when the limit is too low.
    pub max_clients: usize,
}

impl FdBudget {
    pub fn lowered(&self) -> bool {
        self.max_clients < self.configured
    }
}

/// Descriptors redfuse needs besides one per client.
pub fn reserved_fds(config: &Config) -> u64 {
    let per_upstream = 2 * config.upstream_connections as u64 // a pool per protocol
        + 2 * WARM_PER_SETUP as u64 // warm dedicated connections (RESP2 and RESP3)
        + 2; // the health probe and the replay connection
    MIN_RESERVED_FDS
        + LISTENERS
        + ADMIN_CONNECTIONS
        + JOURNAL_FDS
        + per_upstream * config.upstreams.len() as u64
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (to what `max_clients` needs when the
/// hard limit is unlimited), derives the effective `max_clients` from the result, and logs
/// it (a warning when it is lower than configured). Idempotent; call once before accepting.
pub fn apply(config: &Config) -> FdBudget {
    let reserved = reserved_fds(config);
    let wanted = (config.max_clients as u64).saturating_add(reserved);
    let (limit, hard_limit) = match raise_nofile(wanted) {
        Ok(limits) => limits,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read or raise RLIMIT_NOFILE; assuming 1024");
            (1024, 1024)
        }
    };
    let budget = budget(config.max_clients, reserved, limit, hard_limit);
    if budget.lowered() {
        tracing::warn!(
            max_clients = budget.max_clients,
            configured = budget.configured,
            rlimit_nofile = budget.limit,
            hard_limit = budget.hard_limit,
            reserved = budget.reserved,
            "max_clients lowered to fit the open file limit (raise `ulimit -n` to serve more clients)"
        );
    } else {
        tracing::info!(
            max_clients = budget.max_clients,
            rlimit_nofile = budget.limit,
            reserved = budget.reserved,
            "client limit"
        );
    }
    budget
}

/// The arithmetic of [`apply`]: at least one client, at most `configured`.
pub fn budget(configured: usize, reserved: u64, limit: u64, hard_limit: u64) -> FdBudget {
    let fit = limit.saturating_sub(reserved).max(1);
    FdBudget {
        limit,
        hard_limit,
        reserved,
        configured,
        max_clients: usize::try_from(fit).unwrap_or(usize::MAX).min(configured),
    }
}

/// Raises the soft `RLIMIT_NOFILE` as far as allowed; returns (soft, hard) afterwards.
#[cfg(unix)]
#[allow(clippy::unnecessary_cast)] // `rlim_t` is not `u64` everywhere.
pub fn raise_nofile(wanted: u64) -> io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let target = if lim.rlim_max == libc::RLIM_INFINITY {
        wanted.max(lim.rlim_cur as u64) as libc::rlim_t
    } else {
        lim.rlim_max
    };
    if target > lim.rlim_cur {
        let raised = libc::rlimit {
            rlim_cur: target,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads the struct we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim.rlim_cur = target;
        } else {
            tracing::warn!(
                error = %io::Error::last_os_error(),
                from = lim.rlim_cur as u64,
                to = target as u64,
                "cannot raise RLIMIT_NOFILE"
            );
        }
    }
    let hard = if lim.rlim_max == libc::RLIM_INFINITY {
        u64::MAX
    } else {
        lim.rlim_max as u64
    };
    Ok((lim.rlim_cur as u64, hard))
}

#[cfg(not(unix))]
pub fn raise_nofile(_wanted: u64) -> io::Result<(u64, u64)> {
    Ok((u64::MAX, u64::MAX))
}

/// Redis's `tcp-backlog` default: connections the kernel queues before redfuse accepts
/// them. The standard library listens with 128, which a burst of connects overflows while
/// the event loop is busy; each connect dropped then waits a second for the SYN retry.
pub const TCP_BACKLOG: i32 = 511;

/// Sets a listening socket's backlog (calling `listen` again on a listening socket updates
/// it on Linux and the BSDs; the kernel caps it at `net.core.somaxconn`).
pub fn set_backlog(listener: &impl std::os::fd::AsRawFd, backlog: i32) {
    // SAFETY: listen on a socket we own.
    if unsafe { libc::listen(listener.as_raw_fd(), backlog) } != 0 {
        tracing::warn!(error = %io::Error::last_os_error(), backlog, "cannot set the listen backlog");
    }
}

/// Whether an accept failed because descriptors ran out (process or system wide).
pub fn is_out_of_fds(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// Accepts one pending connection synchronously and answers it with `reply` before
/// closing it. Used right after giving up the spare descriptor: no other task can run in
/// between and take the descriptor that was freed.
#[cfg(unix)]
pub fn refuse_pending(listener: &impl std::os::fd::AsRawFd, reply: &[u8]) -> io::Result<()> {
    use std::io::Write;
    use std::os::fd::FromRawFd;
    // SAFETY: accept4 on a listening socket we own; null address pointers are allowed.
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a socket accept4 just returned; the stream owns and closes it.
    let stream = unsafe { std::net::TcpStream::from_raw_fd(fd) };
    (&stream).write(reply).map(|_| ())
}

/// Redis's trick for accepting when out of descriptors: one descriptor kept open to give
/// up for a moment, so a client that cannot be served still gets an error and a close.
pub struct SpareFd(Option<std::fs::File>);

impl SpareFd {
    pub fn open() -> SpareFd {
        SpareFd(std::fs::File::open("/dev/null").ok())
    }

    /// Closes the spare; false when there was none to close.
    pub fn release(&mut self) -> bool {
        self.0.take().is_some()
    }

    /// Takes the spare again (when a descriptor is free).
    pub fn reopen(&mut self) {
        if self.0.is_none() {
            self.0 = std::fs::File::open("/dev/null").ok();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_leaves_the_reserve_and_never_raises_max_clients() {
        let b = budget(10_000, 68, 256, 256);
        assert_eq!(b.max_clients, 188);
        assert!(b.lowered());
        let b = budget(100, 68, 1_048_576, 1_048_576);
        assert_eq!(b.max_clients, 100);
        assert!(!b.lowered());
        assert_eq!(budget(10, 68, 20, 20).max_clients, 1, "always at least one");
    }

    #[test]
    fn the_soft_limit_is_raised_to_the_hard_one() {
        let (soft, hard) = raise_nofile(64).expect("getrlimit");
        assert!(soft >= 64.min(hard));
        assert!(soft <= hard);
        // Idempotent.
        assert_eq!(raise_nofile(64).expect("again"), (soft, hard));
    }

    #[test]
    fn out_of_fds_errors_are_recognised() {
        assert!(is_out_of_fds(&io::Error::from_raw_os_error(libc::EMFILE)));
        assert!(is_out_of_fds(&io::Error::from_raw_os_error(libc::ENFILE)));
        assert!(!is_out_of_fds(&io::Error::from_raw_os_error(
            libc::ECONNABORTED
        )));
    }
}
