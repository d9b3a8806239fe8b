//! The write-queue journal: writes accepted while the primary's breaker is open.
//!
//! While an upstream's circuit breaker is open, a write that matches a `queue`
//! fail-open rule is answered as configured and appended here; when the breaker
//! closes, the replayer sends the journal to the primary oldest first
//! ([`Journal::peek`]) and drops what the primary has answered
//! ([`Journal::ack`]), before any newer client write is let through. The
//! journal is bounded by bytes and by entries; a write that does not fit is
//! refused with [`JournalError::Full`] and counted in
//! `redfuse_write_queue_rejected_total`, never dropped silently.
//!
//! Delivery is at least once: an entry replayed but not yet acked when redfuse
//! stops is replayed again after the restart. Exactly once would need the
//! primary to take part, and re-sending a write is the lesser harm compared to
//! losing one the client was told had succeeded.
//!
//! # Memory and disk
//!
//! Every queued entry lives in memory (a `VecDeque` of [`Bytes`] frames, so a
//! peek is a cheap reference-count bump). With `journal_path` set, each entry
//! is also written to an append-only file *before* it becomes visible in
//! memory, so a write is only accepted once it is in the file; after a restart
//! [`Journal::open`] rebuilds the queue from the file. The file is only ever
//! read at start-up.
//!
//! Why append-only: appending is the one write pattern where a crash can only
//! damage the end of the file (the record being written), which recovery can
//! recognise and cut off. Rewriting records in place could tear one in the
//! middle and lose entries that were already durable.
//!
//! Acks are recorded as small cumulative "acked up to seq N" marker records
//! instead of rewriting the file, so acking is O(1) however the replayer
//! batches. Because markers are cumulative, a marker that failed to be written
//! is covered by the next one. The file is then kept small two ways:
//!
//! * when the journal becomes empty (the normal end of a replay) the file is
//!   truncated to zero length and fsynced, which is cheap and atomic;
//! * when acked records and markers outweigh the live ones (a replay that keeps
//!   being interrupted), the live entries are rewritten to `<path>.compact`,
//!   fsynced, and renamed over the journal (an atomic swap), then the
//!   directory is fsynced. This costs O(live bytes) and happens at most once
//!   per that many acked bytes, so it stays amortised O(1) per entry.
//!
//! A restart therefore never loses an unacked entry (its record was written
//! before `append` returned) and replays an acked one only if redfuse died
//! between the ack and its marker reaching the file (see *Disk thread*).
//!
//! The file is locked exclusively ([`File::try_lock`]) while open: two
//! redfuse processes appending to one journal would interleave records and
//! replay each other's writes.
//!
//! # Disk thread
//!
//! All file I/O (appends, markers, fsyncs, truncation, compaction) runs on one
//! dedicated thread per journal, never on the event loop: a slow or stalled
//! disk delays only the clients whose writes are waiting for it.
//!
//! * [`Journal::append`] reserves the entry's seq and its room under the caps
//!   (a short lock, no I/O), hands the record to the disk thread and waits for
//!   it: the future resolves once the record is in the file (fsynced under
//!   `always`), and only then is the entry visible to [`Journal::peek`]. The
//!   client's reply waits for the disk; other clients do not. Appends waiting
//!   together are written together and share one fsync (group commit).
//! * [`Journal::ack`] removes the entries from memory at once and queues the
//!   marker without waiting for it. The disk thread writes jobs in the order
//!   they were queued, so a marker is always in the file before any record
//!   appended after it. If a marker cannot be written, the next `ack` returns
//!   the error (the entries have left memory either way, as they were
//!   delivered). A redfuse crash between an ack and the write of its marker
//!   (microseconds) replays that entry again after the restart: delivery is at
//!   least once, as above.
//!
//! # File format (version 1, all integers little-endian)
//!
//! ```text
//! file   = header record*
//! header = magic "RFUSEJNL" (8 bytes) | version u32 = 1 | epoch u32 (0: none)
//! record = len u32 | kind u32 | db u32 | seq u64 | checksum u64 | frame (len bytes)
//! kind   = 1: entry, frame is the client's RESP command exactly as sent
//!          2: ack marker, len = 0 and db = 0, every entry with seq <= `seq` is acked
//!          3: entry with identity, frame is name_len u16 | name | command
//! checksum = FNV-1a 64 over the first 20 header bytes (len, kind, db, seq) then the frame
//! ```
//!
//! An empty journal is a zero-length file; the header is written together with
//! the first record. The epoch is a random number drawn when a journal starts
//! empty and kept while the file lives: seqs are only unique within an epoch, and
//! the replay's cursor in Redis names both (see `replay`). Entry seqs are strictly increasing within a file and carry
//! on after a restart; once the file has been truncated empty they may start
//! again at 1, which is harmless since an ack only ever names a seq the same
//! process handed out. A write the disk refused leaves a gap in the seqs.
//!
//! # Recovery and corruption
//!
//! The checksum covers the header fields as well as the frame, so a torn or
//! bit-flipped record is never replayed as a different command or to a
//! different database. The length is checked against [`MAX_FRAME_LEN`] and the
//! bytes actually left in the file before anything is allocated.
//!
//! * **Torn tail** (a crash mid-append): an incomplete record header, a record
//!   running past the end of the file, or a zero-filled tail (some filesystems
//!   extend the size before the data reaches disk; this includes a full-length
//!   last record whose bytes end in zeros, which no complete record does:
//!   entry frames end in `\n`) is cut off with a `warn` log; the records before
//!   it are kept. A partial header from a crash while the file was being
//!   created is cut off the same way. None of these can hold a write a client
//!   was told had succeeded: its record was not complete.
//! * **A corrupt complete record** (the last record is all there but its
//!   checksum does not match and it does not end in zeros: a flipped bit, not
//!   a crash mid-write) is treated like damage in the middle, below: it may be
//!   a write a client was told had succeeded, so redfuse refuses to start
//!   rather than silently drop it. (Quarantining it and starting anyway was the
//!   alternative; refusing keeps one rule for every damaged complete record,
//!   and the error says how to keep the records before it.)
//! * **Damage in the middle** (a bad checksum or impossible header with valid
//!   data after it, seqs out of order, a foreign magic or an unknown version):
//!   [`Journal::open`] fails with [`JournalError::Corrupt`] naming the offset,
//!   and the file is left untouched. Guessing would either replay garbage or
//!   silently discard writes clients were told had succeeded; an operator can
//!   inspect the file, cut it at the offset (`truncate -s OFFSET`) to keep the
//!   records before it, or move it aside to start with an empty queue. With
//!   `fsync = "always"` this needs real disk damage; with the other policies a
//!   machine crash can also cause it, because the OS may write pages back out
//!   of order.
//!
//! # fsync policy
//!
//! * `always`: every append and ack marker is fsynced (`fdatasync`) by the disk
//!   thread; an append's future resolves only after its fsync. Nothing
//!   acknowledged to a client is lost even if the machine crashes, at the cost
//!   of one disk flush per batch of queued writes (milliseconds on spinning
//!   disks, far less on SSDs with power-loss protection).
//! * `everysec` (default): the disk thread fsyncs after a write when at least a
//!   second has passed since the last fsync, and [`Journal::spawn_sync_task`]
//!   (or any caller of [`Journal::sync`]) flushes a quiet journal. A machine
//!   crash loses about the last second; a redfuse crash or restart loses
//!   nothing, since the data is already in the OS page cache.
//! * `never`: flushing is left to the OS. Still safe across redfuse restarts.
//!
//! Truncating an emptied journal and compaction are always fsynced: they are
//! rare, and without it a crash could resurrect acked entries.

use std::collections::VecDeque;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use serde::Deserialize;
use tokio::sync::oneshot;

/// Largest frame one record may hold, matching Redis's own `proto-max-bulk-len`
/// default. Recovery never allocates more than this for one record.
pub const MAX_FRAME_LEN: usize = 512 * 1024 * 1024;

const MAGIC: [u8; 8] = *b"RFUSEJNL";
const VERSION: u32 = 1;
const FILE_HEADER_LEN: usize = 16;
const RECORD_HEADER_LEN: usize = 28;
/// The checksum covers the record header up to (not including) itself.
const CHECKSUMMED_HEADER_LEN: usize = 20;
const KIND_ENTRY: u32 = 1;
const KIND_ACK: u32 = 2;
/// An entry with the identity it is replayed as: the frame is
/// `name_len u16 | name | command`.
const KIND_ENTRY_AS: u32 = 3;
/// Dead bytes tolerated on top of the live ones before compacting, so small
/// journals are not rewritten on every ack.
const COMPACT_SLACK: u64 = 1024 * 1024;
const EVERYSEC: Duration = Duration::from_secs(1);
/// Most appends the disk thread writes under one fsync.
const MAX_BATCH: usize = 1024;

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// `[write_queue]` settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WriteQueueConfig {
    /// Most bytes of queued frames (the RESP bytes as sent, not counting the
    /// journal's own record headers). Default 16 MiB, at most 512 MiB.
    pub max_bytes: usize,
    /// Most queued writes. Default 100 000.
    pub max_entries: usize,
    /// Append-only file that makes the queue survive a redfuse restart.
    /// Without it the queue is memory only.
    pub journal_path: Option<PathBuf>,
    /// When the journal file is fsynced.
    pub fsync: FsyncPolicy,
}

impl Default for WriteQueueConfig {
    fn default() -> Self {
        WriteQueueConfig {
            max_bytes: 16 * 1024 * 1024,
            max_entries: 100_000,
            journal_path: None,
            fsync: FsyncPolicy::default(),
        }
    }
}

impl WriteQueueConfig {
    /// Checks every field; the error starts with the offending field's name.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_bytes == 0 {
            return Err("max_bytes must be at least 1, got 0".into());
        }
        if self.max_bytes > MAX_FRAME_LEN {
            return Err(format!(
                "max_bytes must be at most {MAX_FRAME_LEN} (512 MiB), got {}",
                self.max_bytes
            ));
        }
        if self.max_entries == 0 {
            return Err("max_entries must be at least 1, got 0".into());
        }
        if let Some(path) = &self.journal_path {
            if path.as_os_str().is_empty() {
                return Err("journal_path must not be empty".into());
            }
            if path.file_name().is_none() {
                return Err(format!(
                    "journal_path must name a file, got `{}`",
                    path.display()
                ));
            }
        }
        Ok(())
    }

    /// Whether `journal_path` can be used on this machine, for `--check-config`:
    /// its directory exists and is writable, and the file, if it exists, is a
    /// regular file redfuse can read and write. Leaves nothing behind: the
    /// directory is probed with a uniquely named file removed at once. The
    /// error starts with `journal_path`.
    pub fn check_journal_path(&self) -> Result<(), String> {
        let Some(path) = &self.journal_path else {
            return Ok(());
        };
        let shown = path.display();
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        match fs::metadata(dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(format!(
                    "journal_path `{shown}`: `{}` is not a directory",
                    dir.display()
                ));
            }
            Err(e) => {
                return Err(format!(
                    "journal_path `{shown}`: directory `{}` is not usable: {e}",
                    dir.display()
                ));
            }
        }
        match fs::metadata(path) {
            Ok(m) if !m.is_file() => {
                return Err(format!("journal_path `{shown}` is not a regular file"));
            }
            Ok(_) => {
                OpenOptions::new()
                    .read(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| format!("journal_path `{shown}` cannot be opened: {e}"))?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("journal_path `{shown}`: {e}")),
        }
        static PROBES: AtomicU64 = AtomicU64::new(0);
        let probe = dir.join(format!(
            ".redfuse-check-{}-{}",
            std::process::id(),
            PROBES.fetch_add(1, Ordering::Relaxed)
        ));
        match OpenOptions::new().write(true).create_new(true).open(&probe) {
            Ok(f) => {
                drop(f);
                let _ = fs::remove_file(&probe);
                Ok(())
            }
            Err(e) => Err(format!(
                "journal_path `{shown}`: directory `{}` is not writable: {e}",
                dir.display()
            )),
        }
    }
}

