//! The profiles' collector roles over a [`GattLink`]: GLP (glucose) and BLP (blood pressure).
//!
//! The collector moves bytes and keeps the profiles' rules; it does not decode readings (beyond the RACP
//! answers it must understand) — it hands every value to a [`RecordSink`], the pipeline.
//!
//! GLP rules kept here (GATT.md, GLS/GLP v1.0, GLP.TS 1.0.7):
//! - enable 2A18 / 2A34 notifications and RACP indications **before** any RACP write, else the meter
//!   answers ATT 0x81; on 0x81 the collector re-subscribes once and retries (the session recovers);
//! - read the device clock (Current Time, or Date Time where a meter keeps it there) and record the
//!   coincident time stamp, so every reading carries the measured offset (DESIGN.md promise 5);
//! - first contact asks for all records, afterwards for records ≥ last accepted + 1 — the cursor is the
//!   journal's, so it only ever covers accepted records (promise 4);
//! - the 30 s RACP timer restarts on every 2A18 / 2A34 notification and stops at the response code; on
//!   time-out the set is incomplete and the next session resumes (GLP.TS SPE/BI-04);
//! - a measurement that does not decode is asked for again once the report is complete
//!   (`01 04 01 <seq> <seq>`), and what came after it is held back until then, so the cursor never passes
//!   a record that was not accepted: a session that ends first resumes at the damaged record. A record
//!   damaged in the meter's memory (the same octets again) is reported and passed — see `download`;
//! - when the sink refuses a value (journal full), the collector aborts the procedure and stops: the meter
//!   keeps its records and the next session asks again from the cursor.
//!
//! A meter that numbers its records newest-first (TaiDoc DM30b, GATT.md; [`RecordNumbering::NewestFirst`])
//! cannot be asked for "records ≥ last + 1": every new reading renumbers the rest. Its sessions ask for all
//! records, hold them until the Response Code, and hand over only those newer than the last accepted one,
//! oldest first — see [`marked_cursor`] for how the journal's cursor names that record.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use protocol::gatt::Codec;
use protocol::gatt::glucose::GlucoseMeasurement;
use protocol::gatt::racp::{OpCode, Racp, ResponseCode};
use protocol::gatt::time::{CurrentTime, DateTime};
use protocol::model::{GlucoseRecord, RecordNumbering};

use super::{GattLink, LinkError, att, uuid};

/// What a collector needs to know about the device it talks to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRef {
    /// Stable device identity (BLE address, or the simulator's id): part of every reading id.
    pub id: String,
    /// Model name, from Device Information, when known.
    pub model: Option<String>,
    /// How the device numbers its records (a glucometer's quirk; [`RecordNumbering::Gls`] otherwise).
    pub numbering: RecordNumbering,
}

/// Facts of one connection, passed with every value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    /// The device.
    pub device: DeviceRef,
    /// Device clock − gateway clock (seconds, device time read as UTC) measured at this connection, when the
    /// device's clock could be read.
    pub clock_offset_s: Option<i64>,
}

/// Why the sink refused a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SinkError {
    /// The journal is at its bound: stop downloading; the device keeps its records.
    #[error("journal full")]
    Full,
    /// The gateway is shutting down or the journal failed; the session ends, nothing is advanced.
    #[error("pipeline unavailable: {0}")]
    Unavailable(String),
}

/// The pipeline, as a collector sees it.
pub trait RecordSink: Send {
    /// The last accepted device record sequence number for `key` (a device, or a device + user).
    fn cursor(&self, key: &str) -> Option<u64>;

    /// One characteristic value received at `received_utc` (seconds). May return before the value is
    /// durable; [`RecordSink::end_of_transfer`] waits for that.
    fn value(
        &mut self,
        session: &SessionInfo,
        uuid: u16,
        bytes: &[u8],
        received_utc: i64,
    ) -> impl std::future::Future<Output = Result<(), SinkError>> + Send;

    /// A blood pressure measurement indicated live, as it was measured: the first one after the cuff's
    /// Intermediate Cuff Pressure in this connection (BLS 1.1.1 §3.2: the cuff sends intermediate
    /// pressures while it inflates and deflates, then the measurement), not one from its memory. Its
    /// receive time says when it was measured even when the cuff's clock cannot be trusted (the kiosk's
    /// attribution rule, `crate::kiosk::attribution`). Otherwise as [`RecordSink::value`], which it is by
    /// default.
    fn live_value(
        &mut self,
        session: &SessionInfo,
        uuid: u16,
        bytes: &[u8],
        received_utc: i64,
    ) -> impl std::future::Future<Output = Result<(), SinkError>> + Send {
        self.value(session, uuid, bytes, received_utc)
    }

    /// A value for a display only, never part of the record: a cuff's Intermediate Cuff Pressure while it
    /// measures (the kiosk's patient screen shows it). Nothing by default.
    fn live(&mut self, session: &SessionInfo, uuid: u16, bytes: &[u8]) {
        let _ = (session, uuid, bytes);
    }

