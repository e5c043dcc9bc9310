//! Which patient a kiosk reading belongs to: the attribution rule, pure (no clock, no I/O), so it is
//! tested at the session's edges, with replayed memory and with clock offsets (see `docs/kiosk.md`).
//!
//! # The rule
//!
//! A kiosk reading goes to the patient whose session was open **when it was measured**, and to nobody
//! else. Which time says when it was measured:
//!
//! 1. **The device's time, corrected by the clock offset measured at this connection**, when that time
//!    can be trusted (the device sent a complete time stamp, its clock was read at this connection, no
//!    time-fault bit: `ReadingTime.trusted`). This is the only time that tells a reading measured now from
//!    one taken this morning and replayed from the device's memory on connect: every current source
//!    delivers readings as a memory transfer (GLS RACP, a cuff's dump on subscribe), so their receive
//!    times are all "now" whatever their age.
//! 2. **The receive time**, only for a reading delivered live — indicated as it was measured, not from a
//!    memory transfer — whose device time cannot be trusted. A cuff's measurement is live when it is the
//!    first to come after the cuff's Intermediate Cuff Pressure in this connection (the patient is
//!    measuring now, `RecordSink::live_value`); everything else is a memory transfer.
//! 3. Otherwise — a memory transfer whose device time cannot be trusted — the gateway cannot tell when it
//!    was measured: the reading is **held** (`replayed_memory`). Never guessed.
//!
//! A session covers `[start, end)` in whole seconds (the check-in second counts, the check-out second
//! does not). A reading measured in no session is held (`no_session`); one measured before the current
//! session began or after a session ended, while some session exists, is held (`outside_session`). A
//! reading measured during an earlier session that arrives after the next check-in still goes to the
//! earlier session's patient (the kiosk keeps the recent sessions, [`SessionLog`]).

use std::collections::VecDeque;

/// One session's span on the gateway's clock (Unix seconds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionSpan {
    /// The session number.
    pub id: u64,
    /// The pseudonymous patient id.
    pub patient: String,
    /// Check-in, inclusive.
    pub start_utc: i64,
    /// Check-out or time-out, exclusive; `None` while open.
    pub end_utc: Option<i64>,
}

impl SessionSpan {
    /// Whether the session was open at `t`.
    pub fn covers(&self, t: i64) -> bool {
        t >= self.start_utc && self.end_utc.is_none_or(|end| t < end)
    }
}

/// What the rule needs to know of a reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadingTimes {
    /// Device time − measured clock offset, when it can be trusted (`ReadingTime.trusted`).
    pub trusted_measured_utc: Option<i64>,
    /// When the gateway received it.
    pub received_utc: i64,
    /// Delivered as a memory transfer (RACP, a cuff's dump), not live as it was measured.
    pub from_memory: bool,
}

/// Why a kiosk reading is held for staff.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HoldReason {
    /// Nobody was checked in when it was measured (and nobody has been in the recent past).
    NoSession,
    /// Measured before the session open at its arrival began, or after a session ended.
    OutsideSession,
    /// From the device's memory, with a device time that cannot be trusted: when it was measured is
    /// unknown.
    ReplayedMemory,
}

impl HoldReason {
    /// The name staff see and the wire carries.
    pub fn name(self) -> &'static str {
        match self {
            HoldReason::NoSession => "no_session",
            HoldReason::OutsideSession => "outside_session",
            HoldReason::ReplayedMemory => "replayed_memory",
        }
    }
}

/// The rule's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attribution {
    /// The reading belongs to this session's patient.
    Patient {
        /// The session.
        session: u64,
        /// The pseudonymous patient id.
        patient: String,
    },
    /// Held for staff.
    Held(HoldReason),
}

/// Attributes a reading among `sessions` (any order).
pub fn attribute(sessions: &[SessionSpan], r: &ReadingTimes) -> Attribution {
    let t = match (r.trusted_measured_utc, r.from_memory) {
        (Some(t), _) => t,
        (None, false) => r.received_utc,
        (None, true) => return Attribution::Held(HoldReason::ReplayedMemory),
    };
    // A time after the reading arrived is a clock the offset did not describe: not a session's.
    if t > r.received_utc {
        return Attribution::Held(HoldReason::OutsideSession);
    }
    match sessions.iter().find(|s| s.covers(t)) {
        Some(s) => Attribution::Patient {
            session: s.id,
            patient: s.patient.clone(),
        },
        None if sessions.is_empty() => Attribution::Held(HoldReason::NoSession),
        None => Attribution::Held(HoldReason::OutsideSession),
    }
}

