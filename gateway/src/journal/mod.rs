//! The durable outbox: a reading is *accepted* once it is in the journal and fdatasynced, and it leaves
//! the journal only after the broker has PUBACKed it.
//!
//! This module doc is the journal's design document.
//!
//! # What it promises (DESIGN.md, promises 2–4)
//!
//! - **Nothing accepted is lost.** [`Journal::append`] returns `Ok` only after the batch's frames are
//!   written and `fdatasync`ed. From then on the records survive `kill -9` and power loss: recovery reads
//!   them back, and [`Journal::pending`] hands them out, in seq order, until they are acked.
//! - **A record leaves only after the broker PUBACKed it.** [`Journal::ack`] is the only way out, and the
//!   uplink calls it only for seqs whose PUBACK has arrived: commit on
//!   `Event::Incoming(Packet::PubAck(pkid))`, correlating pkids to seqs FIFO through
//!   `Event::Outgoing(Outgoing::Publish(pkid))` (rumqttc's `publish()` does not return the pkid). Never
//!   "delivered on enqueue" (Vector's MQTT sink is the counter-example). A crash between PUBACK and ack
//!   redelivers: at least once.
//! - **Duplicates are harmless.** A record whose `reading_id` is already pending is not appended again;
//!   its existing seq is returned. (After it was acked, the same id may be appended again; the CRM upserts
//!   on the id.)
//! - **The device's memory is the buffer of last resort.** [`Journal::cursor`] is the highest device
//!   sequence number ever *accepted* for a device — the RACP "records after N" cursor — so the gateway
//!   advances a device only past records the journal holds. When the journal is full, `append` fails
//!   with [`JournalError::Full`] and writes nothing: the caller stops downloading and the devices keep
//!   their records.
//!
//! # Constraints
//!
//! - **Bounded.** At most [`JournalConfig::max_records`] records and [`JournalConfig::max_bytes`] bytes
//!   are pending. A record's size is its encoded frame (payload + ids + topic + 34–42 bytes of framing), so
//!   the bound covers the payload bytes and the live part of the disk; memory is bounded through
//!   `max_records` (see "In memory, on disk"). A batch that does not fit fails whole. Disk use is the
//!   pending bytes plus the acked records that share a segment with a pending one: with in-order
//!   delivery, one or two segments.
//! - **One writer.** The directory is `flock`ed; a second `open` fails with [`JournalError::Locked`].
//! - **Synchronous.** Every call does at most one `write` and one `fdatasync` (plus a segment roll); the
//!   pipeline runs it on a blocking task and batches whatever is queued into one `append` (group commit,
//!   up to 64 records; one when idle) — fdatasync latency is the journal's cost, and batching divides it.
//!   The pipeline's writer splits its append in two ([`Journal::begin_append`] /
//!   [`Journal::finish_append`]) and `fdatasync`s between them with the journal's lock released, so the
//!   uplink's reads and acks do not queue behind every fsync.
//! - **Private.** The directory is created `0700` and every file `0600` (tightened, with a warning, if
//!   found wider): journal data is readable by the service user alone (promise 8).
//!
//! # In memory, on disk
//!
//! A gateway that was offline for a week, or a burst faster than the uplink drains, can have the full
//! bound pending; on a Raspberry-Pi-class box that must not become the process's memory. So **pending
//! payloads live only on disk**, and memory holds an index (`index.rs`):
//!
//! - per pending record, a 48-byte slot — seq, segment id, byte offset and length of its Append frame,
//!   and its dedup key — in a deque ordered by seq (acks within the uplink's window come out of order:
//!   acked slots are marked, popped off the front, and compacted away once they outnumber the live ones;
//!   the memory of a drained backlog is given back);
//! - the dedup index of the pending reading ids: a canonical UUID (`protocol::reading_id`, lowercase and
//!   hyphenated) keyed by its 128 bits — exact, so no hash collision can ever dedup two readings into
//!   one — and any other id (`journal-full:…`, tests) in a small map of strings;
//! - per device its cursor, per segment the count of records pending in it and (once `pending` has read
//!   from it) an open read handle, closed when the segment is deleted.
//!
//! Everything else — payload, topic, device, id — is on disk only. [`Journal::pending`] reads each frame
//! back with a positioned read (the page cache normally serves it: it was written moments ago), checks
//! its CRC and decodes it; a frame damaged after it was accepted is an error naming the segment and the
//! offset ([`JournalError::DamagedRecord`]), never a panic and never a silently skipped record. Recovery
//! builds the same index while it replays and keeps no payloads either.
//!
//! Measured (`journal_memory_with_100k_pending`, `--ignored`; debug test binary on the 2-core build
//! machine): 100 000 pending records of 600-byte payloads with UUID ids take ~8.1 MB of heap
//! (anonymous RSS 1.2 → 9.3 MB) — ~81 bytes a record: the slot, the dedup entry and the map's slack —
//! and the test process's whole RSS goes from ~7 to ~22 MB, the rest being pages of the (debug) test
//! executable itself. A fresh process recovering that journal, and then reading every record back,
//! ends at the same figures. When every record was held in memory, the same test went from 6.9 to
//! 118 MB.
//!
//! # On disk
//!
//! ```text
//! <dir>/                                  mode 0700
//!     LOCK                                flock'ed while open; empty
//!     00000000000000000001.log            segments, mode 0600, replayed in id order
//!     00000000000000000002.log            (segment ids increase; gaps are deleted segments)
//!     00000000000000000003.log.tmp        a segment being created; ignored and removed by recovery
//! ```
//!
//! A segment is a sequence of frames. It starts with a Checkpoint and is preallocated (`fallocate`) to
//! [`JournalConfig::segment_bytes`], which reserves its disk space up front: a full disk shows up when a
//! segment is created — before anything of a batch is written — rather than halfway through a write.
//! Its data therefore ends at the first frame boundary followed only by zero bytes (or at the end of the
//! file): **a segment's file length is not its data length**. A new segment is started when an append
//! would take the current one past `segment_bytes`, and at every `open` — the journal never appends to a
//! file an earlier process wrote.
//!
//! ```text
//! struct Frame {                      // all integers little-endian
//!     len:   u32,                     // bytes of kind + body; 1 ..= 64 MiB
//!     crc32: u32,                     // CRC-32 (IEEE, as zlib) over kind + body
//!     kind:  u8,                      // 1 Append, 2 Ack, 3 Checkpoint
//!     body:  [u8; len - 1],
//! }
//! struct Append {                     // kind 1: one accepted record
//!     seq:        u64,                // journal-global, increasing, from 1; never reused
//!     device_seq: Option<u64>,        // u8 tag 0 | 1, then u64 if 1: the device's record number
//!     device:     Str,                // Str = u32 length + UTF-8 bytes
//!     reading_id: Str,                // the reading's deterministic id (promise 3)
//!     topic:      Str,                // where the uplink publishes it
//!     payload:    Bytes,              // Bytes = u32 length + bytes
//! }
//! struct Ack {                        // kind 2: records the broker PUBACKed
//!     ranges: Vec<(u64, u64)>,        // u32 count, then [start, end) seq ranges
//! }
//! struct Checkpoint {                 // kind 3: first frame of every segment
//!     version:  u8,                   // format version, 1
//!     next_seq: u64,                  // the next seq to be issued
//!     pending:  Vec<(u64, u64)>,      // seqs below next_seq still pending, as sorted [start, end) ranges;
//!                                     //   every other seq below next_seq had been acked
//!     cursors:  Vec<(Str, u64)>,      // per device, the highest device_seq ever accepted
//! }
//! ```
//!
//! The checkpoint makes every segment self-sufficient for what came before it. That is what lets the
//! journal delete *any* segment whose records are all acked, not only the oldest: the acks it held and
//! the cursors and seqs it recorded are all restated by the checkpoint of every later segment, and the
//! active segment — the newest — is never deleted.
//!
//! # Writing
//!
//! - `append` encodes the whole batch into one buffer, writes it at the end of the active segment with one
//!   `pwrite`, and `fdatasync`s. Only then does it update memory and return the seqs.
//! - `ack` writes one buffer of Ack frames (ranges of the seqs that are still pending; already-acked seqs
//!   are ignored, never-issued seqs are refused), `fdatasync`s, forgets the records, and deletes the
//!   segments — never the active one — that no longer hold a pending record (then `fsync`s the
//!   directory). An ack never starts a segment: acks must get out even when a new segment cannot be
//!   created (a full disk). `ack_unsynced` (what the uplink uses) skips the `fdatasync`: the frames ride
//!   on the next append's, a roll's (a segment is never left behind unsynced) or an explicit `sync`.
//!   An ack only ever prevents a resend, so a power cut that loses one costs a duplicate delivery, not a
//!   reading, and one disk then sustains twice the appends-plus-acks. Like a torn multi-frame append,
//!   an unsynced ack tail whose sectors landed out of order can read as corruption after a power cut.
//! - **Kept after ack** ([`Journal::open_keeping`], [`KeepAfter`]): a segment that holds a record after
//!   the keep seq is not deleted even when all its records are acked, and `open` hands those records
//!   back once ([`Journal::take_replay`]). The edge alerts use it to save their state every few minutes
//!   instead of per reading: the readings after their snapshot are replayed from here after a crash.
//!   The keep seq trails the newest record by minutes, so it rarely keeps more than the active segment.
//! - A new segment is created as `<id>.log.tmp`, preallocated, given its checkpoint, `fdatasync`ed,
//!   renamed to `<id>.log` and the directory `fsync`ed. A `.log` file therefore always starts with a
//!   complete checkpoint, and a half-made segment is never mistaken for a real one.
//! - **A failed write** (e.g. `ENOSPC`) is cut off again (`ftruncate` to the old end + `fdatasync`) so that
//!   no fragment of it can ever be read back as a frame; the call fails with [`JournalError::Io`] and the
//!   journal stays usable. **A failed `fdatasync`** poisons the journal ([`JournalError::Poisoned`]):
//!   after an fsync error Linux may have dropped the dirty pages and marked them clean, so this process
//!   can no longer vouch for the file; reopening recovers from what the disk really holds. The same goes
//!   for a failed cut-off and for a new segment whose directory entry could not be made durable.
//!
//! # Recovery ([`Journal::open`])
//!
//! Segments are replayed in id order, frame by frame, and every frame is classified:
//!
//! - **Valid** — CRC matches and the body decodes: applied. An Append adds its record to the index
//!   (where its frame is and its id; not its payload) and raises the device's cursor; an Ack removes
//!   its seqs; a Checkpoint removes every seq below its `next_seq` that it does not list as pending,
//!   and raises `next_seq` and the cursors.
//! - **Undecodable** — CRC matches but the kind is unknown or the body does not parse: its length is
//!   trustworthy, so it is skipped and reading goes on; counted in [`Recovery::undecodable_frames`]. A
//!   checkpoint of an unknown format version stops `open` with [`JournalError::UnsupportedFormat`] rather
//!   than misreading a newer journal.
//! - **Torn** — in the *last* segment only: the frame's length runs past the end of the file, fewer than
//!   8 header bytes remain, or its CRC fails and nothing but zero bytes follows its end. This is a write
//!   that was in progress when the power went, so `append` never returned `Ok` for it: the file is cut
//!   there (`ftruncate` + `fdatasync`), every complete record before it is kept, and the bytes are
//!   reported in [`Recovery::torn_bytes`].
//! - **Corrupted** — any other bad frame (CRC failure with data after it, a zero or absurd length, or
//!   any bad frame in an earlier segment, which was fdatasynced before the next was created): reading
//!   *that segment* stops there — without a length we can trust there is no safe way to find the next
//!   frame, and guessing at a CRC-valid-looking frame in the middle of garbage could resurrect a stale or
//!   foreign record — everything before it is kept, and the damage is reported
//!   ([`Recovery::corrupt_frames`], [`Recovery::unreadable_bytes`], logged at `error`). The file is left as
//!   it is (evidence) and closed for writing; it is deleted like any other once its readable records are
//!   acked. If a later checkpoint lists records as pending that were in the unreadable part, they are
//!   counted in [`Recovery::missing_records`]: accepted readings the journal has lost, which the caller
//!   must surface (event topic, metric). A lost cursor can only move backwards, which re-downloads from
//!   the device: duplicates, not losses.
//!   The flip side: a torn *multi-frame* write whose sectors reached the disk out of order can leave a
//!   bad frame with written frames after it; that is reported as corruption too (those records were
//!   never accepted, so nothing is lost) — a false alarm is preferred over explaining real damage away.
//!
//! Nothing in a file can make recovery panic or allocate more than the file's size: every length is
//! checked against the bytes that remain and capped, every count against the body that remains. After
//! replay, recovery starts a fresh segment (its checkpoint restating the recovered state) and deletes the
//! old segments that hold no pending record.
//!
//! # Why this store
//!
//! An append-only log of CRC-framed records on plain files, measured against the alternatives on this
//! project's 2-core build machine (virtual disk; 100-byte records; TOOLCHAIN.md "Durable storage"):
//!
//! | engine | fsync'd commits | groups of 64 | disk bytes/record (groups) |
//! |---|---|---|---|
//! | plain file, preallocated | 4–7 k/s | ~310 k records/s | ~180 |
//! | SQLite, WAL, `synchronous=FULL` | 4–5 k/s | ~130 k/s | ~490 (17 KB deleting acked rows one at a time) |
//! | fjall | 5 k/s | ~100 k/s | ~260 |
//! | redb | 2 k/s | ~65 k/s | ~750 |
//!
//! A single fsync'd commit costs the same (~4–6 k/s) whatever the engine: only group commit matters for
//! throughput, and there the plain file is fastest. On an SD card, bytes written are wear, so the 3–4×
//! fewer bytes per record matter more still (an SD card also syncs in milliseconds, not the 0.2 ms here:
//! the rates are upper bounds, the bytes per record carry over). And the CRC framing makes a torn final
//! write *detectable and reportable*, which promise 2 needs: SQLite's WAL silently discards torn frames.
//! Measured for this implementation on the same machine (`journal_disk_bytes_per_record`, `--ignored`:
//! 100-byte payloads with their ids and topic, 189-byte frames, 64 per batch, counted at the block
//! device): ~175 k records/s appended at ~317 disk bytes/record, and acks at ~70 disk bytes/record. That
//! is the frame plus ~8 KB per commit. The ~180 B figure above needs a file whose blocks were already
//! *written* (zero-filled ahead), where a commit rewrites only the partial page: 254 B/record for the
//! same frames here, against 316 for both a growing and an `fallocate`d file, which pay an ext4
//! metadata commit per `fdatasync` either way. Recycling acked segments instead of deleting them would
//! get there; it needs a per-segment salt in the CRC so that stale frames cannot be read back, and is
//! left for later.