    /// The transfer ended (response code, time-out, disconnect): release held state (a measurement whose
    /// context never came) and wait until everything handed over is accepted or refused.
    fn end_of_transfer(
        &mut self,
        session: &SessionInfo,
    ) -> impl std::future::Future<Output = Result<(), SinkError>> + Send;
}

/// Collector timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CollectorConfig {
    /// GLP's RACP timer: 30 s, restarted by every measurement or context notification.
    pub racp_timeout: Duration,
    /// A BP cuff has no end-of-transfer marker: the session ends after this long without an indication.
    pub bp_idle: Duration,
    /// Delay before each CCCD write (Beurer BM85 ignores a CCCD write right after discovery: 50–100 ms,
    /// derdilla PR #729).
    pub cccd_delay: Duration,
}

impl Default for CollectorConfig {
    fn default() -> Self {
        CollectorConfig {
            racp_timeout: Duration::from_secs(30),
            bp_idle: Duration::from_secs(10),
            cccd_delay: Duration::ZERO,
        }
    }
}

/// How a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    /// The device said the transfer is complete (RACP success / no records found; a cuff went quiet).
    Complete,
    /// No response in time, or the link dropped: an incomplete set; the next session resumes at the cursor.
    Incomplete,
    /// The journal is full: the procedure was aborted; the device keeps its records.
    JournalFull,
}

/// A session's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionReport {
    /// How it ended.
    pub completion: Completion,
    /// Values handed to the sink.
    pub values: usize,
    /// The clock offset measured, if any.
    pub clock_offset_s: Option<i64>,
}

/// Why a session failed before or during the transfer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// The device requires a bonded, encrypted link (ATT insufficient authentication / encryption).
    #[error("device requires pairing (ATT 0x{0:02X})")]
    NeedsPairing(u8),
    /// The link failed at `stage`.
    #[error("{stage}: {source}")]
    Link {
        /// What the collector was doing.
        stage: &'static str,
        /// The link's error.
        source: LinkError,
    },
    /// The device answered RACP with an error response code (GLP.TS SPE/BI-01..03: reported to the upper
    /// layer as it came).
    #[error("RACP answered {}", .0.name().unwrap_or("a reserved response code"))]
    Racp(ResponseCode),
    /// The sink failed for another reason than a full journal.
    #[error(transparent)]
    Sink(SinkError),
}

fn link_err(stage: &'static str) -> impl FnOnce(LinkError) -> SessionError {
    move |source| match source {
        LinkError::Att(
            code @ (att::INSUFFICIENT_AUTHENTICATION | att::INSUFFICIENT_ENCRYPTION),
        ) => SessionError::NeedsPairing(code),
        source => SessionError::Link { stage, source },
    }
}

/// The gateway clock, seconds since the Unix epoch (UTC).
pub fn now_utc() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Reads the device clock (Current Time, else Date Time) and returns device − gateway, seconds.
///
/// A clock that cannot be read, or reads as an incomplete date, gives `None`: its readings are then
/// flagged "clock not read" by validation rather than corrected with a guess.
pub async fn measure_clock_offset<L: GattLink>(link: &mut L) -> Option<i64> {
    let device = if link.has(uuid::CURRENT_TIME) {
        let bytes = link.read(uuid::CURRENT_TIME).await.ok()?;
        CurrentTime::parse(&bytes).ok()?.date_time
    } else if link.has(uuid::DATE_TIME) {
        // Roche Accu-Chek Aviva Connect keeps its clock in Date Time inside the glucose service (GATT.md).
        let bytes = link.read(uuid::DATE_TIME).await.ok()?;
        DateTime::parse(&bytes).ok()?
    } else {
        return None;
    };
    // The coincident time stamp: the gateway clock read as close to the device's answer as we can.
    let gateway = now_utc();
    Some(device.to_epoch_seconds()? - gateway)
}

async fn subscribe_all<L: GattLink>(
    link: &mut L,
    uuids: &[u16],
    cfg: &CollectorConfig,
) -> Result<(), SessionError> {
    for &u in uuids {
        if !link.has(u) {
            continue;
        }
        if !cfg.cccd_delay.is_zero() {
            tokio::time::sleep(cfg.cccd_delay).await;
        }
        link.subscribe(u).await.map_err(link_err("subscribe"))?;
    }
    Ok(())
}

