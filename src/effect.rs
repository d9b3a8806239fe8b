//! What a reply changes besides reaching its client, as typed values.
//!
//! A request that reads or writes cached keys is sent with a [`ReplyEffect`]; the upstream
//! connection hands the effect and the reply to its [`EffectSink`] (the owner of the cache,
//! `degrade::Degrade`) the moment the reply is read, before it travels to the client:
//! cache fills, single-flight and invalidations must not wait for a client that is slow to
//! read its replies. The upstream side only carries the value; it never looks inside.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use bytes::Bytes;
use tokio::time::Instant;

use crate::auth::IdentityId;
use crate::cache::{CacheKey, FillTicket, FreshClock, LeaderGuard};
use crate::command::{Classified, absent_reply};
use crate::degrade::ClientView;
use crate::error::Reply;
use crate::resp::reply::Absent;
use crate::resp::{Proto, Request};

/// The one read in flight that identical reads wait for (see [`FillPlan::flight_hash`]).
pub type Leader = LeaderGuard<Reply>;

/// How a cacheable read's reply fills the cache.
#[derive(Debug, Clone)]
pub enum FillPlan {
    Single {
        key: CacheKey,
        redis_key: KeyName,
        ticket: FillTicket,
    },
    /// MGET: one GET entry per key, in argument order.
    Mget { parts: MgetParts },
}

/// A read's Redis key, carried with it until its reply for the degraded answer's
/// per-key policy: a copy when short (most keys are), else a handle on the request's frame.
/// A handle raises the frame's shared count and lowers it again when the reply is done:
/// two atomic operations on a line another core may hold, which showed in profiles of
/// every cached read; a copy of a short key is two 16-byte moves.
#[derive(Clone)]
pub enum KeyName {
    Inline { len: u8, bytes: [u8; INLINE_KEY] },
    Shared(Bytes),
}

/// The longest key [`KeyName`] copies: the inline form is then no larger than a handle.
const INLINE_KEY: usize = 30;

impl KeyName {
    /// Argument `i` of `req`.
    pub fn of(req: &Request, i: usize) -> KeyName {
        let name = req.args().arg(i);
        if name.len() <= INLINE_KEY {
            let mut bytes = [0; INLINE_KEY];
            bytes[..name.len()].copy_from_slice(name);
            KeyName::Inline {
                len: name.len() as u8,
                bytes,
            }
        } else {
            KeyName::Shared(req.arg_bytes(i))
        }
    }
}

impl std::ops::Deref for KeyName {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            KeyName::Inline { len, bytes } => &bytes[..usize::from(*len)],
            KeyName::Shared(b) => b,
        }
    }
}

impl std::fmt::Debug for KeyName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", bytes::Bytes::copy_from_slice(self))
    }
}

/// The keys of an MGET's fill plan: each key's cache key and ticket, and where its name lies
/// in the request's frame. One handle on the frame serves every key: a handle per key
/// raised and lowered the frame's shared count ten times per MGET of ten keys, which showed
/// in profiles.
#[derive(Debug, Clone)]
pub struct MgetParts {
    frame: Bytes,
    /// Shared: the plan is cloned for the degraded answer of a request dropped unsent.
    parts: Arc<[MgetPart]>,
}

/// One key of [`MgetParts`]: its cache key, its name's span in the frame, its ticket.
type MgetPart = (CacheKey, (u32, u32), FillTicket);

impl MgetParts {
    /// The parts of `req` (`MGET k1 k2 ...`), `part` giving each key's cache key and ticket.
    pub fn new(req: &Request, part: impl Fn(&[u8]) -> (CacheKey, FillTicket)) -> MgetParts {
        let args = req.args();
        let parts = (1..args.len())
            .map(|i| {
                let (key, ticket) = part(args.arg(i));
                (key, req.arg_span(i), ticket)
            })
            .collect();
        MgetParts {
            frame: req.raw.clone(),
            parts,
        }
    }

    pub fn len(&self) -> usize {
        self.parts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }

    /// Each key's cache key, name and ticket, in argument order.
    pub fn iter(&self) -> impl Iterator<Item = (&CacheKey, &[u8], &FillTicket)> {
        self.parts.iter().map(|(key, (start, end), ticket)| {
            (key, &self.frame[*start as usize..*end as usize], ticket)
        })
    }
}

