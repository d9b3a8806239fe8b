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
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use prometheus::IntCounter;
use tokio::sync::oneshot;

use super::{FastMap, Hasher};

/// Stripes of the leaders-in-flight counts. With this many, a key whose stripe has no
/// leader (the common case with many distinct keys) is the rule, not the exception.
const STRIPES: usize = 1 << 14;

/// Each registered flight with the followers waiting for its leader's value.
type FlightMap<K, V> = FastMap<K, Vec<oneshot::Sender<V>>>;

struct Flights<K, V> {
    map: Mutex<FlightMap<K, V>>,
    /// Leaders in flight per stripe of key hashes, registered or not.
    busy: Box<[AtomicU32]>,
    hasher: Hasher,
}

impl<K, V> Flights<K, V> {
    fn lock(&self) -> MutexGuard<'_, FlightMap<K, V>> {
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
/// Most reads share nothing (distinct keys), so a leader is only registered where a
/// follower could find it when its stripe of key hashes already has a leader in flight:
/// a join whose stripe is idle costs one atomic add and no lock. The price is that the
/// first read of a burst on one key leads unregistered and the second leads too (and
/// registers); every later one follows. Two requests per burst instead of one, for no
/// shared lock on the path of every read.
pub struct SingleFlight<K, V> {
    flights: Arc<Flights<K, V>>,
    shared: Option<IntCounter>,
}

/// Result of [`SingleFlight::join`].
pub enum Flight<K: Hash + Eq, V> {
    /// Send the request, then call [`LeaderGuard::finish`].
    Leader(LeaderGuard<K, V>),
    /// `.await` it: `Some(reply)` from the leader, or `None` if the leader gave up, in
    /// which case send the request yourself.
    Follower(Follower<V>),
}

impl<K: Hash + Eq + Clone, V: Clone> SingleFlight<K, V> {
    /// `shared` counts followers (`CacheMetrics::singleflight_shared`).
    pub fn new(shared: Option<IntCounter>) -> Self {
        SingleFlight {
            flights: Arc::new(Flights {
                map: Mutex::new(FastMap::default()),
                busy: (0..STRIPES).map(|_| AtomicU32::new(0)).collect(),
                hasher: Hasher::default(),
            }),
            shared,
        }
    }

    pub fn join(&self, key: K) -> Flight<K, V> {
        let stripe = self.flights.hasher.hash_one(&key) as usize % STRIPES;
        // Relaxed: the count only decides whether to look in the map, which has its own
        // lock; a stale count costs at most a needless look or a second request.
        if self.flights.busy[stripe].fetch_add(1, Ordering::Relaxed) == 0 {
            return Flight::Leader(LeaderGuard {
                flights: Arc::clone(&self.flights),
                stripe,
                key: None,
            });
        }
        let mut map = self.flights.lock();
        if let Some(followers) = map.get_mut(&key) {
            let (tx, rx) = oneshot::channel();
            followers.push(tx);
            drop(map);
            self.flights.busy[stripe].fetch_sub(1, Ordering::Relaxed);
            if let Some(c) = &self.shared {
                c.inc();
            }
            return Flight::Follower(Follower { rx });
        }
        map.insert(key.clone(), Vec::new());
        drop(map);
        Flight::Leader(LeaderGuard {
            flights: Arc::clone(&self.flights),
            stripe,
            key: Some(key),
        })
    }

    /// Keys with a registered leader still working.
    #[cfg(test)]
    pub fn in_flight(&self) -> usize {
        self.flights.lock().len()
    }