/// Runs the GLP collector: downloads every record after the sink's cursor for `device`.
///
/// # Errors
/// [`SessionError`] when the device needs pairing, the link fails before the transfer starts, or RACP is
/// refused. A link that drops during the transfer is not an error: the report says `Incomplete`.
pub async fn glucose_session<L: GattLink, S: RecordSink>(
    link: &mut L,
    sink: &mut S,
    device: &DeviceRef,
    cfg: &CollectorConfig,
) -> Result<SessionReport, SessionError> {
    if !link.has(uuid::GLUCOSE_MEASUREMENT) || !link.has(uuid::RACP) {
        return Err(SessionError::Link {
            stage: "discovery",
            source: LinkError::Missing(uuid::RACP),
        });
    }
    let cccds = [uuid::GLUCOSE_MEASUREMENT, uuid::GLUCOSE_CONTEXT, uuid::RACP];
    subscribe_all(link, &cccds, cfg).await?;
    if link.has(uuid::GLUCOSE_FEATURE) {
        // Read for the device record; a meter that fails this read can still be downloaded.
        let _ = link.read(uuid::GLUCOSE_FEATURE).await;
    }
    let clock_offset_s = measure_clock_offset(link).await;
    let session = SessionInfo {
        device: device.clone(),
        clock_offset_s,
    };

    let newest_first = device.numbering == RecordNumbering::NewestFirst;
    let cursor = sink.cursor(&device.id);
    // First contact: everything. Afterwards: records >= last accepted + 1 (RACP >= is inclusive). A
    // newest-first meter is always asked for everything: its numbers do not say what is new.
    let request = match cursor {
        _ if newest_first => Racp::report_all(),
        None => Racp::report_all(),
        Some(last) => match u16::try_from(last + 1) {
            Ok(next) => Racp::report_from(next),
            // GLS sequence numbers never roll over: past 0xFFFF there is nothing new to ask for.
            Err(_) => {
                return Ok(SessionReport {
                    completion: Completion::Complete,
                    values: 0,
                    clock_offset_s,
                });
            }
        },
    };
    let bytes = request.to_vec();
    match link.write(uuid::RACP, &bytes).await {
        Ok(()) => {}
        Err(LinkError::Att(att::CCCD_IMPROPERLY_CONFIGURED)) => {
            // The meter did not take our CCCD writes (or forgot them): configure again and retry once.
            tracing::warn!(device = %device.id, "RACP refused with 0x81 (CCCD improperly configured); re-subscribing");
            subscribe_all(link, &cccds, cfg).await?;
            link.write(uuid::RACP, &bytes)
                .await
                .map_err(link_err("racp write"))?;
        }
        Err(e) => return Err(link_err("racp write")(e)),
    }

    let mut values = 0usize;
    let completion = if let (Some(last), false) = (cursor, newest_first) {
        match download(link, sink, &session, cfg, &mut values).await {
            Err(SessionError::Racp(
                code @ (ResponseCode::OPERATOR_NOT_SUPPORTED | ResponseCode::OPERAND_NOT_SUPPORTED),
            )) => {
                // A meter without the "≥ sequence number" filter (GLP.TS SPE/BI-02/03; Yuwell's RACP
                // supports only some requests, GATT.md): ask for everything and pass on only what is
                // after the cursor, so nothing is skipped and nothing accepted is sent again.
                tracing::warn!(device = %device.id, response = code.name().unwrap_or("reserved"), "meter refused \"records >= last + 1\"; asking for all records and skipping those already accepted");
                link.write(uuid::RACP, &Racp::report_all().to_vec())
                    .await
                    .map_err(link_err("racp write"))?;
                let mut after = AfterCursor { inner: sink, last };
                download(link, &mut after, &session, cfg, &mut values).await?
            }
            other => other?,
        }
    } else if newest_first {
        let mut held = Held::default();
        match download(link, &mut held, &session, cfg, &mut values).await? {
            // Only a whole memory says which records are new; a partial one is dropped and asked for again.
            Completion::Complete => hand_over_newer(sink, &session, held.values, cursor).await?,
            other => other,
        }
    } else {
        download(link, sink, &session, cfg, &mut values).await?
    };
    match sink.end_of_transfer(&session).await {
        Ok(()) => {}
        Err(SinkError::Full) => {
            return Ok(SessionReport {
                completion: Completion::JournalFull,
                values,
                clock_offset_s,
            });
        }
        Err(e) => return Err(SessionError::Sink(e)),
    }
    Ok(SessionReport {
        completion,
        values,
        clock_offset_s,
    })
}

/// How often one damaged record is asked for again in a session while each answer comes damaged in a
/// new way (damaged on the way, not in the meter's memory) before the session gives up and ends
/// incomplete — the next session asks again from the cursor, which has not passed the record.
const MAX_REASKS: usize = 3;

/// The records of one report that arrived damaged, and what came after the first of them.
#[derive(Default)]
struct Damaged {
    /// Sequence number of each 2A18 value that did not decode → the octets that came. Comparing them with
    /// a re-request's answer tells a record damaged in the meter's memory (the same octets again) from
    /// one damaged on the way.
    records: std::collections::BTreeMap<u16, Vec<u8>>,
    /// Every value received after the first damaged record, held back (characteristic, value, received
    /// at) until the damaged ones are settled, so that the journal's cursor cannot pass a record that was
    /// not accepted.
    held: Vec<(u16, Vec<u8>, i64)>,
}

