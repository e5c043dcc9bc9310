//! The on-disk frame and the three body codecs (see the module doc for the layout).
//!
//! Encoding writes into a caller's `Vec<u8>` so that a whole group commit becomes one buffer and one
//! `write`. Decoding is for untrusted bytes: every read goes through [`Cursor`], which checks the length
//! before it takes anything and never indexes blindly, and every count from the disk is capped before it
//! sizes an allocation.

use std::collections::BTreeMap;

/// `len: u32 LE | crc32: u32 LE`.
pub(super) const HEADER_LEN: usize = 8;

/// The largest `len` a reader accepts (kind + body). Larger is damage, not data: the writer never makes
/// an Append frame above [`MAX_RECORD_FRAME`] and a checkpoint of a valid configuration stays far below.
pub(super) const MAX_FRAME_LEN: u32 = 64 << 20;

/// The largest whole Append frame (header included) the writer accepts: a reading is a few hundred bytes.
pub(super) const MAX_RECORD_FRAME: usize = 1 << 20;

/// The on-disk format version, carried by every Checkpoint.
pub(super) const FORMAT_VERSION: u8 = 1;

/// Frame kinds.
pub(super) const KIND_APPEND: u8 = 1;
pub(super) const KIND_ACK: u8 = 2;
pub(super) const KIND_CHECKPOINT: u8 = 3;

/// Bytes one `[start, end)` seq range takes in an Ack or Checkpoint body.
pub(super) const RANGE_LEN: usize = 16;

/// Ranges per Ack frame; a larger ack is split into several frames (still one write, one fdatasync).
pub(super) const MAX_ACK_RANGES: usize = 64 * 1024;

/// A half-open range of journal seqs, `start < end`.
pub(super) type SeqRange = (u64, u64);

/// One decoded Append body (the record) — the same fields as [`super::Record`].
pub(super) type AppendBody = super::Record;

/// A decoded Checkpoint body.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(super) struct Checkpoint {
    /// The format version that wrote the segment.
    pub version: u8,
    /// The next seq the journal would have assigned when the segment was created.
    pub next_seq: u64,
    /// The seqs below `next_seq` that were still pending; every other seq below `next_seq` was acked.
    pub pending: Vec<SeqRange>,
    /// Per device, the highest device sequence number ever accepted.
    pub cursors: BTreeMap<String, u64>,
}

/// A frame whose CRC matched, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Frame {
    Append(AppendBody),
    Ack(Vec<SeqRange>),
    Checkpoint(Checkpoint),
}

/// Why a CRC-valid frame could not be decoded ("Undecodable").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum DecodeError {
    /// A kind this version does not know.
    UnknownKind(u8),
    /// The body ended before a field did.
    Truncated,
    /// Bytes left over after the last field.
    TrailingBytes,
    /// A string field was not UTF-8.
    BadUtf8,
    /// An option tag other than 0 or 1.
    BadTag,
    /// A seq range with `start >= end`, a seq of 0 or `u64::MAX`, or a checkpoint range at or past `next_seq`.
    BadSeq,
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::UnknownKind(k) => write!(f, "unknown frame kind {k}"),
            DecodeError::Truncated => f.write_str("body truncated"),
            DecodeError::TrailingBytes => f.write_str("trailing bytes after body"),
            DecodeError::BadUtf8 => f.write_str("string field not UTF-8"),
            DecodeError::BadTag => f.write_str("bad option tag"),
            DecodeError::BadSeq => f.write_str("bad seq or seq range"),
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------------------------------

/// Starts a frame of `kind` at the end of `out`; returns its start for [`end_frame`].
fn begin_frame(out: &mut Vec<u8>, kind: u8) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0u8; HEADER_LEN]);
    out.push(kind);
    start
}

/// Fills in `len` and `crc32` of the frame begun at `start`. Returns the whole frame's length.
///
/// The callers cap what they put in a frame well below `u32::MAX`; the `try_from` is the proof.
fn end_frame(out: &mut [u8], start: usize) -> Result<usize, FrameTooLarge> {
    let frame_len = out.len().checked_sub(start).ok_or(FrameTooLarge)?;
    let (header, kind_and_body) = out
        .get_mut(start..)
        .ok_or(FrameTooLarge)?
        .split_at_mut(HEADER_LEN);
    let len = u32::try_from(kind_and_body.len()).map_err(|_| FrameTooLarge)?;
    if len > MAX_FRAME_LEN {
        return Err(FrameTooLarge);
    }
    let crc = crc32fast::hash(kind_and_body);
    header[..4].copy_from_slice(&len.to_le_bytes());
    header[4..].copy_from_slice(&crc.to_le_bytes());
    Ok(frame_len)
}

