//! The in-memory index of the pending records: where each one's Append frame lies on disk, and the
//! deduplication index of their reading ids. Payloads, topics and device names are never held here —
//! [`super::Journal::pending`] reads them back from the segment files.
//!
//! Per pending record: one 48-byte [`Slot`] in a `VecDeque` sorted by seq, plus one 24-byte entry of
//! the UUID dedup map (hashbrown: 16-byte key, 8-byte seq, 1 control byte per bucket, at most 7/8
//! full, a power of two of buckets). 100 000 records: 4.8 MB of slots (the deque's unused capacity is
//! never touched, so not resident) plus 3.3 MB of map — ~8.1 MB, as measured.

use std::collections::{HashMap, VecDeque};

/// A reading id as the dedup index keys it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum IdKey {
    /// A canonical UUID string (`protocol::reading_id`: lowercase, hyphenated), as its 128 bits. Bytes
    /// rather than `u128`: alignment 1 keeps [`Slot`] and the map entry at 8-byte alignment.
    Uuid([u8; 16]),
    /// Any other id (`journal-full:dev:123`, test ids); the string is kept in [`PendingSet`]'s small
    /// map of those.
    Other,
}

impl IdKey {
    pub(super) fn of(reading_id: &str) -> IdKey {
        parse_uuid(reading_id).map_or(IdKey::Other, IdKey::Uuid)
    }
}

/// Parses the canonical UUID form only: 36 bytes, lowercase hex, hyphens at 8, 13, 18 and 23.
///
/// Only that form, so that string → key is one-to-one: dedup used to compare the strings exactly, and
/// `"ABCD…"`, `"{abcd…}"` or the 32-digit simple form are different strings that a lenient parser would
/// fold into one key. A false dedup silently loses a reading; the other forms simply go to the string
/// map.
fn parse_uuid(s: &str) -> Option<[u8; 16]> {
    let b = s.as_bytes();
    if b.len() != 36 {
        return None;
    }
    let mut out = [0u8; 16];
    let mut nibble = 0usize;
    for (i, &c) in b.iter().enumerate() {
        if matches!(i, 8 | 13 | 18 | 23) {
            if c != b'-' {
                return None;
            }
            continue;
        }
        let v = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            _ => return None,
        };
        let byte = out.get_mut(nibble / 2)?;
        *byte = (*byte << 4) | v;
        nibble += 1;
    }
    Some(out)
}

/// Where one pending record's Append frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Slot {
    pub seq: u64,
    /// The segment id (file `<segment>.log`).
    pub segment: u64,
    /// Byte offset of the frame's header in the segment.
    pub offset: u64,
    /// The whole frame's size, header included (what counts against `max_bytes`). Never 0 for a frame;
    /// 0 marks an acked slot waiting to be compacted away.
    pub len: u32,
    pub key: IdKey,
}

impl Slot {
    /// The slot of record `reading_id`'s Append frame: `len` bytes at `offset` of `segment`.
    pub fn of_frame(seq: u64, segment: u64, offset: u64, len: u32, reading_id: &str) -> Slot {
        Slot {
            seq,
            segment,
            offset,
            len,
            key: IdKey::of(reading_id),
        }
    }

    fn is_live(&self) -> bool {
        self.len != 0
    }
}

/// The pending records: their frame locations in seq order, and the dedup index of their reading ids.
#[derive(Debug, Default)]
pub(super) struct PendingSet {
    /// Sorted by seq, strictly increasing. Acked slots are marked (`len == 0`) rather than removed —
    /// acks arrive out of order within the uplink's window, and removing from the middle of a deque is
    /// O(n) — then popped off the front, or compacted away once they are as many as the live ones.
    slots: VecDeque<Slot>,
    live: usize,
    bytes: u64,
    /// Canonical-UUID reading id → seq: the common case, exact, 24 bytes an entry.
    by_uuid: HashMap<[u8; 16], u64>,
    /// Every other reading id → seq, and back (an ack knows only the seq). Few in practice.
    by_other: HashMap<String, u64>,
    other_of_seq: HashMap<u64, String>,
}

/// Compaction does not bother below this many dead slots.
const MIN_COMPACT: usize = 64;