/// Receives the report asked for, asks again for each record that did not decode, then hands over what
/// came after the first damaged one (see [`Damaged`]).
///
/// The journal's cursor is the highest record number it accepted, and the next session asks for records
/// after it. Had the records after a damaged one been accepted at once, a link lost before the re-request
/// would leave the damaged record behind the cursor, never asked for again (issue 11, defect 3). So the
/// values after the first damaged record are held back; if the session ends before the damaged records
/// are settled, they are dropped — still in the meter — and the next session resumes at the first damaged
/// record, the first one not accepted.
///
/// A damaged record is settled when its re-request (`01 04 01 <seq> <seq>`, GATT.md "RACP") brings it
/// whole, or brings the same octets again: then the damage is in the meter's memory, asking again cannot
/// help, and asking every session forever would cost every later session a round trip. Such a record is
/// reported — its octets are journaled as a `decode_failed` event, the same event each time it comes —
/// and the cursor moves past it. A re-request answered with new damage is repeated up to
/// [`MAX_REASKS`] times; a meter that refuses the re-request (an RACP error code) settles it too, as
/// reported.
///
/// A value too short to carry a sequence number cannot be asked for by number: it is reported and the
/// transfer goes on (a notification is never cut short by the link layer; such a value is the meter's).
async fn download<L: GattLink, S: RecordSink>(
    link: &mut L,
    sink: &mut S,
    session: &SessionInfo,
    cfg: &CollectorConfig,
    values: &mut usize,
) -> Result<Completion, SessionError> {
    let mut damaged = Damaged::default();
    let completion = receive_report(link, sink, session, cfg, values, &mut damaged).await?;
    if completion != Completion::Complete {
        // Anything held is dropped: the meter keeps it, and the cursor is before the first damaged record.
        return Ok(completion);
    }
    // The answers to the re-requests are held too: handed over with the rest, in record order, so that
    // a damaged record asked for again is never accepted before an earlier one held back.
    let mut reasked = Held::default();
    let records = std::mem::take(&mut damaged.records);
    for (seq, mut came) in records {
        let mut reasks = 0;
        loop {
            tracing::warn!(device = %session.device.id, seq, "record did not decode; asking for it again");
            if link
                .write(uuid::RACP, &Racp::report_range(seq, seq).to_vec())
                .await
                .is_err()
            {
                return Ok(Completion::Incomplete);
            }
            reasks += 1;
            let mut again = Damaged::default();
            match receive_report(link, &mut reasked, session, cfg, values, &mut again).await {
                Ok(Completion::Complete) => {}
                Ok(other) => return Ok(other),
                Err(SessionError::Racp(code)) => {
                    tracing::warn!(device = %session.device.id, seq, response = code.name().unwrap_or("reserved"), "meter refused to send a damaged record again; it stays reported as damaged");
                    break;
                }
                Err(e) => return Err(e),
            }
            match again.records.remove(&seq) {
                // Whole (or gone from the meter's memory meanwhile).
                None => break,
                Some(bytes) if bytes == came => {
                    tracing::warn!(device = %session.device.id, seq, "record came damaged the same way twice: damaged in the meter's memory; reported, not asked for again");
                    break;
                }
                Some(_) if reasks >= MAX_REASKS => {
                    tracing::warn!(device = %session.device.id, seq, reasks, "record still damaged after asking again; resuming at it next session");
                    return Ok(Completion::Incomplete);
                }
                Some(bytes) => came = bytes,
            }
        }
    }
    let mut rest = reasked.values;
    rest.append(&mut damaged.held);
    // Stable: a record's measurement stays before its context. A value too short to carry a number
    // (reported as not decodable) goes last.
    rest.sort_by_key(|(_, v, _)| sequence_of(v).map_or(u32::MAX, u32::from));
    for (u, v, received_utc) in rest {
        match sink.value(session, u, &v, received_utc).await {
            Ok(()) => {}
            Err(SinkError::Full) => return Ok(Completion::JournalFull),
            Err(e) => return Err(SessionError::Sink(e)),
        }
    }
    Ok(Completion::Complete)
}

/// Seconds from the Unix epoch to 2000-01-01T00:00:00: the origin of a newest-first cursor's time part
/// (32 bits of seconds from 2000 last until 2136).
const CURSOR_TIME_ORIGIN: i64 = 946_684_800;

/// The journal cursor value of the `n`-th record accepted from a device that has no lasting record number
/// — a cuff, or a meter that numbers newest-first — whose device time is `device_time` (seconds since the
/// Unix epoch, device clock).
///
/// The journal keeps the highest value it has seen per cursor key. The high 32 bits count the records
/// accepted so far, so the highest value is always the last record accepted — even after the device's
/// clock was set back (or a DST change moved it back an hour) — and the low 32 bits are that record's
/// device time: the mark by which the next transfer finds it in the device's memory. A record without a
/// usable time gets 0, which matches nothing.
pub fn marked_cursor(n: u64, device_time: Option<i64>) -> u64 {
    let t = device_time
        .and_then(|t| u32::try_from(t - CURSOR_TIME_ORIGIN).ok())
        .unwrap_or(0);
    (n << 32) | u64::from(t)
}

/// How many records a [`marked_cursor`] says were accepted.
pub fn marked_count(cursor: Option<u64>) -> u64 {
    cursor.map_or(0, |c| c >> 32)
}

/// The device time (seconds since the Unix epoch) of the last record a [`marked_cursor`] names, if it had one.
fn cursor_mark(cursor: Option<u64>) -> Option<i64> {
    cursor
        .map(|c| c & u64::from(u32::MAX))
        .filter(|t| *t != 0)
        .map(|t| CURSOR_TIME_ORIGIN + t as i64)
}

