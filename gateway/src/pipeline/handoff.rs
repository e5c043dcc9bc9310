//! The handoff between the journal writer and the uplink: the records just made durable, kept in memory
//! for a moment so that the uplink can publish them without reading them back from the journal.
//!
//! Why: reading the journal means taking its lock, which the writer holds through every group commit's
//! `fdatasync` — milliseconds on an SD card. An uplink that waits for that lock stops reading PUBACKs and
//! stops publishing meanwhile (measured: accept → PUBACK p99 16 ms at 100 readings/s instead of < 1 ms).
//!
//! The handoff is only a shortcut, never the source of truth (DESIGN.md promise 2): it is bounded and drops
//! what does not fit, and the uplink takes a record from it only when it is the very next seq after what the
//! uplink already handed over (seqs are issued consecutively by the journal). Anything else — a gap left by
//! a dropped record, a record appended outside the writer, a reconnect that starts over from the oldest
//! pending record — makes the uplink read the journal, exactly as without the handoff.

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::Notify;

use crate::journal::Record;

/// Records kept at most (the uplink's window is 100 by default: a few windows' worth).
pub const DEFAULT_RECORDS: usize = 512;
/// Payload bytes kept at most.
pub const DEFAULT_BYTES: usize = 512 * 1024;

/// See the [module documentation](self).
#[derive(Debug)]
pub struct Handoff {
    inner: Mutex<Inner>,
    /// Wakes the uplink after every commit (and on [`wake`](Self::wake)).
    notify: Notify,
    max_records: usize,
    max_bytes: usize,
}

#[derive(Debug, Default)]
struct Inner {
    records: VecDeque<Record>,
    bytes: usize,
    /// The highest seq ever offered (pushed or dropped): older seqs are duplicates of a pending record.
    last_offered: u64,
    /// Something was appended that the queue does not hold: the uplink must look at the journal.
    missed: bool,
}

/// What the uplink got from [`Handoff::take`].
#[derive(Debug, Default)]
pub struct Taken {
    /// Consecutive records, starting right after the uplink's cursor.
    pub records: Vec<Record>,
    /// The journal holds records after the cursor that the handoff does not: read them from there.
    pub read_journal: bool,
}

impl Default for Handoff {
    fn default() -> Self {
        Self::new(DEFAULT_RECORDS, DEFAULT_BYTES)
    }
}

impl Handoff {
    /// A handoff holding at most `max_records` records and `max_bytes` payload bytes (0 disables it:
    /// every record is then read back from the journal).
    pub fn new(max_records: usize, max_bytes: usize) -> Self {
        Handoff {
            inner: Mutex::new(Inner::default()),
            notify: Notify::new(),
            max_records,
            max_bytes,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Plain data, consistent after every statement: a panic elsewhere cannot leave it half-updated.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Offers records that were just committed, in seq order, and wakes the uplink. Records whose seq is
    /// not newer than any offered before (a duplicate reading got its pending record's seq) are skipped.
    pub fn push(&self, records: impl IntoIterator<Item = Record>) {
        {
            let mut inner = self.lock();
            for r in records {
                if r.seq <= inner.last_offered {
                    continue;
                }
                inner.last_offered = r.seq;
                let size = r.payload.len();
                if inner.records.len() >= self.max_records
                    || inner.bytes.saturating_add(size) > self.max_bytes
                {
                    inner.missed = true;
                    continue;
                }
                inner.bytes += size;
                inner.records.push_back(r);
            }
        }
        self.notify.notify_one();
    }

    /// Wakes the uplink after an append that did not go through [`push`](Self::push): it will read the
    /// journal.
    pub fn wake(&self) {
        self.lock().missed = true;
        self.notify.notify_one();
    }

    /// Waits for the next [`push`](Self::push) or [`wake`](Self::wake) (a wake-up that came while nobody
    /// waited is kept, as with [`Notify::notify_one`]).
    pub async fn notified(&self) {
        self.notify.notified().await;
    }

    /// Takes up to `limit` records that follow `cursor` (the last seq handed over; `None`: nothing known
    /// yet, so the journal must be read). Records at or before the cursor are dropped as stale.
    pub fn take(&self, cursor: Option<u64>, limit: usize) -> Taken {
        let mut inner = self.lock();
        let mut taken = Taken {
            read_journal: std::mem::take(&mut inner.missed),
            ..Taken::default()
        };
        let Some(mut next) = cursor.and_then(|c| c.checked_add(1)) else {
            taken.read_journal = true;
            return taken;
        };
        while let Some(front) = inner.records.front() {
            if front.seq < next {
                // Already read from the journal (or published before a reconnect).
                if let Some(r) = inner.records.pop_front() {
                    inner.bytes = inner.bytes.saturating_sub(r.payload.len());
                }
                continue;
            }
            if front.seq > next {
                // A gap: the record in between is only in the journal.
                taken.read_journal = true;
                break;
            }
            if taken.records.len() >= limit {
                break;
            }
            if let Some(r) = inner.records.pop_front() {
                inner.bytes = inner.bytes.saturating_sub(r.payload.len());
                next = r.seq.saturating_add(1);
                taken.records.push(r);
            }
        }
        taken
    }

    /// Records held now (for tests and the benchmark).
    pub fn len(&self) -> usize {
        self.lock().records.len()
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(seq: u64) -> Record {
        Record {
            seq,
            device: "d".into(),
            device_seq: Some(seq),
            reading_id: format!("r{seq}"),
            topic: "t".into(),
            payload: vec![0; 10],
        }
    }

    fn seqs(t: &Taken) -> Vec<u64> {
        t.records.iter().map(|r| r.seq).collect()
    }

    #[test]
    fn handoff_gives_only_the_records_right_after_the_cursor() {
        let h = Handoff::new(8, 1000);
        h.push((1..=5).map(rec));
        // Nothing known yet: read the journal first.
        let t = h.take(None, 10);
        assert!(t.records.is_empty() && t.read_journal);
        // The journal read covered 1..=2: 1 and 2 are stale, 3.. follow.
        let t = h.take(Some(2), 2);
        assert_eq!(seqs(&t), [3, 4]);
        assert!(!t.read_journal);
        let t = h.take(Some(4), 10);
        assert_eq!(seqs(&t), [5]);
        assert!(h.is_empty());
    }

    #[test]
    fn handoff_overflow_and_gaps_send_the_uplink_to_the_journal() {
        let h = Handoff::new(2, 1000);
        h.push((1..=4).map(rec)); // 3 and 4 dropped
        let t = h.take(Some(0), 10);
        assert_eq!(seqs(&t), [1, 2]);
        assert!(
            t.read_journal,
            "dropped records must be read from the journal"
        );
        // A record appended outside the writer (seq 5) leaves a gap before 6.
        h.wake();
        h.push([rec(6)]);
        let t = h.take(Some(4), 10);
        assert!(t.records.is_empty() && t.read_journal);
        // After the journal read handed 5, 6 follows.
        let t = h.take(Some(5), 10);
        assert_eq!(seqs(&t), [6]);
        assert!(!t.read_journal);
    }

    #[test]
    fn handoff_skips_reoffered_seqs_and_respects_the_byte_bound() {
        let h = Handoff::new(100, 25);
        h.push([rec(1), rec(2)]);
        h.push([rec(2), rec(1)]); // duplicates of pending readings keep their old seq
        h.push([rec(3)]); // 30 bytes > 25: dropped
        let t = h.take(Some(0), 10);
        assert_eq!(seqs(&t), [1, 2]);
        assert!(t.read_journal);
    }
}
