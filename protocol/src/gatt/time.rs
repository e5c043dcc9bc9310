//! Date Time (0x2A08) — also the GLS Base Time and the BPM Time Stamp — and Current Time (0x2A2B).
//!
//! A field sent as 0 means "not known" for year, month and day (Date Time characteristic; a BPM Time
//! Stamp may carry year 0, Nordic's test does). GLS v1.0 §3.1.1.3 forbids 0 in Base Time, but a collector
//! must still read it, so decoding accepts it and [`DateTime::is_complete`] tells the model layer.

use core::fmt;

use super::{Codec, Reader, Writer};
use crate::Error;

/// A calendar date and time as a device keeps it: no zone, fields as sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct DateTime {
    /// 1582..=9999, or 0 when not known.
    pub year: u16,
    /// 1..=12, or 0 when not known.
    pub month: u8,
    /// 1..=31, or 0 when not known.
    pub day: u8,
    /// 0..=23.
    pub hours: u8,
    /// 0..=59.
    pub minutes: u8,
    /// 0..=59.
    pub seconds: u8,
}

impl DateTime {
    /// The encoded size.
    pub const LEN: usize = 7;

    /// Checks each field against its range (Date Time characteristic, GSS §3.70).
    ///
    /// # Errors
    /// [`Error::DecodeOutOfRange`] naming the first field out of range.
    pub fn check(&self) -> Result<(), Error> {
        let bad = |field, value: u32| Err(Error::DecodeOutOfRange { field, value });
        if self.year != 0 && !(1582..=9999).contains(&self.year) {
            return bad("year", self.year.into());
        }
        if self.month > 12 {
            return bad("month", self.month.into());
        }
        if self.day > 31 {
            return bad("day", self.day.into());
        }
        if self.hours > 23 {
            return bad("hours", self.hours.into());
        }
        if self.minutes > 59 {
            return bad("minutes", self.minutes.into());
        }
        if self.seconds > 59 {
            return bad("seconds", self.seconds.into());
        }
        Ok(())
    }

    /// Reads and checks the 7 octets.
    pub(crate) fn read(r: &mut Reader<'_>) -> Result<DateTime, Error> {
        let dt = DateTime {
            year: r.u16()?,
            month: r.u8()?,
            day: r.u8()?,
            hours: r.u8()?,
            minutes: r.u8()?,
            seconds: r.u8()?,
        };
        dt.check()?;
        Ok(dt)
    }

    pub(crate) fn write(&self, w: &mut Writer<'_>) -> Result<(), Error> {
        w.u16(self.year)?;
        w.put(&[self.month, self.day, self.hours, self.minutes, self.seconds])
    }

    /// `true` when year, month and day are all known, so the instant can be placed on a timeline.
    pub fn is_complete(&self) -> bool {
        self.year != 0 && self.month != 0 && self.day != 0
    }

    /// Seconds since 1970-01-01T00:00:00 reading the fields as UTC, or `None` when the date is incomplete
    /// or not a real calendar day (31 February).
    pub fn to_epoch_seconds(&self) -> Option<i64> {
        if !self.is_complete()
            || self.check().is_err()
            || self.day > days_in_month(self.year, self.month)
        {
            return None;
        }
        let days = days_from_civil(
            i64::from(self.year),
            u32::from(self.month),
            u32::from(self.day),
        );
        Some(
            days * 86_400
                + i64::from(self.hours) * 3600
                + i64::from(self.minutes) * 60
                + i64::from(self.seconds),
        )
    }

    /// The date-time at `secs` since the Unix epoch (UTC), or `None` outside the years 1582..=9999.
    pub fn from_epoch_seconds(secs: i64) -> Option<DateTime> {
        let days = secs.div_euclid(86_400);
        let tod = secs.rem_euclid(86_400);
        let (y, m, d) = civil_from_days(days);
        let year = u16::try_from(y)
            .ok()
            .filter(|y| (1582..=9999).contains(y))?;
        Some(DateTime {
            year,
            month: m as u8,
            day: d as u8,
            hours: (tod / 3600) as u8,
            minutes: (tod / 60 % 60) as u8,
            seconds: (tod % 60) as u8,
        })
    }

    /// This date-time moved by `minutes` (GLS user-facing time = Base Time + Time Offset), or `None` when
    /// the date is incomplete.
    pub fn add_minutes(&self, minutes: i32) -> Option<DateTime> {
        DateTime::from_epoch_seconds(self.to_epoch_seconds()? + i64::from(minutes) * 60)
    }
}

