//! The kiosk card-reader link: the serial protocol between the companion board (`firmware`) and the
//! gateway (`gateway::sources::card_reader`). One definition, used by both ends.
//!
//! # Messages
//!
//! Board → gateway ([`BoardMessage`]): `Ack`, `Hello` (firmware version, board id, whether the card reader
//! answered), `CardPresented` (the card's UID: 4, 7 or 10 bytes, ISO/IEC 14443-3 §6.5.4), `Heartbeat`,
//! `Fault` (the reader stopped answering). Gateway → board ([`GatewayMessage`]): `Ack`, `Show` (the LED and
//! buzzer pattern: ready, checked in, measuring, result ok, see a nurse, error), `Ping`.
//!
//! # Frame
//!
//! ```text
//! 0x00 | COBS( seq: u8 | postcard(message) | CRC-16 little-endian ) | 0x00
//! ```
//!
//! - `seq` numbers the sender's frames (wrapping). An `Ack` frame carries the `seq` of the frame it
//!   acknowledges.
//! - The message is postcard (its wire format: `spec/src/wire-format.md` of the postcard repository): an
//!   enum is its variant index as a varint, a `u32` a varint, a `bool` one byte, the UID a byte string
//!   (length, then the bytes).
//! - The CRC is CRC-16/IBM-SDLC (the HDLC and X.25 frame check sequence: poly 0x1021 reflected, init and
//!   xorout 0xFFFF) over `seq` and the message.
//! - COBS (Cheshire & Baker, IEEE/ACM ToN 1999) removes every 0x00 from the frame so 0x00 only delimits.
//!   A frame is *preceded* by a delimiter too: line noise before a frame then ends as a frame of its own
//!   (dropped) instead of corrupting the next good one. Empty frames (two delimiters in a row) are ignored.
//! - A decoded frame is at most [`MAX_FRAME`] bytes; a receiver keeps at most [`MAX_ENCODED`] bytes of an
//!   unfinished frame and drops a longer one whole, at its closing delimiter.
//!
//! Known answers (CRC-16/IBM-SDLC checked independently: its check value over "123456789" is 0x906E; these
//! bytes are asserted by this doc test, so the spec cannot drift from the code):
//!
//! ```
//! use protocol::link::*;
//! let mut wire = [0u8; MAX_WIRE];
//! // Board frame 0: Hello { firmware 0.1.0, board id 0x12345678, reader ok }.
//! let hello = BoardMessage::Hello(Hello {
//!     firmware: FirmwareVersion { major: 0, minor: 1, patch: 0 },
//!     board_id: 0x1234_5678,
//!     reader_ok: true,
//! });
//! let n = encode_frame(0, &hello, &mut wire).unwrap();
//! assert_eq!(
//!     wire[..n],
//!     [0x00, 0x01, 0x02, 0x01, 0x02, 0x01, 0x09, 0xF8, 0xAC, 0xD1, 0x91, 0x01, 0x01, 0x74, 0xE1, 0x00]
//! );
//! // Board frame 5: CardPresented, UID 04 A2 2B 1A (a 4-byte NUID).
//! let card = BoardMessage::CardPresented(Uid::new(&[0x04, 0xA2, 0x2B, 0x1A]).unwrap());
//! let n = encode_frame(5, &card, &mut wire).unwrap();
//! assert_eq!(wire[..n], [0x00, 0x0A, 0x05, 0x02, 0x04, 0x04, 0xA2, 0x2B, 0x1A, 0x56, 0xE9, 0x00]);
//! // Gateway: Ack of board frame 5; Show(CheckedIn) as gateway frame 2; Ping as gateway frame 3.
//! let n = encode_frame(5, &GatewayMessage::Ack, &mut wire).unwrap();
//! assert_eq!(wire[..n], [0x00, 0x02, 0x05, 0x03, 0xFF, 0x71, 0x00]);
//! let n = encode_frame(2, &GatewayMessage::Show(Indication::CheckedIn), &mut wire).unwrap();
//! assert_eq!(wire[..n], [0x00, 0x06, 0x02, 0x01, 0x01, 0x25, 0x7B, 0x00]);
//! let n = encode_frame(3, &GatewayMessage::Ping, &mut wire).unwrap();
//! assert_eq!(wire[..n], [0x00, 0x05, 0x03, 0x02, 0x3D, 0x06, 0x00]);
//! ```
//!
//! # Reliable delivery
//!
//! Stop and wait, per direction ([`Endpoint`]): a sender has at most one unacknowledged frame in flight and
//! retransmits it every [`Timing::retry_ms`] until acknowledged, at most [`Timing::attempts`] times in all;
//! then it gives the frame up (counted) and goes on with the next queued message, so a dead peer can never
//! stall the queue forever. The receiver acknowledges every data frame it decodes, duplicates included (the
//! first `Ack` may have been the one lost), and delivers a sequence number once. `Hello` and `Ping` are
//! always delivered: they are harmless to repeat, and they resynchronise a receiver whose peer restarted
//! and numbers its frames from 0 again.
//!
//! # Damage
//!
//! Corrupted (bad COBS or CRC), truncated (shorter than a sequence number and a CRC), oversized, and
//! undecodable (right CRC, unknown message) frames are dropped and counted in [`Counters`]; the decoder
//! resynchronises at the next delimiter. It never panics, and its memory is a fixed array.
//!
//! Time is passed in (milliseconds from any monotonic origin): no clock and no I/O here.