    /// Leaders still working, registered or not.
    #[cfg(test)]
    pub fn leaders(&self) -> u32 {
        self.flights
            .busy
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .sum()
    }
}

impl<K: Hash + Eq + Clone, V: Clone> Default for SingleFlight<K, V> {
    fn default() -> Self {
        SingleFlight::new(None)
    }
}

/// Held by the one caller doing the request. Dropping it unfinished (an error, a
/// timeout, a cancelled task) releases the followers with `None`.
pub struct LeaderGuard<K: Hash + Eq, V> {
    flights: Arc<Flights<K, V>>,
    stripe: usize,
    /// `None` once finished, and for a leader nobody could follow.
    key: Option<K>,
}

impl<K: Hash + Eq, V> LeaderGuard<K, V> {
    fn take_followers(&mut self) -> Vec<oneshot::Sender<V>> {
        let Some(key) = self.key.take() else {
            return Vec::new();
        };
        // Removed before answering, so that a join from now on leads anew instead of
        // following a flight that is over.
        self.flights.lock().remove(&key).unwrap_or_default()
    }
}

impl<K: Hash + Eq, V> LeaderGuard<K, V> {
    /// Hands a clone of `value` to every follower (none made when nobody follows).
    pub fn finish(mut self, value: &V)
    where
        V: Clone,
    {
        for f in self.take_followers() {
            let _ = f.send(value.clone());
        }
    }
}

impl<K: Hash + Eq, V> Drop for LeaderGuard<K, V> {
    fn drop(&mut self) {
        // Dropping the senders is how followers learn of `None`.
        drop(self.take_followers());
        self.flights.busy[self.stripe].fetch_sub(1, Ordering::Relaxed);
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
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_joins_share_one_leader() {
        const N: usize = 100;
        let registry = Registry::new();
        let metrics = CacheMetrics::register(&registry).unwrap();
        let flights: Arc<SingleFlight<CacheKey, Bytes>> =
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
                        flights.join(CacheKey::get(0, IdentityId::ANONYMOUS, Proto::Resp2, b"k"));
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
        // The first leads unregistered, the second registers, the rest follow it.
        assert_eq!(leaders.load(Ordering::SeqCst), 2);
        assert_eq!(metrics.singleflight_shared.get(), N as u64 - 2);
        assert_eq!((flights.in_flight(), flights.leaders()), (0, 0));
    }

    #[tokio::test]
    async fn a_dropped_leader_releases_followers_with_none() {
        let flights: SingleFlight<&str, u32> = SingleFlight::default();
        let Flight::Leader(unregistered) = flights.join("k") else {
            panic!("first join must lead")
        };
        assert_eq!(
            flights.in_flight(),
            0,
            "an idle stripe's leader registers nothing"
        );
        let Flight::Leader(guard) = flights.join("k") else {
            panic!("second join leads too: nobody could follow the first")
        };
        assert_eq!(flights.in_flight(), 1);
        let Flight::Follower(early) = flights.join("k") else {
            panic!("third join must follow")
        };
        let waiting = tokio::spawn(early.into_future());
        tokio::task::yield_now().await;
        let Flight::Follower(late) = flights.join("k") else {
            panic!("fourth join must follow")
        };
        drop(guard);
        assert_eq!(waiting.await.unwrap(), None);
        assert_eq!(late.wait().await, None);
        assert_eq!(flights.in_flight(), 0);
        drop(unregistered);
        assert_eq!(flights.leaders(), 0);

        // The key is free again, and a finished flight does not leak into the next one.
        let Flight::Leader(first) = flights.join("k") else {
            panic!("must lead again")
        };
        let Flight::Leader(guard) = flights.join("k") else {
            panic!("must lead (registered)")
        };
        let Flight::Follower(f) = flights.join("k") else {
            panic!("must follow")
        };
        guard.finish(&7);
        assert_eq!(f.await, Some(7));
        first.finish(&8);
        assert_eq!(flights.leaders(), 0);
        assert!(matches!(flights.join("k"), Flight::Leader(_)));
        assert_eq!(
            flights.leaders(),
            0,
            "a dropped flight gives its stripe back"
        );
    }

    #[test]
    fn reads_of_distinct_keys_register_nothing() {
        let flights: SingleFlight<u64, u32> = SingleFlight::default();
        let guards: Vec<_> = (0..64)
            .map(|k| match flights.join(k) {
                Flight::Leader(g) => g,
                Flight::Follower(_) => panic!("{k} has nobody to follow"),
            })
            .collect();
        // 64 keys over 2^14 stripes: almost surely no two share one.
        assert!(flights.in_flight() <= 2, "{}", flights.in_flight());
        assert_eq!(flights.leaders(), 64);
        drop(guards);
        assert_eq!((flights.in_flight(), flights.leaders()), (0, 0));
    }
}