/// When the journal file is fsynced; see the module docs for the trade-offs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum FsyncPolicy {
    /// Before every append completes, and after every ack marker.
    Always,
    /// At most once a second.
    #[default]
    Everysec,
    /// Never explicitly; the OS writes back on its own schedule.
    Never,
}

/// One queued write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Position in the queue; strictly increasing.
    pub seq: u64,
    /// The database the client had selected when it sent the write.
    pub db: u32,
    /// The Redis user the client's commands ran as (empty: none); `None` for entries
    /// written before identities were recorded, which replay as redfuse itself.
    pub identity: Option<Bytes>,
    /// The exact RESP command frame as the client sent it.
    pub frame: Bytes,
}

impl Entry {
    fn kind(&self) -> u32 {
        if self.identity.is_some() {
            KIND_ENTRY_AS
        } else {
            KIND_ENTRY
        }
    }

    /// The record's payload on disk.
    fn payload(&self) -> std::borrow::Cow<'_, [u8]> {
        match &self.identity {
            None => std::borrow::Cow::Borrowed(&self.frame[..]),
            Some(name) => {
                let mut p = Vec::with_capacity(2 + name.len() + self.frame.len());
                p.extend_from_slice(&(name.len() as u16).to_le_bytes());
                p.extend_from_slice(name);
                p.extend_from_slice(&self.frame);
                std::borrow::Cow::Owned(p)
            }
        }
    }

    fn record_len(&self) -> u64 {
        record_len(self.identity.as_ref().map_or(0, |n| 2 + n.len()) + self.frame.len())
    }
}

/// Longest identity name recorded with an entry.
pub const MAX_IDENTITY_LEN: usize = u16::MAX as usize;

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// The byte or entry cap would be exceeded; the write was not queued.
    #[error("write queue is full ({what})")]
    Full { what: String },
    /// The journal file could not be read or written; the message names the file.
    #[error("write queue journal I/O error: {0}")]
    Io(std::io::Error),
    /// The journal file is damaged other than at its tail; it was left untouched.
    #[error("write queue journal is corrupt: {0}")]
    Corrupt(String),
}

/// The ordered, bounded queue of writes waiting for the primary.
///
/// `Send + Sync`; share it behind an `Arc`. Methods take a short
/// `std::sync::Mutex` and never do file I/O on the calling thread: that is
/// the disk thread's job (see the module docs).
pub struct Journal {
    shared: Arc<Shared>,
    /// The disk thread, when the journal has a file.
    disk: Option<DiskThread>,
    max_bytes: usize,
    max_entries: usize,
    /// See the file format: names this journal's run of seqs.
    epoch: u32,
}

/// What the callers and the disk thread share.
struct Shared {
    state: Mutex<State>,
    /// Queued entries (written or being written), readable without the lock: every client
    /// write asks whether a replay is pending, and nearly always the answer is no.
    depth: AtomicUsize,
    metrics: OnceLock<WriteQueueMetrics>,
    fsync: FsyncPolicy,
    /// Written since the last fsync.
    dirty: AtomicBool,
    /// Fsyncs done, for tests and the curious.
    syncs: AtomicU64,
    /// Why the last ack marker could not be written; reported by the next `ack`.
    ack_error: Mutex<Option<JournalError>>,
    compact_slack: AtomicU64,
}

struct State {
    /// Entries in the file (or memory only), oldest first: what `peek` sees.
    entries: VecDeque<Entry>,
    /// Appends reserved and handed to the disk thread, not yet in `entries`.
    pending: usize,
    /// Sum of the queued frames' lengths, pending ones included.
    bytes: usize,
    /// Record bytes of `entries` in the file, to decide when to compact.
    live: u64,
    next_seq: u64,
}

/// The disk thread's end of the journal.
struct DiskThread {
    path: PathBuf,
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Work for the disk thread, done in the order it was queued.
enum Job {
    Append(Box<PendingAppend>),
    /// Record that every entry up to this seq is acked.
    Ack(u64),
    Sync(oneshot::Sender<Result<(), JournalError>>),
    /// Other file work that must stay off the event loop (the dead letters file).
    Run(Box<dyn FnOnce() + Send>),
    /// Blocks the disk thread until the sender side is dropped (tests: a stalled disk).
    #[cfg(test)]
    Hold(mpsc::Receiver<()>),
    /// Moves the time of the last fsync back (tests of `everysec`).
    #[cfg(test)]
    Backdate(Duration),
}

struct PendingAppend {
    entry: Entry,
    done: oneshot::Sender<Result<(), JournalError>>,
}

impl Journal {
    /// Opens the journal, recovering the entries still pending in
    /// `journal_path` if the file exists (see the module docs for how a torn
    /// tail and corruption are handled), and starts its disk thread. Entries
    /// recovered beyond the caps (after the caps were lowered) are kept;
    /// appends fail until they drain.
    pub fn open(config: &WriteQueueConfig) -> Result<Journal, JournalError> {
        let mut state = State {
            entries: VecDeque::new(),
            pending: 0,
            bytes: 0,
            live: 0,
            next_seq: 1,
        };
        let mut disk = None;
        let mut epoch = None;
        if let Some(path) = &config.journal_path {
            let (mut file, recovered) = Disk::open(path, config.fsync)?;
            // Kept only with the entries it numbered: an empty file starts a new run.
            if !recovered.entries.is_empty() {
                epoch = recovered.epoch;
            }
            file.epoch = *epoch.get_or_insert_with(new_epoch);
            if !recovered.entries.is_empty() {
                tracing::info!(
                    path = %path.display(),
                    entries = recovered.entries.len(),
                    bytes = recovered.bytes,
                    "write queue journal recovered pending writes"
                );
            }
            state.live = recovered.entries.iter().map(Entry::record_len).sum();
            state.entries = recovered.entries;
            state.bytes = recovered.bytes;
            state.next_seq = recovered.next_seq;
            disk = Some(file);
        }
        let shared = Arc::new(Shared {
            depth: AtomicUsize::new(state.entries.len()),
            state: Mutex::new(state),
            metrics: OnceLock::new(),
            fsync: config.fsync,
            dirty: AtomicBool::new(false),
            syncs: AtomicU64::new(0),
            ack_error: Mutex::new(None),
            compact_slack: AtomicU64::new(COMPACT_SLACK),
        });
        let disk = match disk {
            None => None,
            Some(disk) => {
                let path = disk.path.clone();
                let (tx, rx) = mpsc::channel();
                let thread_shared = shared.clone();
                let thread = std::thread::Builder::new()
                    .name("redfuse-journal".into())
                    .spawn(move || disk.run(&thread_shared, rx))
                    .map_err(|e| wrap_io(&path, "cannot start the disk thread for", e))?;
                Some(DiskThread {
                    path,
                    jobs: Some(tx),
                    thread: Some(thread),
                })
            }
        };
        Ok(Journal {
            shared,
            disk,
            max_bytes: config.max_bytes,
            max_entries: config.max_entries,
            epoch: epoch.unwrap_or_else(new_epoch),
        })
    }

    /// Attaches metrics; the gauges are set at once and kept up to date by
    /// every later call.
    pub fn with_metrics(self, metrics: WriteQueueMetrics) -> Journal {
        {
            let state = self.shared.lock();
            metrics.observe(state.entries.len() + state.pending, state.bytes);
        }
        let _ = self.shared.metrics.set(metrics);
        self
    }

    /// Queues a write and returns its seq once the record is in the file
    /// (fsynced under `always`); only then does the entry become visible to
    /// [`Journal::peek`]. An `Ok` means a restart will replay it. On any error
    /// nothing was queued. The file I/O happens on the disk thread: awaiting
    /// this never blocks the runtime. Dropping the future does not withdraw
    /// the write.
    pub async fn append(
        &self,
        db: u32,
        identity: Bytes,
        frame: Bytes,
    ) -> Result<u64, JournalError> {
        let (seq, written) = self.reserve(db, identity, frame)?;
        match written {
            None => Ok(seq),
            Some(rx) => {
                rx.await.unwrap_or_else(|_| Err(self.thread_gone()))?;
                Ok(seq)
            }
        }
    }

    /// [`Journal::append`] for threads outside the async runtime (tests).
    /// Must not be called from within the runtime.
    #[cfg(test)]
    fn append_blocking(&self, db: u32, identity: Bytes, frame: Bytes) -> Result<u64, JournalError> {
        let (seq, written) = self.reserve(db, identity, frame)?;
        match written {
            None => Ok(seq),
            Some(rx) => {
                rx.blocking_recv()
                    .unwrap_or_else(|_| Err(self.thread_gone()))?;
                Ok(seq)
            }
        }
    }

    /// Checks the caps, takes a seq and hands the record to the disk thread
    /// (or, memory only, queues it at once).
    #[allow(clippy::type_complexity)]
    fn reserve(
        &self,
        db: u32,
        identity: Bytes,
        frame: Bytes,
    ) -> Result<(u64, Option<oneshot::Receiver<Result<(), JournalError>>>), JournalError> {
        let mut guard = self.shared.lock();
        let state = &mut *guard;
        if state.entries.len() + state.pending >= self.max_entries {
            return Err(self.reject(Reject::Entries));
        }
        if frame.len() > MAX_FRAME_LEN - MAX_IDENTITY_LEN - 2
            || identity.len() > MAX_IDENTITY_LEN
            || state.bytes.saturating_add(frame.len()) > self.max_bytes
        {
            return Err(self.reject(Reject::Bytes));
        }
        let seq = state.next_seq;
        let Some(next_seq) = seq.checked_add(1) else {
            return Err(JournalError::Corrupt("sequence numbers exhausted".into()));
        };
        let entry = Entry {
            seq,
            db,
            identity: Some(identity),
            frame,
        };
        let Some(jobs) = self.disk.as_ref().and_then(|d| d.jobs.as_ref()) else {
            state.next_seq = next_seq;
            state.bytes += entry.frame.len();
            state.entries.push_back(entry);
            self.shared.observe(state);
            return Ok((seq, None));
        };
        let (done, rx) = oneshot::channel();
        // Sent under the lock, so the disk thread sees the records in seq order.
        if jobs
            .send(Job::Append(Box::new(PendingAppend {
                entry: entry.clone(),
                done,
            })))
            .is_err()
        {
            self.shared.count_rejected(Reject::Io);
            return Err(self.thread_gone());
        }
        state.next_seq = next_seq;
        state.bytes += entry.frame.len();
        state.pending += 1;
        self.shared.observe(state);
        Ok((seq, Some(rx)))
    }

    /// Up to `max` entries, oldest first, without removing them. Entries still
    /// being written are not among them.
    pub fn peek(&self, max: usize) -> Vec<Entry> {
        self.shared
            .lock()
            .entries
            .iter()
            .take(max)
            .cloned()
            .collect()
    }

    /// Removes every entry with `seq <= upto_seq`, once the primary has
    /// answered them, and queues the ack marker for the disk thread without
    /// waiting for it.
    ///
    /// The entries leave memory even if the file cannot be updated: they were
    /// delivered, and keeping them would send them again now. An `Err` says
    /// that an earlier marker could not be written (or fsynced): a restart
    /// before the next marker is written could replay those entries (the
    /// next marker, being cumulative, covers them again).
    pub fn ack(&self, upto_seq: u64) -> Result<(), JournalError> {
        {
            let mut guard = self.shared.lock();
            let state = &mut *guard;
            let mut last_acked = None;
            while let Some(front) = state.entries.front() {
                if front.seq > upto_seq {
                    break;
                }
                if let Some(entry) = state.entries.pop_front() {
                    state.bytes -= entry.frame.len();
                    state.live = state.live.saturating_sub(entry.record_len());
                    last_acked = Some(entry.seq);
                }
            }
            let Some(last_acked) = last_acked else {
                return Ok(());
            };
            self.shared.observe(state);
            if let Some(jobs) = self.disk.as_ref().and_then(|d| d.jobs.as_ref()) {
                // Under the lock, like appends: the marker lands after every
                // record it covers and before any record appended later.
                let _ = jobs.send(Job::Ack(last_acked));
            }
        }
        match self.shared.take_ack_error() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.shared.depth.load(Ordering::Acquire) == 0
    }