use serde::{Deserialize, Serialize};

/// The largest decoded frame: sequence number, message and CRC. The largest message (`CardPresented` with
/// a 10-byte UID, or `Hello` with a 5-byte board id varint) needs 16; the rest is room to grow.
pub const MAX_FRAME: usize = 32;
/// The largest COBS-encoded frame without its delimiters (COBS adds one byte per 254 and one more).
pub const MAX_ENCODED: usize = MAX_FRAME + 2;
/// The most bytes one frame takes on the wire, both delimiters included: the size of a transmit buffer.
pub const MAX_WIRE: usize = MAX_ENCODED + 2;

const CRC: crc::Crc<u16> = crc::Crc::<u16>::new(&crc::CRC_16_IBM_SDLC);
const CRC_LEN: usize = 2;

/// The board's firmware version (semantic versioning).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirmwareVersion {
    /// Major.
    pub major: u8,
    /// Minor.
    pub minor: u8,
    /// Patch.
    pub patch: u8,
}

/// What the board says when it starts (and when its reader recovers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The firmware's version.
    pub firmware: FirmwareVersion,
    /// A number identifying the board (folded from the MCU's unique id): which board is plugged in.
    pub board_id: u32,
    /// Whether the card reader answered at start.
    pub reader_ok: bool,
}

/// A card's UID (ISO/IEC 14443-3 §6.5.4: single, double or triple size: 4, 7 or 10 bytes).
///
/// A UID identifies a patient's card, so its `Debug` shows only its size: it must never reach a log.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Uid {
    len: u8,
    bytes: [u8; 10],
}

impl Uid {
    /// A UID from its bytes; `None` unless there are 4, 7 or 10 of them.
    pub fn new(bytes: &[u8]) -> Option<Self> {
        if !matches!(bytes.len(), 4 | 7 | 10) {
            return None;
        }
        let mut uid = Self {
            len: 0,
            bytes: [0; 10],
        };
        uid.bytes.get_mut(..bytes.len())?.copy_from_slice(bytes);
        uid.len = u8::try_from(bytes.len()).ok()?;
        Some(uid)
    }

    /// The UID's bytes (4, 7 or 10).
    pub fn as_bytes(&self) -> &[u8] {
        self.bytes.get(..usize::from(self.len)).unwrap_or(&[])
    }
}

impl core::fmt::Debug for Uid {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Uid({} bytes)", self.len)
    }
}

impl Serialize for Uid {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(self.as_bytes())
    }
}

impl<'de> Deserialize<'de> for Uid {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct UidVisitor;
        impl serde::de::Visitor<'_> for UidVisitor {
            type Value = Uid;
            fn expecting(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                f.write_str("a card UID of 4, 7 or 10 bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Uid, E> {
                Uid::new(v).ok_or_else(|| E::invalid_length(v.len(), &self))
            }
        }
        deserializer.deserialize_bytes(UidVisitor)
    }
}

