//! The journal's one error type.

use std::io;
use std::path::PathBuf;

/// Why a journal operation failed. Each variant says what state it leaves behind and whether it is
/// recoverable. No variant means "a reading that was accepted is gone": acceptance happens only when an
/// [`append`](super::Journal::append) returns `Ok`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JournalError {
    /// A file-system operation failed (`op` names it: `"write"`, `"fdatasync"`, `"create segment"`, …).
    ///
    /// *State:* the call had no effect on the journal's contents — nothing of the failed batch is
    /// accepted or acked (a short write was cut off again), and the in-memory state is unchanged —
    /// unless [`Journal::is_poisoned`](super::Journal::is_poisoned) now says otherwise (see
    /// [`Poisoned`](Self::Poisoned)). *Recoverable:* yes, retry later; `ENOSPC` shows up here as
    /// `source.kind() == StorageFull` and is handled like [`Full`](Self::Full). From
    /// [`open`](super::Journal::open): nothing was opened; the directory is as it was, except that a torn
    /// tail may already have been cut off (which is what recovery does anyway).
    #[error("journal: {op} {}: {source}", path.display())]
    Io {
        /// The operation that failed.
        op: &'static str,
        /// The file or directory it was applied to.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },

    /// Appending the batch would take the pending (unacked) records past `max_bytes` or `max_records`.
    ///
    /// *State:* nothing was written; nothing of the batch is accepted. *Recoverable:* yes — stop
    /// downloading (the devices keep their records) and retry after [`ack`](super::Journal::ack) has made
    /// room.
    #[error(
        "journal full: {pending_records} records / {pending_bytes} bytes pending, bound {max_records} records / {max_bytes} bytes"
    )]
    Full {
        /// Encoded bytes of the records pending now.
        pending_bytes: u64,
        /// The configured bound on pending bytes.
        max_bytes: u64,
        /// Records pending now.
        pending_records: u64,
        /// The configured bound on pending records.
        max_records: u64,
    },

    /// One record of the batch can never fit: its encoded size is over `max` (the per-record cap of
    /// 1 MiB or the journal's `max_bytes`, whichever is smaller).
    ///
    /// *State:* nothing of the batch was written. *Recoverable:* not for that record — drop it from the
    /// batch and report it; retrying the same batch fails the same way.
    #[error(
        "journal: record {index} of the batch is {bytes} bytes encoded, over the limit of {max}"
    )]
    RecordTooLarge {
        /// Its index in the batch.
        index: usize,
        /// Its encoded size.
        bytes: u64,
        /// The limit it exceeds.
        max: u64,
    },

    /// One record of the batch is malformed (an empty `device`, `reading_id` or `topic`; an empty
    /// reading id would make distinct readings deduplicate into one).
    ///
    /// *State:* nothing of the batch was written. *Recoverable:* not for that record (a caller bug).
    #[error("journal: record {index} of the batch is invalid: {reason}")]
    InvalidRecord {
        /// Its index in the batch.
        index: usize,
        /// What is wrong with it.
        reason: &'static str,
    },

    /// An ack named a seq this journal never issued (0, or at or past the next seq): the caller's
    /// PUBACK-to-seq correlation is wrong, and acking on it could drop the wrong reading.
    ///
    /// *State:* nothing of the ack was written; no record was acked. *Recoverable:* no — it is a bug in
    /// the caller; the records stay pending and will be redelivered.
    #[error("journal: ack of seq {seq}, which was never issued (next seq is {next_seq})")]
    UnknownSeq {
        /// The offending seq.
        seq: u64,
        /// The next seq the journal will issue.
        next_seq: u64,
    },

    /// The configuration is unusable (a zero bound, a segment size out of range, …).
    ///
    /// *State:* nothing was touched. *Recoverable:* fix the configuration.
    #[error("journal: invalid configuration: {reason}")]
    InvalidConfig {
        /// What is wrong.
        reason: &'static str,
    },

    /// Another process holds the journal directory's lock.
    ///
    /// *State:* nothing was touched. *Recoverable:* yes, once the other process has exited. Two writers
    /// on one journal would interleave seqs and lose or double readings, so this is never bypassed.
    #[error("journal: {} is locked by another process", dir.display())]
    Locked {
        /// The journal directory.
        dir: PathBuf,
    },

    /// A segment was written by a journal format this version does not know (a newer gateway).
    ///
    /// *State:* nothing was changed on disk. *Recoverable:* run the gateway version that wrote it (or a
    /// newer one) until the journal has drained.
    #[error("journal: {} has format version {version}, this gateway reads version {supported}", path.display())]
    UnsupportedFormat {
        /// The segment.
        path: PathBuf,
        /// Its format version.
        version: u8,
        /// The version this build reads and writes.
        supported: u8,
    },

    /// A pending record's Append frame no longer reads back as it was written: its header or CRC does
    /// not match, it does not decode, or it is another record than the index says. The segment was
    /// damaged after the record was accepted (a failing SD card, a stray write to the file).
    ///
    /// *State:* nothing changed; the record is still pending, and [`pending`](super::Journal::pending)
    /// fails the same way for any range that includes it (it is never skipped silently). *Recoverable:*
    /// not by retrying — reopen the journal: recovery reports the damage in its
    /// [`Recovery`](super::Recovery) (corrupt frames, missing records) and carries on with what is
    /// readable.
    #[error("journal: pending record {seq} at offset {offset} of {} is damaged: {reason}", segment.display())]
    DamagedRecord {
        /// The segment file.
        segment: PathBuf,
        /// Byte offset of the frame in it.
        offset: u64,
        /// The record's seq.
        seq: u64,
        /// What does not match.
        reason: String,
    },

    /// Another append is written and waiting for its `fdatasync` outside the journal's lock
    /// ([`begin_append`](super::Journal::begin_append)); appends are one at a time, so that seqs become
    /// pending in order.
    ///
    /// *State:* nothing of the batch was written. *Recoverable:* yes — retry once the append in flight
    /// has finished (milliseconds).
    #[error("journal: another append is waiting for its fdatasync; retry")]
    Busy,

    /// The journal has issued every seq a `u64` can hold (not reachable in practice).
    ///
    /// *State:* nothing of the batch was written. *Recoverable:* no.
    #[error("journal: sequence numbers exhausted")]
    SeqExhausted,

    /// An earlier failure left the disk in a state this process can no longer vouch for (an `fdatasync`
    /// failed — after which Linux may already have dropped the unwritten pages — or a failed write
    /// could not be cut off, or a new segment's directory entry could not be made durable).
    ///
    /// *State:* every record accepted before the failure is on disk and still indexed;
    /// [`pending`](super::Journal::pending) keeps working, but `append` and `ack` refuse. *Recoverable:*
    /// yes — drop the journal and [`open`](super::Journal::open) it again; recovery reads back what the
    /// disk really holds.
    #[error("journal poisoned by an earlier I/O failure ({cause}); reopen it")]
    Poisoned {
        /// The failure that poisoned it.
        cause: String,
    },
}

impl JournalError {
    /// Whether this is back-pressure (the journal's bound, or a full disk) rather than a fault: the
    /// caller stops downloading and retries after acks.
    pub fn is_full(&self) -> bool {
        match self {
            JournalError::Full { .. } => true,
            JournalError::Io { source, .. } => source.kind() == io::ErrorKind::StorageFull,
            _ => false,
        }
    }
}