impl FillPlan {
    /// The single-flight identity of a single-key read: identical reads share a flight
    /// (the same command, db, protocol and identity, and no write to the key since).
    #[inline]
    pub fn flight_hash(&self) -> Option<u64> {
        match self {
            FillPlan::Single { key, ticket, .. } => Some(key.flight_hash(ticket)),
            FillPlan::Mget { .. } => None,
        }
    }
}

/// What a degraded answer to a cacheable read depends on besides the cache: who asks,
/// which command, and what Redis answers for a missing key.
#[derive(Debug, Clone, Copy)]
pub struct DegradedRead {
    pub view: ClientView,
    pub command: usize,
    pub absent: Option<Absent>,
}

impl DegradedRead {
    pub fn new(view: ClientView, cls: &Classified, req: &Request) -> DegradedRead {
        DegradedRead {
            view,
            command: cls.id,
            absent: absent_reply(cls.id, req.args()),
        }
    }
}

/// A write that went upstream: what to do about its keys once it has run.
#[derive(Debug, Clone)]
pub struct Written {
    /// The client's database; `None` when redfuse could not follow it.
    pub db: Option<u32>,
    pub identity: IdentityId,
    pub request: Request,
    pub class: Classified,
    /// When it was sent: relative expiries (`EX 2`) count from here, never later than
    /// Redis counts them.
    pub sent: Instant,
    /// Taken right after the write's own invalidation: still current when the reply
    /// arrives means no other write to the key went by, so a plain `SET` may fill the cache
    /// with its own value.
    pub ticket: Option<FillTicket>,
    /// The writer's protocol: a plain `SET` fills the `GET` entry of that framing only
    /// (a client of the other one reads the key from Redis, or gets an error while it is
    /// down, as after any write redfuse does not hold the result of).
    pub proto: Proto,
}

/// What a reply changes.
pub enum ReplyEffect {
    /// A cacheable read: store what it read, and release the reads that waited on it.
    /// With `degraded`, a failure is answered from the cache right then, in pipeline
    /// order: a write the client sent after this read must not change its answer, and
    /// the failure effects of such a write are applied just after this one.
    Fill {
        plan: FillPlan,
        leader: Option<Leader>,
        degraded: Option<DegradedRead>,
    },
    /// A write has run (or failed): its keys are invalidated again and what it did to them
    /// is learnt.
    Write(Box<Written>),
    /// `EXEC`: the writes queued in the transaction ran now.
    Exec(Vec<Written>),
    /// A write queued during an outage was replayed to Redis.
    Replayed(Box<Written>),
}

impl std::fmt::Debug for ReplyEffect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReplyEffect::Fill { plan, .. } => write!(f, "Fill({plan:?})"),
            ReplyEffect::Write(w) => write!(f, "Write({})", w.class.name()),
            ReplyEffect::Exec(w) => write!(f, "Exec({} writes)", w.len()),
            ReplyEffect::Replayed(w) => write!(f, "Replayed({})", w.class.name()),
        }
    }
}

/// The upstream connection a reply arrived on. Replies on one connection come in the order
/// Redis ran the commands: a write answered before a read on the same connection ran
/// before it, so the read's reply already reflects it (see `cache`'s fill tickets).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnId(pub u64);

/// Applies reply effects; implemented by the owner of the cache.
pub trait EffectSink: Send + Sync {
    /// Applies `effect` for `reply`, which it may turn into the degraded answer
    /// ([`crate::error::UpstreamError::Answered`]) of a failed read. `via`: the connection
    /// Redis's reply arrived on; `None` for failures and replies from elsewhere (the
    /// replay).
    fn apply(&self, effect: ReplyEffect, reply: &mut Reply, via: Option<ConnId>);

    /// Applies the fills of successful reads that arrived together on `via`, in the order
    /// they arrived, and empties `fills`. The connection calls it before applying any
    /// effect of a reply that arrived after them (a write's invalidation must not overtake
    /// the fill of a read Redis ran before it), and once it has handled what it read.
    fn apply_fills(&self, fills: &mut Fills, via: Option<ConnId>);

    /// Starts loading the memory that applying `effect` will touch: the connection calls it
    /// a few replies ahead of the one it completes.
    fn prefetch(&self, _effect: &ReplyEffect) {}

