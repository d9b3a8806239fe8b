//! What one client read burst hands on: the calls for one upstream connection and the
//! reply slots, each group passed in one channel message.
//!
//! A pipelining client sends many requests per read. Handing each to the connection task
//! and to the reply writer on its own cost two channel sends per request (a semaphore, a
//! block write and a wake-up each), a tenth of the CPU of a pipelined GET in profiles.
//! Gathered here, they cost two sends per burst.
//!
//! Holding back is safe only while the session waits on nothing else: something it waits
//! for (a fence's `PING`, a reply on another connection, the write queue's replay, the
//! journal's disk) may be behind a call still held here, and replies already made must not
//! wait with it. So the session hands everything on before any other wait (`flush`), the
//! calls first: the writer may be waiting on their replies.

use tokio::time::Instant;

use super::writer::{Slot, Slots};
use crate::upstream::{Call, Calls, ConnHandle};

/// Slots gathered before they go to the writer anyway: a long pipeline is written while
/// it is still being read.
pub const MAX_SLOTS: usize = 64;

#[derive(Default)]
pub struct Outbox {
    calls: Calls,
    /// Where `calls` go (set while there are any).
    conn: Option<ConnHandle>,
    slots: Vec<Slot>,
    /// The size of the last burst: new buffers start that large.
    last_burst: usize,
}

impl Outbox {
    /// The connection held calls go to, if any are held.
    pub fn conn_id(&self) -> Option<u64> {
        self.conn.as_ref().map(|c| c.id)
    }

    /// Holds `call` for `conn`. The caller has sent what was held for another connection.
    pub fn hold(&mut self, conn: &ConnHandle, call: Box<Call>) {
        debug_assert!(self.conn_id().is_none_or(|id| id == conn.id));
        if self.conn.is_none() {
            self.conn = Some(conn.clone());
            self.calls.reserve(self.last_burst.max(1));
        }
        self.calls.push(call);
    }

    /// Holds a reply slot; true when enough are held to send them now.
    pub fn hold_slot(&mut self, slot: Slot) -> bool {
        if self.slots.capacity() == 0 {
            self.slots.reserve(self.last_burst.clamp(1, MAX_SLOTS));
        }
        self.slots.push(slot);
        self.slots.len() >= MAX_SLOTS
    }

    /// The held calls and their connection, if any.
    pub fn take_calls(&mut self) -> Option<(ConnHandle, Calls)> {
        let conn = self.conn.take()?;
        Some((conn, std::mem::take(&mut self.calls)))
    }

    /// The held slots as one message, if any.
    pub fn take_slots(&mut self, received: Instant) -> Option<Slots> {
        if self.slots.is_empty() {
            return None;
        }
        self.last_burst = self.slots.len();
        Some(Slots {
            slots: std::mem::take(&mut self.slots),
            received,
        })
    }
}
