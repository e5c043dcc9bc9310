//! Recovery: replay every segment in order, classify each frame, cut a torn tail off the last segment,
//! and report the damage (rules in the module doc).
//!
//! Replay builds the pending index directly: each Append is decoded (to check it and to learn its seq,
//! reading id and cursor) and then only its location is kept — never its payload — so opening a full
//! journal takes no more memory than running it.

use std::collections::BTreeMap;
use std::io::{self, Read};
use std::path::Path;

use super::frame::{self, Checkpoint, DecodeError, Frame, HEADER_LEN, MAX_FRAME_LEN};
use super::index::{PendingSet, Slot};
use super::ranges::RangeSet;
use super::storage::Storage;
use super::{Damage, DamageKind, JournalError, Recovery, segment_path};

/// What a scan found at one offset of a segment.
#[derive(Debug)]
enum Item {
    /// A frame whose CRC matched ("Valid" if `decoded` is `Ok`, else "Undecodable").
    Frame {
        len: u64,
        decoded: Result<Frame, DecodeError>,
    },
    /// The end of the data: end of file, or a frame boundary followed only by zero bytes (the unused,
    /// preallocated rest of the segment).
    End,
    /// A frame that cannot be trusted ("Corrupted", or torn if it is at the tail of the last segment).
    Bad(Bad),
}

/// Why a frame cannot be trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BadReason {
    /// Fewer than 8 bytes left, not all zero.
    PartialHeader,
    /// `len` runs past the end of the file.
    PastEof,
    /// `len` is 0 but the bytes after it are not all zero.
    ZeroLength,
    /// `len` is over [`MAX_FRAME_LEN`] (and within the file).
    TooLong,
    /// The CRC does not match.
    Crc,
}

#[derive(Debug, Clone, Copy)]
struct Bad {
    reason: BadReason,
    /// Where the frame would end by its `len` (only meaningful for `Crc`).
    claimed_end: u64,
    /// One past the last non-zero byte at or after the bad frame's start (the file's zero tail excluded).
    nonzero_end: u64,
}

impl Bad {
    /// Torn-write shape: the damage is the last thing in the file. Only the last segment's tail can be
    /// torn; anywhere else the same shape is corruption.
    fn looks_torn(&self) -> bool {
        match self.reason {
            BadReason::PartialHeader | BadReason::PastEof => true,
            BadReason::Crc => self.nonzero_end <= self.claimed_end,
            BadReason::ZeroLength | BadReason::TooLong => false,
        }
    }
}

/// Reads one segment front to back, one frame at a time (never more than one frame in memory).
struct Scanner {
    r: Box<dyn Read + Send>,
    pos: u64,
    file_len: u64,
}

impl Scanner {
    /// Offset of the next item.
    fn pos(&self) -> u64 {
        self.pos
    }

    fn next(&mut self) -> io::Result<Item> {
        let offset = self.pos;
        let remaining = self.file_len.saturating_sub(offset);
        if remaining == 0 {
            return Ok(Item::End);
        }
        if remaining < HEADER_LEN as u64 {
            let nonzero_end = self.nonzero_end_of_rest(offset, &[])?;
            if nonzero_end == offset {
                return Ok(Item::End);
            }
            return Ok(Item::Bad(Bad {
                reason: BadReason::PartialHeader,
                claimed_end: self.file_len,
                nonzero_end,
            }));
        }
        let mut header = [0u8; HEADER_LEN];
        if let Err(e) = self.r.read_exact(&mut header) {
            return self.short_read(e, offset, &[]);
        }
        let (len, crc) = frame::parse_header(&header);
        let body_start = offset + HEADER_LEN as u64;
        let claimed_end = body_start + u64::from(len);
        let bad = |s: &mut Self, reason, seen: &[u8]| -> io::Result<Item> {
            let nonzero_end = s.nonzero_end_of_rest(offset, seen)?;
            Ok(Item::Bad(Bad {
                reason,
                claimed_end,
                nonzero_end,
            }))
        };
        if len == 0 {
            let nonzero_end = self.nonzero_end_of_rest(offset, &header)?;
            if nonzero_end == offset {
                return Ok(Item::End);
            }
            return Ok(Item::Bad(Bad {
                reason: BadReason::ZeroLength,
                claimed_end,
                nonzero_end,
            }));
        }
        if claimed_end > self.file_len {
            return bad(self, BadReason::PastEof, &header);
        }
        if len > MAX_FRAME_LEN {
            return bad(self, BadReason::TooLong, &header);
        }
        // `len` is at most the file's remaining bytes and at most MAX_FRAME_LEN: safe to allocate.
        let mut body = vec![0u8; len as usize];
        if let Err(e) = self.r.read_exact(&mut body) {
            let mut seen = header.to_vec();
            seen.extend_from_slice(&body);
            return self.short_read(e, offset, &seen);
        }
        if !frame::crc_matches(&body, crc) {
            let mut seen = header.to_vec();
            seen.extend_from_slice(&body);
            return bad(self, BadReason::Crc, &seen);
        }
        self.pos = claimed_end;
        Ok(Item::Frame {
            len: u64::from(len) + HEADER_LEN as u64,
            decoded: frame::decode(&body),
        })
    }

