//! BP history and the window computations: the home-BP average (CLINICAL.md §2.2) and daily means for
//! trends (§2.3), in exact rational arithmetic on milli-mmHg so that an average of exactly 135 is ≥ 135.

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;
use core::cmp::Ordering;

use super::decimal::{Dec, round_half_away};
use super::file::{DAY_S, WindowDef};

/// A BP-side value in mmHg: exact when the cuff sent mmHg, derived (`f64`) from kPa (§3.4).
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub(crate) enum Obs {
    /// The SFLOAT as sent, mmHg.
    Exact(Dec),
    /// Converted from kPa.
    Approx(f64),
}

/// As people see it: an mmHg reading exactly as the cuff sent it (whole mmHg, CLINICAL.md §3.4); a value
/// converted from kPa to one decimal, enough not to round it across a whole-mmHg threshold.
impl core::fmt::Display for Obs {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Obs::Exact(v) => write!(f, "{v}"),
            Obs::Approx(v) => write!(f, "{v:.1}"),
        }
    }
}

impl Obs {
    /// `self.cmp(threshold)`: exact for mmHg, `f64` for kPa-derived values (no published kPa value).
    pub(crate) fn cmp_dec(&self, d: Dec) -> Ordering {
        match self {
            Obs::Exact(v) => v.cmp(&d),
            Obs::Approx(f) => f.total_cmp(&d.to_f64()),
        }
    }

    pub(crate) fn to_f64(self) -> f64 {
        match self {
            Obs::Exact(v) => v.to_f64(),
            Obs::Approx(f) => f,
        }
    }

    /// milli-mmHg, exact for mmHg values with up to three decimals.
    fn milli(self) -> i128 {
        match self {
            Obs::Exact(v) => v
                .scaled_to(-3)
                .unwrap_or_else(|| i128::from(round_half_away(v.to_f64() * 1000.0))),
            Obs::Approx(f) => i128::from(round_half_away(f * 1000.0)),
        }
    }
}

/// One BP reading kept for pattern and window rules.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub(crate) struct BpEntry {
    pub(crate) time_utc: i64,
    pub(crate) reading_id: String,
    /// Time of the first reading of its session (§3.3).
    pub(crate) session_utc: i64,
    pub(crate) sbp: Obs,
    pub(crate) dbp: Obs,
    pub(crate) pulse: Option<Dec>,
    pub(crate) low_quality: bool,
    pub(crate) irregular: bool,
    pub(crate) pulse_range: bool,
}

/// A mean as `num / den` milli-mmHg (den > 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Mean {
    num: i128,
    den: i128,
}

impl Mean {
    /// `self.cmp(threshold)`, exactly when the numbers fit (they do for any real series).
    pub(crate) fn cmp_dec(&self, d: Dec) -> Ordering {
        let exact = d
            .scaled_to(-3)
            .and_then(|t| t.checked_mul(self.den))
            .map(|rhs| self.num.cmp(&rhs));
        exact.unwrap_or_else(|| self.to_f64().total_cmp(&d.to_f64()))
    }

    /// mmHg, for display.
    pub(crate) fn to_f64(self) -> f64 {
        self.num as f64 / self.den as f64 / 1000.0
    }
}

fn gcd(a: i128, b: i128) -> i128 {
    let (mut a, mut b) = (a.abs(), b.abs());
    while b != 0 {
        let r = a % b;
        a = b;
        b = r;
    }
    a
}

/// The mean of session means (each session's readings averaged first, CLINICAL.md §3.3).
fn mean_of_sessions<'a>(entries: impl Iterator<Item = &'a BpEntry>) -> Option<(Mean, Mean)> {
    // session → (Σ sbp, Σ dbp, k)
    let mut sessions: BTreeMap<i64, (i128, i128, i128)> = BTreeMap::new();
    for e in entries {
        let s = sessions.entry(e.session_utc).or_insert((0, 0, 0));
        s.0 += e.sbp.milli();
        s.1 += e.dbp.milli();
        s.2 += 1;
    }
    let n = i128::try_from(sessions.len()).ok()?;
    if n == 0 {
        return None;
    }
    let mut lcm: i128 = 1;
    for (_, _, k) in sessions.values() {
        lcm = lcm.checked_mul(*k / gcd(lcm, *k))?;
    }
    let (mut s_num, mut d_num) = (0i128, 0i128);
    for (s, d, k) in sessions.values() {
        let w = lcm / k;
        s_num = s_num.checked_add(s.checked_mul(w)?)?;
        d_num = d_num.checked_add(d.checked_mul(w)?)?;
    }
    let den = n.checked_mul(lcm)?;
    Some((Mean { num: s_num, den }, Mean { num: d_num, den }))
}