/// Why the board's card reader is not working.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReaderFault {
    /// The reader does not answer on its bus (its version register reads 0x00 or 0xFF: unplugged,
    /// unpowered or in reset).
    NotResponding,
    /// The bus itself reported an error.
    Bus,
    /// The reader answered but could not be initialised.
    Init,
}

/// What the board shows with its LEDs and buzzer (`firmware::indicator` has each pattern).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Indication {
    /// Waiting for a card.
    Ready,
    /// The card was recognised: the patient is checked in.
    CheckedIn,
    /// A measurement is under way.
    Measuring,
    /// The result is in and needs nothing more.
    ResultOk,
    /// The result needs a nurse (CLINICAL.md).
    SeeANurse,
    /// Something went wrong (unknown card, gateway fault).
    Error,
}

/// Board → gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BoardMessage {
    /// Acknowledges the gateway frame whose sequence number this frame carries.
    Ack,
    /// The board (re)started, or its reader recovered.
    Hello(Hello),
    /// A card was put on the reader (once per presentation: a held card is not presented again).
    CardPresented(Uid),
    /// The board is alive (sent periodically).
    Heartbeat,
    /// The card reader stopped working (reported once per fault; a `Hello` follows its recovery).
    Fault(ReaderFault),
}

/// Gateway → board.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GatewayMessage {
    /// Acknowledges the board frame whose sequence number this frame carries.
    Ack,
    /// Show this pattern.
    Show(Indication),
    /// Are you there? (Answered by the `Ack` every frame gets.)
    Ping,
}

/// A message type that travels over the link.
pub trait Message: Serialize + for<'de> Deserialize<'de> + Copy {
    /// The acknowledgement.
    const ACK: Self;
    /// Whether this is the acknowledgement.
    fn is_ack(&self) -> bool;
    /// Whether a receiver always delivers it, duplicate or not (harmless to repeat, and it starts a
    /// sender's numbering afresh after a restart).
    fn resynchronises(&self) -> bool;
}

impl Message for BoardMessage {
    const ACK: Self = Self::Ack;
    fn is_ack(&self) -> bool {
        matches!(self, Self::Ack)
    }
    fn resynchronises(&self) -> bool {
        matches!(self, Self::Hello(_))
    }
}

impl Message for GatewayMessage {
    const ACK: Self = Self::Ack;
    fn is_ack(&self) -> bool {
        matches!(self, Self::Ack)
    }
    fn resynchronises(&self) -> bool {
        matches!(self, Self::Ping)
    }
}

/// Why a frame was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FrameError {
    /// Invalid COBS or a CRC mismatch: damaged on the way.
    Corrupt,
    /// Too short to hold a sequence number and a CRC.
    Truncated,
    /// Longer than [`MAX_ENCODED`] before its delimiter.
    Oversized,
    /// The CRC matched but the bytes are no message this end knows (a newer peer?).
    Undecodable,
}

/// Why a frame could not be encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum EncodeError {
    /// The message does not fit [`MAX_FRAME`] or the output buffer (a programming error).
    TooLarge,
}

/// Encodes one frame, delimiters included, into `out`; returns its length (at most [`MAX_WIRE`]).
///
/// # Errors
///
/// [`EncodeError::TooLarge`] if the message does not fit [`MAX_FRAME`] or `out`.
pub fn encode_frame<M: Message>(
    seq: u8,
    message: &M,
    out: &mut [u8],
) -> Result<usize, EncodeError> {
    let mut frame = [0u8; MAX_FRAME];
    let (first, rest) = frame.split_first_mut().ok_or(EncodeError::TooLarge)?;
    *first = seq;
    let body_len = postcard::to_slice(message, rest)
        .map_err(|_| EncodeError::TooLarge)?
        .len();
    let crc_at = body_len.checked_add(1).ok_or(EncodeError::TooLarge)?;
    let crc_end = crc_at.checked_add(CRC_LEN).ok_or(EncodeError::TooLarge)?;
    let crc = CRC.checksum(frame.get(..crc_at).ok_or(EncodeError::TooLarge)?);
    frame
        .get_mut(crc_at..crc_end)
        .ok_or(EncodeError::TooLarge)?
        .copy_from_slice(&crc.to_le_bytes());
    let (lead, body) = out.split_first_mut().ok_or(EncodeError::TooLarge)?;
    *lead = 0;
    let n = cobs::try_encode(frame.get(..crc_end).ok_or(EncodeError::TooLarge)?, body)
        .map_err(|_| EncodeError::TooLarge)?;
    let end = n.checked_add(1).ok_or(EncodeError::TooLarge)?;
    *out.get_mut(end).ok_or(EncodeError::TooLarge)? = 0;
    end.checked_add(1).ok_or(EncodeError::TooLarge)
}