/// The journal cursor key of a cuff reading: the cuff, and with a BLS user id the user too (each user's
/// readings are a separate series in the cuff's memory).
pub fn bp_cursor_key(device: &str, user_id: Option<u8>) -> String {
    match user_id {
        Some(u) => format!("{device}#user{u}"),
        None => device.to_owned(),
    }
}

/// The device time (seconds since the Unix epoch, device clock) of a Glucose Measurement value.
fn device_time_of(measurement: &[u8]) -> Option<i64> {
    let g = GlucoseMeasurement::parse(measurement).ok()?;
    GlucoseRecord::from_gatt(&g)
        .device_time()?
        .to_epoch_seconds()
}

/// The sequence number a 2A18 or 2A34 value carries (octets 1–2 of both).
fn sequence_of(value: &[u8]) -> Option<u16> {
    match value.get(1..3) {
        Some(&[lo, hi]) => Some(u16::from_le_bytes([lo, hi])),
        _ => None,
    }
}

/// Passes on only the records numbered after `last` (for a meter that can only be asked for everything).
struct AfterCursor<'a, S> {
    inner: &'a mut S,
    last: u64,
}

impl<S: RecordSink> RecordSink for AfterCursor<'_, S> {
    fn cursor(&self, key: &str) -> Option<u64> {
        self.inner.cursor(key)
    }

    async fn value(
        &mut self,
        session: &SessionInfo,
        uuid: u16,
        bytes: &[u8],
        received_utc: i64,
    ) -> Result<(), SinkError> {
        if sequence_of(bytes).is_some_and(|seq| u64::from(seq) <= self.last) {
            return Ok(()); // accepted in an earlier session
        }
        self.inner.value(session, uuid, bytes, received_utc).await
    }

    async fn end_of_transfer(&mut self, session: &SessionInfo) -> Result<(), SinkError> {
        self.inner.end_of_transfer(session).await
    }
}

/// Hands a cuff's indications to the sink, in the order they came, except those accepted before.
///
/// A cuff has no record number, and many resend their whole memory on every subscribe (SBM69, Beurer
/// BM59/BM85; GATT.md). Per cursor key (the cuff, or the cuff and user), the last reading accepted is
/// found among those that came by the device time its cursor carries ([`marked_cursor`]), and only the
/// readings stored after it are new: those that came after it, or before it if this cuff sends its
/// memory newest first (told by the order of the time stamps that came). Position, not time, decides,
/// so a clock set back (or a DST change) loses no reading taken since. When the last accepted reading is
/// not among them (a cuff that deletes what it sent, Omron X4; a memory cleared), every reading is new: a
/// doubled reading is harmless — the same reading id — while a skipped one would be lost.
async fn hand_over_new_bp<S: RecordSink>(
    sink: &mut S,
    session: &SessionInfo,
    held: Vec<BpValue>,
) -> Result<Completion, SessionError> {
    use protocol::gatt::bp::BloodPressureMeasurement;

    /// One cursor key's readings in this transfer.
    #[derive(Default)]
    struct Series {
        mark: Option<i64>,
        /// Where the last accepted reading came: first and last position with its time.
        found: Option<(usize, usize)>,
        previous: Option<i64>,
        ascending: usize,
        descending: usize,
    }

    // Each value's user (which names its cursor key, [`bp_cursor_key`]) and device time. The user, not
    // the key: a dump holds thousands of values of a few users.
    let identity: Vec<Option<(Option<u8>, Option<i64>)>> = held
        .iter()
        .map(|v| {
            let m = BloodPressureMeasurement::parse(&v.bytes).ok()?;
            Some((m.user_id, m.timestamp.and_then(|t| t.to_epoch_seconds())))
        })
        .collect();
    let mut series: std::collections::HashMap<Option<u8>, Series> =
        std::collections::HashMap::new();
    for (i, id) in identity.iter().enumerate() {
        let Some((user, time)) = id else { continue };
        let s = series.entry(*user).or_insert_with(|| Series {
            mark: cursor_mark(sink.cursor(&bp_cursor_key(&session.device.id, *user))),
            ..Series::default()
        });
        if s.mark.is_some() && *time == s.mark {
            s.found = Some(s.found.map_or((i, i), |(first, _)| (first, i)));
        }
        if let Some(t) = time {
            match s.previous {
                Some(p) if *t > p => s.ascending += 1,
                Some(p) if *t < p => s.descending += 1,
                _ => {}
            }
            s.previous = Some(*t);
        }
    }
    for (i, v) in held.iter().enumerate() {
        let new = match identity.get(i).and_then(Option::as_ref) {
            // Undecodable: the pipeline reports it.
            None => true,
            Some((user, _)) => match series.get(user) {
                Some(Series {
                    found: Some((first, last)),
                    ascending,
                    descending,
                    ..
                }) => {
                    if descending > ascending {
                        i < *first
                    } else {
                        i > *last
                    }
                }
                _ => true,
            },
        };
        if !new {
            continue;
        }
        let handed = if v.live {
            sink.live_value(session, uuid::BP_MEASUREMENT, &v.bytes, v.received_utc)
                .await
        } else {
            sink.value(session, uuid::BP_MEASUREMENT, &v.bytes, v.received_utc)
                .await
        };
        match handed {
            Ok(()) => {}
            Err(SinkError::Full) => return Ok(Completion::JournalFull),
            Err(e) => return Err(SessionError::Sink(e)),
        }
    }
    Ok(Completion::Complete)
}