    /// What [`ReplyEffect::defer`] does; a sink may also find that the fill has nothing
    /// to do (the cache holds this very reply, just stored) and finish it at once.
    /// `now`: when the replies read together arrived, the same for all of them.
    fn defer(
        &self,
        effect: ReplyEffect,
        reply: &Reply,
        fills: &mut Fills,
        _now: Instant,
    ) -> Option<ReplyEffect> {
        effect.defer(reply, &mut fills.deferred, 0, None)
    }
}

/// What the replies read together leave the cache to do, applied together by
/// [`EffectSink::apply_fills`]: their fills, and the count of the fills found to store
/// nothing new, counted once for all of them (a counter's atomic add per read showed in
/// profiles), with the clock they were found fresh by, worked out once for all of them.
#[derive(Default)]
pub struct Fills {
    pub deferred: Vec<DeferredFill>,
    pub skipped: u64,
    pub clock: Option<FreshClock>,
}

/// A successful read's fill, taken out of its [`ReplyEffect`] so that the reply can go on
/// to its client at once and the cache work for every reply read together is done under
/// one lock ([`EffectSink::apply_fills`]).
pub struct DeferredFill {
    pub plan: FillPlan,
    pub leader: Option<Leader>,
    pub reply: Bytes,
    /// The MGET parts (bit i: part i) whose reply the cache stored a moment ago: not
    /// stored again.
    pub fresh: u64,
    /// Where each element of an MGET's reply lies, when already known.
    pub elements: Option<Vec<Range<usize>>>,
}

impl ReplyEffect {
    /// Puts the fill this effect would make of `reply` in `fills` when it changes nothing
    /// in the reply: a fill of a reply Redis answered without an error, but for the `fresh`
    /// parts ([`DeferredFill::fresh`]), with the MGET reply's `elements` if already split.
    /// Anything else is handed back, to be applied at once.
    pub fn defer(
        self,
        reply: &Reply,
        fills: &mut Vec<DeferredFill>,
        fresh: u64,
        elements: Option<Vec<Range<usize>>>,
    ) -> Option<ReplyEffect> {
        match (self, reply) {
            (ReplyEffect::Fill { plan, leader, .. }, Ok(r)) if !crate::resp::is_error_reply(r) => {
                fills.push(DeferredFill {
                    plan,
                    leader,
                    reply: r.clone(),
                    fresh,
                    elements,
                });
                None
            }
            (effect, _) => Some(effect),
        }
    }
}

/// A count of a client's requests in flight of some kind (its writes on shared
/// connections, its blocking commands, everything on one connection), kept by the client
/// and decremented by the connection when the reply arrives: the [`Mark`] travels with
/// the request and is dropped after its effect.
#[derive(Debug, Default, Clone)]
pub struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    pub fn new() -> InFlight {
        InFlight::default()
    }

    /// Counts one more; the count goes down when the mark is dropped.
    pub fn mark(&self) -> Mark {
        self.0.fetch_add(1, Ordering::AcqRel);
        Mark(self.0.clone())
    }

    pub fn any(&self) -> bool {
        self.0.load(Ordering::Acquire) > 0
    }
}

/// One request counted in an [`InFlight`].
#[derive(Debug)]
pub struct Mark(Arc<AtomicUsize>);

impl Drop for Mark {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_count_until_dropped() {
        let c = InFlight::new();
        assert!(!c.any());
        let a = c.mark();
        let b = c.clone().mark();
        assert!(c.any());
        drop(a);
        assert!(c.any());
        drop(b);
        assert!(!c.any());
    }
}

/// Reply bytes a client may have coming from Redis (its requests waiting on Redis, times
/// the size of its recent replies) before redfuse stops reading from it: its share of a
/// shared connection's FIFO pipeline. Everyone else on that connection waits behind what
/// is ahead of them; a client pipelining thousands of 100 KB reads kept others waiting
/// seconds behind hundreds of megabytes. Counted in bytes, not requests, so a lone client
/// pipelining small commands over a slow link keeps its whole window. Answered requests
/// are not counted: a client that writes a long pipeline before reading anything is slowed
/// down, never stuck.
pub const UNANSWERED_BYTES: usize = 8 << 20;

/// Requests a new client may have waiting on Redis before its replies' size is known (the
/// average starts at the size that allows this many).
const FIRST_WINDOW: usize = 256;

