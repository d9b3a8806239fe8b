//! Single-flight: identical reads in flight at the same time share one upstream request,
//! which protects Redis from a stampede of the same read (a hot key, or every client
//! re-reading after an outage).
//!
//! The first caller of a key leads and holds a [`LeaderGuard`]; callers arriving while it
//! works follow, waiting on a oneshot channel for a clone of its value. A guard dropped
//! without finishing (error, timeout, cancelled task) closes the channel, so followers wake
//! with `None` and send their own request rather than hang or share a failure.

use std::future::Future;
use std::hash::{BuildHasher, Hash};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use prometheus::IntCounter;
use tokio::sync::oneshot;

use super::{FastMap, Hasher};

/// Stripes of key hashes. With this many, a key whose stripe is idle (the common case
/// with many distinct keys) is the rule, not the exception.
const STRIPES: usize = 1 << 14;

/// Set in a stripe once a follower waits on its unregistered leader: that leader must look
/// in the map when it finishes.
const FOLLOWED: u64 = 1;

/// [`LeaderGuard::stripe`] of a registered leader.
const NOT_HELD: u32 = u32::MAX;

/// Followers waiting per key (by its 64-bit hash): of a registered leader, or of the
/// unregistered leader that holds the key's stripe.
type FlightMap<V> = FastMap<u64, Vec<oneshot::Sender<V>>>;

struct Flights<V> {
    map: Mutex<FlightMap<V>>,
    /// Per stripe: 0, or the fingerprint of the key whose leader holds the stripe without
    /// a map entry, with [`FOLLOWED`] once a follower waits for it.
    stripes: Box<[AtomicU64]>,
    /// Hashes keys given without their hash ([`SingleFlight::join`]).
    hasher: Hasher,
}

impl<V> Flights<V> {
    fn lock(&self) -> MutexGuard<'_, FlightMap<V>> {
        // The map is only inserted into and removed from; a panic cannot leave it half-done.
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Lets identical reads in flight at the same time share one upstream request.
///
/// The first [`join`](SingleFlight::join) of a key leads: it sends the request and
/// [`finish`](LeaderGuard::finish)es with the reply. Joins of the same key before that
/// follow and receive a clone of it. Once the leader finishes (or gives up), the key is
/// free again: a later join leads a new request rather than getting an old answer.
///
/// Most reads share nothing (distinct keys), and a shared map on the path of every read
/// costs a lock and cache-line transfers between cores per request. So a leader whose
/// stripe of key hashes is idle claims the stripe with one compare-and-swap of its key's
/// fingerprint, and registers nothing; a join that finds its own fingerprint there
/// follows, through the map, and flags the stripe so that the leader looks in the map
/// when it finishes. Flagging and waiting happen under the map's lock, and the leader
/// clears the stripe before it takes that lock, so a follower either is found by the
/// leader or sees the stripe cleared and starts over. Only when the stripe is held by
/// another key does a leader register in the map, as every leader used to.
///
/// The flights live as long as the process: every leader's guard points at them, and a
/// shared count (an `Arc`) raised and lowered by every read on every core was a cache
/// line the cores took from each other twice per read. One exists per server.
pub struct SingleFlight<V: 'static> {
    flights: &'static Flights<V>,
    shared: Option<IntCounter>,
}

/// Result of [`SingleFlight::join`].
pub enum Flight<V: 'static> {
    /// Send the request, then call [`LeaderGuard::finish`].
    Leader(LeaderGuard<V>),
    /// `.await` it: `Some(reply)` from the leader, or `None` if the leader gave up, in
    /// which case send the request yourself.
    Follower(Follower<V>),
}