/// The current session and the recent ended ones, bounded, newest last.
#[derive(Debug, Clone, Default)]
pub struct SessionLog {
    spans: VecDeque<SessionSpan>,
}

/// How many ended sessions are kept for late readings (a busy clinic's hour).
const KEEP_ENDED: usize = 64;
/// How long an ended session still takes late readings, seconds (a meter synced an hour later).
const KEEP_ENDED_S: i64 = 24 * 3600;

impl SessionLog {
    /// Opens a session at `now` (ends the open one at `now` first).
    pub fn open(&mut self, id: u64, patient: &str, now: i64) {
        self.close(now);
        self.spans.push_back(SessionSpan {
            id,
            patient: patient.to_owned(),
            start_utc: now,
            end_utc: None,
        });
        while self.spans.len() > KEEP_ENDED + 1 {
            self.spans.pop_front();
        }
    }

    /// Ends the open session at `end` (exclusive); returns it if there was one.
    pub fn close(&mut self, end: i64) -> Option<SessionSpan> {
        let open = self.spans.back_mut().filter(|s| s.end_utc.is_none())?;
        // Never before its start; a session ended in the second it began covers nothing, so the next
        // one (which starts at that second) never overlaps it.
        open.end_utc = Some(end.max(open.start_utc));
        Some(open.clone())
    }

    /// The open session, if any.
    pub fn current(&self) -> Option<&SessionSpan> {
        self.spans.back().filter(|s| s.end_utc.is_none())
    }

    /// Forgets ended sessions older than a day.
    pub fn prune(&mut self, now: i64) {
        self.spans
            .retain(|s| s.end_utc.is_none_or(|e| now - e <= KEEP_ENDED_S));
    }

