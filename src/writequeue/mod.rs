//! The write queue: writes accepted while the primary was down, replayed when it is back.
//!
//! [`WriteQueue`] is the one owner of everything about queued writes: the [`journal`]
//! (ordered, bounded, optionally on disk), the gate that keeps newer client writes behind
//! the replay, whether the replay is stalled, and the dead letters.
//!
//! # Ordering and delivery
//!
//! - Queued writes are replayed oldest first, each as the identity (Redis user) of the
//!   client that queued it, in the database it had selected, so a write never gets rights
//!   its client did not have.
//! - While entries are queued, client writes to the primary wait for the replay (bounded by
//!   the command timeout), so a queued write lands before any newer one; while the replay
//!   is stalled by a transient refusal (`LOADING`, `BUSY`, `OOM` ...) they fail fast.
//! - A queued write Redis refuses for a reason that will not go away (`NOAUTH`,
//!   `WRONGPASS`, `NOPERM`, `WRONGTYPE`, any other command error, `OOM` for longer than
//!   [`OOM_PATIENCE`], or credentials redfuse no longer holds after a restart) is moved to
//!   the dead-letter list and the replay goes on: the order then holds for every write
//!   that was replayed, and the dead letters are inspectable and drainable through the
//!   admin API (`GET /write-queue/dead-letters`, `POST /write-queue/dead-letters/drain`).
//! - Delivery is exactly once: entries are replayed in transactions (`MULTI` ... `EXEC`)
//!   that also record the last entry's seq in a cursor key of this journal
//!   ([`WriteQueue::cursor_key`]), so a replay whose outcome was lost (a connection reset
//!   before `EXEC`'s reply, redfuse killed before the journal's ack reached the disk)
//!   is recognised as done by the next pass instead of being sent again. Where Redis
//!   refuses redfuse the cursor (an ACL user without `MULTI` or without access to
//!   `redfuse:replay:*`), that identity's writes fall back to one at a time, at least
//!   once (see `replay`).

pub mod journal;
pub mod replay;

use std::collections::VecDeque;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::auth::{Credentials, Identities, IdentityId};
pub use journal::{Journal, JournalError, WriteQueueConfig, WriteQueueMetrics};

fn cursor_key(journal: Option<&std::path::Path>) -> Bytes {
    use std::os::unix::ffi::OsStrExt;
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "redfuse".into());
    let digest = match journal {
        Some(path) => {
            let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
            // FNV-1a: stable across builds, as the same journal must name the same cursor
            // after a restart or an upgrade.
            path.as_os_str()
                .as_bytes()
                .iter()
                .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                    (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
                })
        }
        None => rand::random(),
    };
    Bytes::from(format!("redfuse:replay:{host}:{digest:016x}"))
}

/// How long Redis may keep refusing a queued write with `OOM` before it is dead-lettered.
pub const OOM_PATIENCE: Duration = Duration::from_secs(30);

/// Most dead letters kept; the oldest are dropped beyond it (and counted).
const MAX_DEAD_LETTERS: usize = 10_000;

/// Why a write could not be queued.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("write queue full ({what})")]
    Full { what: String },
    #[error(transparent)]
    Journal(#[from] JournalError),
}

/// Why a client write cannot go to the primary yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Redis refuses the queued writes for now: fail fast rather than wait out a timeout.
    Stalled,
    /// The replay did not finish within the wait.
    StillReplaying,
}

impl std::fmt::Display for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Gate::Stalled => "queued writes from the outage cannot be replayed yet",
            Gate::StillReplaying => "queued writes from the outage are still being replayed",
        })
    }
}

/// A queued write Redis refused for good.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub seq: u64,
    pub db: u32,
    /// The Redis user it was to run as (empty: none).
    pub identity: String,
    /// The command's name, lower case.
    pub name: String,
    /// The whole command, its arguments separated by spaces (binary bytes escaped).
    pub command: String,
    /// Redis's reply, or why redfuse could not send it.
    pub reason: String,
    /// Metric label: `auth`, `permission`, `wrongtype`, `oom`, `identity` or `error`.
    pub class: String,
    pub at_unix_ms: u64,
}