impl<V: Clone + 'static> SingleFlight<V> {
    /// `shared` counts followers (`CacheMetrics::singleflight_shared`).
    pub fn new(shared: Option<IntCounter>) -> Self {
        SingleFlight {
            flights: Box::leak(Box::new(Flights {
                map: Mutex::new(FastMap::default()),
                stripes: (0..STRIPES).map(|_| AtomicU64::new(0)).collect(),
                hasher: Hasher::default(),
            })),
            shared,
        }
    }

    /// Joins the flight of `key`, hashed here (see [`join_hashed`](Self::join_hashed)).
    pub fn join<K: Hash + ?Sized>(&self, key: &K) -> Flight<V> {
        self.join_hashed(self.flights.hasher.hash_one(key))
    }

    /// Joins the flight of the key hashing to `hash`: keys are known by their hash alone,
    /// so no key is copied or compared on the path of every read. Two keys in flight at
    /// once with the same 64-bit hash would share a flight: `hash` must make that a 2^-62
    /// chance, as a good (keyed) 64-bit hash does.
    pub fn join_hashed(&self, hash: u64) -> Flight<V> {
        let flights = self.flights;
        let (stripe, fingerprint) = place(hash);
        let cell = &flights.stripes[stripe];
        loop {
            let seen = cell.load(Ordering::Acquire);
            if seen == 0 {
                if cell
                    .compare_exchange(0, fingerprint, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    return Flight::Leader(LeaderGuard {
                        flights: self.flights,
                        hash,
                        stripe: stripe as u32,
                        done: false,
                    });
                }
                continue;
            }
            let mut map = flights.lock();
            if seen & !FOLLOWED == fingerprint {
                // Flag it under the lock; failing means the leader has just finished.
                if cell
                    .compare_exchange(
                        seen,
                        fingerprint | FOLLOWED,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    )
                    .is_err()
                {
                    continue;
                }
                return self.follow(map.entry(hash).or_default());
            }
            if let Some(followers) = map.get_mut(&hash) {
                return self.follow(followers);
            }
            map.insert(hash, Vec::new());
            return Flight::Leader(LeaderGuard {
                flights: self.flights,
                hash,
                stripe: NOT_HELD,
                done: false,
            });
        }
    }

    fn follow(&self, followers: &mut Vec<oneshot::Sender<V>>) -> Flight<V> {
        let (tx, rx) = oneshot::channel();
        followers.push(tx);
        if let Some(c) = &self.shared {
            c.inc();
        }
        Flight::Follower(Follower { rx })
    }

    /// Keys with followers or a registered leader.
    #[cfg(test)]
    pub fn in_flight(&self) -> usize {
        self.flights.lock().len()
    }

    /// Stripes held by an unregistered leader.
    #[cfg(test)]
    pub fn held(&self) -> usize {
        self.flights
            .stripes
            .iter()
            .filter(|s| s.load(Ordering::Relaxed) != 0)
            .count()
    }
}

impl<V: Clone + 'static> Default for SingleFlight<V> {
    fn default() -> Self {
        SingleFlight::new(None)
    }
}

/// A key's stripe and fingerprint, from its hash: the fingerprint is a bijection of the
/// hash (an odd multiplier) with two bits set aside: never 0 (idle), and FOLLOWED clear.
fn place(hash: u64) -> (usize, u64) {
    let stripe = (hash >> 40) as usize % STRIPES;
    let fingerprint = (hash.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 2) & !FOLLOWED;
    (stripe, fingerprint)
}

/// Held by the one caller doing the request. Dropping it unfinished (an error, a
/// timeout, a cancelled task) releases the followers with `None`.
pub struct LeaderGuard<V: 'static> {
    flights: &'static Flights<V>,
    hash: u64,
    /// The stripe a leader holds (and has no map entry for unless a follower made one);
    /// `NOT_HELD` for a registered leader.
    stripe: u32,
    done: bool,
}

impl<V: 'static> LeaderGuard<V> {
    /// Starts loading what finishing will touch (the stripe it clears), so that a
    /// connection completing a run of replies does not stall on each in turn.
    pub fn prefetch(&self) {
        if self.stripe != NOT_HELD {
            super::prefetch_line(&self.flights.stripes[self.stripe as usize]);
        }
    }

    /// Ends the flight; whether followers may wait for it in the map. A leader nobody
    /// followed (nearly every one) touches nothing else: no map, no list of followers to
    /// go through and drop.
    fn end(&mut self) -> bool {
        if std::mem::replace(&mut self.done, true) {
            return false;
        }
        if self.stripe == NOT_HELD {
            return true;
        }
        // Cleared before the map is looked at (see `SingleFlight`): a join from now on
        // starts a flight of its own.
        let seen = self.flights.stripes[self.stripe as usize].swap(0, Ordering::AcqRel);
        seen & FOLLOWED != 0
    }

    /// The followers of a flight that [`end`](Self::end) found may have some.
    fn take_followers(&self) -> Vec<oneshot::Sender<V>> {
        // Removed before answering, so that a join from now on leads anew instead of
        // following a flight that is over.
        self.flights.lock().remove(&self.hash).unwrap_or_default()
    }

    /// Hands a clone of `value` to every follower (none made when nobody follows).
    pub fn finish(mut self, value: &V)
    where
        V: Clone,
    {
        if self.end() {
            for f in self.take_followers() {
                let _ = f.send(value.clone());
            }
        }
    }
}