/// Gathers bytes into frames: a fixed [`MAX_ENCODED`]-byte buffer, resynchronised at every 0x00.
#[derive(Debug, Clone)]
pub struct Decoder {
    buf: [u8; MAX_ENCODED],
    len: usize,
    overflowed: bool,
}

impl Default for Decoder {
    fn default() -> Self {
        Self {
            buf: [0; MAX_ENCODED],
            len: 0,
            overflowed: false,
        }
    }
}

impl Decoder {
    /// Feeds one byte. `None` while a frame is incomplete (or empty); at a delimiter, the frame's
    /// sequence number and message, or why it was dropped.
    pub fn push<M: Message>(&mut self, byte: u8) -> Option<Result<(u8, M), FrameError>> {
        if byte != 0 {
            match self.buf.get_mut(self.len) {
                Some(slot) if !self.overflowed => {
                    *slot = byte;
                    self.len = self.len.saturating_add(1);
                }
                // Keep nothing more of an oversized frame; it is dropped at its delimiter.
                _ => self.overflowed = true,
            }
            return None;
        }
        let (len, overflowed) = (self.len, self.overflowed);
        self.len = 0;
        self.overflowed = false;
        if overflowed {
            return Some(Err(FrameError::Oversized));
        }
        if len == 0 {
            return None;
        }
        Some(
            self.buf
                .get_mut(..len)
                .map_or(Err(FrameError::Oversized), decode_body),
        )
    }
}

/// Decodes one COBS-encoded frame (without delimiters) in place.
fn decode_body<M: Message>(encoded: &mut [u8]) -> Result<(u8, M), FrameError> {
    let n = cobs::decode_in_place(encoded).map_err(|_| FrameError::Corrupt)?;
    let frame = encoded.get(..n).ok_or(FrameError::Corrupt)?;
    let crc_at = n.checked_sub(CRC_LEN).ok_or(FrameError::Truncated)?;
    if crc_at < 1 {
        return Err(FrameError::Truncated);
    }
    let (data, crc) = frame.split_at(crc_at);
    if CRC.checksum(data).to_le_bytes() != *crc {
        return Err(FrameError::Corrupt);
    }
    let (&seq, body) = data.split_first().ok_or(FrameError::Truncated)?;
    match postcard::take_from_bytes::<M>(body) {
        Ok((message, [])) => Ok((seq, message)),
        _ => Err(FrameError::Undecodable),
    }
}

/// Retransmission timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// How long to wait for an `Ack` before sending a frame again.
    pub retry_ms: u32,
    /// How many times a frame is sent in all before it is given up.
    pub attempts: u8,
}

impl Default for Timing {
    /// 250 ms × 8: a frame takes about 1 ms at 115 200 baud, so this rides out two seconds of a busy or
    /// briefly unplugged peer, and a tap is still reported within the time a patient waits.
    fn default() -> Self {
        Self {
            retry_ms: 250,
            attempts: 8,
        }
    }
}

/// What one end of the link counted (since it started; wrapping).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Frames decoded (acks included).
    pub frames_good: u32,
    /// Frames with bad COBS or a bad CRC.
    pub corrupt: u32,
    /// Frames too short to be one.
    pub truncated: u32,
    /// Frames longer than [`MAX_ENCODED`].
    pub oversized: u32,
    /// Frames with a good CRC but no known message.
    pub undecodable: u32,
    /// Data frames received again (acknowledged, not delivered again).
    pub duplicates: u32,
    /// Frames this end sent again for want of an `Ack`.
    pub retransmissions: u32,
    /// Frames this end gave up after [`Timing::attempts`].
    pub given_up: u32,
    /// Messages refused because the send queue was full.
    pub queue_full: u32,
}