mod error;
mod frame;
mod index;
mod ranges;
mod recovery;
mod storage;
#[cfg(test)]
mod tests;

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

pub use error::JournalError;
use index::{PendingSet, Slot};
use storage::{OsStorage, SegmentReader, SegmentWriter, Storage};

/// Default [`JournalConfig::segment_bytes`]: 4 MiB.
pub const DEFAULT_SEGMENT_BYTES: u64 = 4 << 20;
/// Default [`JournalConfig::max_bytes`]: 64 MiB of pending records (a week offline is a few thousand).
pub const DEFAULT_MAX_BYTES: u64 = 64 << 20;
/// Default [`JournalConfig::max_records`].
pub const DEFAULT_MAX_RECORDS: u64 = 100_000;
/// The largest accepted [`JournalConfig::max_records`] (keeps a checkpoint's pending list bounded).
pub const MAX_RECORDS_LIMIT: u64 = 1 << 20;
/// The largest accepted [`JournalConfig::segment_bytes`]: 1 GiB.
pub const MAX_SEGMENT_BYTES: u64 = 1 << 30;

/// Name of the lock file inside the journal directory.
const LOCK_FILE: &str = "LOCK";
const SEGMENT_SUFFIX: &str = ".log";
const TMP_SUFFIX: &str = ".log.tmp";
/// Digits of a segment id in its file name.
const SEGMENT_ID_DIGITS: usize = 20;