impl<V: 'static> Drop for LeaderGuard<V> {
    fn drop(&mut self) {
        // Dropping the senders is how followers learn of `None`.
        if self.end() {
            drop(self.take_followers());
        }
    }
}

/// Waits for a leader's value; see [`Flight::Follower`]. Resolves to `None` when the
/// leader gave up.
pub struct Follower<V> {
    rx: oneshot::Receiver<V>,
}

impl<V> Follower<V> {
    #[cfg(test)]
    pub async fn wait(self) -> Option<V> {
        self.await
    }

    /// The leader's value if it is already there, without waiting: `Ok(Some)` the value,
    /// `Ok(None)` the leader gave up, `Err(self)` still in flight.
    pub fn try_take(mut self) -> Result<Option<V>, Follower<V>> {
        match self.rx.try_recv() {
            Ok(v) => Ok(Some(v)),
            Err(oneshot::error::TryRecvError::Closed) => Ok(None),
            Err(oneshot::error::TryRecvError::Empty) => Err(self),
        }
    }
}

impl<V> Future for Follower<V> {
    type Output = Option<V>;

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<V>> {
        Pin::new(&mut self.rx).poll(cx).map(Result::ok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::IdentityId;
    use crate::cache::{CacheKey, CacheMetrics};
    use crate::resp::Proto;
    use bytes::Bytes;
    use prometheus::Registry;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_joins_share_one_leader() {
        const N: usize = 100;
        let registry = Registry::new();
        let metrics = CacheMetrics::register(&registry).unwrap();
        let flights: Arc<SingleFlight<Bytes>> =
            Arc::new(SingleFlight::new(Some(metrics.singleflight_shared.clone())));
        let before = Arc::new(tokio::sync::Barrier::new(N));
        let joined = Arc::new(tokio::sync::Barrier::new(N));
        let leaders = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..N)
            .map(|_| {
                let (flights, before, joined, leaders) = (
                    flights.clone(),
                    before.clone(),
                    joined.clone(),
                    leaders.clone(),
                );
                tokio::spawn(async move {
                    before.wait().await;
                    let flight =
                        flights.join(&CacheKey::get(0, IdentityId::ANONYMOUS, Proto::Resp2, b"k"));
                    // Nobody finishes until everyone has joined, so every join overlaps.
                    joined.wait().await;
                    match flight {
                        Flight::Leader(guard) => {
                            leaders.fetch_add(1, Ordering::SeqCst);
                            guard.finish(&b("$1\r\nv\r\n"));
                            Some(b("$1\r\nv\r\n"))
                        }
                        Flight::Follower(f) => f.await,
                    }
                })
            })
            .collect();
        for task in tasks {
            assert_eq!(task.await.unwrap(), Some(b("$1\r\nv\r\n")));
        }
        assert_eq!(leaders.load(Ordering::SeqCst), 1);
        assert_eq!(metrics.singleflight_shared.get(), N as u64 - 1);
        assert_eq!((flights.in_flight(), flights.held()), (0, 0));
    }

    #[tokio::test]
    async fn a_dropped_leader_releases_followers_with_none() {
        let flights: SingleFlight<u32> = SingleFlight::default();
        let Flight::Leader(guard) = flights.join(&"k") else {
            panic!("first join must lead")
        };
        assert_eq!(
            (flights.in_flight(), flights.held()),
            (0, 1),
            "a leader alone in its stripe registers nothing"
        );
        let Flight::Follower(early) = flights.join(&"k") else {
            panic!("second join must follow")
        };
        let waiting = tokio::spawn(early.into_future());
        tokio::task::yield_now().await;
        let Flight::Follower(late) = flights.join(&"k") else {
            panic!("third join must follow")
        };
        drop(guard);
        assert_eq!(waiting.await.unwrap(), None);
        assert_eq!(late.wait().await, None);
        assert_eq!((flights.in_flight(), flights.held()), (0, 0));

        // The key is free again, and a finished flight does not leak into the next one.
        let Flight::Leader(guard) = flights.join(&"k") else {
            panic!("must lead again")
        };
        let Flight::Follower(f) = flights.join(&"k") else {
            panic!("must follow")
        };
        guard.finish(&7);
        assert_eq!(f.await, Some(7));
        assert!(matches!(flights.join(&"k"), Flight::Leader(_)));
        assert_eq!((flights.in_flight(), flights.held()), (0, 0));
    }

    /// Keys are spread over stripes by one hash; this finds two that share a stripe.
    fn stripe_mates(flights: &SingleFlight<u32>) -> (u64, u64) {
        let stripe = |k: u64| place(flights.flights.hasher.hash_one(k)).0;
        let first = stripe(0);
        let mate = (1..).find(|&k| stripe(k) == first).expect("a stripe mate");
        (0, mate)
    }

    #[test]
    fn a_key_whose_stripe_is_taken_registers_and_is_followed() {
        let flights: SingleFlight<u32> = SingleFlight::default();
        let (a, b) = stripe_mates(&flights);
        let Flight::Leader(lead_a) = flights.join(&a) else {
            panic!("a leads")
        };
        let Flight::Leader(lead_b) = flights.join(&b) else {
            panic!("b leads: the stripe is a's")
        };
        assert_eq!((flights.in_flight(), flights.held()), (1, 1));
        let Flight::Follower(follow_b) = flights.join(&b) else {
            panic!("b's second read follows its registered leader")
        };
        let Flight::Follower(follow_a) = flights.join(&a) else {
            panic!("a's second read follows a")
        };
        lead_a.finish(&1);
        assert!(matches!(follow_a.try_take(), Ok(Some(1))));
        let Err(follow_b) = follow_b.try_take() else {
            panic!("b's leader has not finished")
        };
        lead_b.finish(&2);
        assert!(matches!(follow_b.try_take(), Ok(Some(2))));
        assert_eq!((flights.in_flight(), flights.held()), (0, 0));
    }

    /// Leaders finishing while followers join, on two threads: every follower is answered
    /// (none waits on a flight nobody will finish) and nothing is left behind.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn followers_racing_a_finishing_leader_are_always_answered() {
        let flights: Arc<SingleFlight<u32>> = Arc::new(SingleFlight::default());
        let tasks: Vec<_> = (0..4)
            .map(|t| {
                let flights = flights.clone();
                tokio::spawn(async move {
                    let mut waiting = Vec::new();
                    for i in 0..20_000u32 {
                        match flights.join(&((i % 3) as u8)) {
                            Flight::Leader(g) if (i + t) % 4 == 0 => drop(g),
                            Flight::Leader(g) => g.finish(&i),
                            Flight::Follower(f) => waiting.push(f),
                        }
                        if i % 64 == 0 {
                            tokio::task::yield_now().await;
                        }
                    }
                    for f in waiting {
                        tokio::time::timeout(std::time::Duration::from_secs(10), f)
                            .await
                            .expect("a follower was never answered");
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!((flights.in_flight(), flights.held()), (0, 0));
    }

    #[test]
    fn reads_of_distinct_keys_register_nothing() {
        let flights: SingleFlight<u32> = SingleFlight::default();
        let guards: Vec<_> = (0..64)
            .map(|k| match flights.join(&k) {
                Flight::Leader(g) => g,
                Flight::Follower(_) => panic!("{k} has nobody to follow"),
            })
            .collect();
        // 64 keys over 2^14 stripes: almost surely no two share one.
        assert!(flights.in_flight() <= 2, "{}", flights.in_flight());
        assert_eq!(flights.held() + flights.in_flight(), 64);
        drop(guards);
        assert_eq!((flights.in_flight(), flights.held()), (0, 0));
    }
}