impl Counters {
    /// Both counts added (wrapping): totals over several sessions of one port.
    #[must_use]
    pub fn plus(self, other: Self) -> Self {
        Self {
            frames_good: self.frames_good.wrapping_add(other.frames_good),
            corrupt: self.corrupt.wrapping_add(other.corrupt),
            truncated: self.truncated.wrapping_add(other.truncated),
            oversized: self.oversized.wrapping_add(other.oversized),
            undecodable: self.undecodable.wrapping_add(other.undecodable),
            duplicates: self.duplicates.wrapping_add(other.duplicates),
            retransmissions: self.retransmissions.wrapping_add(other.retransmissions),
            given_up: self.given_up.wrapping_add(other.given_up),
            queue_full: self.queue_full.wrapping_add(other.queue_full),
        }
    }

    /// All frames dropped as damaged.
    pub fn frames_bad(&self) -> u32 {
        self.corrupt
            .wrapping_add(self.truncated)
            .wrapping_add(self.oversized)
            .wrapping_add(self.undecodable)
    }
}

/// How many messages wait behind the one in flight.
pub const QUEUE: usize = 4;

#[derive(Debug, Clone, Copy)]
struct InFlight<M> {
    seq: u8,
    message: M,
    sent: u8,
    sent_at_ms: u64,
}

/// One end of the link: sends `Out`, receives `In`. Pure state: bytes in, frames out, time passed in.
#[derive(Debug, Clone)]
pub struct Endpoint<Out, In> {
    timing: Timing,
    decoder: Decoder,
    next_seq: u8,
    in_flight: Option<InFlight<Out>>,
    queue: [Option<Out>; QUEUE],
    queue_head: usize,
    queue_len: usize,
    ack_due: Option<u8>,
    last_delivered: Option<u8>,
    acknowledged: Option<Out>,
    counters: Counters,
    _in: core::marker::PhantomData<In>,
}

/// The board's end.
pub type BoardEndpoint = Endpoint<BoardMessage, GatewayMessage>;
/// The gateway's end.
pub type GatewayEndpoint = Endpoint<GatewayMessage, BoardMessage>;

impl<Out: Message, In: Message> Endpoint<Out, In> {
    /// A fresh endpoint: numbering starts at 0, nothing in flight.
    pub fn new(timing: Timing) -> Self {
        Self {
            timing,
            decoder: Decoder::default(),
            next_seq: 0,
            in_flight: None,
            queue: [None; QUEUE],
            queue_head: 0,
            queue_len: 0,
            ack_due: None,
            last_delivered: None,
            acknowledged: None,
            counters: Counters::default(),
            _in: core::marker::PhantomData,
        }
    }

    /// Queues a message for reliable delivery. Returns `false` (and counts it) if [`QUEUE`] messages
    /// already wait: the caller's rate is then beyond what the link carries.
    pub fn send(&mut self, message: Out) -> bool {
        if self.queue_len >= QUEUE {
            self.counters.queue_full = self.counters.queue_full.wrapping_add(1);
            return false;
        }
        let slot = (self.queue_head.wrapping_add(self.queue_len)) % QUEUE;
        if let Some(s) = self.queue.get_mut(slot) {
            *s = Some(message);
            self.queue_len = self.queue_len.saturating_add(1);
        }
        true
    }