impl PendingSet {
    /// Records pending.
    pub(super) fn len(&self) -> usize {
        self.live
    }

    /// Their encoded frame bytes.
    pub(super) fn bytes(&self) -> u64 {
        self.bytes
    }

    fn find(&self, seq: u64) -> Result<usize, usize> {
        self.slots.binary_search_by_key(&seq, |s| s.seq)
    }

    pub(super) fn contains(&self, seq: u64) -> bool {
        self.find(seq)
            .ok()
            .and_then(|i| self.slots.get(i))
            .is_some_and(Slot::is_live)
    }

    /// The seq of the pending record with this reading id.
    pub(super) fn seq_of(&self, reading_id: &str) -> Option<u64> {
        match IdKey::of(reading_id) {
            IdKey::Uuid(k) => self.by_uuid.get(&k).copied(),
            IdKey::Other => self.by_other.get(reading_id).copied(),
        }
    }

    /// Adds a pending record (`slot.key` must be `IdKey::of(reading_id)`). Returns `false`, changing
    /// nothing, if its seq is already pending (recovery keeps the first Append of a seq). A reading id
    /// that is already pending under another seq keeps pointing at the first.
    pub(super) fn insert(&mut self, slot: Slot, reading_id: &str) -> bool {
        debug_assert!(slot.is_live());
        debug_assert_eq!(slot.key, IdKey::of(reading_id));
        if self.slots.back().is_none_or(|last| last.seq < slot.seq) {
            // The normal case: seqs are issued in increasing order.
            self.slots.push_back(slot);
        } else {
            match self.find(slot.seq) {
                Ok(i) => match self.slots.get_mut(i) {
                    // An acked seq appended again (only a damaged or hand-made journal does that):
                    // pending again, as recovery always treated it.
                    Some(dead) if !dead.is_live() => *dead = slot,
                    _ => return false,
                },
                Err(i) => self.slots.insert(i, slot),
            }
        }
        self.live += 1;
        self.bytes += u64::from(slot.len);
        match slot.key {
            IdKey::Uuid(k) => {
                self.by_uuid.entry(k).or_insert(slot.seq);
            }
            IdKey::Other => {
                self.by_other
                    .entry(reading_id.to_owned())
                    .or_insert(slot.seq);
                self.other_of_seq.insert(slot.seq, reading_id.to_owned());
            }
        }
        true
    }

    /// Removes a pending record; `None` if `seq` is not pending.
    pub(super) fn remove(&mut self, seq: u64) -> Option<Slot> {
        let i = self.find(seq).ok()?;
        let slot = self.slots.get_mut(i)?;
        if !slot.is_live() {
            return None;
        }
        let removed = *slot;
        slot.len = 0;
        self.live -= 1;
        self.bytes = self.bytes.saturating_sub(u64::from(removed.len));
        match removed.key {
            IdKey::Uuid(k) => {
                if self.by_uuid.get(&k) == Some(&seq) {
                    self.by_uuid.remove(&k);
                }
            }
            IdKey::Other => {
                if let Some(id) = self.other_of_seq.remove(&seq)
                    && self.by_other.get(&id) == Some(&seq)
                {
                    self.by_other.remove(&id);
                }
            }
        }
        self.tidy();
        Some(removed)
    }

    /// Drops dead slots off the front, compacts when they outnumber the live ones, and gives memory back
    /// once a backlog has drained (a week offline must not pin its peak for good).
    fn tidy(&mut self) {
        while self.slots.front().is_some_and(|s| !s.is_live()) {
            self.slots.pop_front();
        }
        let dead = self.slots.len() - self.live;
        if dead > MIN_COMPACT && dead > self.live {
            self.slots.retain(Slot::is_live);
        }
        if self.slots.capacity() > 4 * self.slots.len().max(256) {
            self.slots.shrink_to(2 * self.slots.len());
        }
        if self.by_uuid.capacity() > 4 * self.by_uuid.len().max(256) {
            self.by_uuid.shrink_to(2 * self.by_uuid.len());
        }
    }

    /// Pending slots in seq order, from the first after `after` (`None`: from the oldest).
    pub(super) fn iter_after(&self, after: Option<u64>) -> impl Iterator<Item = &Slot> {
        let start = after.map_or(0, |a| self.slots.partition_point(|s| s.seq <= a));
        self.slots.range(start..).filter(|s| s.is_live())
    }