    /// The run of seqs this journal's entries belong to (see the file format).
    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    pub fn metrics(&self) -> Option<&WriteQueueMetrics> {
        self.shared.metrics.get()
    }

    /// Number of queued entries, those still being written included.
    pub fn len(&self) -> usize {
        let state = self.shared.lock();
        state.entries.len() + state.pending
    }

    /// Queued entries that are still being written: not yet durable, and not yet
    /// acknowledged to their clients (a crash now loses them, and nobody was told they
    /// were queued).
    pub fn writing(&self) -> usize {
        self.shared.lock().pending
    }

    /// Bytes of queued frames (what `max_bytes` limits).
    pub fn bytes(&self) -> usize {
        self.shared.lock().bytes
    }

    /// Fsyncs whatever was written since the last fsync, on the disk thread.
    /// A no-op without a journal file or when nothing is pending.
    pub async fn sync(&self) -> Result<(), JournalError> {
        match self.send_sync() {
            None => Ok(()),
            Some(rx) => rx.await.unwrap_or_else(|_| Err(self.thread_gone())),
        }
    }

    /// [`Journal::sync`] for threads outside the async runtime (tests).
    #[cfg(test)]
    fn sync_blocking(&self) -> Result<(), JournalError> {
        match self.send_sync() {
            None => Ok(()),
            Some(rx) => rx
                .blocking_recv()
                .unwrap_or_else(|_| Err(self.thread_gone())),
        }
    }

    fn send_sync(&self) -> Option<oneshot::Receiver<Result<(), JournalError>>> {
        let jobs = self.disk.as_ref()?.jobs.as_ref()?;
        let (tx, rx) = oneshot::channel();
        jobs.send(Job::Sync(tx)).ok()?;
        Some(rx)
    }

    /// Runs `work` on the disk thread, after everything queued before it; runs
    /// it right here when the journal has no file. For other file work that
    /// must stay off the event loop.
    pub fn run_on_disk_thread(&self, work: impl FnOnce() + Send + 'static) {
        match self.disk.as_ref().and_then(|d| d.jobs.as_ref()) {
            Some(jobs) => {
                if let Err(mpsc::SendError(Job::Run(work))) = jobs.send(Job::Run(Box::new(work))) {
                    work();
                }
            }
            None => work(),
        }
    }

    /// The journal file, if the queue has one.
    pub fn path(&self) -> Option<PathBuf> {
        self.disk.as_ref().map(|d| d.path.clone())
    }

    /// Under `fsync = "everysec"` with a journal file, starts a task that
    /// fsyncs pending writes once a second (on the disk thread), so the last
    /// writes before a quiet spell are flushed too. Returns `None` otherwise.
    /// The task ends by itself once the journal is dropped. Must be called
    /// within a tokio runtime.
    pub fn spawn_sync_task(journal: &Arc<Journal>) -> Option<tokio::task::JoinHandle<()>> {
        if journal.shared.fsync != FsyncPolicy::Everysec || journal.disk.is_none() {
            return None;
        }
        let weak = Arc::downgrade(journal);
        Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(EVERYSEC);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                // Holding only a weak reference between ticks lets the journal
                // (and its file lock) go away when its owners drop it.
                let Some(journal) = weak.upgrade() else {
                    break;
                };
                if !journal.is_dirty() {
                    continue;
                }
                if let Err(e) = journal.sync().await {
                    tracing::warn!(error = %e, "write queue journal fsync failed");
                }
            }
        }))
    }

    fn is_dirty(&self) -> bool {
        self.shared.dirty.load(Ordering::Acquire)
    }

    fn thread_gone(&self) -> JournalError {
        let path = self.path().unwrap_or_default();
        wrap_io(
            &path,
            "cannot write to",
            io::Error::other("the journal's disk thread has stopped"),
        )
    }

    /// Stalls the disk thread until the returned guard is dropped.
    #[cfg(test)]
    pub(crate) fn hold_disk(&self) -> mpsc::Sender<()> {
        let (tx, rx) = mpsc::channel();
        let jobs = self.disk.as_ref().and_then(|d| d.jobs.as_ref());
        jobs.expect("a journal file").send(Job::Hold(rx)).unwrap();
        tx
    }

    #[cfg(test)]
    fn backdate_last_sync(&self, by: Duration) {
        let jobs = self.disk.as_ref().and_then(|d| d.jobs.as_ref());
        jobs.expect("a journal file")
            .send(Job::Backdate(by))
            .unwrap();
    }

    #[cfg(test)]
    fn set_compact_slack(&self, slack: u64) {
        self.shared.compact_slack.store(slack, Ordering::Relaxed);
    }

    fn reject(&self, why: Reject) -> JournalError {
        self.shared.count_rejected(why);
        let what = match why {
            Reject::Entries => format!("max_entries {} reached", self.max_entries),
            _ => format!("max_bytes {} reached", self.max_bytes),
        };
        JournalError::Full { what }
    }
}

impl Drop for Journal {
    /// Lets the disk thread finish what was queued, then waits for it, so the
    /// file (and its lock) is released when the journal is gone.
    fn drop(&mut self) {
        if let Some(disk) = &mut self.disk {
            drop(disk.jobs.take());
            if let Some(thread) = disk.thread.take() {
                let _ = thread.join();
            }
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere cannot leave `State` half-updated in a way that
        // matters more than refusing all writes would.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn observe(&self, state: &State) {
        let depth = state.entries.len() + state.pending;
        self.depth.store(depth, Ordering::Release);
        if let Some(m) = self.metrics.get() {
            m.observe(depth, state.bytes);
        }
    }

    fn count_rejected(&self, why: Reject) {
        if let Some(m) = self.metrics.get() {
            m.rejected(why);
        }
    }

    fn set_ack_error(&self, e: Option<JournalError>) {
        *self.ack_error.lock().unwrap_or_else(|e| e.into_inner()) = e;
    }

    fn take_ack_error(&self) -> Option<JournalError> {
        self.ack_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }
}

impl fmt::Debug for Journal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.shared.lock();
        f.debug_struct("Journal")
            .field("len", &state.entries.len())
            .field("pending", &state.pending)
            .field("bytes", &state.bytes)
            .field("next_seq", &state.next_seq)
            .field("path", &self.disk.as_ref().map(|d| &d.path))
            .field("fsync", &self.shared.fsync)
            .finish_non_exhaustive()
    }
}

/// The open journal file, owned by the disk thread.
struct Disk {
    path: PathBuf,
    file: File,
    policy: FsyncPolicy,
    /// Length of the file up to the end of the last fully written record.
    len: u64,
    last_sync: Instant,
    /// A failed write could not be rolled back; the next write retries the
    /// rollback first, so nothing is ever appended after a partial record.
    needs_repair: bool,
    /// Reused for building records.
    buf: Vec<u8>,
    /// Written into every file header.
    epoch: u32,
}