/// A frame would exceed [`MAX_FRAME_LEN`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct FrameTooLarge;

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) -> Result<(), FrameTooLarge> {
    put_u32(out, u32::try_from(b.len()).map_err(|_| FrameTooLarge)?);
    out.extend_from_slice(b);
    Ok(())
}

/// The exact encoded length of an Append frame (header included) for these fields, without encoding it.
/// Saturates instead of overflowing; anything near the saturation point is rejected as too large anyway.
pub(super) fn append_frame_len(
    device: &str,
    reading_id: &str,
    topic: &str,
    payload: &[u8],
    has_device_seq: bool,
) -> usize {
    let fixed = HEADER_LEN + 1 /* kind */ + 8 /* seq */ + 1 /* tag */ + 4 * 4 /* length prefixes */;
    fixed
        .saturating_add(if has_device_seq { 8 } else { 0 })
        .saturating_add(device.len())
        .saturating_add(reading_id.len())
        .saturating_add(topic.len())
        .saturating_add(payload.len())
}

/// Appends one Append frame to `out`. Returns the frame's length.
pub(super) fn encode_append(
    out: &mut Vec<u8>,
    seq: u64,
    device: &str,
    device_seq: Option<u64>,
    reading_id: &str,
    topic: &str,
    payload: &[u8],
) -> Result<usize, FrameTooLarge> {
    let start = begin_frame(out, KIND_APPEND);
    put_u64(out, seq);
    match device_seq {
        None => out.push(0),
        Some(s) => {
            out.push(1);
            put_u64(out, s);
        }
    }
    put_bytes(out, device.as_bytes())?;
    put_bytes(out, reading_id.as_bytes())?;
    put_bytes(out, topic.as_bytes())?;
    put_bytes(out, payload)?;
    end_frame(out, start)
}

/// Appends Ack frames for `ranges` (sorted, disjoint) to `out`, [`MAX_ACK_RANGES`] per frame.
pub(super) fn encode_acks(out: &mut Vec<u8>, ranges: &[SeqRange]) -> Result<(), FrameTooLarge> {
    for chunk in ranges.chunks(MAX_ACK_RANGES) {
        let start = begin_frame(out, KIND_ACK);
        put_u32(out, u32::try_from(chunk.len()).map_err(|_| FrameTooLarge)?);
        for &(s, e) in chunk {
            put_u64(out, s);
            put_u64(out, e);
        }
        end_frame(out, start)?;
    }
    Ok(())
}

/// Appends one Checkpoint frame to `out`. Returns the frame's length.
pub(super) fn encode_checkpoint(
    out: &mut Vec<u8>,
    next_seq: u64,
    pending: &[SeqRange],
    cursors: &BTreeMap<String, u64>,
) -> Result<usize, FrameTooLarge> {
    let start = begin_frame(out, KIND_CHECKPOINT);
    out.push(FORMAT_VERSION);
    put_u64(out, next_seq);
    put_u32(
        out,
        u32::try_from(pending.len()).map_err(|_| FrameTooLarge)?,
    );
    for &(s, e) in pending {
        put_u64(out, s);
        put_u64(out, e);
    }
    put_u32(
        out,
        u32::try_from(cursors.len()).map_err(|_| FrameTooLarge)?,
    );
    for (device, seq) in cursors {
        put_bytes(out, device.as_bytes())?;
        put_u64(out, *seq);
    }
    end_frame(out, start)
}

// ---------------------------------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------------------------------

/// Parses a frame header: `(len, crc)`.
pub(super) fn parse_header(header: &[u8; HEADER_LEN]) -> (u32, u32) {
    let [l0, l1, l2, l3, c0, c1, c2, c3] = *header;
    (
        u32::from_le_bytes([l0, l1, l2, l3]),
        u32::from_le_bytes([c0, c1, c2, c3]),
    )
}

/// Whether `kind_and_body` matches `crc`.
pub(super) fn crc_matches(kind_and_body: &[u8], crc: u32) -> bool {
    crc32fast::hash(kind_and_body) == crc
}