/// A client's replies that have arrived from Redis but not yet been written to its socket,
/// in bytes, against `client-output-buffer-limit`-style limits: past the hard limit, or
/// above the soft limit for longer than its grace period, the client is disconnected (as
/// Redis does), so one client that does not read cannot grow redfuse without bound.
///
/// It also counts the client's requests still waiting on Redis ([`Owed`],
/// [`UNANSWERED_BYTES`]).
#[derive(Debug)]
pub struct OutputBudget {
    pending: AtomicUsize,
    unanswered: AtomicUsize,
    /// A moving average of the client's reply sizes.
    reply_size: AtomicUsize,
    /// Set while the session waits for answers (`caught_up`).
    waiting: AtomicBool,
    answered: tokio::sync::Notify,
    hard: usize,
    soft: usize,
    soft_for: std::time::Duration,
    /// When `pending` last went above `soft` (ms since `epoch`; 0: it is not above).
    above_soft_since: std::sync::atomic::AtomicU64,
    epoch: Instant,
    exceeded: tokio::sync::Notify,
    over: std::sync::atomic::AtomicBool,
}

/// Limits of [`OutputBudget`]; zero disables a limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputLimits {
    pub hard: usize,
    pub soft: usize,
    pub soft_for: std::time::Duration,
}

impl OutputBudget {
    pub fn new(limits: OutputLimits) -> OutputBudget {
        OutputBudget {
            pending: AtomicUsize::new(0),
            unanswered: AtomicUsize::new(0),
            reply_size: AtomicUsize::new(UNANSWERED_BYTES / FIRST_WINDOW),
            waiting: AtomicBool::new(false),
            answered: tokio::sync::Notify::new(),
            hard: if limits.hard == 0 {
                usize::MAX
            } else {
                limits.hard
            },
            soft: if limits.soft == 0 {
                usize::MAX
            } else {
                limits.soft
            },
            soft_for: limits.soft_for,
            above_soft_since: std::sync::atomic::AtomicU64::new(0),
            epoch: Instant::now(),
            exceeded: tokio::sync::Notify::new(),
            over: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// A reply of `n` bytes arrived for the client.
    pub fn add(&self, n: usize) {
        // Replies of one client arrive on one connection at a time, nearly always: an
        // update lost to a race only makes the average a little older.
        let avg = self.reply_size.load(Ordering::Relaxed);
        self.reply_size
            .store(avg - avg / 8 + n / 8, Ordering::Relaxed);
        let now = self.pending.fetch_add(n, Ordering::AcqRel) + n;
        if now > self.hard {
            self.exceed();
        } else if now > self.soft {
            let ms = (self.epoch.elapsed().as_millis() as u64).max(1);
            match self
                .above_soft_since
                .compare_exchange(0, ms, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {}
                Err(since) if ms.saturating_sub(since) > self.soft_for.as_millis() as u64 => {
                    self.exceed()
                }
                Err(_) => {}
            }
        }
    }

    /// `n` bytes of replies were written to the client (or dropped).
    pub fn sub(&self, n: usize) {
        let now = self
            .pending
            .fetch_sub(n, Ordering::AcqRel)
            .saturating_sub(n);
        if now <= self.soft {
            self.above_soft_since.store(0, Ordering::Release);
        }
    }

    fn exceed(&self) {
        self.over.store(true, Ordering::Release);
        self.exceeded.notify_waiters();
    }

    pub fn is_exceeded(&self) -> bool {
        self.over.load(Ordering::Acquire)
    }

    /// Resolves once a limit is exceeded.
    pub async fn exceeded(&self) {
        loop {
            let notified = self.exceeded.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_exceeded() {
                return;
            }
            notified.await;
        }
    }

    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Acquire)
    }

    /// Counts one more request of the client's waiting on Redis, until the [`Owed`] is
    /// dropped (answered, failed or never sent).
    pub fn owe(self: &Arc<Self>) -> Owed {
        self.unanswered.fetch_add(1, Ordering::AcqRel);
        Owed(self.clone())
    }

    /// Whether the client has its share of the pipeline waiting on Redis
    /// ([`UNANSWERED_BYTES`]).
    pub fn owes_enough(&self) -> bool {
        let size = self.reply_size.load(Ordering::Relaxed).max(1);
        // SeqCst here, on `waiting` and in `Owed::drop`: the session's "waiting, then
        // check" and the reply's "count down, then check waiting" never both miss.
        let n = self.unanswered.load(Ordering::SeqCst);
        n.saturating_mul(size) >= UNANSWERED_BYTES
    }