pub struct WriteQueue {
    pub journal: Arc<Journal>,
    identities: Arc<Identities>,
    replay_done: Notify,
    stalled: AtomicBool,
    dead: Mutex<VecDeque<DeadLetter>>,
    dead_path: Option<PathBuf>,
    /// The credentials each queued write's client had, by seq: it is replayed with exactly
    /// those (never with credentials of the same user given later, after a password
    /// rotation, say). Memory only; after a restart see `replay`.
    credentials: Mutex<std::collections::HashMap<u64, Arc<Credentials>>>,
    metrics: QueueMetrics,
    cursor_key: Bytes,
}

#[derive(Clone)]
struct QueueMetrics {
    dead_letters: IntGauge,
    dead_lettered: IntCounterVec,
    stalled: IntGauge,
    capacity_bytes: IntGauge,
    capacity_entries: IntGauge,
}

impl WriteQueue {
    /// Opens the journal (recovering what it holds) and the dead letters next to it.
    pub fn open(
        config: &WriteQueueConfig,
        identities: Arc<Identities>,
        registry: &Registry,
    ) -> Result<WriteQueue, QueueError> {
        let journal_metrics = WriteQueueMetrics::register(registry)
            .map_err(|e| JournalError::Corrupt(format!("metrics: {e}")))?;
        let journal = Arc::new(Journal::open(config)?.with_metrics(journal_metrics));
        let metrics = QueueMetrics::register(registry)
            .map_err(|e| JournalError::Corrupt(format!("metrics: {e}")))?;
        metrics.capacity_bytes.set(config.max_bytes as i64);
        metrics.capacity_entries.set(config.max_entries as i64);
        let dead_path = config.journal_path.as_ref().map(|p| {
            let mut s = p.as_os_str().to_owned();
            s.push(".dead");
            PathBuf::from(s)
        });
        let dead = match &dead_path {
            Some(p) => load_dead_letters(p),
            None => VecDeque::new(),
        };
        metrics.dead_letters.set(dead.len() as i64);
        Ok(WriteQueue {
            journal,
            identities,
            replay_done: Notify::new(),
            stalled: AtomicBool::new(false),
            dead: Mutex::new(dead),
            dead_path,
            credentials: Mutex::new(std::collections::HashMap::new()),
            metrics,
            cursor_key: cursor_key(config.journal_path.as_deref()),
        })
    }

    /// The Redis key where the replay records how far it got, unique to this journal:
    /// `redfuse:replay:<host name>:<digest of the journal's path>` (a random digest for a
    /// journal in memory, which does not outlive the process anyway).
    pub fn cursor_key(&self) -> &Bytes {
        &self.cursor_key
    }

    pub fn is_empty(&self) -> bool {
        self.journal.is_empty()
    }

    /// Queues a write made in database `db` as `identity`, authenticated with
    /// `credentials`. Resolves once the write is in the journal file (fsynced under
    /// `fsync = "always"`); the file I/O runs on the journal's disk thread, so only the
    /// caller waits for the disk, never the event loop.
    pub async fn append(
        &self,
        db: u32,
        identity: IdentityId,
        credentials: Option<Arc<Credentials>>,
        frame: Bytes,
    ) -> Result<u64, QueueError> {
        let name = Bytes::from(self.identities.name(identity));
        let seq = self
            .journal
            .append(db, name, frame)
            .await
            .map_err(|e| match e {
                JournalError::Full { what } => QueueError::Full { what },
                other => QueueError::Journal(other),
            })?;
        if let Some(c) = credentials {
            self.lock_credentials().insert(seq, c);
        }
        Ok(seq)
    }