    /// Feeds one received byte; returns a message to act on, at most once per sequence number.
    pub fn receive(&mut self, byte: u8) -> Option<In> {
        let (seq, message) = match self.decoder.push::<In>(byte)? {
            Ok(frame) => frame,
            Err(error) => {
                let counter = match error {
                    FrameError::Corrupt => &mut self.counters.corrupt,
                    FrameError::Truncated => &mut self.counters.truncated,
                    FrameError::Oversized => &mut self.counters.oversized,
                    FrameError::Undecodable => &mut self.counters.undecodable,
                };
                *counter = counter.wrapping_add(1);
                return None;
            }
        };
        self.counters.frames_good = self.counters.frames_good.wrapping_add(1);
        if message.is_ack() {
            if self.in_flight.is_some_and(|f| f.seq == seq) {
                self.acknowledged = self.in_flight.take().map(|f| f.message);
            }
            return None;
        }
        self.ack_due = Some(seq);
        if self.last_delivered == Some(seq) && !message.resynchronises() {
            self.counters.duplicates = self.counters.duplicates.wrapping_add(1);
            return None;
        }
        self.last_delivered = Some(seq);
        Some(message)
    }

    /// The next frame to write, if any is due at `now_ms`: a pending `Ack` first, then a retransmission
    /// or the next queued message. Call until it returns `None`.
    pub fn transmit(&mut self, now_ms: u64, out: &mut [u8; MAX_WIRE]) -> Option<usize> {
        if let Some(seq) = self.ack_due.take() {
            return encode_frame(seq, &Out::ACK, out).ok();
        }
        if let Some(f) = self.in_flight.as_mut() {
            if now_ms.saturating_sub(f.sent_at_ms) < u64::from(self.timing.retry_ms) {
                return None;
            }
            if f.sent < self.timing.attempts {
                f.sent = f.sent.saturating_add(1);
                f.sent_at_ms = now_ms;
                self.counters.retransmissions = self.counters.retransmissions.wrapping_add(1);
                let (seq, message) = (f.seq, f.message);
                return encode_frame(seq, &message, out).ok();
            }
            self.counters.given_up = self.counters.given_up.wrapping_add(1);
            self.in_flight = None;
        }
        let message = self.pop()?;
        let seq = self.next_seq;
        self.next_seq = seq.wrapping_add(1);
        self.in_flight = Some(InFlight {
            seq,
            message,
            sent: 1,
            sent_at_ms: now_ms,
        });
        encode_frame(seq, &message, out).ok()
    }

    fn pop(&mut self) -> Option<Out> {
        if self.queue_len == 0 {
            return None;
        }
        let message = self.queue.get_mut(self.queue_head)?.take();
        self.queue_head = self.queue_head.wrapping_add(1) % QUEUE;
        self.queue_len = self.queue_len.saturating_sub(1);
        message
    }

    /// The message the peer acknowledged last, once (`None` if none since the last call). With one frame
    /// in flight, at most one is acknowledged between two calls of [`Endpoint::transmit`].
    pub fn take_acknowledged(&mut self) -> Option<Out> {
        self.acknowledged.take()
    }

    /// Whether everything sent has been acknowledged or given up.
    pub fn is_idle(&self) -> bool {
        self.in_flight.is_none() && self.queue_len == 0
    }