/// Bytes beyond `max_bytes` that [`Journal::append_notice`] may use.
pub const NOTICE_RESERVE_BYTES: u64 = 64 * 1024;
/// Records beyond `max_records` that [`Journal::append_notice`] may use.
pub const NOTICE_RESERVE_RECORDS: u64 = 64;

/// The most bytes [`Journal::pending`] reads with one `pread` (a run of frames that lie back to back).
const READ_SPAN: u64 = 256 * 1024;

/// The most segment read handles kept open. With the default segment size a full journal has ~17
/// segments; a tiny `segment_bytes` could otherwise hold a descriptor for each of thousands.
const MAX_OPEN_READERS: usize = 16;

/// Where the journal lives and how much it may hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalConfig {
    /// The journal directory (created `0700` if missing). Nothing else should live in it.
    pub dir: PathBuf,
    /// Bound on the encoded bytes of pending (unacked) records — payload plus ids, topic and framing.
    pub max_bytes: u64,
    /// Bound on the number of pending records (at most [`MAX_RECORDS_LIMIT`]).
    pub max_records: u64,
    /// Size at which a segment file is rolled (and to which it is preallocated); 1 ..= [`MAX_SEGMENT_BYTES`].
    pub segment_bytes: u64,
}

impl JournalConfig {
    /// A configuration with the default bounds and segment size.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        JournalConfig {
            dir: dir.into(),
            max_bytes: DEFAULT_MAX_BYTES,
            max_records: DEFAULT_MAX_RECORDS,
            segment_bytes: DEFAULT_SEGMENT_BYTES,
        }
    }

    fn validate(&self) -> Result<(), JournalError> {
        let reason = if self.max_bytes == 0 {
            "max_bytes is 0"
        } else if self.max_records == 0 {
            "max_records is 0"
        } else if self.max_records > MAX_RECORDS_LIMIT {
            "max_records is over MAX_RECORDS_LIMIT"
        } else if self.segment_bytes == 0 || self.segment_bytes > MAX_SEGMENT_BYTES {
            "segment_bytes is not in 1 ..= MAX_SEGMENT_BYTES"
        } else {
            return Ok(());
        };
        Err(JournalError::InvalidConfig { reason })
    }
}

/// The seq after which records stay on disk once acked, and are handed back by [`Journal::open_keeping`]
/// ([`Journal::take_replay`]): the edge alerts' snapshot names the last reading it includes, and the
/// readings after it are what a restart replays through the engine (so the snapshot need not be
/// rewritten per reading). Shared: the owner of the snapshot raises it as it saves; the journal reads it
/// when it decides which acked segments to delete. `u64::MAX`: nothing is kept.
#[derive(Debug, Clone)]
pub struct KeepAfter(std::sync::Arc<std::sync::atomic::AtomicU64>);

impl KeepAfter {
    /// Keeps the records after `seq` (`None`: none).
    pub fn new(seq: Option<u64>) -> Self {
        KeepAfter(std::sync::Arc::new(std::sync::atomic::AtomicU64::new(
            seq.unwrap_or(u64::MAX),
        )))
    }

    /// The records after this seq are kept (`None`: none).
    pub fn get(&self) -> Option<u64> {
        match self.0.load(std::sync::atomic::Ordering::Acquire) {
            u64::MAX => None,
            seq => Some(seq),
        }
    }

    /// Keeps the records after `seq` from now on (`None`: none).
    pub fn set(&self, seq: Option<u64>) {
        self.0.store(
            seq.unwrap_or(u64::MAX),
            std::sync::atomic::Ordering::Release,
        );
    }
}

/// A record to append: one validated, attributed reading (or alert) and where to publish it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRecord {
    /// The device's identity (non-empty); the key of its [`cursor`](Journal::cursor).
    pub device: String,
    /// The device's record sequence number, if it has one (the RACP cursor).
    pub device_seq: Option<u64>,
    /// The reading's deterministic id (non-empty): the deduplication key.
    pub reading_id: String,
    /// The MQTT topic to publish to (non-empty).
    pub topic: String,
    /// The MQTT payload.
    pub payload: Vec<u8>,
}

/// A pending record, as handed to the uplink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The journal's seq: ack it after the broker's PUBACK.
    pub seq: u64,
    /// The device's identity.
    pub device: String,
    /// The device's record sequence number, if it has one.
    pub device_seq: Option<u64>,
    /// The reading's deterministic id.
    pub reading_id: String,
    /// The MQTT topic.
    pub topic: String,
    /// The MQTT payload.
    pub payload: Vec<u8>,
}

/// The damage report of [`Journal::open`]. All zero (see [`is_clean`](Self::is_clean)) after a clean
/// shutdown or a crash between writes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Segment files replayed.
    pub segments: usize,
    /// Records pending after recovery.
    pub records: u64,
    /// Their encoded bytes.
    pub pending_bytes: u64,
    /// The next seq the journal will issue.
    pub next_seq: u64,
    /// Bytes of torn writes cut off the tail of the last segment. These were never accepted (their
    /// `append` did not return `Ok`); the devices still have them. Expected after a power loss.
    pub torn_bytes: u64,
    /// Bad frames that were not a torn tail: real corruption. Reading stopped at each.
    pub corrupt_frames: u64,
    /// Bytes that could not be read after those corrupt frames (zero tail excluded).
    pub unreadable_bytes: u64,
    /// CRC-valid frames that could not be decoded, skipped.
    pub undecodable_frames: u64,
    /// Records a checkpoint listed as pending whose Append frame could not be read: accepted readings
    /// that are lost. Only detectable when a later segment survived the damage.
    pub missing_records: u64,
    /// Every damaged place, in replay order.
    pub damage: Vec<Damage>,
}

impl Recovery {
    /// No damage of any kind (a torn tail included).
    pub fn is_clean(&self) -> bool {
        self.damage.is_empty() && self.missing_records == 0
    }

    /// Damage beyond a torn tail: something that had been accepted may be lost. Report it loudly.
    pub fn has_corruption(&self) -> bool {
        self.corrupt_frames > 0 || self.undecodable_frames > 0 || self.missing_records > 0
    }
}

/// One damaged place found by recovery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// The segment file.
    pub segment: PathBuf,
    /// Byte offset of the bad frame in it.
    pub offset: u64,
    /// What was found.
    pub kind: DamageKind,
}

/// What kind of damage (see the module doc's recovery rules).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DamageKind {
    /// A torn final write, cut off.
    Torn {
        /// Bytes cut off (zero tail excluded).
        bytes: u64,
    },
    /// A corrupt frame; the rest of the segment was not read.
    Corrupt {
        /// Bytes from the frame to the last non-zero byte of the segment.
        unreadable_bytes: u64,
    },
    /// A CRC-valid frame that could not be decoded; skipped.
    Undecodable {
        /// The frame's size.
        frame_bytes: u64,
    },
}

/// An append whose frames are written but not yet `fdatasync`ed: from [`Journal::begin_append`] to
/// [`Journal::finish_append`]. Nothing of it is accepted until `finish_append` returns `Ok`.
#[derive(Debug)]
#[must_use = "an append in flight blocks every other append until it is finished"]
pub struct AppendInFlight {
    /// Each record's seq, in batch order (a record already pending keeps its own).
    seqs: Vec<u64>,
    /// What was written; `None` when every record was already pending (nothing to sync or accept).
    written: Option<Written>,
}

/// The frames an [`AppendInFlight`] wrote.
#[derive(Debug)]
struct Written {
    /// Each new record's frame: (batch index, seq, offset in the segment, frame length).
    frames: Vec<(usize, u64, u64, u32)>,
    /// The journal's next seq once these are accepted.
    next_seq: u64,
    segment: u64,
    file: Arc<dyn SegmentWriter>,
    path: PathBuf,
    /// [`Journal::unsynced_ack_writes`] when the frames were written.
    ack_writes: u64,
}

impl AppendInFlight {
    /// `fdatasync`s the frames: call it without holding the journal's lock.
    ///
    /// # Errors
    /// The OS error; pass it to [`Journal::finish_append`], which poisons the journal.
    pub fn sync(&self) -> io::Result<()> {
        self.written.as_ref().map_or(Ok(()), |w| w.file.sync_data())
    }
}