/// `YYYY-MM-DDTHH:MM:SS`, with `0000` / `00` for a field sent as 0 (the `decode` contract).
impl fmt::Display for DateTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
            self.year, self.month, self.day, self.hours, self.minutes, self.seconds
        )
    }
}

fn is_leap(y: u16) -> bool {
    (y.is_multiple_of(4) && !y.is_multiple_of(100)) || y.is_multiple_of(400)
}

fn days_in_month(y: u16, m: u8) -> u8 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if is_leap(y) => 29,
        2 => 28,
        _ => 0,
    }
}

// Proleptic Gregorian day counts, after Howard Hinnant's "chrono-Compatible Low-Level Date Algorithms"
// (days_from_civil / civil_from_days); pure integer arithmetic, so it runs on the Cortex-M build too.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

impl<'a> Codec<'a> for DateTime {
    const UUID: u16 = 0x2A08;

    fn parse(bytes: &'a [u8]) -> Result<Self, Error> {
        let mut r = Reader::new(bytes);
        r.require(Self::LEN)?;
        // Octets after the 7 defined ones are tolerated and ignored: Date Time has no flags, so there is
        // nothing they could mean.
        DateTime::read(&mut r)
    }

    fn buffer_len(&self) -> usize {
        Self::LEN
    }

    fn emit(&self, out: &mut [u8]) -> Result<usize, Error> {
        let mut w = Writer::new(out, Self::LEN)?;
        self.write(&mut w)?;
        Ok(w.written())
    }
}

/// Current Time (0x2A2B): Exact Time 256 (Day Date Time + Fractions256) + Adjust Reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct CurrentTime {
    /// The date and time.
    pub date_time: DateTime,
    /// 0 unknown, 1 Monday ..= 7 Sunday; taken as sent (devices do not always cross-check it).
    pub day_of_week: u8,
    /// 1/256 s.
    pub fractions256: u8,
    /// Adjust Reason bits (see the `ADJUST_*` constants); reserved bits 4–7 are kept.
    pub adjust_reason: u8,
}

impl CurrentTime {
    /// The encoded size.
    pub const LEN: usize = 10;
    /// Adjust Reason bit 0.
    pub const ADJUST_MANUAL: u8 = 0x01;
    /// Adjust Reason bit 1.
    pub const ADJUST_EXTERNAL_REFERENCE: u8 = 0x02;
    /// Adjust Reason bit 2.
    pub const ADJUST_TIME_ZONE: u8 = 0x04;
    /// Adjust Reason bit 3.
    pub const ADJUST_DST: u8 = 0x08;

    /// The names of the set Adjust Reason bits.
    pub fn adjust_reason_names(&self) -> impl Iterator<Item = &'static str> + '_ {
        const NAMES: [&str; 4] = [
            "manual time update",
            "external reference time update",
            "change of time zone",
            "change of DST",
        ];
        NAMES
            .iter()
            .enumerate()
            .filter(move |(i, _)| self.adjust_reason & (1 << i) != 0)
            .map(|(_, n)| *n)
    }
}

impl<'a> Codec<'a> for CurrentTime {
    const UUID: u16 = 0x2A2B;

    fn parse(bytes: &'a [u8]) -> Result<Self, Error> {
        let mut r = Reader::new(bytes);
        r.require(Self::LEN)?;
        let date_time = DateTime::read(&mut r)?;
        let day_of_week = r.u8()?;
        if day_of_week > 7 {
            return Err(Error::DecodeOutOfRange {
                field: "day_of_week",
                value: day_of_week.into(),
            });
        }
        Ok(CurrentTime {
            date_time,
            day_of_week,
            fractions256: r.u8()?,
            adjust_reason: r.u8()?,
        })
    }

    fn buffer_len(&self) -> usize {
        Self::LEN
    }