/// Decodes a CRC-checked `kind + body`.
pub(super) fn decode(kind_and_body: &[u8]) -> Result<Frame, DecodeError> {
    let (&kind, body) = kind_and_body.split_first().ok_or(DecodeError::Truncated)?;
    let mut c = Cursor(body);
    let frame = match kind {
        KIND_APPEND => {
            let seq = c.u64()?;
            if seq == 0 || seq == u64::MAX {
                return Err(DecodeError::BadSeq);
            }
            let device_seq = match c.u8()? {
                0 => None,
                1 => Some(c.u64()?),
                _ => return Err(DecodeError::BadTag),
            };
            let device = c.string()?;
            let reading_id = c.string()?;
            let topic = c.string()?;
            let payload = c.bytes()?.to_vec();
            Frame::Append(AppendBody {
                seq,
                device,
                device_seq,
                reading_id,
                topic,
                payload,
            })
        }
        KIND_ACK => Frame::Ack(c.ranges()?),
        KIND_CHECKPOINT => {
            let version = c.u8()?;
            if version != FORMAT_VERSION {
                // The rest is another version's layout: hand the version up, do not guess.
                return Ok(Frame::Checkpoint(Checkpoint {
                    version,
                    ..Checkpoint::default()
                }));
            }
            let next_seq = c.u64()?;
            let pending = c.ranges()?;
            // What the writer makes: sorted, disjoint, all below next_seq (recovery binary-searches it).
            let sorted = pending
                .windows(2)
                .all(|w| matches!(w, [(_, e0), (s1, _)] if e0 < s1));
            if !sorted || pending.last().is_some_and(|&(_, e)| e > next_seq) {
                return Err(DecodeError::BadSeq);
            }
            let n = c.count(4 + 8)?;
            let mut cursors = BTreeMap::new();
            for _ in 0..n {
                let device = c.string()?;
                let seq = c.u64()?;
                cursors.insert(device, seq);
            }
            Frame::Checkpoint(Checkpoint {
                version,
                next_seq,
                pending,
                cursors,
            })
        }
        other => return Err(DecodeError::UnknownKind(other)),
    };
    if !c.0.is_empty() {
        return Err(DecodeError::TrailingBytes);
    }
    Ok(frame)
}