/// The segment being appended to.
#[derive(Debug)]
struct Active {
    id: u64,
    path: PathBuf,
    /// Shared with an append in flight, which `fdatasync`s through it outside the journal's lock.
    file: Arc<dyn SegmentWriter>,
    /// End of the data written so far (the file may be longer: preallocation).
    len: u64,
    /// End of its checkpoint.
    base: u64,
}

/// The durable outbox. See the [module documentation](self) for the design.
///
/// ```
/// use gateway::journal::{Journal, JournalConfig, NewRecord};
///
/// let dir = tempfile::tempdir()?;
/// let (mut journal, recovery) = Journal::open(JournalConfig::new(dir.path().join("journal")))?;
/// assert!(recovery.is_clean());
///
/// let seqs = journal.append(&[NewRecord {
///     device: "meter-1".into(),
///     device_seq: Some(17),
///     reading_id: "r-17".into(),
///     topic: "phg/v1/gw/readings".into(),
///     payload: br#"{"schema":"reading/1"}"#.to_vec(),
/// }])?;
/// assert_eq!(journal.cursor("meter-1"), Some(17)); // the device may now forget record 17
///
/// for record in journal.pending(None, 64)? {
///     // publish QoS 1; after the PUBACK:
///     journal.ack(&[record.seq])?;
/// }
/// assert_eq!(journal.depth(), 0);
/// # let _ = seqs;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Journal {
    cfg: JournalConfig,
    storage: Box<dyn Storage>,
    /// Holds the directory's flock for as long as the journal lives.
    _lock: Box<dyn fmt::Debug + Send>,
    /// Where each pending record's frame is on disk, and the dedup index of their reading ids (no
    /// payloads: see the module doc, "In memory, on disk").
    pending: PendingSet,
    /// Read handles of the segments `pending` has read from, opened on first use and dropped when their
    /// segment is deleted (at most [`MAX_OPEN_READERS`]: the oldest goes first — `pending` reads in
    /// seq order, so that is the one it has finished with). A `Mutex` so that `pending` can take
    /// `&self` (the uplink and the pipeline share the journal behind one lock; this one is never
    /// contended).
    readers: Mutex<BTreeMap<u64, Box<dyn SegmentReader>>>,
    cursors: BTreeMap<String, u64>,
    next_seq: u64,
    /// Every segment file, with the number of pending records whose Append it holds.
    segments: BTreeMap<u64, u64>,
    active: Active,
    next_segment_id: u64,
    bytes_written: u64,
    /// `fdatasync`s of the active segment (commits, ack syncs) since the journal was opened.
    fsyncs: u64,
    /// When the first Ack frame written without `fdatasync` since the active segment was last synced
    /// was written (`None`: nothing unsynced).
    unsynced_since: Option<std::time::Instant>,
    /// Ack frames written without `fdatasync` since the journal was opened: an append in flight
    /// clears `unsynced_since` only if none was written after its frames (its sync may have missed them).
    unsynced_ack_writes: u64,
    /// An append is written but not yet synced ([`Journal::begin_append`]): no other append may start
    /// (seqs are published in order, and the active segment must not roll under it).
    append_in_flight: bool,
    poisoned: Option<String>,
    /// Per segment, the highest seq it holds an Append of.
    last_seq: BTreeMap<u64, u64>,
    /// Acked records after this seq are kept on disk ([`Journal::open_keeping`]).
    keep_after: Option<KeepAfter>,
    /// The last segment creation failed for want of disk space: until one succeeds, acked segments go
    /// even if [`KeepAfter`] would keep them (see [`Journal::collect_garbage`]).
    short_of_space: bool,
    /// The records after `keep_after` found at open, until [`Journal::take_replay`].
    replay: Vec<Record>,
}

impl fmt::Debug for Journal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Journal")
            .field("dir", &self.cfg.dir)
            .field("depth", &self.pending.len())
            .field("pending_bytes", &self.pending.bytes())
            .field("next_seq", &self.next_seq)
            .field("segments", &self.segments.len())
            .field("active_segment", &self.active.id)
            .field("poisoned", &self.poisoned)
            .finish_non_exhaustive()
    }
}

// The pipeline moves the journal into a blocking task.
const _: () = {
    const fn assert_send<T: Send>() {}
    assert_send::<Journal>();
};

/// The file name of segment `id`.
fn segment_name(id: u64) -> String {
    format!("{id:0width$}{SEGMENT_SUFFIX}", width = SEGMENT_ID_DIGITS)
}

fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(segment_name(id))
}

/// The id of a segment file name (exactly 20 digits + `.log`).
fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != SEGMENT_ID_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Whether `e` is the file system's "no space left".
fn is_storage_full(e: &JournalError) -> bool {
    matches!(e, JournalError::Io { source, .. } if source.kind() == io::ErrorKind::StorageFull)
}

/// Why creating a segment failed, and whether that poisons the journal.
enum CreateFailure {
    /// Nothing the journal depends on changed.
    Clean(JournalError),
    /// The segment's name exists but may not be durable.
    Poison(JournalError),
}

/// Encodes the checkpoint for a segment created now.
fn checkpoint_frame(
    next_seq: u64,
    pending: &PendingSet,
    cursors: &BTreeMap<String, u64>,
) -> Result<Vec<u8>, JournalError> {
    let ranges = ranges::collapse(pending.seqs());
    let mut buf = Vec::new();
    // Unreachable with a valid configuration (MAX_RECORDS_LIMIT ranges take 16 MiB of the 64 MiB).
    frame::encode_checkpoint(&mut buf, next_seq, &ranges, cursors).map_err(|_| {
        JournalError::InvalidConfig {
            reason: "checkpoint over 64 MiB (too many devices?)",
        }
    })?;
    Ok(buf)
}

/// Creates segment `id` in `dir`: `.tmp`, preallocate, checkpoint, fdatasync, rename, fsync directory.
fn create_segment(
    storage: &dyn Storage,
    dir: &Path,
    id: u64,
    preallocate: u64,
    checkpoint: &[u8],
) -> Result<Active, CreateFailure> {
    let path = segment_path(dir, id);
    let tmp = dir.join(format!(
        "{}{}",
        segment_name(id).trim_end_matches(SEGMENT_SUFFIX),
        TMP_SUFFIX
    ));
    let io_err = |op, path: &Path, source| JournalError::Io {
        op,
        path: path.to_owned(),
        source,
    };
    let file: Arc<dyn SegmentWriter> = storage
        .create(&tmp)
        .map(Arc::from)
        .map_err(|e| CreateFailure::Clean(io_err("create segment", &tmp, e)))?;
    let result = (|| {
        match file.preallocate(preallocate) {
            Err(e) if e.kind() == io::ErrorKind::StorageFull => {
                return Err(("preallocate segment", e));
            }
            Err(e) => tracing::debug!(error = %e, "journal: no preallocation on this file system"),
            Ok(()) => {}
        }
        file.write_all_at(0, checkpoint)
            .map_err(|e| ("write checkpoint", e))?;
        file.sync_data().map_err(|e| ("fdatasync new segment", e))?;
        storage
            .rename(&tmp, &path)
            .map_err(|e| ("rename new segment", e))
    })();
    if let Err((op, e)) = result {
        if let Err(rm) = storage.remove(&tmp) {
            tracing::warn!(path = %tmp.display(), error = %rm, "journal: could not remove a half-made segment");
        }
        return Err(CreateFailure::Clean(io_err(op, &tmp, e)));
    }
    storage
        .sync_dir(dir)
        .map_err(|e| CreateFailure::Poison(io_err("fsync directory", dir, e)))?;
    let len = checkpoint.len() as u64;
    Ok(Active {
        id,
        path,
        file,
        len,
        base: len,
    })
}