    /// Resolves once the client no longer [`owes_enough`](Self::owes_enough).
    pub async fn caught_up(&self) {
        loop {
            let notified = self.answered.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            self.waiting.store(true, Ordering::SeqCst);
            if !self.owes_enough() {
                self.waiting.store(false, Ordering::Relaxed);
                return;
            }
            notified.await;
        }
    }
}

/// One request of a client's waiting on Redis (see [`OutputBudget::owe`]); its reply is
/// charged to the client's budget through it.
#[derive(Debug)]
pub struct Owed(Arc<OutputBudget>);

impl Owed {
    pub fn budget(&self) -> &Arc<OutputBudget> {
        &self.0
    }
}

impl std::ops::Deref for Owed {
    type Target = OutputBudget;

    fn deref(&self) -> &OutputBudget {
        &self.0
    }
}

impl Drop for Owed {
    fn drop(&mut self) {
        let budget = &self.0;
        budget.unanswered.fetch_sub(1, Ordering::SeqCst);
        if budget.waiting.load(Ordering::SeqCst) && !budget.owes_enough() {
            budget.waiting.store(false, Ordering::Relaxed);
            budget.answered.notify_one();
        }
    }
}

#[cfg(test)]
mod budget_tests {
    use super::*;
    use std::time::Duration;

    fn unlimited() -> Arc<OutputBudget> {
        Arc::new(OutputBudget::new(OutputLimits {
            hard: 0,
            soft: 0,
            soft_for: Duration::ZERO,
        }))
    }

    #[tokio::test]
    async fn a_clients_share_of_the_pipeline_is_counted_in_reply_bytes() {
        let b = unlimited();
        // Before any reply: FIRST_WINDOW requests.
        let mut owed: Vec<Owed> = (0..FIRST_WINDOW - 1).map(|_| b.owe()).collect();
        assert!(!b.owes_enough());
        owed.push(b.owe());
        assert!(b.owes_enough());
        // Replies of 64 KiB: 128 requests' worth.
        for o in owed.drain(..) {
            o.add(64 << 10);
        }
        for _ in 0..100 {
            b.add(64 << 10);
        }
        let mut owed: Vec<Owed> = (0..127).map(|_| b.owe()).collect();
        assert!(!b.owes_enough());
        owed.push(b.owe());
        assert!(b.owes_enough());
        // Small replies: the window is far wider.
        drop(owed);
        for _ in 0..200 {
            b.add(10);
        }
        let owed: Vec<Owed> = (0..50_000).map(|_| b.owe()).collect();
        assert!(!b.owes_enough());
        drop(owed);
    }

    #[tokio::test]
    async fn caught_up_wakes_when_an_answer_makes_room() {
        let b = unlimited();
        let mut owed: Vec<Owed> = (0..FIRST_WINDOW).map(|_| b.owe()).collect();
        let waiter = tokio::spawn({
            let b = b.clone();
            async move { b.caught_up().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        // Failed or never sent counts as answered too: dropping is enough.
        owed.pop();
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .unwrap();
        drop(owed);
        b.caught_up().await;
    }

    #[tokio::test(start_paused = true)]
    async fn hard_and_soft_limits() {
        let b = OutputBudget::new(OutputLimits {
            hard: 100,
            soft: 50,
            soft_for: Duration::from_secs(10),
        });
        b.add(40);
        b.sub(40);
        b.add(60);
        assert!(!b.is_exceeded(), "above soft, within its grace");
        tokio::time::advance(Duration::from_secs(5)).await;
        b.add(1);
        assert!(!b.is_exceeded());
        b.sub(30);
        tokio::time::advance(Duration::from_secs(20)).await;
        b.add(1);
        assert!(!b.is_exceeded(), "went back under soft: the grace restarts");
        b.add(20);
        tokio::time::advance(Duration::from_secs(11)).await;
        b.add(1);
        assert!(b.is_exceeded(), "above soft for longer than its grace");
        let c = OutputBudget::new(OutputLimits {
            hard: 100,
            soft: 0,
            soft_for: Duration::ZERO,
        });
        c.add(101);
        assert!(c.is_exceeded());
        c.exceeded().await;
    }
}