impl Disk {
    fn open(path: &Path, policy: FsyncPolicy) -> Result<(Disk, Recovered), JournalError> {
        let io_err = |what: &str, e: io::Error| wrap_io(path, what, e);
        let existed = fs::metadata(path).is_ok();
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(|e| io_err("cannot open", e))?;
        lock_file(&file).map_err(|e| io_err("cannot lock", e))?;
        if !existed {
            // Without this the new directory entry itself may not survive a
            // crash, taking every fsynced record with it.
            sync_dir(path).map_err(|e| io_err("cannot fsync the directory of", e))?;
        }
        let tmp = compact_path(path);
        match fs::remove_file(&tmp) {
            Ok(()) => {
                tracing::info!(path = %tmp.display(), "removed an unfinished journal compaction")
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %tmp.display(), error = %e, "cannot remove an unfinished journal compaction")
            }
        }
        let recovered = recover(&file, path)?;
        let mut len = recovered.good_len;
        if let Some(reason) = &recovered.torn {
            tracing::warn!(
                path = %path.display(),
                offset = recovered.good_len,
                file_len = recovered.file_len,
                reason = %reason,
                "write queue journal has a torn tail (crash mid-write); truncating it"
            );
        }
        // An empty journal is a zero-length file, whatever acked records or
        // torn bytes it held.
        if recovered.entries.is_empty() {
            len = 0;
        }
        if len != recovered.file_len {
            file.set_len(len)
                .and_then(|()| file.sync_all())
                .map_err(|e| io_err("cannot truncate", e))?;
        }
        let disk = Disk {
            path: path.to_path_buf(),
            file,
            policy,
            len,
            last_sync: Instant::now(),
            needs_repair: false,
            buf: Vec::new(),
            epoch: 0,
        };
        Ok((disk, recovered))
    }

    /// The disk thread: does the jobs in order until the journal is dropped.
    fn run(mut self, shared: &Shared, jobs: mpsc::Receiver<Job>) {
        let mut next = None;
        loop {
            let job = match next.take() {
                Some(job) => job,
                None => match jobs.recv() {
                    Ok(job) => job,
                    Err(_) => break,
                },
            };
            match job {
                Job::Append(first) => {
                    let mut batch = vec![*first];
                    while batch.len() < MAX_BATCH {
                        match jobs.try_recv() {
                            Ok(Job::Append(more)) => batch.push(*more),
                            Ok(other) => {
                                next = Some(other);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    self.append_batch(shared, batch);
                }
                Job::Ack(mut upto) => {
                    // Markers are cumulative: consecutive ones make one.
                    loop {
                        match jobs.try_recv() {
                            Ok(Job::Ack(more)) => upto = upto.max(more),
                            Ok(other) => {
                                next = Some(other);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    self.ack(shared, upto);
                }
                Job::Sync(done) => {
                    let r = self
                        .sync(shared)
                        .map_err(|e| self.io_error("cannot fsync", e));
                    let _ = done.send(r);
                }
                Job::Run(work) => work(),
                #[cfg(test)]
                Job::Hold(release) => {
                    let _ = release.recv();
                }
                #[cfg(test)]
                Job::Backdate(by) => {
                    if let Some(earlier) = self.last_sync.checked_sub(by) {
                        self.last_sync = earlier;
                    }
                }
            }
        }
        if self.policy != FsyncPolicy::Never
            && let Err(e) = self.sync(shared)
        {
            tracing::warn!(error = %self.io_error("cannot fsync", e), "write queue journal not flushed at close");
        }
    }

    /// Writes a batch of appends, fsyncs once as the policy says, then makes
    /// the written entries visible in order and answers every caller.
    fn append_batch(&mut self, shared: &Shared, batch: Vec<PendingAppend>) {
        let start = self.len;
        let mut results: Vec<io::Result<()>> = batch
            .iter()
            .map(|p| {
                let payload = p.entry.payload();
                self.write_record(p.entry.kind(), p.entry.db, p.entry.seq, &payload)
            })
            .collect();
        if results.iter().any(Result::is_ok)
            && let Err(e) = self.sync_for_policy(shared)
        {
            // A failed fsync may have dropped the records' pages: cut them all
            // away so every caller's error is the whole truth.
            if self.file.set_len(start).is_err() {
                self.needs_repair = true;
            }
            self.len = start;
            for r in &mut results {
                *r = Err(io::Error::new(e.kind(), e.to_string()));
            }
        }
        let mut answers = Vec::with_capacity(batch.len());
        {
            let mut state = shared.lock();
            for (p, r) in batch.into_iter().zip(results) {
                state.pending -= 1;
                match r {
                    Ok(()) => {
                        state.live += p.entry.record_len();
                        state.entries.push_back(p.entry);
                        answers.push((p.done, Ok(())));
                    }
                    Err(e) => {
                        state.bytes -= p.entry.frame.len();
                        shared.count_rejected(Reject::Io);
                        let err = self.io_error("cannot append to", e);
                        tracing::warn!(error = %err, seq = p.entry.seq, "write queue append failed");
                        answers.push((p.done, Err(err)));
                    }
                }
            }
            shared.observe(&state);
        }
        for (done, r) in answers {
            let _ = done.send(r);
        }
    }

    /// Writes an ack marker; truncates the file when nothing is left, or
    /// compacts it when dead records outweigh live ones.
    fn ack(&mut self, shared: &Shared, upto: u64) {
        // The marker goes first even when the file is about to be truncated:
        // if the truncation fails, the marker still keeps a restart from
        // replaying what was just delivered.
        let start = self.len;
        let marker = self.write_record(KIND_ACK, 0, upto, &[]).and_then(|()| {
            match self.sync_for_policy(shared) {
                Ok(()) => Ok(()),
                Err(e) => {
                    if self.file.set_len(start).is_err() {
                        self.needs_repair = true;
                    }
                    self.len = start;
                    Err(e)
                }
            }
        });
        // Only this thread adds entries, so the answer cannot change until
        // the truncation below is done.
        let (empty, live) = {
            let state = shared.lock();
            (state.entries.is_empty(), state.live)
        };
        if empty {
            let result = match (self.clear(shared), marker) {
                (Ok(()), _) => None,
                (Err(e), Ok(())) => {
                    let err = self.io_error("cannot truncate", e);
                    tracing::warn!(error = %err, "write queue journal not truncated; its ack marker stands");
                    None
                }
                (Err(e), Err(_)) => Some(self.io_error("cannot record an ack in or truncate", e)),
            };
            if let Some(e) = &result {
                tracing::warn!(error = %e, "write queue ack not recorded");
            }
            shared.set_ack_error(result);
            return;
        }
        if let Err(e) = marker {
            let err = self.io_error("cannot record an ack in", e);
            tracing::warn!(error = %err, "write queue ack not recorded");
            shared.set_ack_error(Some(err));
            return;
        }
        shared.set_ack_error(None);
        if self.should_compact(live, shared.compact_slack.load(Ordering::Relaxed)) {
            let entries = shared.lock().entries.clone();
            if let Err(e) = self.compact(shared, &entries) {
                // Not fatal: the marker already made the ack durable, and the
                // next ack retries.
                let err = self.io_error("cannot compact", e);
                tracing::warn!(error = %err, "write queue journal compaction failed");
            }
        }
    }

    /// Appends one record (and the file header, if the file is empty) without
    /// fsyncing. On failure the file is cut back to where it was, so a
    /// half-written record never sits in front of later ones.
    fn write_record(&mut self, kind: u32, db: u32, seq: u64, frame: &[u8]) -> io::Result<()> {
        self.repair()?;
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        if self.len == 0 {
            buf.extend_from_slice(&file_header(self.epoch));
        }
        buf.extend_from_slice(&record_header(kind, db, seq, frame));
        buf.extend_from_slice(frame);
        let written = (&self.file).write_all(&buf);
        let n = buf.len() as u64;
        if buf.capacity() <= 1024 * 1024 {
            self.buf = buf;
        }
        match written {
            Ok(()) => {
                self.len += n;
                Ok(())
            }
            Err(e) => {
                if self.file.set_len(self.len).is_err() {
                    self.needs_repair = true;
                }
                Err(e)
            }
        }
    }

    /// Fsyncs what was written if the policy says so now; otherwise marks the
    /// file dirty.
    fn sync_for_policy(&mut self, shared: &Shared) -> io::Result<()> {
        let sync = match self.policy {
            FsyncPolicy::Always => true,
            FsyncPolicy::Everysec => self.last_sync.elapsed() >= EVERYSEC,
            FsyncPolicy::Never => false,
        };
        if sync {
            self.file.sync_data()?;
            self.synced(shared);
        } else {
            shared.dirty.store(true, Ordering::Release);
        }
        Ok(())
    }

    fn repair(&mut self) -> io::Result<()> {
        if self.needs_repair {
            self.file.set_len(self.len)?;
            self.needs_repair = false;
        }
        Ok(())
    }

    fn sync(&mut self, shared: &Shared) -> io::Result<()> {
        self.repair()?;
        if shared.dirty.load(Ordering::Acquire) {
            self.file.sync_data()?;
            self.synced(shared);
        }
        Ok(())
    }

    fn synced(&mut self, shared: &Shared) {
        shared.dirty.store(false, Ordering::Release);
        shared.syncs.fetch_add(1, Ordering::Relaxed);
        self.last_sync = Instant::now();
    }

    /// Truncates the file to zero length, durably.
    fn clear(&mut self, shared: &Shared) -> io::Result<()> {
        self.file.set_len(0)?;
        // Recorded before the fsync: if only the fsync fails, the file is
        // still empty and the next append must write the header again.
        self.len = 0;
        self.needs_repair = false;
        self.file.sync_all()?;
        self.synced(shared);
        Ok(())
    }

    fn should_compact(&self, live: u64, slack: u64) -> bool {
        let needed = FILE_HEADER_LEN as u64 + live;
        self.len > needed.saturating_mul(2).saturating_add(slack)
    }

    /// Rewrites the live entries to a new file and swaps it in atomically.
    fn compact(&mut self, shared: &Shared, entries: &VecDeque<Entry>) -> io::Result<()> {
        let tmp = compact_path(&self.path);
        let built = (|| -> io::Result<(File, u64)> {
            let file = OpenOptions::new()
                .read(true)
                .append(true)
                .create(true)
                .open(&tmp)?;
            file.set_len(0)?;
            let mut out = BufWriter::with_capacity(256 * 1024, &file);
            out.write_all(&file_header(self.epoch))?;
            let mut len = FILE_HEADER_LEN as u64;
            for e in entries {
                let payload = e.payload();
                out.write_all(&record_header(e.kind(), e.db, e.seq, &payload))?;
                out.write_all(&payload)?;
                len += e.record_len();
            }
            out.flush()?;
            drop(out);
            file.sync_all()?;
            // Lock before the rename so no other process can open and lock
            // the new file between the swap and our lock.
            lock_file(&file)?;
            fs::rename(&tmp, &self.path)?;
            Ok((file, len))
        })();
        let (file, len) = match built {
            Ok(done) => done,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
        };
        // From the rename on, the new file is the journal: switch to it
        // before anything else can fail, or later appends would go to the
        // unlinked old one.
        tracing::debug!(path = %self.path.display(), from = self.len, to = len, "write queue journal compacted");
        self.file = file;
        self.len = len;
        self.needs_repair = false;
        shared.dirty.store(false, Ordering::Release);
        sync_dir(&self.path)
    }

    fn io_error(&self, what: &str, e: io::Error) -> JournalError {
        wrap_io(&self.path, what, e)
    }
}

/// What [`recover`] found in an existing file.
struct Recovered {
    /// The file header's epoch, when it has one.
    epoch: Option<u32>,
    entries: VecDeque<Entry>,
    bytes: usize,
    next_seq: u64,
    file_len: u64,
    /// End of the last intact record.
    good_len: u64,
    /// Why the bytes after `good_len` are being cut off, if there are any.
    torn: Option<String>,
}

fn recover(file: &File, path: &Path) -> Result<Recovered, JournalError> {
    let io_err = |e: io::Error| wrap_io(path, "cannot read", e);
    let corrupt = |offset: u64, what: String| {
        JournalError::Corrupt(format!(
            "{path}: {what} at offset {offset}; the file was left as it is: inspect it, \
             cut it at the offset to keep the records before it (`truncate -s {offset} {path}`), \
             or move it aside to start with an empty write queue",
            path = path.display()
        ))
    };
    let file_len = file.metadata().map_err(io_err)?.len();
    let mut out = Recovered {
        epoch: None,
        entries: VecDeque::new(),
        bytes: 0,
        next_seq: 1,
        file_len,
        good_len: 0,
        torn: None,
    };
    if file_len == 0 {
        return Ok(out);
    }
    let mut r = BufReader::with_capacity(64 * 1024, file);
    r.seek(SeekFrom::Start(0)).map_err(io_err)?;

    let mut header = [0u8; FILE_HEADER_LEN];
    let have = file_len.min(FILE_HEADER_LEN as u64) as usize;
    r.read_exact(&mut header[..have]).map_err(io_err)?;
    let expected = file_header(0);
    if have < FILE_HEADER_LEN {
        let fixed = have.min(12);
        if header[..fixed] == expected[..fixed] || header[..have].iter().all(|&b| b == 0) {
            out.torn = Some("incomplete file header".into());
            return Ok(out);
        }
        return Err(corrupt(
            0,
            "not a redfuse write-queue journal (bad magic)".into(),
        ));
    }
    if header[..8] != MAGIC {
        if rest_is_zero(&mut r, 0).map_err(io_err)? {
            out.torn = Some("zero-filled file header".into());
            return Ok(out);
        }
        return Err(corrupt(
            0,
            "not a redfuse write-queue journal (bad magic)".into(),
        ));
    }
    let version = u32::from_le_bytes(le4(&header[8..12]));
    if version != VERSION {
        return Err(corrupt(
            8,
            format!("unsupported journal version {version} (this build reads {VERSION})"),
        ));
    }

    out.epoch = Some(u32::from_le_bytes(le4(&header[12..16]))).filter(|e| *e != 0);
    let mut pos = FILE_HEADER_LEN as u64;
    let mut last_seq = 0u64;
    out.good_len = pos;
    loop {
        let left = file_len - pos;
        if left == 0 {
            break;
        }
        if left < RECORD_HEADER_LEN as u64 {
            out.torn = Some("incomplete record header".into());
            break;
        }
        let mut head = [0u8; RECORD_HEADER_LEN];
        r.read_exact(&mut head).map_err(io_err)?;
        let h = RecordHeader::parse(&head);
        let implausible = if !matches!(h.kind, KIND_ENTRY | KIND_ACK | KIND_ENTRY_AS) {
            Some(format!("unknown record kind {}", h.kind))
        } else if h.len as usize > MAX_FRAME_LEN {
            Some(format!(
                "record length {} over the {MAX_FRAME_LEN} cap",
                h.len
            ))
        } else if h.kind == KIND_ACK && (h.len != 0 || h.db != 0) {
            Some("malformed ack record".into())
        } else {
            None
        };
        if let Some(what) = implausible {
            if rest_is_zero(&mut r, pos).map_err(io_err)? {
                out.torn = Some("zero-filled tail".into());
                break;
            }
            return Err(corrupt(pos, what));
        }
        let end = pos + record_len(h.len as usize);
        if end > file_len {
            // A crash mid-append, unless the record is all there and only its
            // length field is damaged: then it may hold a write a client was
            // told had succeeded.
            if complete_but_for_its_length(&mut r, &head, pos, file_len).map_err(io_err)? {
                return Err(corrupt(
                    pos,
                    format!(
                        "damaged length in the last record (seq {}), which is complete: not a torn write",
                        h.seq
                    ),
                ));
            }
            out.torn = Some("last record runs past the end of the file".into());
            break;
        }
        // Bounded twice over: by MAX_FRAME_LEN above and by the bytes the
        // file really has left.
        let mut frame = vec![0u8; h.len as usize];
        r.read_exact(&mut frame).map_err(io_err)?;
        if checksum(&head[..CHECKSUMMED_HEADER_LEN], &frame) != h.checksum {
            let last = end == file_len || rest_is_zero(&mut r, end).map_err(io_err)?;
            // Bytes that never reached the disk read as zeros, and no complete
            // record ends in one: an entry's frame ends in `\n`.
            let ends_in_zero = match frame.last() {
                Some(&b) => b == 0,
                None => head[RECORD_HEADER_LEN - 1] == 0,
            };
            if last && ends_in_zero {
                out.torn =
                    Some("the last record ends in zeros (it never fully reached the disk)".into());
                break;
            }
            let what = if last {
                format!(
                    "checksum mismatch in the last record (seq {}), which is complete: \
                     not a torn write but damage (a flipped bit?)",
                    h.seq
                )
            } else {
                format!("checksum mismatch (seq {})", h.seq)
            };
            return Err(corrupt(pos, what));
        }
        match h.kind {
            KIND_ENTRY | KIND_ENTRY_AS => {
                if h.seq <= last_seq || h.seq == u64::MAX {
                    return Err(corrupt(
                        pos,
                        format!("entry seq {} does not follow seq {last_seq}", h.seq),
                    ));
                }
                last_seq = h.seq;
                let mut frame = Bytes::from(frame);
                let identity = if h.kind == KIND_ENTRY_AS {
                    let name_len = frame
                        .get(..2)
                        .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
                        .filter(|n| 2 + n <= frame.len())
                        .ok_or_else(|| {
                            corrupt(pos, format!("malformed identity (seq {})", h.seq))
                        })?;
                    let name = frame.slice(2..2 + name_len);
                    frame = frame.slice(2 + name_len..);
                    Some(name)
                } else {
                    None
                };
                out.bytes += frame.len();
                out.entries.push_back(Entry {
                    seq: h.seq,
                    db: h.db,
                    identity,
                    frame,
                });
            }
            _ => {
                while out.entries.front().is_some_and(|e| e.seq <= h.seq) {
                    if let Some(e) = out.entries.pop_front() {
                        out.bytes -= e.frame.len();
                    }
                }
            }
        }
        pos = end;
        out.good_len = pos;
    }
    out.next_seq = last_seq + 1;
    Ok(out)
}

/// Whether the record at `pos`, whose length field says it runs past the end
/// of the file, is intact when its length is taken to be what the file holds:
/// a complete record whose length field was damaged, not a torn one.
fn complete_but_for_its_length(
    r: &mut BufReader<&File>,
    head: &[u8; RECORD_HEADER_LEN],
    pos: u64,
    file_len: u64,
) -> io::Result<bool> {
    let have = file_len - pos - RECORD_HEADER_LEN as u64;
    // Under the declared length, itself under MAX_FRAME_LEN: bounded.
    let mut frame = vec![0u8; have as usize];
    r.read_exact(&mut frame)?;
    let mut fixed = *head;
    fixed[0..4].copy_from_slice(&(have as u32).to_le_bytes());
    let stored = u64::from_le_bytes(le8(&head[20..28]));
    Ok(!frame.is_empty() && checksum(&fixed[..CHECKSUMMED_HEADER_LEN], &frame) == stored)
}

/// Whether every byte from `from` to the end of the file is zero. Reads in
/// chunks, so a large tail costs time but no memory.
fn rest_is_zero(r: &mut BufReader<&File>, from: u64) -> io::Result<bool> {
    r.seek(SeekFrom::Start(from))?;
    let mut chunk = [0u8; 8192];
    loop {
        let n = r.read(&mut chunk)?;
        if n == 0 {
            return Ok(true);
        }
        if chunk[..n].iter().any(|&b| b != 0) {
            return Ok(false);
        }
    }
}

struct RecordHeader {
    len: u32,
    kind: u32,
    db: u32,
    seq: u64,
    checksum: u64,
}

impl RecordHeader {
    fn parse(b: &[u8; RECORD_HEADER_LEN]) -> RecordHeader {
        RecordHeader {
            len: u32::from_le_bytes(le4(&b[0..4])),
            kind: u32::from_le_bytes(le4(&b[4..8])),
            db: u32::from_le_bytes(le4(&b[8..12])),
            seq: u64::from_le_bytes(le8(&b[12..20])),
            checksum: u64::from_le_bytes(le8(&b[20..28])),
        }
    }
}

fn le4(b: &[u8]) -> [u8; 4] {
    let mut a = [0u8; 4];
    a.copy_from_slice(b);
    a
}

fn le8(b: &[u8]) -> [u8; 8] {
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    a
}

fn file_header(epoch: u32) -> [u8; FILE_HEADER_LEN] {
    let mut h = [0u8; FILE_HEADER_LEN];
    h[..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&epoch.to_le_bytes());
    h
}

/// A new journal epoch: random, never 0 (a file from before epochs).
fn new_epoch() -> u32 {
    loop {
        let e: u32 = rand::random();
        if e != 0 {
            return e;
        }
    }
}

/// `frame.len()` must be at most [`MAX_FRAME_LEN`] (the callers check).
fn record_header(kind: u32, db: u32, seq: u64, frame: &[u8]) -> [u8; RECORD_HEADER_LEN] {
    let mut h = [0u8; RECORD_HEADER_LEN];
    h[0..4].copy_from_slice(&(frame.len() as u32).to_le_bytes());
    h[4..8].copy_from_slice(&kind.to_le_bytes());
    h[8..12].copy_from_slice(&db.to_le_bytes());
    h[12..20].copy_from_slice(&seq.to_le_bytes());
    let sum = checksum(&h[..CHECKSUMMED_HEADER_LEN], frame);
    h[20..28].copy_from_slice(&sum.to_le_bytes());
    h
}

fn record_len(frame_len: usize) -> u64 {
    (RECORD_HEADER_LEN + frame_len) as u64
}

/// FNV-1a 64. Not cryptographic, and needs none: it only has to notice torn
/// writes and flipped bits, and it keeps the crate free of a checksum
/// dependency.
fn checksum(head: &[u8], frame: &[u8]) -> u64 {
    fnv1a(fnv1a(FNV_OFFSET, head), frame)
}

fn fnv1a(mut hash: u64, data: &[u8]) -> u64 {
    for &b in data {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(FNV_PRIME);
    }
    hash
}

fn compact_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".compact");
    PathBuf::from(s)
}

fn lock_file(file: &File) -> io::Result<()> {
    match file.try_lock() {
        Ok(()) => Ok(()),
        Err(fs::TryLockError::WouldBlock) => Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            "the journal is in use by another process",
        )),
        Err(fs::TryLockError::Error(e)) => Err(e),
    }
}

/// Makes a created or renamed directory entry durable.
fn sync_dir(path: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        File::open(dir)?.sync_all()?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

fn wrap_io(path: &Path, what: &str, e: io::Error) -> JournalError {
    JournalError::Io(io::Error::new(
        e.kind(),
        format!("{what} {}: {e}", path.display()),
    ))
}

#[derive(Debug, Clone, Copy)]
enum Reject {
    Bytes,
    Entries,
    Io,
}

/// Prometheus metrics of the write queue. Cheap to clone (handles only).
#[derive(Clone)]
pub struct WriteQueueMetrics {
    depth: IntGauge,
    bytes: IntGauge,
    replayed: IntCounter,
    rejected_bytes: IntCounter,
    rejected_entries: IntCounter,
    rejected_io: IntCounter,
}

impl WriteQueueMetrics {
    /// Creates the metrics and registers them in `registry`. Fails if they
    /// are already registered there.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let depth = IntGauge::new(
            "redfuse_write_queue_depth",
            "Writes queued while the primary was unavailable, waiting for replay.",
        )?;
        let bytes = IntGauge::new(
            "redfuse_write_queue_bytes",
            "Bytes of queued write frames (what max_bytes limits).",
        )?;
        let replayed = IntCounter::new(
            "redfuse_write_queue_replayed_total",
            "Queued writes replayed to the primary.",
        )?;
        let rejected = IntCounterVec::new(
            Opts::new(
                "redfuse_write_queue_rejected_total",
                "Writes the write queue refused, by reason: bytes or entries cap reached, or a journal I/O error.",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(depth.clone()))?;
        registry.register(Box::new(bytes.clone()))?;
        registry.register(Box::new(replayed.clone()))?;
        registry.register(Box::new(rejected.clone()))?;
        Ok(WriteQueueMetrics {
            depth,
            bytes,
            replayed,
            rejected_bytes: rejected.with_label_values(&["bytes"]),
            rejected_entries: rejected.with_label_values(&["entries"]),
            rejected_io: rejected.with_label_values(&["io"]),
        })
    }

    /// Counts `n` queued writes the primary has answered during a replay.
    pub fn replayed(&self, n: u64) {
        self.replayed.inc_by(n);
    }

    fn observe(&self, depth: usize, bytes: usize) {
        self.depth.set(i64::try_from(depth).unwrap_or(i64::MAX));
        self.bytes.set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    fn rejected(&self, why: Reject) {
        match why {
            Reject::Bytes => self.rejected_bytes.inc(),
            Reject::Entries => self.rejected_entries.inc(),
            Reject::Io => self.rejected_io.inc(),
        }
    }
}

impl fmt::Debug for WriteQueueMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WriteQueueMetrics")
            .field("depth", &self.depth.get())
            .field("bytes", &self.bytes.get())
            .field("replayed", &self.replayed.get())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            static NEXT: AtomicU64 = AtomicU64::new(0);
            let dir = std::env::temp_dir().join(format!(
                "redfuse-journal-{}-{}-{name}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).expect("create temp dir");
            TempDir(dir)
        }

        fn file(&self) -> PathBuf {
            self.0.join("queue.journal")
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn set(i: usize) -> Bytes {
        let key = format!("key:{i}");
        Bytes::from(format!(
            "*3\r\n$3\r\nSET\r\n${}\r\n{key}\r\n$5\r\nvalue\r\n",
            key.len()
        ))
    }

    fn memory() -> WriteQueueConfig {
        WriteQueueConfig::default()
    }

    fn on_disk(path: &Path, fsync: FsyncPolicy) -> WriteQueueConfig {
        WriteQueueConfig {
            journal_path: Some(path.to_path_buf()),
            fsync,
            ..WriteQueueConfig::default()
        }
    }

    fn seqs(j: &Journal) -> Vec<u64> {
        j.peek(usize::MAX).iter().map(|e| e.seq).collect()
    }

    fn file_len(path: &Path) -> u64 {
        fs::metadata(path).expect("journal metadata").len()
    }

    fn syncs(j: &Journal) -> u64 {
        settle(j);
        j.shared.syncs.load(Ordering::Relaxed)
    }

    /// Waits until the disk thread has done everything queued so far.
    fn settle(j: &Journal) {
        let (tx, rx) = std::sync::mpsc::channel();
        j.run_on_disk_thread(move || {
            let _ = tx.send(());
        });
        rx.recv().expect("disk thread");
    }

    /// Offset of the record holding entry `index` (0-based), assuming every
    /// entry record and no markers precede it.
    fn record_offset(frames: &[Bytes], index: usize) -> u64 {
        FILE_HEADER_LEN as u64
            + frames[..index]
                .iter()
                .map(|f| record_len(2 + f.len()))
                .sum::<u64>()
    }

    fn write_three(path: &Path) -> Vec<Bytes> {
        let j = Journal::open(&on_disk(path, FsyncPolicy::Always)).expect("open");
        let frames: Vec<Bytes> = (0..3).map(set).collect();
        for (db, f) in frames.iter().enumerate() {
            j.append_blocking(db as u32, Bytes::new(), f.clone())
                .expect("append");
        }
        frames
    }

    fn patch(path: &Path, offset: u64, bytes: &[u8]) {
        let mut data = fs::read(path).expect("read journal");
        let at = offset as usize;
        data[at..at + bytes.len()].copy_from_slice(bytes);
        fs::write(path, data).expect("write journal");
    }

    #[test]
    fn journal_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Journal>();
        assert_send_sync::<WriteQueueMetrics>();
    }

    #[test]
    fn append_peek_ack_keep_order() {
        let j = Journal::open(&memory()).expect("open");
        assert!(j.is_empty());
        for i in 0..5 {
            assert_eq!(
                j.append_blocking(i as u32 % 2, Bytes::new(), set(i))
                    .expect("append"),
                i as u64 + 1
            );
        }
        assert_eq!(j.len(), 5);
        assert_eq!(j.bytes(), (0..5).map(|i| set(i).len()).sum::<usize>());
        let first = j.peek(2);
        assert_eq!(first.len(), 2);
        assert_eq!(
            (first[0].seq, first[0].db, &first[0].frame),
            (1, 0, &set(0))
        );
        assert_eq!(
            (first[1].seq, first[1].db, &first[1].frame),
            (2, 1, &set(1))
        );
        // Peeking does not remove anything.
        assert_eq!(seqs(&j), vec![1, 2, 3, 4, 5]);

        j.ack(2).expect("ack");
        assert_eq!(seqs(&j), vec![3, 4, 5]);
        // Acking something already acked, or below the head, changes nothing.
        j.ack(1).expect("ack");
        assert_eq!(seqs(&j), vec![3, 4, 5]);
        j.append_blocking(7, Bytes::new(), set(9)).expect("append");
        j.ack(5).expect("ack");
        assert_eq!(seqs(&j), vec![6]);
        assert_eq!(j.peek(10)[0].frame, set(9));
        j.ack(u64::MAX).expect("ack");
        assert!(j.is_empty());
        assert_eq!(j.bytes(), 0);
        // Seqs keep increasing after the queue drained.
        assert_eq!(
            j.append_blocking(0, Bytes::new(), set(1)).expect("append"),
            7
        );
    }

    #[test]
    fn byte_cap_refuses_and_keeps_everything() {
        let registry = Registry::new();
        let metrics = WriteQueueMetrics::register(&registry).expect("register");
        let frame = set(1);
        let cfg = WriteQueueConfig {
            max_bytes: frame.len() * 2 + 1,
            ..memory()
        };
        let j = Journal::open(&cfg)
            .expect("open")
            .with_metrics(metrics.clone());
        j.append_blocking(0, Bytes::new(), frame.clone())
            .expect("first fits");
        j.append_blocking(0, Bytes::new(), frame.clone())
            .expect("second fits");
        let err = j
            .append_blocking(0, Bytes::new(), frame.clone())
            .expect_err("third is over the cap");
        assert!(
            matches!(&err, JournalError::Full { what } if *what == format!("max_bytes {} reached", cfg.max_bytes)),
            "{err:?}"
        );
        assert_eq!(j.len(), 2, "a refused write changes nothing");
        assert_eq!(j.bytes(), frame.len() * 2);
        assert_eq!(metrics.rejected_bytes.get(), 1);
        assert_eq!(metrics.depth.get(), 2);
        // A frame that fits in what is left is still taken.
        j.append_blocking(0, Bytes::new(), Bytes::from_static(b"x"))
            .expect("small fits");
        // Room comes back once the replay acks.
        j.ack(1).expect("ack");
        j.append_blocking(0, Bytes::new(), frame)
            .expect("fits after ack");
        assert_eq!(seqs(&j), vec![2, 3, 4], "the refused write used no seq");
    }

    #[test]
    fn entry_cap_refuses_and_keeps_everything() {
        let registry = Registry::new();
        let metrics = WriteQueueMetrics::register(&registry).expect("register");
        let cfg = WriteQueueConfig {
            max_entries: 2,
            ..memory()
        };
        let j = Journal::open(&cfg)
            .expect("open")
            .with_metrics(metrics.clone());
        j.append_blocking(0, Bytes::new(), set(0)).expect("append");
        j.append_blocking(0, Bytes::new(), set(1)).expect("append");
        let err = j
            .append_blocking(0, Bytes::new(), set(2))
            .expect_err("over the entry cap");
        assert!(
            matches!(&err, JournalError::Full { what } if what == "max_entries 2 reached"),
            "{err:?}"
        );
        assert_eq!(j.len(), 2);
        assert_eq!(metrics.rejected_entries.get(), 1);
        assert_eq!(metrics.rejected_bytes.get(), 0);
        assert_eq!(metrics.depth.get(), 2);
        j.ack(1).expect("ack");
        j.append_blocking(0, Bytes::new(), set(2))
            .expect("room again");
        assert_eq!(
            j.peek(5)
                .iter()
                .map(|e| e.frame.clone())
                .collect::<Vec<_>>(),
            vec![set(1), set(2)]
        );
    }

    #[test]
    fn reopen_recovers_entries_in_order_and_seqs_continue() {
        let dir = TempDir::new("reopen");
        let path = dir.file();
        let frames = write_three(&path);
        let j = Journal::open(&on_disk(&path, FsyncPolicy::Always)).expect("reopen");
        let entries = j.peek(10);
        assert_eq!(entries.len(), 3);
        for (i, e) in entries.iter().enumerate() {
            assert_eq!(e.seq, i as u64 + 1);
            assert_eq!(e.db, i as u32);
            assert_eq!(e.frame, frames[i]);
        }
        assert_eq!(j.bytes(), frames.iter().map(|f| f.len()).sum::<usize>());
        assert_eq!(
            j.append_blocking(0, Bytes::new(), set(3)).expect("append"),
            4
        );
        drop(j);
        let j = Journal::open(&on_disk(&path, FsyncPolicy::Always)).expect("reopen again");
        assert_eq!(seqs(&j), vec![1, 2, 3, 4]);
    }

    #[test]
    fn the_epoch_lives_as_long_as_the_entries_it_numbered() {
        let dir = TempDir::new("epoch");
        let path = dir.file();
        write_three(&path);
        let first = Journal::open(&on_disk(&path, FsyncPolicy::Always)).expect("reopen");
        let epoch = first.epoch();
        assert_ne!(epoch, 0);
        drop(first);
        let again = Journal::open(&on_disk(&path, FsyncPolicy::Always)).expect("reopen");
        assert_eq!(again.epoch(), epoch, "same entries, same seqs: same epoch");
        again.ack(3).expect("ack");
        drop(again);
        // Empty: its seqs may start at 1 again, so they must not be mistaken for the old.
        let emptied = Journal::open(&on_disk(&path, FsyncPolicy::Always)).expect("reopen");
        assert_eq!(seqs(&emptied), Vec::<u64>::new());
        let fresh = emptied.epoch();
        emptied
            .append_blocking(0, Bytes::new(), set(1))
            .expect("append");
        drop(emptied);
        let reopened = Journal::open(&on_disk(&path, FsyncPolicy::Always)).expect("reopen");
        assert_eq!(reopened.epoch(), fresh);
    }

    #[test]
    fn acked_entries_are_not_replayed_after_reopen() {
        let dir = TempDir::new("ack-reopen");
        let path = dir.file();
        let frames = write_three(&path);
        {
            let j = Journal::open(&on_disk(&path, FsyncPolicy::Always)).expect("reopen");
            j.ack(2).expect("ack");
        }
        let j = Journal::open(&on_disk(&path, FsyncPolicy::Always)).expect("reopen");
        let entries = j.peek(10);
        assert_eq!(entries.len(), 1);
        assert_eq!((entries[0].seq, &entries[0].frame), (3, &frames[2]));
        assert_eq!(j.bytes(), frames[2].len());
        assert_eq!(
            j.append_blocking(0, Bytes::new(), set(7)).expect("append"),
            4
        );
    }

    #[test]
    fn acking_everything_truncates_the_file() {
        let dir = TempDir::new("ack-all");
        let path = dir.file();
        write_three(&path);
        {
            let j = Journal::open(&on_disk(&path, FsyncPolicy::Always)).expect("reopen");
            assert!(file_len(&path) > 0);
            j.ack(3).expect("ack");
            assert!(j.is_empty());
            settle(&j);
            assert_eq!(file_len(&path), 0);
            // The next append writes the header again.
            j.append_blocking(5, Bytes::new(), set(5)).expect("append");
            j.ack(4).expect("ack");
            settle(&j);
            assert_eq!(file_len(&path), 0);
        }
        let j = Journal::open(&on_disk(&path, FsyncPolicy::Always)).expect("reopen");
        assert!(j.is_empty());
        assert_eq!(
            j.append_blocking(0, Bytes::new(), set(0)).expect("append"),
            1
        );
        drop(j);
        let j = Journal::open(&on_disk(&path, FsyncPolicy::Always)).expect("reopen");
        assert_eq!(j.peek(10)[0].frame, set(0));
    }

    #[test]
    fn torn_tail_is_cut_off_and_appending_goes_on() {
        let dir = TempDir::new("torn");
        let path = dir.file();
        let frames = write_three(&path);
        let full = file_len(&path);
        // A crash in the middle of writing the third record.
        for cut in [1, 5, record_len(frames[2].len()) - 1] {
            let f = OpenOptions::new().write(true).open(&path).expect("open");
            f.set_len(full - cut).expect("truncate");
            drop(f);
            let j = Journal::open(&on_disk(&path, FsyncPolicy::Always)).expect("reopen");
            assert_eq!(seqs(&j), vec![1, 2], "cut {cut}");
            assert_eq!(file_len(&path), record_offset(&frames, 2), "cut {cut}");
            // Restore the third record for the next round.
            assert_eq!(
                j.append_blocking(2, Bytes::new(), frames[2].clone())
                    .expect("append"),
                3
            );
            drop(j);
            assert_eq!(file_len(&path), full);
        }
        let j = Journal::open(&on_disk(&path, FsyncPolicy::Always)).expect("reopen");
        assert_eq!(
            j.peek(10).into_iter().map(|e| e.frame).collect::<Vec<_>>(),
            frames
        );
    }

    #[test]
    fn zero_filled_tail_is_cut_off() {
        let dir = TempDir::new("zero-tail");
        let path = dir.file();
        let frames = write_three(&path);
        let full = file_len(&path);
        // The size reached the disk, the data did not.
        let f = OpenOptions::new().write(true).open(&path).expect("open");
        f.set_len(full + 4096).expect("extend");
        drop(f);
        let j = Journal::open(&on_disk(&path, FsyncPolicy::Always)).expect("reopen");
        assert_eq!(seqs(&j), vec![1, 2, 3]);
        assert_eq!(file_len(&path), full);
        drop(j);
        // Zeroes over the whole last record as well.
        patch(
            &path,
            record_offset(&frames, 2),
            &vec![0u8; record_len(2 + frames[2].len()) as usize],
        );
        let j = Journal::open(&on_disk(&path, FsyncPolicy::Always)).expect("reopen");
        assert_eq!(seqs(&j), vec![1, 2]);
    }

    #[test]
    fn torn_file_header_yields_an_empty_journal() {
        let dir = TempDir::new("torn-header");
        let path = dir.file();
        fs::write(&path, &MAGIC[..5]).expect("write");
        let j = Journal::open(&on_disk(&path, FsyncPolicy::Always)).expect("open");
        assert!(j.is_empty());
        assert_eq!(file_len(&path), 0);
        j.append_blocking(0, Bytes::new(), set(0)).expect("append");
        drop(j);
        let j = Journal::open(&on_disk(&path, FsyncPolicy::Always)).expect("reopen");
        assert_eq!(j.len(), 1);
    }

    #[test]
    fn foreign_file_is_refused_and_left_alone() {
        let dir = TempDir::new("foreign");
        let path = dir.file();
        let content = b"this is somebody else's important file".to_vec();
        fs::write(&path, &content).expect("write");
        let err = Journal::open(&on_disk(&path, FsyncPolicy::Always)).expect_err("foreign file");
        assert!(
            matches!(&err, JournalError::Corrupt(m) if m.contains("magic")),
            "{err}"
        );
        assert_eq!(fs::read(&path).expect("read"), content);

        let mut header = file_header(7);
        header[8..12].copy_from_slice(&99u32.to_le_bytes());
        fs::write(&path, header).expect("write");
        let err = Journal::open(&on_disk(&path, FsyncPolicy::Always)).expect_err("future version");
        assert!(
            matches!(&err, JournalError::Corrupt(m) if m.contains("version 99")),
            "{err}"
        );
    }

    #[test]
    fn bad_checksum_in_the_middle_is_reported_and_file_kept() {
        let dir = TempDir::new("corrupt-middle");
        let path = dir.file();
        let frames = write_three(&path);
        // Flip one byte inside the second frame.
        let at = record_offset(&frames, 1) + RECORD_HEADER_LEN as u64 + 3;
        let before = fs::read(&path).expect("read");
        patch(&path, at, &[before[at as usize] ^ 0x20]);
        let damaged = fs::read(&path).expect("read");
        let err = Journal::open(&on_disk(&path, FsyncPolicy::Always)).expect_err("corrupt");
        match &err {
            JournalError::Corrupt(m) => {
                assert!(m.contains("checksum"), "{m}");
                assert!(
                    m.contains(&format!("offset {}", record_offset(&frames, 1))),
                    "{m}"
                );
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
        assert_eq!(
            fs::read(&path).expect("read"),
            damaged,
            "nothing was cut away"
        );

        // A flipped db in the header is caught the same way.
        patch(&path, at, &[before[at as usize]]);
        let db_at = record_offset(&frames, 0) + 8;
        patch(&path, db_at, &[7]);
        let err = Journal::open(&on_disk(&path, FsyncPolicy::Always)).expect_err("corrupt");
        assert!(matches!(err, JournalError::Corrupt(_)), "{err:?}");
    }

    #[test]
    fn a_corrupt_complete_last_record_refuses_to_start() {
        let dir = TempDir::new("corrupt-last");
        let path = dir.file();
        let frames = write_three(&path);
        let last = record_offset(&frames, 2);
        let original = fs::read(&path).expect("read");
        // One flipped bit anywhere in the complete last record: in its frame,
        // its db, its seq or its checksum. It may be a write a client was told
        // had succeeded, so it is not cut off as a torn tail.
        for at in [
            file_len(&path) - 3,
            last + 8,
            last + 12,
            last + 20,
            last + RECORD_HEADER_LEN as u64,
        ] {
            fs::write(&path, &original).expect("restore");
            patch(&path, at, &[original[at as usize] ^ 0x04]);
            let damaged = fs::read(&path).expect("read");
            let err = Journal::open(&on_disk(&path, FsyncPolicy::Always)).expect_err("corrupt");
            match &err {
                JournalError::Corrupt(m) => {
                    assert!(m.contains(&format!("offset {last}")), "{m}");
                    assert!(m.contains("last record"), "{m}");
                    assert!(m.contains(&format!("truncate -s {last}")), "{m}");
                }
                other => panic!("flip at {at}: expected Corrupt, got {other:?}"),
            }
            assert_eq!(fs::read(&path).expect("read"), damaged, "file left alone");
        }
        // A damaged length field in a complete last record (it now claims to
        // run past the end of the file) is damage too, not a torn write.
        fs::write(&path, &original).expect("restore");
        patch(&path, last, &[original[last as usize] + 1]);
        let err = Journal::open(&on_disk(&path, FsyncPolicy::Always)).expect_err("corrupt");
        assert!(
            matches!(&err, JournalError::Corrupt(m) if m.contains("length") && m.contains(&format!("offset {last}"))),
            "{err}"
        );
        // Cutting the file at the offset, as the message says, keeps the others.
        fs::write(&path, &original).expect("restore");
        patch(&path, last + 12, &[original[last as usize + 12] ^ 1]);
        OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_len(last))
            .expect("truncate");
        let j = Journal::open(&on_disk(&path, FsyncPolicy::Always)).expect("cut");
        assert_eq!(seqs(&j), vec![1, 2]);
    }

    #[test]
    fn a_full_length_last_record_ending_in_zeros_is_a_torn_tail() {
        let dir = TempDir::new("torn-zeros");
        let path = dir.file();
        let frames = write_three(&path);
        let full = file_len(&path);
        // The size reached the disk and the first page of the record did, the
        // rest did not: its tail reads as zeros.
        for zeros in [1usize, 7, frames[2].len()] {
            write_three_again(&path);
            patch(&path, full - zeros as u64, &vec![0u8; zeros]);
            let j = Journal::open(&on_disk(&path, FsyncPolicy::Always)).expect("torn");
            assert_eq!(seqs(&j), vec![1, 2], "{zeros} zeros");
            drop(j);
            assert_eq!(file_len(&path), record_offset(&frames, 2));
        }
        // A torn ack marker: complete length, zero checksum bytes at its end.
        let j = Journal::open(&on_disk(&path, FsyncPolicy::Always)).expect("open");
        j.ack(1).expect("ack");
        drop(j);
        let end = file_len(&path);
        patch(&path, end - 4, &[0, 0, 0, 0]);
        let j = Journal::open(&on_disk(&path, FsyncPolicy::Always)).expect("torn marker");
        assert_eq!(seqs(&j), vec![1, 2], "the torn marker acked nothing");
    }

    fn write_three_again(path: &Path) {
        let _ = fs::remove_file(path);
        write_three(path);
    }

    #[test]
    fn huge_length_fields_never_allocate() {
        let dir = TempDir::new("huge-len");
        let path = dir.file();
        let frames = write_three(&path);
        let original = fs::read(&path).expect("read");

        // Over the cap, with valid records after it: corruption.
        patch(&path, record_offset(&frames, 1), &u32::MAX.to_le_bytes());
        let err = Journal::open(&on_disk(&path, FsyncPolicy::Always)).expect_err("corrupt");
        assert!(
            matches!(&err, JournalError::Corrupt(m) if m.contains("length")),
            "{err}"
        );

        // Under the cap but far past the end of the file, and the record is
        // incomplete: a torn tail, cut off without allocating the 500 MB it
        // claims.
        fs::write(&path, &original[..original.len() - 1]).expect("restore");
        let claimed = (MAX_FRAME_LEN as u32 - 1).to_le_bytes();
        patch(&path, record_offset(&frames, 2), &claimed);
        let j = Journal::open(&on_disk(&path, FsyncPolicy::Always)).expect("reopen");
        assert_eq!(seqs(&j), vec![1, 2]);
        drop(j);

        // The same claim on a record that is all there: damage, refused.
        fs::write(&path, &original).expect("restore");
        patch(&path, record_offset(&frames, 2), &claimed);
        let err = Journal::open(&on_disk(&path, FsyncPolicy::Always)).expect_err("corrupt");
        assert!(matches!(err, JournalError::Corrupt(_)), "{err:?}");

        // Over the cap in the last record: nothing valid follows it, but it
        // is not zero either, so it is still reported, not guessed at.
        fs::write(&path, &original).expect("restore");
        patch(&path, record_offset(&frames, 2), &u32::MAX.to_le_bytes());
        let err = Journal::open(&on_disk(&path, FsyncPolicy::Always)).expect_err("corrupt");
        assert!(matches!(err, JournalError::Corrupt(_)), "{err:?}");
    }

    #[test]
    fn out_of_order_seqs_are_corruption() {
        let dir = TempDir::new("seq-order");
        let path = dir.file();
        let mut data = file_header(7).to_vec();
        for seq in [5u64, 3] {
            let frame = set(seq as usize);
            data.extend_from_slice(&record_header(KIND_ENTRY, 0, seq, &frame));
            data.extend_from_slice(&frame);
        }
        fs::write(&path, &data).expect("write");
        let err = Journal::open(&on_disk(&path, FsyncPolicy::Always)).expect_err("corrupt");
        assert!(
            matches!(&err, JournalError::Corrupt(m) if m.contains("seq 3")),
            "{err}"
        );
    }

    #[test]
    fn fsync_always_syncs_every_append_and_ack() {
        let dir = TempDir::new("always");
        let path = dir.file();
        let j = Journal::open(&on_disk(&path, FsyncPolicy::Always)).expect("open");
        for i in 0..4 {
            j.append_blocking(0, Bytes::new(), set(i)).expect("append");
            assert_eq!(syncs(&j), i as u64 + 1);
            assert!(!j.is_dirty());
        }
        j.ack(2).expect("ack");
        assert_eq!(syncs(&j), 5, "the ack marker is synced");
        // Marker and truncation.
        j.ack(4).expect("ack");
        assert_eq!(syncs(&j), 7);
    }

    #[test]
    fn appends_waiting_together_share_one_fsync_and_acks_never_wait() {
        let dir = TempDir::new("group-commit");
        let path = dir.file();
        let j = Arc::new(Journal::open(&on_disk(&path, FsyncPolicy::Always)).expect("open"));
        j.append_blocking(0, Bytes::new(), set(0)).expect("append");
        assert_eq!(syncs(&j), 1);
        let stall = j.hold_disk();
        let writers: Vec<_> = (1..=10)
            .map(|i| {
                let j = Arc::clone(&j);
                std::thread::spawn(move || j.append_blocking(0, Bytes::new(), set(i)))
            })
            .collect();
        while j.len() < 11 {
            std::thread::yield_now();
        }
        // The disk is stalled: an ack still returns at once.
        j.ack(1).expect("ack");
        assert_eq!(j.len(), 10);
        assert!(
            j.peek(100).is_empty(),
            "nothing is visible before it is durable"
        );
        drop(stall);
        for w in writers {
            w.join().expect("thread").expect("append");
        }
        assert_eq!(
            syncs(&j),
            3,
            "one fsync for the ten appends, then one for the marker"
        );
        assert_eq!(j.peek(100).len(), 10);
        drop(j);
        let j = Journal::open(&on_disk(&path, FsyncPolicy::Always)).expect("reopen");
        assert_eq!(seqs(&j), (2..=11).collect::<Vec<u64>>());
    }

    #[test]
    fn fsync_everysec_syncs_at_most_once_a_second() {
        let dir = TempDir::new("everysec");
        let path = dir.file();
        let j = Journal::open(&on_disk(&path, FsyncPolicy::Everysec)).expect("open");
        j.append_blocking(0, Bytes::new(), set(0)).expect("append");
        j.append_blocking(0, Bytes::new(), set(1)).expect("append");
        assert_eq!(syncs(&j), 0, "less than a second since open");
        assert!(j.is_dirty());
        j.backdate_last_sync(Duration::from_millis(1100));
        j.append_blocking(0, Bytes::new(), set(2)).expect("append");
        assert_eq!(syncs(&j), 1, "a second had passed");
        assert!(!j.is_dirty());
        j.append_blocking(0, Bytes::new(), set(3)).expect("append");
        assert_eq!(syncs(&j), 1);
        j.sync_blocking().expect("sync");
        assert_eq!(syncs(&j), 2, "sync flushes what is pending");
        j.sync_blocking().expect("sync");
        assert_eq!(syncs(&j), 2, "and nothing when nothing is");
    }

    #[test]
    fn fsync_never_leaves_it_to_the_os() {
        let dir = TempDir::new("never");
        let path = dir.file();
        let j = Journal::open(&on_disk(&path, FsyncPolicy::Never)).expect("open");
        for i in 0..3 {
            j.append_blocking(0, Bytes::new(), set(i)).expect("append");
        }
        j.ack(1).expect("ack");
        assert_eq!(syncs(&j), 0);
        drop(j);
        // Still safe across a process restart.
        let j = Journal::open(&on_disk(&path, FsyncPolicy::Never)).expect("reopen");
        assert_eq!(seqs(&j), vec![2, 3]);
    }

    #[tokio::test(start_paused = true)]
    async fn sync_task_flushes_a_quiet_journal_and_stops_with_it() {
        let dir = TempDir::new("sync-task");
        let path = dir.file();
        let j = Arc::new(Journal::open(&on_disk(&path, FsyncPolicy::Everysec)).expect("open"));
        let task = Journal::spawn_sync_task(&j).expect("everysec with a file has a task");
        j.append(0, Bytes::new(), set(0)).await.expect("append");
        assert!(j.is_dirty());
        tokio::time::sleep(Duration::from_millis(1500)).await;
        for _ in 0..100 {
            if !j.is_dirty() {
                break;
            }
            tokio::task::yield_now().await;
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(!j.is_dirty());
        assert_eq!(syncs(&j), 1);
        drop(j);
        tokio::time::sleep(Duration::from_secs(2)).await;
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the task ends after the journal is dropped")
            .expect("task did not panic");

        let memory_only = Arc::new(Journal::open(&memory()).expect("open"));
        assert!(Journal::spawn_sync_task(&memory_only).is_none());
        let always =
            Arc::new(Journal::open(&on_disk(&dir.0.join("b"), FsyncPolicy::Always)).expect("open"));
        assert!(Journal::spawn_sync_task(&always).is_none());
    }

    #[test]
    fn interrupted_replays_compact_the_file() {
        let dir = TempDir::new("compact");
        let path = dir.file();
        let j = Journal::open(&on_disk(&path, FsyncPolicy::Always)).expect("open");
        j.set_compact_slack(0);
        let frames: Vec<Bytes> = (0..10).map(set).collect();
        for f in &frames {
            j.append_blocking(3, Bytes::new(), f.clone())
                .expect("append");
        }
        let full = file_len(&path);
        j.ack(6).expect("ack");
        settle(&j);
        let live: u64 = frames[6..].iter().map(|f| record_len(2 + f.len())).sum();
        assert_eq!(file_len(&path), FILE_HEADER_LEN as u64 + live, "compacted");
        assert!(file_len(&path) < full);
        assert!(!compact_path(&path).exists(), "no temp file left");
        // The compacted file is the one appended to from now on.
        j.append_blocking(3, Bytes::new(), set(10)).expect("append");
        drop(j);
        let j = Journal::open(&on_disk(&path, FsyncPolicy::Always)).expect("reopen");
        assert_eq!(seqs(&j), vec![7, 8, 9, 10, 11]);
        assert_eq!(j.peek(1)[0].frame, frames[6]);
    }

    #[test]
    fn small_acks_write_markers_without_compacting() {
        let dir = TempDir::new("markers");
        let path = dir.file();
        let j = Journal::open(&on_disk(&path, FsyncPolicy::Always)).expect("open");
        for i in 0..10 {
            j.append_blocking(0, Bytes::new(), set(i)).expect("append");
        }
        let before = file_len(&path);
        j.ack(3).expect("ack");
        settle(&j);
        assert_eq!(
            file_len(&path),
            before + RECORD_HEADER_LEN as u64,
            "one marker"
        );
        drop(j);
        let j = Journal::open(&on_disk(&path, FsyncPolicy::Always)).expect("reopen");
        assert_eq!(seqs(&j), (4..=10).collect::<Vec<u64>>());
    }

    #[test]
    fn a_stale_compaction_file_is_removed_on_open() {
        let dir = TempDir::new("stale-compact");
        let path = dir.file();
        write_three(&path);
        fs::write(compact_path(&path), b"half a compaction").expect("write");
        let j = Journal::open(&on_disk(&path, FsyncPolicy::Always)).expect("open");
        assert_eq!(j.len(), 3);
        assert!(!compact_path(&path).exists());
    }

    #[test]
    fn a_journal_in_use_cannot_be_opened_twice() {
        let dir = TempDir::new("lock");
        let path = dir.file();
        let j = Journal::open(&on_disk(&path, FsyncPolicy::Always)).expect("open");
        let err = Journal::open(&on_disk(&path, FsyncPolicy::Always)).expect_err("locked");
        match &err {
            JournalError::Io(e) => {
                assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
                assert!(e.to_string().contains("queue.journal"), "{e}");
            }
            other => panic!("expected Io, got {other:?}"),
        }
        drop(j);
        Journal::open(&on_disk(&path, FsyncPolicy::Always)).expect("free again");
    }

    #[test]
    fn io_errors_name_the_file() {
        let dir = TempDir::new("io-error");
        let path = dir.0.join("missing-dir").join("queue.journal");
        let err = Journal::open(&on_disk(&path, FsyncPolicy::Always)).expect_err("no dir");
        match &err {
            JournalError::Io(e) => assert!(e.to_string().contains("missing-dir"), "{e}"),
            other => panic!("expected Io, got {other:?}"),
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_failing_disk_refuses_writes_and_counts_them() {
        // /dev/full accepts the open and fails every write with ENOSPC.
        let path = Path::new("/dev/full");
        if !path.exists() {
            return;
        }
        let registry = Registry::new();
        let metrics = WriteQueueMetrics::register(&registry).expect("register");
        let j = Journal::open(&on_disk(path, FsyncPolicy::Always))
            .expect("open")
            .with_metrics(metrics.clone());
        for i in 0..2 {
            let err = j
                .append_blocking(0, Bytes::new(), set(i))
                .expect_err("disk full");
            assert!(
                matches!(&err, JournalError::Io(e) if e.to_string().contains("/dev/full")),
                "{err}"
            );
        }
        assert!(j.is_empty(), "a write the file refused is not queued");
        assert_eq!(metrics.rejected_io.get(), 2);
        assert_eq!(metrics.depth.get(), 0);
    }

    #[test]
    fn concurrent_appends_keep_file_and_memory_in_the_same_order() {
        let dir = TempDir::new("threads");
        let path = dir.file();
        let j = Arc::new(Journal::open(&on_disk(&path, FsyncPolicy::Never)).expect("open"));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let j = Arc::clone(&j);
                std::thread::spawn(move || {
                    for i in 0..50 {
                        j.append_blocking(t, Bytes::new(), set(t as usize * 1000 + i))
                            .expect("append");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        let in_memory = j.peek(usize::MAX);
        assert_eq!(in_memory.len(), 200);
        assert!(in_memory.windows(2).all(|w| w[0].seq + 1 == w[1].seq));
        drop(j);
        let j = Journal::open(&on_disk(&path, FsyncPolicy::Never)).expect("reopen");
        assert_eq!(j.peek(usize::MAX), in_memory);
    }

    #[test]
    fn metrics_follow_depth_and_bytes() {
        let dir = TempDir::new("metrics");
        let path = dir.file();
        write_three(&path);
        let registry = Registry::new();
        let metrics = WriteQueueMetrics::register(&registry).expect("register");
        let j = Journal::open(&on_disk(&path, FsyncPolicy::Never))
            .expect("open")
            .with_metrics(metrics.clone());
        assert_eq!(metrics.depth.get(), 3, "recovered entries count at once");
        assert_eq!(metrics.bytes.get(), j.bytes() as i64);
        j.append_blocking(0, Bytes::new(), set(42)).expect("append");
        assert_eq!(metrics.depth.get(), 4);
        assert_eq!(metrics.bytes.get(), j.bytes() as i64);
        j.ack(2).expect("ack");
        metrics.replayed(2);
        assert_eq!(metrics.depth.get(), 2);
        assert_eq!(metrics.bytes.get(), j.bytes() as i64);
        j.ack(4).expect("ack");
        metrics.replayed(2);
        assert_eq!((metrics.depth.get(), metrics.bytes.get()), (0, 0));

        let names: Vec<String> = registry
            .gather()
            .iter()
            .map(|f| f.name().to_string())
            .collect();
        for name in [
            "redfuse_write_queue_depth",
            "redfuse_write_queue_bytes",
            "redfuse_write_queue_replayed_total",
        ] {
            assert!(
                names.iter().any(|n| n == name),
                "{name} missing from {names:?}"
            );
        }
        assert_eq!(metrics.replayed.get(), 4);
        assert!(
            WriteQueueMetrics::register(&registry).is_err(),
            "registering twice fails"
        );
    }

    #[test]
    fn checksum_covers_every_field() {
        let frame = set(1);
        let base = record_header(KIND_ENTRY, 2, 9, &frame);
        assert_ne!(base, record_header(KIND_ENTRY, 3, 9, &frame));
        assert_ne!(base, record_header(KIND_ENTRY, 2, 10, &frame));
        assert_ne!(base[20..], record_header(KIND_ENTRY, 2, 9, &set(2))[20..]);
        // Known FNV-1a 64 vectors.
        assert_eq!(fnv1a(FNV_OFFSET, b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(FNV_OFFSET, b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn config_defaults_parsing_and_validation() {
        let c: WriteQueueConfig = toml::from_str("").expect("empty table");
        assert_eq!(c, WriteQueueConfig::default());
        assert_eq!(c.max_bytes, 16 * 1024 * 1024);
        assert_eq!(c.max_entries, 100_000);
        assert_eq!(c.fsync, FsyncPolicy::Everysec);
        assert!(c.validate().is_ok());

        let c: WriteQueueConfig = toml::from_str(
            "max_bytes = 1024\njournal_path = \"/var/lib/redfuse/q\"\nfsync = \"always\"",
        )
        .expect("parse");
        assert_eq!(c.max_bytes, 1024);
        assert_eq!(
            c.journal_path.as_deref(),
            Some(Path::new("/var/lib/redfuse/q"))
        );
        assert_eq!(c.fsync, FsyncPolicy::Always);
        let c: WriteQueueConfig = toml::from_str("fsync = \"never\"").expect("parse");
        assert_eq!(c.fsync, FsyncPolicy::Never);
        assert!(toml::from_str::<WriteQueueConfig>("fsync = \"sometimes\"").is_err());
        assert!(toml::from_str::<WriteQueueConfig>("max_byte = 1").is_err());

        let bad = [
            (
                WriteQueueConfig {
                    max_bytes: 0,
                    ..memory()
                },
                "max_bytes",
            ),
            (
                WriteQueueConfig {
                    max_bytes: MAX_FRAME_LEN + 1,
                    ..memory()
                },
                "max_bytes",
            ),
            (
                WriteQueueConfig {
                    max_entries: 0,
                    ..memory()
                },
                "max_entries",
            ),
            (
                WriteQueueConfig {
                    journal_path: Some(PathBuf::new()),
                    ..memory()
                },
                "journal_path",
            ),
            (
                WriteQueueConfig {
                    journal_path: Some(PathBuf::from("/var/lib/..")),
                    ..memory()
                },
                "journal_path",
            ),
        ];
        for (config, field) in bad {
            let err = config.validate().expect_err(field);
            assert!(err.starts_with(field), "{err}");
        }
    }

    #[test]
    fn check_journal_path_refuses_unusable_places_and_leaves_nothing_behind() {
        let dir = TempDir::new("check-path");
        let check = |path: PathBuf| {
            WriteQueueConfig {
                journal_path: Some(path),
                ..memory()
            }
            .check_journal_path()
        };
        assert_eq!(memory().check_journal_path(), Ok(()));
        assert_eq!(check(dir.file()), Ok(()));
        assert_eq!(
            fs::read_dir(&dir.0).expect("read dir").count(),
            0,
            "the check leaves no file behind"
        );
        write_three(&dir.file());
        assert_eq!(check(dir.file()), Ok(()), "an existing journal is fine");

        let err = check(dir.0.join("missing").join("queue.journal")).unwrap_err();
        assert!(
            err.starts_with("journal_path") && err.contains("missing"),
            "{err}"
        );
        let err = check(dir.file().join("under-a-file")).unwrap_err();
        assert!(err.contains("not a directory"), "{err}");
        let err = check(dir.0.clone()).unwrap_err();
        assert!(err.contains("not a regular file"), "{err}");
        #[cfg(target_os = "linux")]
        {
            // Not writable even for root.
            let err = check(PathBuf::from("/proc/redfuse.journal")).unwrap_err();
            assert!(err.contains("not writable"), "{err}");
        }
    }

    #[test]
    fn identities_survive_a_reopen_and_legacy_entries_have_none() {
        let dir = TempDir::new("identity");
        let path = dir.file();
        {
            let j = Journal::open(&on_disk(&path, FsyncPolicy::Always)).expect("open");
            j.append_blocking(1, Bytes::from_static(b"alice"), set(1))
                .expect("append");
            j.append_blocking(2, Bytes::new(), set(2)).expect("append");
        }
        // A record as the first version wrote them, with no identity.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&record_header(KIND_ENTRY, 3, 3, &set(3)))
            .unwrap();
        f.write_all(&set(3)).unwrap();
        drop(f);
        let j = Journal::open(&on_disk(&path, FsyncPolicy::Always)).expect("reopen");
        let got = j.peek(10);
        assert_eq!(got.len(), 3);
        assert_eq!(got[0].identity.as_deref(), Some(&b"alice"[..]));
        assert_eq!(got[0].frame, set(1));
        assert_eq!(got[1].identity.as_deref(), Some(&b""[..]));
        assert_eq!(got[2].identity, None);
        assert_eq!(got[2].frame, set(3));
        assert_eq!(j.bytes(), set(1).len() + set(2).len() + set(3).len());
    }
}