    fn emit(&self, out: &mut [u8]) -> Result<usize, Error> {
        let mut w = Writer::new(out, Self::LEN)?;
        self.date_time.write(&mut w)?;
        w.put(&[self.day_of_week, self.fractions256, self.adjust_reason])?;
        Ok(w.written())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn date_time_known_answer() {
        let dt = DateTime::parse(&[0xE2, 0x07, 0x04, 0x11, 0x0F, 0x33, 0x00]).unwrap();
        assert_eq!(dt.to_string(), "2018-04-17T15:51:00");
        assert_eq!(dt.to_vec(), [0xE2, 0x07, 0x04, 0x11, 0x0F, 0x33, 0x00]);
    }

    #[test]
    fn date_time_unknown_fields_print_as_zero() {
        let dt = DateTime::parse(&[0, 0, 0, 0, 0x12, 0x1A, 0x20]).unwrap();
        assert_eq!(dt.to_string(), "0000-00-00T18:26:32");
        assert!(!dt.is_complete());
        assert_eq!(dt.to_epoch_seconds(), None);
    }

    #[test]
    fn date_time_rejects_out_of_range_fields() {
        let e = DateTime::parse(&[0xE9, 0x07, 13, 1, 0, 0, 0]).unwrap_err();
        assert_eq!(
            e,
            Error::DecodeOutOfRange {
                field: "month",
                value: 13
            }
        );
        assert!(DateTime::parse(&[0xE9, 0x07, 1, 1, 24, 0, 0]).is_err());
    }

    #[test]
    fn epoch_round_trip_and_offset() {
        let dt = DateTime {
            year: 2019,
            month: 2,
            day: 27,
            hours: 11,
            minutes: 10,
            seconds: 30,
        };
        assert_eq!(dt.to_epoch_seconds(), Some(1_551_265_830));
        assert_eq!(DateTime::from_epoch_seconds(1_551_265_830), Some(dt));
        let earlier = dt.add_minutes(-5).unwrap();
        assert_eq!(earlier.to_string(), "2019-02-27T11:05:30");
        // Across a leap day and a year end.
        let ny = DateTime {
            year: 2024,
            month: 12,
            day: 31,
            hours: 23,
            minutes: 59,
            seconds: 0,
        };
        assert_eq!(
            ny.add_minutes(1).unwrap().to_string(),
            "2025-01-01T00:00:00"
        );
        let leap = DateTime {
            year: 2024,
            month: 2,
            day: 28,
            hours: 12,
            minutes: 0,
            seconds: 0,
        };
        assert_eq!(
            leap.add_minutes(24 * 60).unwrap().to_string(),
            "2024-02-29T12:00:00"
        );
    }

    #[test]
    fn impossible_calendar_day_has_no_instant() {
        let dt = DateTime {
            year: 2023,
            month: 2,
            day: 31,
            hours: 0,
            minutes: 0,
            seconds: 0,
        };
        assert_eq!(dt.to_epoch_seconds(), None);
    }

    #[test]
    fn current_time_known_answer() {
        let bytes = [0xE9, 0x07, 0x0C, 0x1F, 0x17, 0x3B, 0x3B, 0x07, 0xFF, 0x06];
        let ct = CurrentTime::parse(&bytes).unwrap();
        assert_eq!(ct.date_time.to_string(), "2025-12-31T23:59:59");
        assert_eq!(ct.day_of_week, 7);
        assert_eq!(ct.fractions256, 255);
        let names: Vec<_> = ct.adjust_reason_names().collect();
        assert_eq!(
            names,
            ["external reference time update", "change of time zone"]
        );
        assert_eq!(ct.to_vec(), bytes);
    }

    #[test]
    fn current_time_rejects_day_of_week_8() {
        let e = CurrentTime::parse(&[0xE9, 0x07, 1, 1, 0, 0, 0, 8, 0, 0]).unwrap_err();
        assert_eq!(
            e,
            Error::DecodeOutOfRange {
                field: "day_of_week",
                value: 8
            }
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// No input panics either decoder; whatever decodes re-encodes to its defined octets.
        #[test]
        fn parse_is_total(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..24)) {
            if let Ok(dt) = DateTime::parse(&bytes) {
                proptest::prop_assert_eq!(&dt.to_vec()[..], &bytes[..DateTime::LEN]);
            }
            if let Ok(ct) = CurrentTime::parse(&bytes) {
                proptest::prop_assert_eq!(&ct.to_vec()[..], &bytes[..CurrentTime::LEN]);
            }
        }

        /// Epoch seconds → date-time → epoch seconds is the identity over the years 1582..=9999.
        #[test]
        fn epoch_round_trip(secs in -12_212_553_600i64..=253_402_300_799) {
            let dt = DateTime::from_epoch_seconds(secs).unwrap();
            proptest::prop_assert_eq!(dt.to_epoch_seconds(), Some(secs));
        }
    }
}