/// Checks and decodes the frame `bytes` that `slot` (of segment `path`) says holds its record.
fn decode_pending(path: &Path, slot: &Slot, bytes: &[u8]) -> Result<Record, JournalError> {
    let damaged = |reason: String| JournalError::DamagedRecord {
        segment: path.to_owned(),
        offset: slot.offset,
        seq: slot.seq,
        reason,
    };
    let Some((header, kind_and_body)) = bytes.split_at_checked(frame::HEADER_LEN) else {
        return Err(damaged("shorter than a frame header".into()));
    };
    let header: &[u8; frame::HEADER_LEN] = header
        .try_into()
        .map_err(|_| damaged("shorter than a frame header".into()))?;
    let (len, crc) = frame::parse_header(header);
    if len as usize != kind_and_body.len() {
        return Err(damaged(format!(
            "frame length {len}, expected {}",
            kind_and_body.len()
        )));
    }
    if !frame::crc_matches(kind_and_body, crc) {
        return Err(damaged("CRC mismatch".into()));
    }
    match frame::decode(kind_and_body) {
        Ok(frame::Frame::Append(record)) if record.seq == slot.seq => Ok(record),
        Ok(frame::Frame::Append(record)) => {
            Err(damaged(format!("holds seq {} instead", record.seq)))
        }
        Ok(_) => Err(damaged("not an Append frame".into())),
        Err(why) => Err(damaged(format!("undecodable: {why}"))),
    }
}

impl Journal {
    /// Opens (creating if needed) the journal in `cfg.dir`, recovers it and reports the damage.
    ///
    /// Recovery replays every segment (see the module doc), cuts a torn tail off the last one, starts a
    /// fresh segment and deletes the segments that hold no pending record. Damage is reported in the
    /// [`Recovery`], not as an error: the journal opens with everything that could be read.
    ///
    /// # Errors
    ///
    /// [`JournalError::InvalidConfig`], [`JournalError::Locked`] (another process has it),
    /// [`JournalError::UnsupportedFormat`] (a newer gateway wrote it), or [`JournalError::Io`] (the
    /// directory or a segment could not be created, read, truncated or synced).
    pub fn open(cfg: JournalConfig) -> Result<(Journal, Recovery), JournalError> {
        Self::open_with(cfg, Box::new(OsStorage))
    }

    /// As [`open`](Self::open), and the segments holding records after `keep` stay on disk after
    /// those records are acked (until `keep` moves past them): the records after `keep` found now,
    /// acked or not, are handed out once by [`take_replay`](Self::take_replay).
    ///
    /// # Errors
    /// As [`open`](Self::open).
    pub fn open_keeping(
        cfg: JournalConfig,
        keep: KeepAfter,
    ) -> Result<(Journal, Recovery), JournalError> {
        Self::open_inner(cfg, Box::new(OsStorage), Some(keep))
    }

    fn open_with(
        cfg: JournalConfig,
        storage: Box<dyn Storage>,
    ) -> Result<(Journal, Recovery), JournalError> {
        Self::open_inner(cfg, storage, None)
    }

    fn open_inner(
        cfg: JournalConfig,
        storage: Box<dyn Storage>,
        keep_after: Option<KeepAfter>,
    ) -> Result<(Journal, Recovery), JournalError> {
        cfg.validate()?;
        let dir = cfg.dir.clone();
        let io_err = |op, source| JournalError::Io {
            op,
            path: dir.clone(),
            source,
        };
        storage
            .create_dir(&dir)
            .map_err(|e| io_err("create directory", e))?;
        let lock = storage.lock(&dir).map_err(|e| match e.kind() {
            io::ErrorKind::WouldBlock => JournalError::Locked { dir: dir.clone() },
            _ => io_err("lock directory", e),
        })?;

        let mut ids = Vec::new();
        for name in storage
            .list(&dir)
            .map_err(|e| io_err("list directory", e))?
        {
            if let Some(id) = parse_segment_name(&name) {
                ids.push(id);
            } else if name.ends_with(TMP_SUFFIX) {
                // A segment whose creation did not finish: never part of the journal.
                let path = dir.join(&name);
                if let Err(e) = storage.remove(&path) {
                    tracing::warn!(path = %path.display(), error = %e, "journal: could not remove a half-made segment");
                }
            } else if name != LOCK_FILE {
                tracing::warn!(file = %name, dir = %dir.display(), "journal: ignoring a foreign file in the journal directory");
            }
        }
        ids.sort_unstable();

        let recovered = recovery::recover(
            &*storage,
            &dir,
            &ids,
            keep_after.as_ref().and_then(KeepAfter::get),
        )?;
        let mut segments: BTreeMap<u64, u64> = ids.iter().map(|&id| (id, 0)).collect();
        for slot in recovered.pending.iter_after(None) {
            *segments.entry(slot.segment).or_insert(0) += 1;
        }

        let id = ids.last().map_or(1, |&last| last.saturating_add(1));
        let checkpoint =
            checkpoint_frame(recovered.next_seq, &recovered.pending, &recovered.cursors)?;
        let mut last_seq = recovered.last_seq;
        let active = match create_segment(&*storage, &dir, id, cfg.segment_bytes, &checkpoint) {
            Ok(a) => a,
            // A disk filled by segments only the keep holds (a full disk stops the readings that would
            // have moved it): as in `collect_garbage`, the keep yields. Their records are in
            // `recovered.replay` already, so this start's replay still has them.
            Err(CreateFailure::Clean(e)) if is_storage_full(&e) && keep_after.is_some() => {
                let delivered: Vec<u64> = segments
                    .iter()
                    .filter(|&(_, &live)| live == 0)
                    .map(|(&id, _)| id)
                    .collect();
                tracing::warn!(
                    segments = delivered.len(),
                    "journal: disk full at open; deleting delivered segments kept for the edge alerts' replay"
                );
                for old in delivered {
                    let path = segment_path(&dir, old);
                    match storage.remove(&path) {
                        Ok(()) => {
                            segments.remove(&old);
                            last_seq.remove(&old);
                        }
                        Err(e) => {
                            tracing::warn!(path = %path.display(), error = %e, "journal: could not delete an acked segment")
                        }
                    }
                }
                if let Err(e) = storage.sync_dir(&dir) {
                    tracing::warn!(dir = %dir.display(), error = %e, "journal: could not fsync the directory after deleting segments");
                }
                match create_segment(&*storage, &dir, id, cfg.segment_bytes, &checkpoint) {
                    Ok(a) => a,
                    Err(CreateFailure::Clean(e) | CreateFailure::Poison(e)) => return Err(e),
                }
            }
            Err(CreateFailure::Clean(e) | CreateFailure::Poison(e)) => return Err(e),
        };
        segments.insert(id, 0);

        let report = recovered.report;
        let mut journal = Journal {
            storage,
            _lock: lock,
            pending: recovered.pending,
            readers: Mutex::new(BTreeMap::new()),
            cursors: recovered.cursors,
            next_seq: recovered.next_seq,
            segments,
            next_segment_id: id.saturating_add(1),
            bytes_written: active.len,
            fsyncs: 0,
            active,
            unsynced_since: None,
            unsynced_ack_writes: 0,
            append_in_flight: false,
            poisoned: None,
            last_seq,
            keep_after,
            replay: recovered.replay,
            short_of_space: false,
            cfg,
        };
        journal.collect_garbage();
        if report.has_corruption() {
            tracing::error!(dir = %journal.cfg.dir.display(), ?report, "journal: opened with corruption");
        } else {
            tracing::info!(dir = %journal.cfg.dir.display(), segments = report.segments, pending = report.records,
                torn_bytes = report.torn_bytes, "journal: opened");
        }
        Ok((journal, report))
    }

    /// Appends a batch with one write and one `fdatasync` (group commit: pass whatever is queued, up to
    /// 64; one record when idle). Returns the seq of each record, in batch order.
    ///
    /// A record whose `reading_id` is already pending (or earlier in the same batch) is not appended
    /// again: its existing seq is returned. When `Ok` returns, every record of the batch is *accepted*
    /// and [`cursor`](Self::cursor) has advanced; before that, none is.
    ///
    /// # Errors
    ///
    /// - [`JournalError::Full`] if the new records would take the pending set past `max_bytes` or
    ///   `max_records` — nothing is written; stop downloading and retry after acks.
    /// - [`JournalError::RecordTooLarge`] / [`JournalError::InvalidRecord`] — nothing is written.
    /// - [`JournalError::Io`] — nothing is accepted (a partial write is cut off again).
    /// - [`JournalError::Poisoned`] — reopen the journal.
    pub fn append(&mut self, batch: &[NewRecord]) -> Result<Vec<u64>, JournalError> {
        self.append_within(batch, 0, 0)
    }