    /// Pending seqs in `[start, end)`, ascending.
    pub(super) fn seqs_in(&self, start: u64, end: u64) -> impl Iterator<Item = u64> {
        let from = self.slots.partition_point(|s| s.seq < start);
        self.slots
            .range(from..)
            .take_while(move |s| s.seq < end)
            .filter(|s| s.is_live())
            .map(|s| s.seq)
    }

    /// Every pending seq, ascending.
    pub(super) fn seqs(&self) -> impl Iterator<Item = u64> {
        self.iter_after(None).map(|s| s.seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(seq: u64, id: &str) -> Slot {
        Slot {
            seq,
            segment: 1,
            offset: seq * 100,
            len: 100,
            key: IdKey::of(id),
        }
    }

    #[test]
    fn canonical_uuids_only() {
        let id = "20178b84-9cc1-5407-9253-b99b9ffbffec";
        assert_eq!(
            parse_uuid(id),
            Some(0x20178b84_9cc1_5407_9253_b99b9ffbffec_u128.to_be_bytes())
        );
        for other in [
            "20178B84-9cc1-5407-9253-b99b9ffbffec",
            "{20178b84-9cc1-5407-9253-b99b9ffbffe}",
            "20178b849cc154079253b99b9ffbffec",
            "20178b84-9cc1-5407-9253-b99b9ffbffe",
            "20178b84-9cc1-5407-9253-b99b9ffbffecc",
            "20178b84_9cc1-5407-9253-b99b9ffbffec",
            "20178b84-9cc1-5407-9253-b99b9ffbffeg",
            "journal-full:dev:123",
            "",
        ] {
            assert_eq!(IdKey::of(other), IdKey::Other, "{other}");
        }
        // The slot stays small: this is most of the journal's memory per pending record.
        assert!(std::mem::size_of::<Slot>() <= 48);
    }

    #[test]
    fn out_of_order_removal_compaction_and_dedup() {
        let mut p = PendingSet::default();
        let uuid = |i: u64| format!("00000000-0000-4000-8000-{i:012x}");
        for seq in 1..=1000 {
            let id = if seq % 10 == 0 {
                format!("other-{seq}")
            } else {
                uuid(seq)
            };
            assert!(p.insert(slot(seq, &id), &id));
        }
        assert!(!p.insert(slot(5, &uuid(5)), &uuid(5)), "a seq once");
        assert_eq!((p.len(), p.bytes()), (1000, 100_000));
        // Every other one, from the back: no front popping, so compaction does the work.
        for seq in (1..=1000).rev().step_by(2) {
            assert_eq!(p.remove(seq).map(|s| s.seq), Some(seq));
            assert_eq!(p.remove(seq), None);
        }
        assert_eq!(p.len(), 500);
        assert!(p.slots.len() <= 1000);
        assert_eq!(p.seqs().count(), 500);
        assert!(p.seqs().all(|s| s % 2 == 1));
        assert_eq!(p.seq_of(&uuid(3)), Some(3));
        assert_eq!(p.seq_of(&uuid(4)), None);
        assert_eq!(p.seq_of("other-10"), None);
        assert_eq!(p.seq_of(&"x".repeat(3)), None);
        assert_eq!(
            p.iter_after(Some(10))
                .map(|s| s.seq)
                .take(3)
                .collect::<Vec<_>>(),
            [11, 13, 15]
        );
        assert_eq!(p.seqs_in(4, 10).collect::<Vec<_>>(), [5, 7, 9]);
        // A late insert in the middle (recovery of a hand-made journal) keeps the order.
        assert!(p.insert(slot(4, "other-4"), "other-4"));
        assert_eq!(p.seqs_in(1, 8).collect::<Vec<_>>(), [1, 3, 4, 5, 7]);
        assert_eq!(p.seq_of("other-4"), Some(4));
        for seq in 1..=1000 {
            p.remove(seq);
        }
        assert_eq!((p.len(), p.bytes(), p.slots.len()), (0, 0, 0));
        assert!(p.by_uuid.is_empty() && p.by_other.is_empty() && p.other_of_seq.is_empty());
    }
}