    fn lock_credentials(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<u64, Arc<Credentials>>> {
        self.credentials.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The credentials the client of entry `seq` had, while redfuse still holds them.
    fn credentials_of(&self, seq: u64) -> Option<Arc<Credentials>> {
        self.lock_credentials().get(&seq).cloned()
    }

    /// Entry `seq` left the queue (replayed or dead-lettered).
    fn done(&self, seq: u64) -> Result<(), JournalError> {
        self.lock_credentials().remove(&seq);
        self.journal.ack(seq)
    }

    /// Waits, up to `timeout`, until queued writes have been replayed, so that a newer
    /// client write lands after them.
    pub async fn wait_for_replay(&self, timeout: Duration) -> Result<(), Gate> {
        if self.journal.is_empty() {
            return Ok(());
        }
        if self.is_stalled() {
            return Err(Gate::Stalled);
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.replay_done.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.journal.is_empty() {
                return Ok(());
            }
            if self.is_stalled() {
                return Err(Gate::Stalled);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(Gate::StillReplaying);
            }
        }
    }

    pub fn is_stalled(&self) -> bool {
        self.stalled.load(Ordering::Acquire)
    }

    /// The replay moved on: writes waiting behind it wait again rather than fail fast.
    fn progressed(&self) {
        if self.is_stalled() {
            self.pass_ended(false);
        }
    }

    /// A replay pass ended; `stalled` when Redis refused a queued write for now.
    fn pass_ended(&self, stalled: bool) {
        self.stalled.store(stalled, Ordering::Release);
        self.metrics.stalled.set(stalled as i64);
        self.replay_done.notify_waiters();
    }

    /// Moves a queued write Redis refused for good to the dead letters, and out of the
    /// queue.
    fn dead_letter(
        &self,
        entry: &journal::Entry,
        reason: &str,
        class: &str,
    ) -> Result<(), JournalError> {
        let letter = DeadLetter {
            seq: entry.seq,
            db: entry.db,
            identity: String::from_utf8_lossy(entry.identity.as_deref().unwrap_or_default())
                .into_owned(),
            name: String::new(),
            command: printable(&entry.frame),
            reason: reason.trim_end().to_owned(),
            class: class.to_owned(),
            at_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
        };
        let letter = DeadLetter {
            name: letter
                .command
                .split(' ')
                .next()
                .unwrap_or_default()
                .to_ascii_lowercase(),
            ..letter
        };
        tracing::warn!(
            seq = letter.seq,
            command = %letter.command,
            identity = %letter.identity,
            reason = %letter.reason,
            "queued write refused by Redis for good; moved to the dead letters"
        );
        if let Some(path) = &self.dead_path {
            // Off the event loop, in order with the journal's own writes.
            let path = path.clone();
            let on_disk = letter.clone();
            self.journal.run_on_disk_thread(move || {
                if let Err(e) = append_dead_letter(&path, &on_disk) {
                    tracing::warn!(path = %path.display(), error = %e, "cannot record a dead letter on disk; it is kept in memory");
                }
            });
        }
        self.metrics.dead_lettered.with_label_values(&[class]).inc();
        {
            let mut dead = self.dead.lock().unwrap_or_else(|e| e.into_inner());
            if dead.len() >= MAX_DEAD_LETTERS {
                dead.pop_front();
            }
            dead.push_back(letter);
            self.metrics.dead_letters.set(dead.len() as i64);
        }
        self.done(entry.seq)
    }

    /// The dead letters, oldest first.
    pub fn dead_letters(&self) -> Vec<DeadLetter> {
        self.dead
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    /// Forgets every dead letter (after an operator has dealt with them); returns how many.
    pub fn drain_dead_letters(&self) -> usize {
        let mut dead = self.dead.lock().unwrap_or_else(|e| e.into_inner());
        let n = dead.len();
        dead.clear();
        self.metrics.dead_letters.set(0);
        if let Some(path) = &self.dead_path {
            let path = path.clone();
            self.journal.run_on_disk_thread(move || {
                if let Err(e) = std::fs::write(&path, b"") {
                    tracing::warn!(path = %path.display(), error = %e, "cannot clear the dead letters file");
                }
            });
        }
        n
    }
}

impl QueueMetrics {
    fn register(registry: &Registry) -> prometheus::Result<QueueMetrics> {
        let dead_letters = IntGauge::new(
            "redfuse_write_queue_dead_letters",
            "Queued writes Redis refused for good, kept for an operator (GET /write-queue/dead-letters)",
        )?;
        let dead_lettered = IntCounterVec::new(
            Opts::new(
                "redfuse_write_queue_dead_lettered_total",
                "Queued writes moved to the dead letters, by reason",
            ),
            &["reason"],
        )?;
        let stalled = IntGauge::new(
            "redfuse_write_queue_replay_stalled",
            "1 while Redis refuses the queued writes for now (LOADING, BUSY, OOM ...)",
        )?;
        let capacity_bytes = IntGauge::new(
            "redfuse_write_queue_max_bytes",
            "The write queue's byte cap (write_queue.max_bytes)",
        )?;
        let capacity_entries = IntGauge::new(
            "redfuse_write_queue_max_entries",
            "The write queue's entry cap (write_queue.max_entries)",
        )?;
        registry.register(Box::new(dead_letters.clone()))?;
        registry.register(Box::new(dead_lettered.clone()))?;
        registry.register(Box::new(stalled.clone()))?;
        registry.register(Box::new(capacity_bytes.clone()))?;
        registry.register(Box::new(capacity_entries.clone()))?;
        Ok(QueueMetrics {
            dead_letters,
            dead_lettered,
            stalled,
            capacity_bytes,
            capacity_entries,
        })
    }
}

/// A RESP command frame as text: its arguments separated by spaces, binary bytes escaped.
fn printable(frame: &[u8]) -> String {
    let mut buf = bytes::BytesMut::from(frame);
    match crate::resp::parse_request(&mut buf, &crate::resp::Limits::default()) {
        Ok(Some(r)) => r
            .args()
            .iter()
            .map(|a| a.escape_ascii().to_string())
            .collect::<Vec<_>>()
            .join(" "),
        _ => frame.escape_ascii().to_string(),
    }
}

fn load_dead_letters(path: &std::path::Path) -> VecDeque<DeadLetter> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return VecDeque::new();
    };
    let mut out = VecDeque::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        match serde_json::from_str::<DeadLetter>(line) {
            Ok(d) => out.push_back(d),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "skipping an unreadable dead letter")
            }
        }
    }
    while out.len() > MAX_DEAD_LETTERS {
        out.pop_front();
    }
    out
}