    /// Appends notices about the journal itself (the "journal full" event) into a small reserve beyond the
    /// bounds ([`NOTICE_RESERVE_BYTES`], [`NOTICE_RESERVE_RECORDS`]), so that the reason downloading stopped
    /// reaches the CRM even though readings no longer fit. Otherwise as [`append`](Self::append).
    ///
    /// # Errors
    /// As [`append`](Self::append), with the bounds raised by the reserve.
    pub fn append_notice(&mut self, batch: &[NewRecord]) -> Result<Vec<u64>, JournalError> {
        self.append_within(batch, NOTICE_RESERVE_BYTES, NOTICE_RESERVE_RECORDS)
    }

    fn append_within(
        &mut self,
        batch: &[NewRecord],
        extra_bytes: u64,
        extra_records: u64,
    ) -> Result<Vec<u64>, JournalError> {
        let written = self.begin_within(batch, extra_bytes, extra_records)?;
        let synced = written.sync();
        self.finish_append(batch, written, synced)
    }

    /// The first half of [`append`](Self::append), for a caller that `fdatasync`s without holding the
    /// journal's lock (the pipeline's writer thread): checks the batch, assigns seqs and writes the
    /// frames, but accepts nothing. Call [`AppendInFlight::sync`] with the lock released — the uplink's
    /// reads and acks need not wait out the fsync — then [`finish_append`](Self::finish_append) with
    /// the same batch, under the lock again. Until then no other append may start
    /// ([`JournalError::Busy`]), [`last_seq`](Self::last_seq) does not count the new seqs and
    /// [`pending`](Self::pending) does not show them: a reader can never see a record before it is
    /// durable, nor a later seq before an earlier one.
    ///
    /// # Errors
    /// As [`append`](Self::append), and [`JournalError::Busy`] while another append is in flight.
    pub fn begin_append(&mut self, batch: &[NewRecord]) -> Result<AppendInFlight, JournalError> {
        self.begin_within(batch, 0, 0)
    }

    /// The second half of [`append`](Self::append): `synced` is what [`AppendInFlight::sync`] returned.
    /// On success the records are accepted — indexed, the device cursors advanced — and their seqs are
    /// returned in batch order; a failed `fdatasync` poisons the journal, as in `append`.
    ///
    /// # Errors
    /// [`JournalError::Io`] (the `fdatasync` failed; nothing is accepted), or
    /// [`JournalError::Poisoned`] when another failure poisoned the journal meanwhile.
    pub fn finish_append(
        &mut self,
        batch: &[NewRecord],
        append: AppendInFlight,
        synced: io::Result<()>,
    ) -> Result<Vec<u64>, JournalError> {
        let Some(written) = append.written else {
            // Nothing new was written: every record was already pending.
            return Ok(append.seqs);
        };
        self.append_in_flight = false;
        self.fsyncs += 1;
        if let Err(source) = synced {
            let err = JournalError::Io {
                op: "fdatasync",
                path: written.path,
                source,
            };
            self.poison(&err);
            return Err(err);
        }
        // Something else failed while the lock was free: this process can no longer vouch for the disk.
        self.check_poisoned()?;
        if self.unsynced_ack_writes == written.ack_writes {
            // Every Ack frame written without a sync came before these frames: the fsync covered it.
            self.unsynced_since = None;
        }

        // Durable: now, and only now, the records are accepted. Memory keeps where each frame is, not
        // the record: `pending` reads it back from the segment.
        let segment = written.segment;
        for &(i, seq, offset, len) in &written.frames {
            let Some(r) = batch.get(i) else { continue };
            if let Some(ds) = r.device_seq {
                let c = self.cursors.entry(r.device.clone()).or_insert(ds);
                *c = (*c).max(ds);
            }
            let slot = Slot::of_frame(seq, segment, offset, len, &r.reading_id);
            if self.pending.insert(slot, &r.reading_id) {
                *self.segments.entry(segment).or_insert(0) += 1;
            }
            let last = self.last_seq.entry(segment).or_insert(seq);
            *last = (*last).max(seq);
        }
        self.next_seq = written.next_seq;
        Ok(append.seqs)
    }

    fn begin_within(
        &mut self,
        batch: &[NewRecord],
        extra_bytes: u64,
        extra_records: u64,
    ) -> Result<AppendInFlight, JournalError> {
        self.check_poisoned()?;
        if self.append_in_flight {
            return Err(JournalError::Busy);
        }
        let record_cap = (frame::MAX_RECORD_FRAME as u64).min(self.cfg.max_bytes);
        let mut sizes = Vec::with_capacity(batch.len());
        for (index, r) in batch.iter().enumerate() {
            let reason = if r.device.is_empty() {
                Some("empty device")
            } else if r.reading_id.is_empty() {
                Some("empty reading_id")
            } else if r.topic.is_empty() {
                Some("empty topic")
            } else {
                None
            };
            if let Some(reason) = reason {
                return Err(JournalError::InvalidRecord { index, reason });
            }
            let bytes = frame::append_frame_len(
                &r.device,
                &r.reading_id,
                &r.topic,
                &r.payload,
                r.device_seq.is_some(),
            ) as u64;
            if bytes > record_cap {
                return Err(JournalError::RecordTooLarge {
                    index,
                    bytes,
                    max: record_cap,
                });
            }
            sizes.push(bytes);
        }

        // Assign seqs; duplicates of pending records (or of earlier records in the batch) reuse theirs.
        let mut seqs = Vec::with_capacity(batch.len());
        let mut new: Vec<(usize, u64)> = Vec::new();
        let mut in_batch: HashMap<&str, u64> = HashMap::new();
        let mut next = self.next_seq;
        let (mut new_bytes, mut new_count) = (0u64, 0u64);
        for (i, (r, &bytes)) in batch.iter().zip(&sizes).enumerate() {
            if let Some(seq) = self
                .pending
                .seq_of(&r.reading_id)
                .or_else(|| in_batch.get(r.reading_id.as_str()).copied())
            {
                seqs.push(seq);
                continue;
            }
            if next == u64::MAX {
                return Err(JournalError::SeqExhausted);
            }
            in_batch.insert(&r.reading_id, next);
            seqs.push(next);
            new.push((i, next));
            next += 1;
            new_bytes += bytes;
            new_count += 1;
        }
        if new.is_empty() {
            return Ok(AppendInFlight {
                seqs,
                written: None,
            });
        }
        let depth = self.depth();
        if self.pending.bytes().saturating_add(new_bytes)
            > self.cfg.max_bytes.saturating_add(extra_bytes)
            || depth.saturating_add(new_count) > self.cfg.max_records.saturating_add(extra_records)
        {
            return Err(JournalError::Full {
                pending_bytes: self.pending.bytes(),
                max_bytes: self.cfg.max_bytes,
                pending_records: depth,
                max_records: self.cfg.max_records,
            });
        }

        let mut buf = Vec::with_capacity(usize::try_from(new_bytes).unwrap_or(0));
        // Each new record's frame: (batch index, seq, offset in `buf`, frame length).
        let mut frames: Vec<(usize, u64, u64, u32)> = Vec::with_capacity(new.len());
        for &(i, seq) in &new {
            let Some(r) = batch.get(i) else { continue };
            let at = buf.len() as u64;
            let len = frame::encode_append(
                &mut buf,
                seq,
                &r.device,
                r.device_seq,
                &r.reading_id,
                &r.topic,
                &r.payload,
            )
            .ok()
            // The frame is at most MAX_RECORD_FRAME (checked above), far below u32::MAX.
            .and_then(|len| u32::try_from(len).ok())
            .ok_or(JournalError::RecordTooLarge {
                index: i,
                bytes: u64::MAX,
                max: record_cap,
            })?;
            debug_assert_eq!(sizes.get(i).copied(), Some(u64::from(len)));
            frames.push((i, seq, at, len));
        }
        // Not synced here: the caller syncs, with the journal's lock released (see `begin_append`).
        let start = self.write_frames(&buf, true, false)?;
        for frame in &mut frames {
            frame.2 += start;
        }
        self.append_in_flight = true;
        Ok(AppendInFlight {
            seqs,
            written: Some(Written {
                frames,
                next_seq: next,
                segment: self.active.id,
                file: Arc::clone(&self.active.file),
                path: self.active.path.clone(),
                ack_writes: self.unsynced_ack_writes,
            }),
        })
    }