    /// The file was shorter than its metadata said: a torn tail.
    fn short_read(&mut self, e: io::Error, offset: u64, seen: &[u8]) -> io::Result<Item> {
        if e.kind() != io::ErrorKind::UnexpectedEof {
            return Err(e);
        }
        let nonzero_end = last_nonzero(offset, seen).unwrap_or(offset).max(offset + 1);
        Ok(Item::Bad(Bad {
            reason: BadReason::PastEof,
            claimed_end: u64::MAX,
            nonzero_end,
        }))
    }

    /// One past the last non-zero byte from `offset` to the end of the file, where `seen` are the bytes
    /// already read from `offset` on; `offset` itself if they are all zero. Consumes the reader.
    fn nonzero_end_of_rest(&mut self, offset: u64, seen: &[u8]) -> io::Result<u64> {
        let mut end = last_nonzero(offset, seen).unwrap_or(offset);
        let mut at = offset + seen.len() as u64;
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            let n = match self.r.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if let Some(e) = last_nonzero(at, chunk.get(..n).unwrap_or(&[])) {
                end = e;
            }
            at += n as u64;
        }
        Ok(end)
    }
}

/// One past the last non-zero byte of `bytes`, which start at `base`.
fn last_nonzero(base: u64, bytes: &[u8]) -> Option<u64> {
    bytes
        .iter()
        .rposition(|&b| b != 0)
        .map(|i| base + i as u64 + 1)
}

/// The journal's state as read back from disk.
#[derive(Debug, Default)]
pub(super) struct Recovered {
    pub pending: PendingSet,
    pub cursors: BTreeMap<String, u64>,
    pub next_seq: u64,
    pub report: Recovery,
    /// Per segment, the highest seq it holds an Append of (what [`super::KeepAfter`] keeps on disk).
    pub last_seq: BTreeMap<u64, u64>,
    /// The readable records (acked or not) after `replay_after`, in seq order.
    pub replay: Vec<super::Record>,
}

/// Replays the segments `ids` (ascending) of `dir`. Cuts a torn tail off the last one. The records after
/// seq `replay_after`, acked or not, are kept whole in [`Recovered::replay`].
pub(super) fn recover(
    storage: &dyn Storage,
    dir: &Path,
    ids: &[u64],
    replay_after: Option<u64>,
) -> Result<Recovered, JournalError> {
    let mut st = Recovered {
        next_seq: 1,
        ..Recovered::default()
    };
    // Seqs a checkpoint said were pending but whose Append was not found (and that were not acked later).
    let mut missing = RangeSet::default();
    st.report.segments = ids.len();

    for (i, &id) in ids.iter().enumerate() {
        let is_last = i + 1 == ids.len();
        let path = segment_path(dir, id);
        let io_err = |op, source| JournalError::Io {
            op,
            path: path.clone(),
            source,
        };
        let (r, file_len) = storage
            .open_read(&path)
            .map_err(|e| io_err("open segment", e))?;
        let mut scan = Scanner {
            r,
            pos: 0,
            file_len,
        };
        loop {
            let offset = scan.pos();
            match scan.next().map_err(|e| io_err("read segment", e))? {
                Item::End => break,
                Item::Frame {
                    len,
                    decoded: Ok(f),
                } => {
                    if let Frame::Append(r) = &f {
                        let last = st.last_seq.entry(id).or_insert(r.seq);
                        *last = (*last).max(r.seq);
                        if replay_after.is_some_and(|after| r.seq > after) {
                            st.replay.push(r.clone());
                        }
                    }
                    apply(&mut st, &mut missing, &path, id, offset, len, f)?
                }
                Item::Frame {
                    len,
                    decoded: Err(why),
                } => {
                    tracing::warn!(segment = %path.display(), offset, frame_bytes = len, %why,
                        "journal: skipping an undecodable frame (CRC valid)");
                    st.report.undecodable_frames += 1;
                    st.report.damage.push(Damage {
                        segment: path.clone(),
                        offset,
                        kind: DamageKind::Undecodable { frame_bytes: len },
                    });
                }
                Item::Bad(bad) if is_last && bad.looks_torn() => {
                    let bytes = bad.nonzero_end.saturating_sub(offset).max(1);
                    tracing::warn!(segment = %path.display(), offset, bytes, reason = ?bad.reason,
                        "journal: torn write at the tail (never acknowledged to anyone); cutting it off");
                    storage
                        .truncate(&path, offset)
                        .map_err(|e| io_err("truncate torn tail", e))?;
                    st.report.torn_bytes += bytes;
                    st.report.damage.push(Damage {
                        segment: path.clone(),
                        offset,
                        kind: DamageKind::Torn { bytes },
                    });
                    break;
                }
                Item::Bad(bad) => {
                    let unreadable = bad.nonzero_end.saturating_sub(offset);
                    tracing::error!(segment = %path.display(), offset, unreadable_bytes = unreadable, reason = ?bad.reason,
                        "journal: corrupt frame; the rest of this segment cannot be read");
                    st.report.corrupt_frames += 1;
                    st.report.unreadable_bytes += unreadable;
                    st.report.damage.push(Damage {
                        segment: path.clone(),
                        offset,
                        kind: DamageKind::Corrupt {
                            unreadable_bytes: unreadable,
                        },
                    });
                    break;
                }
            }
        }
    }

    st.report.missing_records = missing.len();
    if st.report.missing_records > 0 {
        tracing::error!(
            missing = st.report.missing_records,
            "journal: records that were accepted and not yet delivered could not be read back"
        );
    }
    st.report.records = st.pending.len() as u64;
    st.report.pending_bytes = st.pending.bytes();
    st.report.next_seq = st.next_seq;
    st.replay.sort_by_key(|r| r.seq);
    st.replay.dedup_by_key(|r| r.seq);
    Ok(st)
}