/// Local day number of `t` for a patient `offset` seconds ahead of UTC.
pub(crate) fn local_day(t: i64, offset: i64) -> i64 {
    t.saturating_add(offset).div_euclid(DAY_S)
}

/// The home-BP average over a window.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct WindowAverage {
    pub(crate) sbp: Mean,
    pub(crate) dbp: Mean,
    pub(crate) readings: usize,
    pub(crate) sessions: usize,
    pub(crate) reading_ids: Vec<String>,
    pub(crate) dropped_first_day: bool,
}

/// CLINICAL.md §2.2: valid (not low-quality, §3.2) readings of the last `w.days` local days, today
/// included; the first day of a new block (no reading in the `new_block_gap_days` before it) discarded
/// ([S13][S19]; day-1 readings run ≈ 2.8/1.4 mmHg higher, [S14]); the mean of session means; `None`
/// unless at least `w.min_readings` readings remain (≥ 12, ESH/AHA [S13]).
pub(crate) fn home_average(
    entries: &[BpEntry],
    now: i64,
    offset: i64,
    w: &WindowDef,
) -> Option<WindowAverage> {
    let today = local_day(now, offset);
    let first = today - i64::from(w.days) + 1;
    let days_with_data: Vec<i64> = {
        let mut d: Vec<i64> = entries
            .iter()
            .filter(|e| e.time_utc <= now)
            .map(|e| local_day(e.time_utc, offset))
            .collect();
        d.dedup();
        d
    };
    let gap = i64::from(w.new_block_gap_days);
    let block_start = |day: i64| {
        w.drop_first_day_of_new_block && !days_with_data.iter().any(|d| *d < day && *d >= day - gap)
    };
    let mut dropped_first_day = false;
    let used: Vec<&BpEntry> = entries
        .iter()
        .filter(|e| e.time_utc <= now && !e.low_quality)
        .filter(|e| {
            let d = local_day(e.time_utc, offset);
            if d < first || d > today {
                return false;
            }
            if block_start(d) {
                dropped_first_day = true;
                return false;
            }
            true
        })
        .collect();
    let readings = used.len();
    if readings < usize::try_from(w.min_readings).unwrap_or(usize::MAX) {
        return None;
    }
    let (sbp, dbp) = mean_of_sessions(used.iter().copied())?;
    let mut sessions: Vec<i64> = used.iter().map(|e| e.session_utc).collect();
    sessions.dedup();
    Some(WindowAverage {
        sbp,
        dbp,
        readings,
        sessions: sessions.len(),
        reading_ids: used.iter().map(|e| e.reading_id.clone()).collect(),
        dropped_first_day,
    })
}

/// One local day's mean of its valid readings.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct DayMean {
    pub(crate) day: i64,
    pub(crate) sbp: Mean,
    pub(crate) dbp: Mean,
    pub(crate) reading_ids: Vec<String>,
}

/// Daily means (session means averaged) of the valid readings, ascending by day.
pub(crate) fn daily_means(entries: &[BpEntry], now: i64, offset: i64) -> Vec<DayMean> {
    let mut by_day: BTreeMap<i64, Vec<&BpEntry>> = BTreeMap::new();
    for e in entries
        .iter()
        .filter(|e| e.time_utc <= now && !e.low_quality)
    {
        by_day
            .entry(local_day(e.time_utc, offset))
            .or_default()
            .push(e);
    }
    by_day
        .into_iter()
        .filter_map(|(day, es)| {
            let (sbp, dbp) = mean_of_sessions(es.iter().copied())?;
            Some(DayMean {
                day,
                sbp,
                dbp,
                reading_ids: es.iter().map(|e| e.reading_id.clone()).collect(),
            })
        })
        .collect()
}