    /// What this end counted.
    pub fn counters(&self) -> Counters {
        self.counters
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame<M: Message>(seq: u8, m: &M) -> ([u8; MAX_WIRE], usize) {
        let mut out = [0u8; MAX_WIRE];
        let n = encode_frame(seq, m, &mut out).unwrap();
        (out, n)
    }

    fn feed<O: Message, I: Message>(e: &mut Endpoint<O, I>, bytes: &[u8]) -> Vec<I> {
        bytes.iter().filter_map(|&b| e.receive(b)).collect()
    }

    /// Everything `e` has to send at `now`, concatenated.
    fn drain<O: Message, I: Message>(e: &mut Endpoint<O, I>, now: u64) -> Vec<u8> {
        let mut wire = Vec::new();
        let mut buf = [0u8; MAX_WIRE];
        while let Some(n) = e.transmit(now, &mut buf) {
            wire.extend_from_slice(&buf[..n]);
        }
        wire
    }

    fn card() -> BoardMessage {
        BoardMessage::CardPresented(Uid::new(&[1, 2, 3, 4, 5, 6, 7]).unwrap())
    }

    #[test]
    fn the_largest_messages_fit_a_frame() {
        let big = [
            BoardMessage::CardPresented(Uid::new(&[0xFF; 10]).unwrap()),
            BoardMessage::Hello(Hello {
                firmware: FirmwareVersion {
                    major: 255,
                    minor: 255,
                    patch: 255,
                },
                board_id: u32::MAX,
                reader_ok: true,
            }),
        ];
        for m in big {
            let (_, n) = frame(255, &m);
            assert!(n <= MAX_WIRE);
        }
    }

    #[test]
    fn uid_debug_does_not_show_the_uid() {
        let uid = Uid::new(&[0xDE, 0xAD, 0xBE, 0xEF]).unwrap();
        assert_eq!(
            format!("{:?}", BoardMessage::CardPresented(uid)),
            "CardPresented(Uid(4 bytes))"
        );
        assert!(Uid::new(&[1, 2, 3]).is_none() && Uid::new(&[0; 11]).is_none());
    }

    #[test]
    fn an_unacknowledged_frame_is_sent_again_then_given_up() {
        let timing = Timing {
            retry_ms: 100,
            attempts: 3,
        };
        let mut board = BoardEndpoint::new(timing);
        assert!(board.send(card()));
        let first = drain(&mut board, 0);
        assert!(!first.is_empty());
        assert!(drain(&mut board, 99).is_empty(), "not before retry_ms");
        assert_eq!(drain(&mut board, 100), first, "the same frame, same seq");
        assert_eq!(drain(&mut board, 200), first);
        assert!(drain(&mut board, 300).is_empty(), "three attempts in all");
        let c = board.counters();
        assert_eq!((c.retransmissions, c.given_up), (2, 1));
        assert!(board.is_idle());
    }

    #[test]
    fn an_ack_stops_retransmission_and_the_next_message_goes() {
        let mut board = BoardEndpoint::new(Timing::default());
        let mut gateway = GatewayEndpoint::new(Timing::default());
        assert!(board.send(card()));
        assert!(board.send(BoardMessage::Heartbeat));
        let wire = drain(&mut board, 0);
        assert_eq!(feed(&mut gateway, &wire), [card()]);
        let ack = drain(&mut gateway, 0);
        assert_eq!(ack, frame(0, &GatewayMessage::Ack).0[..7]);
        assert!(feed(&mut board, &ack).is_empty());
        assert_eq!(
            feed(&mut gateway, &drain(&mut board, 1)),
            [BoardMessage::Heartbeat]
        );
        assert_eq!(board.counters().retransmissions, 0);
    }

    #[test]
    fn a_duplicate_is_acknowledged_again_and_delivered_once() {
        let mut board = BoardEndpoint::new(Timing::default());
        let mut gateway = GatewayEndpoint::new(Timing::default());
        assert!(board.send(card()));
        let wire = drain(&mut board, 0);
        assert_eq!(feed(&mut gateway, &wire), [card()]);
        let _lost_ack = drain(&mut gateway, 0);
        let again = drain(&mut board, 10_000);
        assert_eq!(again, wire);
        assert!(feed(&mut gateway, &again).is_empty(), "acted on once");
        let ack = drain(&mut gateway, 10_000);
        assert!(!ack.is_empty(), "the duplicate is acknowledged");
        feed(&mut board, &ack);
        assert!(board.is_idle());
        assert_eq!(gateway.counters().duplicates, 1);
    }

    #[test]
    fn a_restarted_peer_is_heard_from_its_hello() {
        let hello = BoardMessage::Hello(Hello {
            firmware: FirmwareVersion {
                major: 0,
                minor: 1,
                patch: 0,
            },
            board_id: 7,
            reader_ok: true,
        });
        let mut gateway = GatewayEndpoint::new(Timing::default());
        for _ in 0..2 {
            // The board restarts: frame 0 again.
            let mut board = BoardEndpoint::new(Timing::default());
            board.send(hello);
            assert_eq!(feed(&mut gateway, &drain(&mut board, 0)), [hello]);
            let _ = drain(&mut gateway, 0);
        }
    }

    #[test]
    fn damage_is_dropped_counted_and_the_next_frame_still_decodes() {
        let mut gateway = GatewayEndpoint::new(Timing::default());
        let (good, n) = frame(1, &card());
        let mut flipped = good;
        flipped[4] ^= 0x10;
        let mut stream = Vec::new();
        stream.extend_from_slice(b"line noise");
        stream.extend_from_slice(&flipped[..n]); // corrupt
        stream.extend_from_slice(&good[..5]); // truncated by a reset mid-frame: runs into the next
        stream.extend_from_slice(&[0x00, 0x02, 0x01, 0x00]); // COBS-valid, too short
        stream.extend_from_slice(&[0x55; 100]); // oversized
        stream.extend_from_slice(&good[..n]);
        assert_eq!(feed(&mut gateway, &stream), [card()]);
        let c = gateway.counters();
        assert_eq!(c.frames_good, 1);
        assert_eq!(c.truncated, 1);
        assert_eq!(c.oversized, 1);
        assert!(c.corrupt >= 2, "{c:?}");
    }

    #[test]
    fn a_good_crc_around_an_unknown_message_is_undecodable() {
        // Variant 9 of GatewayMessage does not exist.
        let mut raw = [0u8; 4];
        raw[0] = 1;
        raw[1] = 9;
        let crc = CRC.checksum(&raw[..2]).to_le_bytes();
        raw[2..].copy_from_slice(&crc);
        let mut wire = vec![0u8; 8];
        let n = cobs::encode(&raw, &mut wire[1..]);
        wire.truncate(n + 1);
        wire.push(0);
        let mut board = BoardEndpoint::new(Timing::default());
        assert!(feed(&mut board, &wire).is_empty());
        assert_eq!(board.counters().undecodable, 1);
    }

    #[test]
    fn a_full_queue_refuses_and_counts() {
        let mut board = BoardEndpoint::new(Timing::default());
        for _ in 0..QUEUE {
            assert!(board.send(BoardMessage::Heartbeat));
        }
        assert!(!board.send(BoardMessage::Heartbeat));
        assert_eq!(board.counters().queue_full, 1);
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        fn board_message() -> impl Strategy<Value = BoardMessage> {
            prop_oneof![
                Just(BoardMessage::Ack),
                Just(BoardMessage::Heartbeat),
                (any::<[u8; 3]>(), any::<u32>(), any::<bool>()).prop_map(|(v, id, ok)| {
                    BoardMessage::Hello(Hello {
                        firmware: FirmwareVersion {
                            major: v[0],
                            minor: v[1],
                            patch: v[2],
                        },
                        board_id: id,
                        reader_ok: ok,
                    })
                }),
                prop_oneof![
                    proptest::collection::vec(any::<u8>(), 4),
                    proptest::collection::vec(any::<u8>(), 7),
                    proptest::collection::vec(any::<u8>(), 10)
                ]
                .prop_map(|b| BoardMessage::CardPresented(Uid::new(&b).unwrap())),
                prop_oneof![
                    Just(ReaderFault::NotResponding),
                    Just(ReaderFault::Bus),
                    Just(ReaderFault::Init)
                ]
                .prop_map(BoardMessage::Fault),
            ]
        }

        proptest! {
            #[test]
            fn any_bytes_never_panic_and_never_grow(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
                let mut d = Decoder::default();
                for b in bytes {
                    let _ = d.push::<BoardMessage>(b);
                    let _ = d.push::<GatewayMessage>(b);
                    prop_assert!(d.len <= MAX_ENCODED);
                }
            }

            #[test]
            fn every_valid_frame_round_trips(
                seq in any::<u8>(),
                m in board_message(),
                noise in proptest::collection::vec(any::<u8>(), 0..64),
            ) {
                let (wire, n) = frame(seq, &m);
                prop_assert!(n <= MAX_WIRE);
                prop_assert!(!wire[1..n - 1].contains(&0));
                let mut d = Decoder::default();
                // Whatever came before, the leading delimiter resynchronises.
                for b in noise {
                    let _ = d.push::<BoardMessage>(b);
                }
                let got: Vec<_> = wire[..n].iter().filter_map(|&b| d.push::<BoardMessage>(b)).collect();
                prop_assert_eq!(got.last().copied(), Some(Ok((seq, m))));
            }
        }
    }
}