/// A Blood Pressure Measurement as the BP collector received it.
#[derive(Debug, Clone)]
struct BpValue {
    /// A Blood Pressure Measurement is at most 19 octets (BLS 1.1 §3.1); a longer value, which a
    /// device may still send, goes to the heap.
    bytes: smallvec::SmallVec<[u8; 19]>,
    received_utc: i64,
    /// The first measurement after Intermediate Cuff Pressure: see [`RecordSink::live_value`].
    live: bool,
}

/// A newest-first meter's whole memory, as received: (characteristic, value, received at).
#[derive(Default)]
struct Held {
    values: Vec<(u16, Vec<u8>, i64)>,
}

impl RecordSink for Held {
    fn cursor(&self, _key: &str) -> Option<u64> {
        None
    }

    async fn value(
        &mut self,
        _session: &SessionInfo,
        uuid: u16,
        bytes: &[u8],
        received_utc: i64,
    ) -> Result<(), SinkError> {
        self.values.push((uuid, bytes.to_vec(), received_utc));
        Ok(())
    }

    async fn end_of_transfer(&mut self, _session: &SessionInfo) -> Result<(), SinkError> {
        Ok(())
    }
}

/// Hands the records of a newest-first meter that are newer than the last accepted one to the sink,
/// oldest first (promise 2: in order per device).
///
/// The last accepted record is found by the device time its cursor carries ([`crate::pipeline`] documents
/// that cursor): the records numbered below it (newer) are new. When it is no longer in the meter's
/// memory (memory cleared or wrapped), every record is handed over — the time-and-value reading ids make
/// any that were delivered before harmless duplicates (promise 3) — which is the safe direction: nothing
/// is skipped.
async fn hand_over_newer<S: RecordSink>(
    sink: &mut S,
    session: &SessionInfo,
    held: Vec<(u16, Vec<u8>, i64)>,
    cursor: Option<u64>,
) -> Result<Completion, SessionError> {
    let mark = cursor_mark(cursor);
    // The newest record (lowest number) that carries the mark is the last one accepted.
    let boundary = mark.and_then(|mark| {
        held.iter()
            .filter(|(u, v, _)| *u == uuid::GLUCOSE_MEASUREMENT && device_time_of(v) == Some(mark))
            .filter_map(|(_, v, _)| sequence_of(v))
            .min()
    });
    if cursor.is_some() && boundary.is_none() {
        tracing::warn!(device = %session.device.id, "the last record accepted from this newest-first meter is no longer in its memory: handing over every record (reading ids keep re-sent ones harmless)");
    }
    // Oldest first: highest number first; within one record, the order received (measurement, context).
    // A value too short to carry a number goes last; the pipeline reports it as not decodable.
    let mut new: Vec<_> = held
        .into_iter()
        .enumerate()
        .filter(|(_, (_, v, _))| match (sequence_of(v), boundary) {
            (Some(seq), Some(b)) => seq < b,
            _ => true,
        })
        .collect();
    new.sort_by_key(|(i, (_, v, _))| {
        let seq = sequence_of(v);
        (seq.is_none(), std::cmp::Reverse(seq), *i)
    });
    for (_, (u, v, received_utc)) in new {
        match sink.value(session, u, &v, received_utc).await {
            Ok(()) => {}
            Err(SinkError::Full) => return Ok(Completion::JournalFull),
            Err(e) => return Err(SessionError::Sink(e)),
        }
    }
    Ok(Completion::Complete)
}