    /// Pending records in seq order, starting after seq `after` (`None`: from the oldest), at most
    /// `limit`.
    ///
    /// Each record is read back from its segment — frames that lie back to back with one positioned
    /// read, normally served by the page cache — its CRC checked and its frame decoded.
    ///
    /// # Errors
    ///
    /// - [`JournalError::Io`] — a segment could not be opened or read (the message names the segment
    ///   and the offset); retry later.
    /// - [`JournalError::DamagedRecord`] — a pending record's frame was damaged on disk after it was
    ///   accepted. The record is never skipped: reopen the journal to have recovery report and drop
    ///   what cannot be read.
    pub fn pending(&self, after: Option<u64>, limit: usize) -> Result<Vec<Record>, JournalError> {
        let mut readers = self
            .readers
            .lock()
            // Only file handles live under this lock: a panic while it was held leaves nothing
            // half-updated that matters.
            .unwrap_or_else(PoisonError::into_inner);
        let mut out = Vec::with_capacity(limit.min(self.pending.len()));
        let mut slots = self.pending.iter_after(after).take(limit).peekable();
        let mut run: Vec<Slot> = Vec::new();
        let mut buf = Vec::new();
        while let Some(&first) = slots.next() {
            // Frames appended together lie back to back: read such a run with one `pread` (up to
            // READ_SPAN bytes) instead of one per record.
            run.clear();
            run.push(first);
            let mut end = first.offset + u64::from(first.len);
            while let Some(&&next) = slots.peek() {
                let span = end + u64::from(next.len) - first.offset;
                if next.segment != first.segment || next.offset != end || span > READ_SPAN {
                    break;
                }
                run.push(next);
                end += u64::from(next.len);
                slots.next();
            }
            self.read_run(&mut readers, &run, end, &mut buf, &mut out)?;
        }
        Ok(out)
    }

    /// Reads the frames of `run` (contiguous in one segment, ending at `end`) with one positioned read,
    /// checks and decodes each, and appends the records to `out`.
    fn read_run(
        &self,
        readers: &mut BTreeMap<u64, Box<dyn SegmentReader>>,
        run: &[Slot],
        end: u64,
        buf: &mut Vec<u8>,
        out: &mut Vec<Record>,
    ) -> Result<(), JournalError> {
        let Some(first) = run.first() else {
            return Ok(());
        };
        let path = segment_path(&self.cfg.dir, first.segment);
        if readers.len() >= MAX_OPEN_READERS && !readers.contains_key(&first.segment) {
            readers.pop_first();
        }
        let reader = match readers.entry(first.segment) {
            Entry::Occupied(o) => o.into_mut(),
            Entry::Vacant(v) => {
                v.insert(
                    self.storage
                        .open_reader(&path)
                        .map_err(|e| JournalError::Io {
                            op: "open segment for reading",
                            path: path.clone(),
                            source: e,
                        })?,
                )
            }
        };
        // At most READ_SPAN, or one frame of at most MAX_FRAME_LEN + header: fits a usize.
        let span = usize::try_from(end - first.offset).unwrap_or(usize::MAX);
        buf.clear();
        buf.resize(span, 0);
        if let Err(e) = reader.read_exact_at(first.offset, buf) {
            if let [_, _, ..] = run {
                // Read them one by one: the error then names the record's own offset (a file cut
                // short under the third frame of a run says so), and the ones before it still count.
                for slot in run {
                    let end = slot.offset + u64::from(slot.len);
                    self.read_run(readers, std::slice::from_ref(slot), end, buf, out)?;
                }
                return Ok(());
            }
            return Err(JournalError::Io {
                op: "read pending records",
                path,
                source: io::Error::new(
                    e.kind(),
                    format!("{span} bytes at offset {}: {e}", first.offset),
                ),
            });
        }
        let mut at = 0usize;
        for slot in run {
            let len = slot.len as usize;
            let bytes = buf.get(at..at + len).unwrap_or(&[]);
            out.push(decode_pending(&path, slot, bytes)?);
            at += len;
        }
        Ok(())
    }

    /// Marks records delivered — call it only after the broker's PUBACK. Writes the Ack frames with one
    /// write and one `fdatasync`, then deletes the segment files (never the active one) whose records
    /// are all acked.
    ///
    /// Seqs that are no longer pending (acked before: a repeated PUBACK) are ignored.
    ///
    /// # Errors
    ///
    /// - [`JournalError::UnknownSeq`] if a seq was never issued — nothing is acked.
    /// - [`JournalError::Io`] — nothing is acked; the records stay pending (and will be redelivered).
    /// - [`JournalError::Poisoned`] — reopen the journal.
    pub fn ack(&mut self, seqs: &[u64]) -> Result<(), JournalError> {
        self.ack_with(seqs, true)
    }

    /// As [`ack`](Self::ack), but without the `fdatasync`: the Ack frames reach the disk with the next
    /// append's (or [`sync`](Self::sync)'s, or a segment roll's) `fdatasync`, or with the kernel's own
    /// writeback. Acks only ever prevent a resend, so the worst a power loss can do to unsynced ones is
    /// a duplicate delivery (same reading id: harmless by design) — and the uplink saves one `fdatasync`
    /// per batch of PUBACKs, which on one disk halves what appends and acks together can sustain.
    /// A process crash loses nothing: the frames are in the page cache.
    ///
    /// # Errors
    /// As [`ack`](Self::ack).
    pub fn ack_unsynced(&mut self, seqs: &[u64]) -> Result<(), JournalError> {
        self.ack_with(seqs, false)
    }

    /// `fdatasync`s the active segment if Ack frames were written without one since its last sync.
    ///
    /// # Errors
    /// [`JournalError::Io`] (and the journal is poisoned, as for any failed `fdatasync`), or
    /// [`JournalError::Poisoned`].
    pub fn sync(&mut self) -> Result<(), JournalError> {
        self.check_poisoned()?;
        if self.unsynced_since.is_none() {
            return Ok(());
        }
        self.sync_active()
    }

    /// [`sync`](Self::sync)s once the oldest Ack frame written without `fdatasync` is `age` old. Returns
    /// when the acks still unsynced are due (`None`: none are): an append's `fdatasync` syncs them
    /// first if one comes before — a meter syncing every 10 s then never pays an fdatasync of its own
    /// for its acks, nor a journal tail page written twice (issue 14 item 6).
    ///
    /// # Errors
    /// As [`sync`](Self::sync).
    pub fn sync_acks_older_than(
        &mut self,
        age: std::time::Duration,
    ) -> Result<Option<std::time::Instant>, JournalError> {
        if self
            .acks_due(age)
            .is_some_and(|due| due <= std::time::Instant::now())
        {
            self.sync()?;
        }
        Ok(self.acks_due(age))
    }

    /// When Ack frames written without `fdatasync` will be `age` old (`None`: there are none).
    pub fn acks_due(&self, age: std::time::Duration) -> Option<std::time::Instant> {
        self.unsynced_since.map(|since| since + age)
    }

    /// Whether Ack frames were written since the active segment's last `fdatasync`.
    pub fn has_unsynced_acks(&self) -> bool {
        self.unsynced_since.is_some()
    }

    fn sync_active(&mut self) -> Result<(), JournalError> {
        self.fsyncs += 1;
        if let Err(e) = self.active.file.sync_data() {
            let err = JournalError::Io {
                op: "fdatasync",
                path: self.active.path.clone(),
                source: e,
            };
            self.poison(&err);
            return Err(err);
        }
        self.unsynced_since = None;
        Ok(())
    }