    /// The spans, oldest first.
    pub fn spans(&self) -> Vec<SessionSpan> {
        self.spans.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const T0: i64 = 1_764_900_000;

    fn span(id: u64, start: i64, end: Option<i64>) -> SessionSpan {
        SessionSpan {
            id,
            patient: format!("p-kiosk-{id:04}"),
            start_utc: start,
            end_utc: end,
        }
    }

    fn trusted(t: i64, received: i64) -> ReadingTimes {
        ReadingTimes {
            trusted_measured_utc: Some(t),
            received_utc: received,
            from_memory: true,
        }
    }

    fn patient(session: u64) -> Attribution {
        Attribution::Patient {
            session,
            patient: format!("p-kiosk-{session:04}"),
        }
    }

    #[test]
    fn the_check_in_second_counts_and_the_check_out_second_does_not() {
        let s = [span(1, T0, Some(T0 + 180))];
        assert_eq!(attribute(&s, &trusted(T0, T0 + 300)), patient(1));
        assert_eq!(attribute(&s, &trusted(T0 + 179, T0 + 300)), patient(1));
        assert_eq!(
            attribute(&s, &trusted(T0 + 180, T0 + 300)),
            Attribution::Held(HoldReason::OutsideSession)
        );
        assert_eq!(
            attribute(&s, &trusted(T0 - 1, T0 + 300)),
            Attribution::Held(HoldReason::OutsideSession)
        );
    }

    #[test]
    fn a_replayed_reading_measured_this_morning_is_not_the_current_patients() {
        // The cuff dumps its memory on connect during the session: everything arrives "now".
        let s = [span(7, T0, None)];
        let morning = trusted(T0 - 4 * 3600, T0 + 30);
        assert_eq!(
            attribute(&s, &morning),
            Attribution::Held(HoldReason::OutsideSession)
        );
        let now = trusted(T0 + 20, T0 + 30);
        assert_eq!(attribute(&s, &now), patient(7));
    }

    #[test]
    fn memory_without_a_trusted_clock_is_held_even_during_a_session() {
        let s = [span(3, T0, None)];
        let r = ReadingTimes {
            trusted_measured_utc: None,
            received_utc: T0 + 10,
            from_memory: true,
        };
        assert_eq!(
            attribute(&s, &r),
            Attribution::Held(HoldReason::ReplayedMemory)
        );
        // Delivered live, the receive time decides.
        let live = ReadingTimes {
            from_memory: false,
            ..r
        };
        assert_eq!(attribute(&s, &live), patient(3));
    }

    #[test]
    fn a_device_clock_one_hour_fast_is_corrected_before_the_rule() {
        // The device says 10:00 when it is 09:00; the offset (+3600) was measured at this connection, so
        // the corrected time is what the pipeline passes: the reading belongs to the session at 09:00.
        let device_time = T0 + 3600 + 15;
        let offset = 3600;
        let s = [span(2, T0, None)];
        assert_eq!(
            attribute(&s, &trusted(device_time - offset, T0 + 40)),
            patient(2)
        );
        // Uncorrected, it would be in the future: never a session's.
        assert_eq!(
            attribute(&s, &trusted(device_time, T0 + 40)),
            Attribution::Held(HoldReason::OutsideSession)
        );
    }

    #[test]
    fn no_session_at_all_is_named_so() {
        assert_eq!(
            attribute(&[], &trusted(T0, T0)),
            Attribution::Held(HoldReason::NoSession)
        );
    }

    #[test]
    fn a_late_reading_goes_to_the_session_it_was_measured_in_not_the_next() {
        let mut log = SessionLog::default();
        log.open(1, "p-kiosk-0001", T0);
        log.open(2, "p-kiosk-0002", T0 + 100); // the next check-in ends session 1
        let spans = log.spans();
        assert_eq!(attribute(&spans, &trusted(T0 + 50, T0 + 130)), patient(1));
        assert_eq!(attribute(&spans, &trusted(T0 + 120, T0 + 130)), patient(2));
    }

    #[test]
    fn a_timed_out_session_attributes_nothing_measured_afterwards() {
        let mut log = SessionLog::default();
        log.open(1, "p-kiosk-0001", T0);
        log.close(T0 + 180);
        let spans = log.spans();
        assert_eq!(
            attribute(&spans, &trusted(T0 + 181, T0 + 200)),
            Attribution::Held(HoldReason::OutsideSession)
        );
        assert_eq!(attribute(&spans, &trusted(T0 + 179, T0 + 200)), patient(1));
    }

    proptest! {
        /// Attributed iff measured inside a session, and then to that session's patient; never to a
        /// session that began after the reading was measured.
        #[test]
        fn attributed_exactly_when_measured_inside_a_session(
            start in 0i64..10_000,
            len in 1i64..1_000,
            measured in -2_000i64..14_000,
            late in 0i64..5_000,
            offset in -7_200i64..7_200,
        ) {
            let s = [span(9, T0 + start, Some(T0 + start + len))];
            // The device keeps its own clock; the pipeline corrects it by the measured offset.
            let device = T0 + measured + offset;
            let corrected = device - offset;
            let received = T0 + measured.max(start) + late;
            let got = attribute(&s, &trusted(corrected, received));
            let inside = (start..start + len).contains(&measured);
            if inside {
                prop_assert_eq!(got, patient(9));
            } else {
                prop_assert_eq!(got, Attribution::Held(HoldReason::OutsideSession));
            }
        }

        /// Memory with an untrusted clock is held whatever the sessions and times.
        #[test]
        fn untrusted_memory_is_always_held(
            starts in proptest::collection::vec(0i64..10_000, 0..5),
            received in 0i64..20_000,
        ) {
            let s: Vec<_> = starts.iter().enumerate().map(|(i, st)| span(i as u64, T0 + st, None)).collect();
            let r = ReadingTimes { trusted_measured_utc: None, received_utc: T0 + received, from_memory: true };
            prop_assert_eq!(attribute(&s, &r), Attribution::Held(HoldReason::ReplayedMemory));
        }

        /// Sessions opened one after another never overlap, so a time has at most one patient.
        #[test]
        fn sessions_of_a_log_never_overlap(gaps in proptest::collection::vec(0i64..500, 1..20), t in 0i64..10_000) {
            let mut log = SessionLog::default();
            let mut now = T0;
            for (i, g) in gaps.iter().enumerate() {
                now += g;
                log.open(i as u64, &format!("p-kiosk-{i:04}"), now);
            }
            let covering = log.spans().iter().filter(|s| s.covers(T0 + t)).count();
            prop_assert!(covering <= 1);
        }
    }
}