/// Applies one valid frame of segment `segment`, `len` bytes at `offset`.
fn apply(
    st: &mut Recovered,
    missing: &mut RangeSet,
    path: &Path,
    segment: u64,
    offset: u64,
    len: u64,
    f: Frame,
) -> Result<(), JournalError> {
    match f {
        Frame::Append(record) => {
            let seq = record.seq;
            // `decode` rejects seq 0 and u64::MAX.
            st.next_seq = st.next_seq.max(seq + 1);
            if let Some(ds) = record.device_seq {
                let c = st.cursors.entry(record.device.clone()).or_insert(ds);
                *c = (*c).max(ds);
            }
            missing.remove((seq, seq + 1));
            // The scanner caps a frame at MAX_FRAME_LEN + header, far below u32::MAX; should that ever
            // change, the record is reported, not dropped in silence.
            let Ok(len) = u32::try_from(len) else {
                tracing::error!(segment = %path.display(), offset, seq, frame_bytes = len,
                    "journal: an Append frame too large to index; skipping it");
                st.report.undecodable_frames += 1;
                st.report.damage.push(Damage {
                    segment: path.to_owned(),
                    offset,
                    kind: DamageKind::Undecodable { frame_bytes: len },
                });
                return Ok(());
            };
            let slot = Slot::of_frame(seq, segment, offset, len, &record.reading_id);
            if !st.pending.insert(slot, &record.reading_id) {
                tracing::warn!(segment = %path.display(), seq, "journal: a second Append of one seq; keeping the first");
            }
            // `record` (payload and all) is dropped here: only its location stays in memory.
        }
        Frame::Ack(ranges) => {
            for (s, e) in ranges {
                let acked: Vec<u64> = st.pending.seqs_in(s, e).collect();
                for k in acked {
                    st.pending.remove(k);
                }
                missing.remove((s, e));
            }
        }
        Frame::Checkpoint(cp) => apply_checkpoint(st, missing, path, cp)?,
    }
    Ok(())
}

fn apply_checkpoint(
    st: &mut Recovered,
    missing: &mut RangeSet,
    path: &Path,
    cp: Checkpoint,
) -> Result<(), JournalError> {
    if cp.version != frame::FORMAT_VERSION {
        return Err(JournalError::UnsupportedFormat {
            path: path.to_owned(),
            version: cp.version,
            supported: frame::FORMAT_VERSION,
        });
    }
    st.next_seq = st.next_seq.max(cp.next_seq);
    for (device, ds) in cp.cursors {
        let c = st.cursors.entry(device).or_insert(ds);
        *c = (*c).max(ds);
    }
    let in_cp = |seq: u64| {
        // `cp.pending` is what this journal wrote: sorted and disjoint; binary search it.
        let i = cp.pending.partition_point(|&(_, e)| e <= seq);
        cp.pending.get(i).is_some_and(|&(s, _)| s <= seq)
    };
    // Everything below the checkpoint's next_seq that it does not list as pending had been acked.
    let acked: Vec<u64> = st
        .pending
        .seqs_in(0, cp.next_seq)
        .filter(|&k| !in_cp(k))
        .collect();
    for k in acked {
        st.pending.remove(k);
    }
    missing.retain_within(&RangeSet::from_ranges(cp.pending.clone()), cp.next_seq);
    // Listed as pending but no Append seen: lost, unless a later Ack or checkpoint says it was acked.
    for &(s, e) in &cp.pending {
        let mut at = s;
        for k in st.pending.seqs_in(s, e) {
            if k > at {
                missing.insert((at, k));
            }
            at = k + 1;
        }
        if at < e {
            missing.insert((at, e));
        }
    }
    Ok(())
}