    fn ack_with(&mut self, seqs: &[u64], sync: bool) -> Result<(), JournalError> {
        self.check_poisoned()?;
        let mut to_ack = BTreeSet::new();
        for &seq in seqs {
            if seq == 0 || seq >= self.next_seq {
                return Err(JournalError::UnknownSeq {
                    seq,
                    next_seq: self.next_seq,
                });
            }
            if self.pending.contains(seq) {
                to_ack.insert(seq);
            }
        }
        if to_ack.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::new();
        // Ranges of at most MAX_ACK_RANGES per frame: never over the frame limit.
        frame::encode_acks(&mut buf, &ranges::collapse(to_ack.iter().copied())).map_err(|_| {
            JournalError::InvalidConfig {
                reason: "ack frame over 64 MiB",
            }
        })?;
        let _ = self.write_frames(&buf, false, sync)?;
        if !sync {
            self.unsynced_since
                .get_or_insert_with(std::time::Instant::now);
            self.unsynced_ack_writes += 1;
        }

        for seq in to_ack {
            let Some(slot) = self.pending.remove(seq) else {
                continue;
            };
            if let Some(live) = self.segments.get_mut(&slot.segment) {
                *live = live.saturating_sub(1);
            }
        }
        self.collect_garbage();
        Ok(())
    }

    /// The highest device sequence number ever accepted for `device` (over everything ever appended,
    /// acked or not; it survives segment deletion through the checkpoints). `None` if the device never
    /// had a record with a sequence number accepted.
    pub fn cursor(&self, device: &str) -> Option<u64> {
        self.cursors.get(device).copied()
    }

    /// The highest seq ever issued (`0` when the journal never held a record): a reader that has seen
    /// every pending record up to it knows the next record appended gets a higher one.
    pub fn last_seq(&self) -> u64 {
        self.next_seq.saturating_sub(1)
    }

    /// Records pending (accepted, not yet acked).
    pub fn depth(&self) -> u64 {
        self.pending.len() as u64
    }

    /// Encoded bytes of the pending records (what `max_bytes` bounds).
    pub fn pending_bytes(&self) -> u64 {
        self.pending.bytes()
    }

    /// Bytes this process has written to journal files (frames and checkpoints; not the file system's
    /// own metadata). For the benchmark.
    pub fn bytes_written(&self) -> u64 {
        self.bytes_written
    }

    /// The `fdatasync`s of the active segment since the journal was opened: one per commit (a group of
    /// records), plus those of acks ([`sync`](Self::sync)). What wears an SD card (issue 14 item 6).
    pub fn fsyncs(&self) -> u64 {
        self.fsyncs
    }

    /// Segment files on disk (the active one included).
    pub fn segments(&self) -> usize {
        self.segments.len()
    }

    /// Whether an earlier I/O failure has poisoned the journal (see [`JournalError::Poisoned`]).
    pub fn is_poisoned(&self) -> bool {
        self.poisoned.is_some()
    }

    /// The configuration it was opened with.
    pub fn config(&self) -> &JournalConfig {
        &self.cfg
    }

    fn check_poisoned(&self) -> Result<(), JournalError> {
        match &self.poisoned {
            Some(cause) => Err(JournalError::Poisoned {
                cause: cause.clone(),
            }),
            None => Ok(()),
        }
    }

    fn poison(&mut self, err: &JournalError) {
        tracing::error!(error = %err, "journal: poisoned; it must be reopened");
        self.poisoned = Some(err.to_string());
    }

    /// Writes `buf` at the end of the active segment and, if `sync`, fdatasyncs it, starting a new
    /// segment first if `may_roll` and `buf` would take the active one past `segment_bytes`. Returns the
    /// offset `buf` was written at (in the active segment, which the roll may have changed).
    fn write_frames(
        &mut self,
        buf: &[u8],
        may_roll: bool,
        sync: bool,
    ) -> Result<u64, JournalError> {
        let size = buf.len() as u64;
        if may_roll
            && self.active.len > self.active.base
            && self.active.len.saturating_add(size) > self.cfg.segment_bytes
        {
            self.roll()?;
        }
        let offset = self.active.len;
        if let Err(e) = self.active.file.write_all_at(offset, buf) {
            let err = JournalError::Io {
                op: "write",
                path: self.active.path.clone(),
                source: e,
            };
            // Cut the partial write off, durably, so that no fragment of it can ever be read as a frame.
            if let Err(e) = self
                .active
                .file
                .set_len(offset)
                .and_then(|()| self.active.file.sync_data())
            {
                let cut = JournalError::Io {
                    op: "cut off a failed write",
                    path: self.active.path.clone(),
                    source: e,
                };
                self.poison(&cut);
            }
            return Err(err);
        }
        self.active.len += size;
        self.bytes_written += size;
        if sync {
            self.sync_active()?;
        }
        Ok(offset)
    }

    /// Closes the active segment and starts the next one.
    fn roll(&mut self) -> Result<(), JournalError> {
        // Recovery reads any bad frame in an earlier segment as corruption: no segment is left behind
        // with unsynced frames.
        if self.unsynced_since.is_some() {
            self.sync_active()?;
        }
        let id = self.next_segment_id;
        self.next_segment_id = id.saturating_add(1);
        let checkpoint = checkpoint_frame(self.next_seq, &self.pending, &self.cursors)?;
        match create_segment(
            &*self.storage,
            &self.cfg.dir,
            id,
            self.cfg.segment_bytes,
            &checkpoint,
        ) {
            Ok(active) => {
                self.bytes_written += active.len;
                self.active = active;
                self.segments.insert(id, 0);
                self.short_of_space = false;
                self.collect_garbage();
                Ok(())
            }
            Err(CreateFailure::Clean(e)) => {
                if is_storage_full(&e) {
                    self.short_of_space = true;
                    // What the keep held is the first room there is.
                    self.collect_garbage();
                }
                Err(e)
            }
            Err(CreateFailure::Poison(e)) => {
                self.poison(&e);
                Err(e)
            }
        }
    }

    /// Deletes the segments, other than the active one, that hold no pending record. A deletion that
    /// fails is logged and retried next time; a deletion that is not yet durable is harmless (a segment
    /// that reappears after a crash is replayed, and every later checkpoint says its records were acked).
    /// The records found after [`KeepAfter`] at open (acked or not, in seq order); empty afterwards.
    pub fn take_replay(&mut self) -> Vec<Record> {
        std::mem::take(&mut self.replay)
    }

    ///
    /// [`KeepAfter`] yields to a full disk: readings come before the edge alerts' replay. Its segments
    /// hold only delivered records, and the edge engine snapshots every few minutes *while readings
    /// arrive* — on a full disk none arrive, so a keep that held its segments would keep the disk full
    /// for good (downloads stopped, the state file unwritable). The cost: after a crash before the next
    /// snapshot, the edge engine does not see again the readings whose segments went (ingest, which
    /// keeps its own state, is unaffected).
    fn collect_garbage(&mut self) {
        let keep_after = self
            .keep_after
            .as_ref()
            .and_then(KeepAfter::get)
            .filter(|_| !self.short_of_space);
        let kept = |id: &u64| {
            keep_after.is_some_and(|k| self.last_seq.get(id).is_some_and(|&last| last > k))
        };
        let dead: Vec<u64> = self
            .segments
            .iter()
            .filter(|&(&id, &live)| live == 0 && id != self.active.id && !kept(&id))
            .map(|(&id, _)| id)
            .collect();
        if dead.is_empty() {
            return;
        }
        if self.short_of_space && self.keep_after.as_ref().and_then(KeepAfter::get).is_some() {
            tracing::warn!(
                segments = dead.len(),
                "journal: disk full; deleting delivered segments kept for the edge alerts' replay"
            );
        }
        let mut removed = false;
        let readers = self
            .readers
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        for id in dead {
            // Close our read handle first: the file's blocks are freed only when the last fd goes.
            readers.remove(&id);
            let path = segment_path(&self.cfg.dir, id);
            match self.storage.remove(&path) {
                Ok(()) => {
                    removed = true;
                    self.segments.remove(&id);
                    self.last_seq.remove(&id);
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    self.segments.remove(&id);
                    self.last_seq.remove(&id);
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "journal: could not delete an acked segment")
                }
            }
        }
        if removed && let Err(e) = self.storage.sync_dir(&self.cfg.dir) {
            tracing::warn!(dir = %self.cfg.dir.display(), error = %e,
                    "journal: could not fsync the directory after deleting segments");
        }
    }

    /// End of the data in the active segment, and its path (tests cut files relative to it).
    #[cfg(test)]
    fn active_segment(&self) -> (PathBuf, u64) {
        (self.active.path.clone(), self.active.len)
    }
}