/// A checked reader over a body: every getter checks the length first.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if n > self.0.len() {
            return Err(DecodeError::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A `u32` count of items of at least `min_item_len` bytes each, checked against what is left so that
    /// a damaged count cannot size an allocation.
    fn count(&mut self, min_item_len: usize) -> Result<usize, DecodeError> {
        let n = usize::try_from(self.u32()?).map_err(|_| DecodeError::Truncated)?;
        match n.checked_mul(min_item_len) {
            Some(need) if need <= self.0.len() => Ok(n),
            _ => Err(DecodeError::Truncated),
        }
    }

    fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = usize::try_from(self.u32()?).map_err(|_| DecodeError::Truncated)?;
        self.take(n)
    }

    fn string(&mut self) -> Result<String, DecodeError> {
        let b = self.bytes()?;
        std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|_| DecodeError::BadUtf8)
    }

    fn ranges(&mut self) -> Result<Vec<SeqRange>, DecodeError> {
        let n = self.count(RANGE_LEN)?;
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            let s = self.u64()?;
            let e = self.u64()?;
            if s == 0 || s >= e {
                return Err(DecodeError::BadSeq);
            }
            v.push((s, e));
        }
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn one_frame(buf: &[u8]) -> Result<Frame, DecodeError> {
        let header: [u8; HEADER_LEN] = buf[..HEADER_LEN].try_into().unwrap();
        let (len, crc) = parse_header(&header);
        let body = &buf[HEADER_LEN..];
        assert_eq!(len as usize, body.len());
        assert!(crc_matches(body, crc));
        decode(body)
    }

    /// Known-answer bytes for one Append frame: the layout in the module doc, byte for byte. The CRC was
    /// computed independently (Python `zlib.crc32` over kind+body), so this pins both the layout and the
    /// polynomial.
    const APPEND_FRAME: &[u8] = &[
        0x2a, 0x00, 0x00, 0x00, // len = 42 (kind + body)
        0x83, 0xaa, 0x18, 0x99, // crc32 = 0x9918aa83
        0x01, // kind = Append
        0x07, 0, 0, 0, 0, 0, 0, 0, // seq = 7
        0x01, 0x2a, 0, 0, 0, 0, 0, 0, 0, // device_seq = Some(42)
        0x02, 0, 0, 0, b'd', b'1', // device = "d1"
        0x02, 0, 0, 0, b'r', b'1', // reading_id = "r1"
        0x01, 0, 0, 0, b't', // topic = "t"
        0x03, 0, 0, 0, 0xa5, 0x00, 0xff, // payload
    ];

    #[test]
    fn append_frame_known_answer() {
        let mut out = Vec::new();
        let n = encode_append(&mut out, 7, "d1", Some(42), "r1", "t", &[0xa5, 0x00, 0xff]).unwrap();
        assert_eq!(out, APPEND_FRAME);
        assert_eq!(n, APPEND_FRAME.len());
        assert_eq!(
            append_frame_len("d1", "r1", "t", &[0xa5, 0x00, 0xff], true),
            n
        );
        assert_eq!(
            one_frame(&out).unwrap(),
            Frame::Append(AppendBody {
                seq: 7,
                device: "d1".into(),
                device_seq: Some(42),
                reading_id: "r1".into(),
                topic: "t".into(),
                payload: vec![0xa5, 0x00, 0xff],
            })
        );
    }

    #[test]
    fn ack_and_checkpoint_round_trip() {
        let mut out = Vec::new();
        encode_acks(&mut out, &[(1, 3), (9, 10)]).unwrap();
        assert_eq!(one_frame(&out).unwrap(), Frame::Ack(vec![(1, 3), (9, 10)]));

        let mut cursors = BTreeMap::new();
        cursors.insert("meter".to_string(), 12);
        cursors.insert("cuff".to_string(), u64::MAX);
        let mut out = Vec::new();
        encode_checkpoint(&mut out, 20, &[(4, 5), (10, 20)], &cursors).unwrap();
        assert_eq!(
            one_frame(&out).unwrap(),
            Frame::Checkpoint(Checkpoint {
                version: FORMAT_VERSION,
                next_seq: 20,
                pending: vec![(4, 5), (10, 20)],
                cursors
            })
        );
    }

    #[test]
    fn undecodable_bodies_are_errors() {
        assert_eq!(decode(&[]), Err(DecodeError::Truncated));
        assert_eq!(decode(&[9]), Err(DecodeError::UnknownKind(9)));
        // Ack with a count far larger than the body.
        assert_eq!(
            decode(&[KIND_ACK, 0xff, 0xff, 0xff, 0xff]),
            Err(DecodeError::Truncated)
        );
        // Ack range with start >= end.
        let mut b = vec![KIND_ACK, 1, 0, 0, 0];
        b.extend_from_slice(&5u64.to_le_bytes());
        b.extend_from_slice(&5u64.to_le_bytes());
        assert_eq!(decode(&b), Err(DecodeError::BadSeq));
        // Trailing byte after a valid Ack.
        let mut b = vec![KIND_ACK, 0, 0, 0, 0, 0];
        assert_eq!(decode(&b), Err(DecodeError::TrailingBytes));
        b.pop();
        assert_eq!(decode(&b), Ok(Frame::Ack(vec![])));
        // Append with seq 0.
        let mut out = Vec::new();
        encode_append(&mut out, 0, "d", None, "r", "t", b"p").unwrap();
        assert_eq!(decode(&out[HEADER_LEN..]), Err(DecodeError::BadSeq));
        // Append with a bad option tag.
        let mut out = Vec::new();
        encode_append(&mut out, 1, "d", None, "r", "t", b"p").unwrap();
        out[HEADER_LEN + 9] = 2;
        assert_eq!(decode(&out[HEADER_LEN..]), Err(DecodeError::BadTag));
        // Append with a non-UTF-8 device.
        let mut out = Vec::new();
        encode_append(&mut out, 1, "d", None, "r", "t", b"p").unwrap();
        out[HEADER_LEN + 14] = 0xff;
        assert_eq!(decode(&out[HEADER_LEN..]), Err(DecodeError::BadUtf8));
        // A checkpoint of a future version is handed up, not guessed at.
        assert_eq!(
            decode(&[KIND_CHECKPOINT, 2, 0xde, 0xad]),
            Ok(Frame::Checkpoint(Checkpoint {
                version: 2,
                ..Checkpoint::default()
            }))
        );
    }

    proptest! {
        /// Decoding never panics on any bytes.
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(&bytes);
        }

        /// Encode → decode round-trips every Append.
        #[test]
        fn append_round_trips(
            seq in 1u64..u64::MAX,
            device in ".{0,12}",
            device_seq in proptest::option::of(any::<u64>()),
            reading_id in ".{0,12}",
            topic in ".{0,12}",
            payload in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let mut out = Vec::new();
            let n = encode_append(&mut out, seq, &device, device_seq, &reading_id, &topic, &payload).unwrap();
            prop_assert_eq!(n, out.len());
            prop_assert_eq!(append_frame_len(&device, &reading_id, &topic, &payload, device_seq.is_some()), n);
            let want = Frame::Append(AppendBody { seq, device, device_seq, reading_id, topic, payload });
            prop_assert_eq!(one_frame(&out).unwrap(), want);
        }
    }
}