/// Receives one report's notifications until its Response Code (or the RACP timer, or the link's end),
/// handing every 2A18 / 2A34 value to the sink — except, once a measurement did not decode, what comes
/// after it, which goes to `damaged.held` (see [`download`]).
async fn receive_report<L: GattLink, S: RecordSink>(
    link: &mut L,
    sink: &mut S,
    session: &SessionInfo,
    cfg: &CollectorConfig,
    values: &mut usize,
    damaged: &mut Damaged,
) -> Result<Completion, SessionError> {
    let completion = loop {
        let next = match tokio::time::timeout(cfg.racp_timeout, link.next_notification()).await {
            Err(_) => {
                tracing::warn!(device = %session.device.id, "RACP timer expired: incomplete set, resuming next session");
                break Completion::Incomplete;
            }
            Ok(None) => break Completion::Incomplete,
            Ok(Some(n)) => n,
        };
        match next.uuid {
            uuid::GLUCOSE_MEASUREMENT | uuid::GLUCOSE_CONTEXT => {
                *values += 1;
                let seq = sequence_of(&next.value);
                let undecodable = next.uuid == uuid::GLUCOSE_MEASUREMENT
                    && GlucoseMeasurement::parse(&next.value).is_err();
                match seq {
                    // The damaged value itself is reported now (a `decode_failed` event: it moves no
                    // cursor); its record is asked for again once the report is complete.
                    Some(seq) if undecodable => {
                        damaged.records.insert(seq, next.value.clone());
                    }
                    // A damaged record's context comes again with its re-request.
                    Some(seq) if damaged.records.contains_key(&seq) => continue,
                    _ if !damaged.records.is_empty() => {
                        damaged.held.push((next.uuid, next.value, now_utc()));
                        continue;
                    }
                    _ => {}
                }
                match sink.value(session, next.uuid, &next.value, now_utc()).await {
                    Ok(()) => {}
                    Err(SinkError::Full) => {
                        // Stop the meter sending more; what it sent after this stays in its memory.
                        let _ = link.write(uuid::RACP, &Racp::abort().to_vec()).await;
                        break Completion::JournalFull;
                    }
                    Err(e) => return Err(SessionError::Sink(e)),
                }
            }
            uuid::RACP => match Racp::parse(&next.value) {
                Ok(Racp::ResponseCode {
                    request_op_code,
                    response,
                }) if request_op_code == OpCode::REPORT_STORED_RECORDS => {
                    if response == ResponseCode::SUCCESS
                        || response == ResponseCode::NO_RECORDS_FOUND
                    {
                        break Completion::Complete;
                    }
                    let _ = sink.end_of_transfer(session).await;
                    return Err(SessionError::Racp(response));
                }
                // Other indications (an abort's answer, a stray count) do not end a report.
                _ => {}
            },
            _ => {}
        }
    };
    Ok(completion)
}