fn append_dead_letter(path: &std::path::Path, letter: &DeadLetter) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(letter).map_err(std::io::Error::other)?;
    line.push(b'\n');
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    f.write_all(&line)?;
    f.sync_data()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(path: Option<PathBuf>) -> WriteQueue {
        queue_with(path, journal::FsyncPolicy::default())
    }

    fn queue_with(path: Option<PathBuf>, fsync: journal::FsyncPolicy) -> WriteQueue {
        let cfg = WriteQueueConfig {
            journal_path: path,
            fsync,
            ..WriteQueueConfig::default()
        };
        WriteQueue::open(&cfg, Arc::new(Identities::new()), &Registry::new()).unwrap()
    }

    /// `fsync = "always"` on a disk that stalls (the disk thread is held): the write
    /// waits for it, and the event loop (one thread here, as with `--threads 1`) keeps
    /// serving other clients meanwhile. Deterministic: if the append blocked the
    /// runtime's only thread, no other client would be answered at all.
    #[tokio::test(flavor = "current_thread")]
    async fn a_stalled_disk_delays_only_the_write_waiting_for_it() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dir = std::env::temp_dir().join(format!("redfuse-stall-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("journal");
        let _ = std::fs::remove_file(&path);
        let q = Arc::new(queue_with(Some(path.clone()), journal::FsyncPolicy::Always));
        let frame = Bytes::from_static(b"*2\r\n$4\r\nINCR\r\n$7\r\nq:stall\r\n");

        let stall = q.journal.hold_disk();
        let write = {
            let q = q.clone();
            let frame = frame.clone();
            tokio::spawn(async move { q.append(0, IdentityId::ANONYMOUS, None, frame).await })
        };
        // Other clients on the same runtime: a server answering PING, 100 round trips.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(b"+PONG\r\n").await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        for round in 0..100 {
            let served = tokio::time::timeout(Duration::from_secs(5), async {
                let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
                c.write_all(b"PING\r\n").await.unwrap();
                let mut reply = [0u8; 7];
                c.read_exact(&mut reply).await.unwrap();
                reply
            })
            .await
            .unwrap_or_else(|_| {
                panic!("round {round}: the event loop did not serve other clients")
            });
            assert_eq!(&served, b"+PONG\r\n");
            assert!(
                !write.is_finished(),
                "the write returned before the disk took it"
            );
        }
        assert_eq!(q.journal.len(), 1, "reserved while it waits");
        assert!(
            q.journal.peek(10).is_empty(),
            "not replayable before it is durable"
        );
        assert!(!q.is_empty(), "newer writes still wait for it");

        drop(stall);
        let seq = tokio::time::timeout(Duration::from_secs(5), write)
            .await
            .expect("the write completes once the disk does")
            .unwrap()
            .unwrap();
        assert_eq!(seq, 1);
        assert_eq!(q.journal.peek(10)[0].frame, frame);
        let on_disk = std::fs::read(&path).unwrap();
        assert!(
            on_disk.windows(frame.len()).any(|w| w == &frame[..]),
            "the reply came after the record reached the file"
        );
        server.abort();
        drop(q);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test(start_paused = true)]
    async fn writes_wait_for_the_replay_and_fail_fast_while_it_is_stalled() {
        let q = Arc::new(queue(None));
        assert_eq!(q.wait_for_replay(Duration::from_secs(1)).await, Ok(()));
        let alice = q.identities.intern("alice");
        q.append(0, alice, None, Bytes::from_static(b"*1\r\n$4\r\nINCR\r\n"))
            .await
            .unwrap();
        assert_eq!(
            q.wait_for_replay(Duration::from_secs(1)).await,
            Err(Gate::StillReplaying)
        );
        let waiter = {
            let q = q.clone();
            tokio::spawn(async move { q.wait_for_replay(Duration::from_secs(5)).await })
        };
        tokio::task::yield_now().await;
        let entry = q.journal.peek(1).remove(0);
        assert_eq!(entry.identity.as_deref(), Some(&b"alice"[..]));
        q.journal.ack(entry.seq).unwrap();
        q.pass_ended(false);
        assert_eq!(waiter.await.unwrap(), Ok(()));
        q.append(0, alice, None, Bytes::from_static(b"*1\r\n$4\r\nINCR\r\n"))
            .await
            .unwrap();
        q.pass_ended(true);
        assert_eq!(
            q.wait_for_replay(Duration::from_secs(5)).await,
            Err(Gate::Stalled)
        );
    }

    #[tokio::test]
    async fn dead_letters_leave_the_queue_survive_a_restart_and_drain() {
        let dir = std::env::temp_dir().join(format!("redfuse-dead-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("journal");
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(dir.join("journal.dead"));
        {
            let q = queue(Some(path.clone()));
            q.append(
                2,
                IdentityId::ANONYMOUS,
                None,
                Bytes::from_static(b"*2\r\n$4\r\nINCR\r\n$1\r\nk\r\n"),
            )
            .await
            .unwrap();
            let e = q.journal.peek(1).remove(0);
            q.dead_letter(&e, "-NOAUTH Authentication required.\r\n", "auth")
                .unwrap();
            assert!(q.is_empty());
        }
        let q = queue(Some(path.clone()));
        assert!(
            q.is_empty(),
            "a dead letter is not replayed after a restart"
        );
        let dead = q.dead_letters();
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].name, "incr");
        assert_eq!(dead[0].command, "INCR k");
        assert_eq!(dead[0].db, 2);
        assert_eq!(dead[0].reason, "-NOAUTH Authentication required.");
        assert_eq!(q.drain_dead_letters(), 1);
        assert!(q.dead_letters().is_empty());
        drop(q);
        assert!(queue(Some(path)).dead_letters().is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