/// Runs the BLP collector: subscribes to measurements (a cuff may dump its memory now), holds every
/// indication until the cuff goes quiet for [`CollectorConfig::bp_idle`] or disconnects, then hands the
/// sink those it has not accepted before (see `hand_over_new_bp`).
///
/// # Errors
/// [`SessionError`] when the cuff needs pairing or the link fails before the transfer.
pub async fn blood_pressure_session<L: GattLink, S: RecordSink>(
    link: &mut L,
    sink: &mut S,
    device: &DeviceRef,
    cfg: &CollectorConfig,
) -> Result<SessionReport, SessionError> {
    if !link.has(uuid::BP_MEASUREMENT) {
        return Err(SessionError::Link {
            stage: "discovery",
            source: LinkError::Missing(uuid::BP_MEASUREMENT),
        });
    }
    // Read the clock before subscribing: cuffs that dump on subscribe start sending at once.
    let clock_offset_s = measure_clock_offset(link).await;
    let session = SessionInfo {
        device: device.clone(),
        clock_offset_s,
    };
    subscribe_all(
        link,
        &[uuid::INTERMEDIATE_CUFF_PRESSURE, uuid::BP_MEASUREMENT],
        cfg,
    )
    .await?;
    let mut held = Vec::new();
    // Intermediate Cuff Pressure came since the last measurement: the next one is the live result.
    let mut measuring = false;
    loop {
        let next = match tokio::time::timeout(cfg.bp_idle, link.next_notification()).await {
            Err(_) => break,
            // Some cuffs treat disconnect as "transfer complete" (vital-ios GATTMeterWithNoRACP).
            Ok(None) => break,
            Ok(Some(n)) => n,
        };
        if next.uuid == uuid::INTERMEDIATE_CUFF_PRESSURE {
            // Live cuff pressure is for a display, not the record.
            sink.live(&session, next.uuid, &next.value);
            measuring = true;
            continue;
        }
        if next.uuid != uuid::BP_MEASUREMENT {
            continue;
        }
        // Only the first measurement after the pressures: a cuff that sends its stored ones after the new
        // one must not have them taken as live.
        held.push(BpValue {
            bytes: smallvec::SmallVec::from_slice(&next.value),
            received_utc: now_utc(),
            live: std::mem::take(&mut measuring),
        });
    }
    let values = held.len();
    let completion = hand_over_new_bp(sink, &session, held).await?;
    match sink.end_of_transfer(&session).await {
        Ok(()) => Ok(SessionReport {
            completion,
            values,
            clock_offset_s,
        }),
        Err(SinkError::Full) => Ok(SessionReport {
            completion: Completion::JournalFull,
            values,
            clock_offset_s,
        }),
        Err(e) => Err(SessionError::Sink(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::gatt::bp::{BloodPressureMeasurement, PressureUnit};
    use protocol::ieee11073::SFloat;

    /// A sink that records what it is handed, with a fixed journal cursor per key.
    #[derive(Default)]
    struct Recorder {
        cursors: std::collections::HashMap<String, u64>,
        got: Vec<u16>,
        /// The values as handed over.
        values: Vec<Vec<u8>>,
    }

    impl RecordSink for Recorder {
        fn cursor(&self, key: &str) -> Option<u64> {
            self.cursors.get(key).copied()
        }

        async fn value(
            &mut self,
            _session: &SessionInfo,
            _uuid: u16,
            bytes: &[u8],
            _received_utc: i64,
        ) -> Result<(), SinkError> {
            self.values.push(bytes.to_vec());
            let m = BloodPressureMeasurement::parse(bytes)
                .map_err(|e| SinkError::Unavailable(format!("test values decode: {e}")))?;
            let sys = m.systolic.value().unwrap_or_default();
            self.got.push(sys as u16);
            Ok(())
        }

        async fn end_of_transfer(&mut self, _session: &SessionInfo) -> Result<(), SinkError> {
            Ok(())
        }
    }

    const T0: i64 = 1_718_352_000; // 2024-06-14T08:00:00Z

    /// A cuff reading (systolic `sys`) stamped `t`, as indicated.
    fn bp(sys: i32, t: i64) -> BpValue {
        let p = |v| SFloat::new(v, 0).unwrap_or(SFloat::NAN);
        let m = BloodPressureMeasurement {
            timestamp: DateTime::from_epoch_seconds(t),
            ..BloodPressureMeasurement::new(PressureUnit::MmHg, p(sys), p(80), p(95))
        };
        BpValue {
            bytes: m.to_vec().into(),
            received_utc: t,
            live: false,
        }
    }

    fn session() -> SessionInfo {
        SessionInfo {
            device: DeviceRef {
                id: "cuff".into(),
                model: None,
                numbering: RecordNumbering::Gls,
            },
            clock_offset_s: None,
        }
    }

    async fn handed(last_accepted: Option<(u64, i64)>, dump: Vec<BpValue>) -> Vec<u16> {
        let mut sink = Recorder::default();
        if let Some((n, t)) = last_accepted {
            sink.cursors
                .insert("cuff".into(), marked_cursor(n, Some(t)));
        }
        let completion = hand_over_new_bp(&mut sink, &session(), dump).await;
        assert_eq!(completion, Ok(Completion::Complete));
        sink.got
    }

    #[tokio::test]
    async fn a_cuff_dump_yields_what_was_stored_after_the_last_accepted_reading() {
        let oldest_first = || vec![bp(121, T0), bp(122, T0 + 600), bp(123, T0 + 1200)];
        // First contact: everything.
        assert_eq!(handed(None, oldest_first()).await, [121, 122, 123]);
        // The last accepted is the second: only the third is new.
        assert_eq!(handed(Some((2, T0 + 600)), oldest_first()).await, [123]);
        // The last accepted is not in the memory any more (a cuff that deletes what it sent): all new.
        assert_eq!(
            handed(Some((9, T0 - 60)), oldest_first()).await,
            [121, 122, 123]
        );
        // A cuff that sends newest first: what came before the last accepted one is new.
        let newest_first = vec![bp(123, T0 + 1200), bp(122, T0 + 600), bp(121, T0)];
        assert_eq!(handed(Some((2, T0 + 600)), newest_first).await, [123]);
        // The clock went back an hour before the third reading: position, not time, says it is new.
        let set_back = vec![bp(121, T0), bp(122, T0 + 600), bp(144, T0 - 2400)];
        assert_eq!(handed(Some((2, T0 + 600)), set_back.clone()).await, [144]);
        // And once it is accepted, nothing is sent again.
        assert!(handed(Some((3, T0 - 2400)), set_back).await.is_empty());
    }

    /// A held value is kept inline up to 19 octets (the longest BLS measurement); one that is longer — a
    /// device's extra octets after the fields — is handed over whole all the same.
    #[tokio::test]
    async fn held_values_of_any_length_are_handed_over_unchanged() {
        let p = |v| SFloat::new(v, 0).unwrap_or(SFloat::NAN);
        let longest = BloodPressureMeasurement {
            timestamp: DateTime::from_epoch_seconds(T0),
            pulse_rate: Some(p(70)),
            user_id: Some(1),
            measurement_status: Some(protocol::gatt::bp::MeasurementStatus(0)),
            ..BloodPressureMeasurement::new(PressureUnit::MmHg, p(121), p(80), p(95))
        }
        .to_vec();
        assert_eq!(longest.len(), 19);
        let mut longer = bp(122, T0 + 600).bytes.to_vec();
        longer.extend([0xAA; 12]);
        let dump: Vec<BpValue> = [longest.clone(), longer.clone()]
            .into_iter()
            .map(|bytes| BpValue {
                bytes: bytes.into(),
                received_utc: T0,
                live: false,
            })
            .collect();
        let mut sink = Recorder::default();
        let completion = hand_over_new_bp(&mut sink, &session(), dump).await;
        assert_eq!(completion, Ok(Completion::Complete));
        assert_eq!(sink.values, [longest, longer]);
    }

    #[test]
    fn a_marked_cursor_orders_by_count_and_keeps_the_time() {
        let a = marked_cursor(1, Some(T0 + 3600));
        let b = marked_cursor(2, Some(T0)); // taken later, clock set back
        assert!(b > a, "the journal's highest cursor is the last accepted");
        assert_eq!(marked_count(Some(b)), 2);
        assert_eq!(cursor_mark(Some(b)), Some(T0));
        assert_eq!(cursor_mark(Some(marked_cursor(3, None))), None);
        assert_eq!(marked_count(None), 0);
    }
}
