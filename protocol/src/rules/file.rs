//! The rule file: TOML (serde types), validated into a [`RuleSet`].
//!
//! # Format
//!
//! ```toml
//! version = 1
//! name = "phg-default"
//! default_profile = "CN"              # CN | US | EU; a patient's settings may choose another
//!
//! [session]                           # CLINICAL.md §3.3
//! window_s = 600
//! source = { cite = "[S13][S18]", text = "…" }
//!
//! [confirmation]                      # §3.3 / §4.2
//! min_gap_s = 60
//! window_s = 900
//! low_quality_timeout_severity = "ADVISORY"
//! source = { cite = "[S21]", text = "…" }
//!
//! [episodes]                          # §4.3
//! merge_s = { CRITICAL = 3600, URGENT = 43200, ADVISORY = 86400, INFO = 86400 }
//! window_rule_merge_s = 604800
//! resolve_after_in_range = 2
//! source = { cite = "[S40][S34]", text = "…" }
//!
//! [escalation]                        # §4.3 unacknowledged alerts
//! ack_s = { CRITICAL = 1800, URGENT = 14400 }
//! source = { cite = "[S34]", text = "…" }
//!
//! [[rule]]
//! id = "GLU_HYPO_L1"
//! family = "GLU_LOW"                  # episode key = (patient, family)
//! kind = "glucose_level"
//! severity = "URGENT"
//! message = "Level 1 hypoglycaemia: …"
//! source = { cite = "[S1][S2]", text = "…" }
//! [rule.threshold.value]              # every threshold: op, the published value per unit, source
//! op = "<"
//! mg_dl = 70
//! mmol_l = 3.9
//! source = { cite = "[S1]", text = "ADA: Level 1 < 70 mg/dL (3.9 mmol/L) and ≥ 54" }
//! [rule.threshold.value.profile.CN]   # optional regional alternative, a full threshold with its source
//! …
//! ```
//!
//! Rule kinds and their thresholds (names under `[rule.threshold.*]`):
//!
//! | kind | thresholds | unit fields | other fields |
//! |---|---|---|---|
//! | `glucose_level` | `value` (optional with `censored`) | `mg_dl` + `mmol_l` | `censored`, `escalate_to`, `escalate_if` |
//! | `glucose_target` | `fasting`, `preprandial`, `postprandial`, `casual`, `bedtime`, `unknown` | `mg_dl` + `mmol_l` | |
//! | `bp_level` | `sbp` and/or `dbp` (either fires: "and/or") | `mmhg` | `confirm`, `pattern`, `single_severity` |
//! | `pulse_level` | `pulse` | `bpm` | `confirm`, `pattern` |
//! | `flag` | – | – | `flag`, `of_last`, `pattern` |
//! | `bp_average` | `sbp`, `dbp` | `mmhg` | `window` |
//! | `bp_trend` | `sbp`, `dbp` | `mmhg` | `consecutive_days`, `tier` |
//! | `adherence` | – (the `steps` carry days) | – | `measure`, `steps` |
//! | `reported` | – | – | `symptoms` (fires on a symptom report) |
//!
//! Glucose thresholds carry both units as the guideline published them (70 / 3.9), and a reading is
//! compared in its device-native unit against the value for that unit (CLINICAL.md §3.4 rule 3); the
//! pair must agree within 1 mg/dL (factor 18.016). Blood pressure is published in mmHg only: a kPa cuff's
//! value is converted (§3.4) and compared as `f64`.

use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use super::decimal::{Dec, Op};
use super::{Profile, Severity, Source, Symptom};
use crate::model::MG_PER_DL_PER_MMOL_PER_L;
use crate::validate::Censor;

/// The default rule file: CLINICAL.md §1–§5 with CN, US and EU profiles. Parse with
/// [`RuleSet::default_rules`].
#[cfg(feature = "serde")]
pub const DEFAULT_RULES_TOML: &str = include_str!("default_rules.toml");

/// Seconds per day.
pub(crate) const DAY_S: i64 = 86_400;

/// Threshold name of a single-valued glucose rule.
pub const PARAM_VALUE: &str = "value";
/// Threshold name for systolic pressure.
pub const PARAM_SBP: &str = "sbp";
/// Threshold name for diastolic pressure.
pub const PARAM_DBP: &str = "dbp";
/// Threshold name for pulse.
pub const PARAM_PULSE: &str = "pulse";
/// The `glucose_target` threshold names, one per meal context (CLINICAL.md §1.4).
pub const TARGET_CONTEXTS: [&str; 6] = [
    "fasting",
    "preprandial",
    "postprandial",
    "casual",
    "bedtime",
    "unknown",
];

/// The `glucose_target` threshold for a GLS meal value (CLINICAL.md §1.4): 1 preprandial,
/// 2 postprandial, 3 fasting, 4 casual, 5 bedtime; 0 / absent / reserved → "unknown" (which uses the
/// non-fasting ceiling, §1.4 rule 2).
pub fn meal_context(meal: Option<u8>) -> &'static str {
    match meal {
        Some(1) => "preprandial",
        Some(2) => "postprandial",
        Some(3) => "fasting",
        Some(4) => "casual",
        Some(5) => "bedtime",
        _ => "unknown",
    }
}

/// A rule file (see the module documentation for the format).
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(deny_unknown_fields))]
pub struct RuleFile {
    /// Format version; this crate reads 1.
    pub version: u32,
    /// A name for logs ("phg-default").
    pub name: String,
    /// The profile for patients whose settings name none.
    pub default_profile: Profile,
    /// Session grouping.
    pub session: SessionDef,
    /// Confirmation by repeat measurement.
    pub confirmation: ConfirmationDef,
    /// Episode merging and resolution.
    pub episodes: EpisodeDef,
    /// Re-routing of unacknowledged alerts.
    pub escalation: EscalationDef,
    /// The rules, in priority order within a family (the first of equal severity wins).
    pub rule: Vec<RuleDef>,
}

/// Session grouping (CLINICAL.md §3.3).
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(deny_unknown_fields))]
pub struct SessionDef {
    /// Readings within this many seconds of a session's first reading belong to it.
    pub window_s: i64,
    /// Source.
    pub source: Source,
}

/// Confirmation by repeat measurement (CLINICAL.md §3.3, §4.2).
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(deny_unknown_fields))]
pub struct ConfirmationDef {
    /// A repeat must come at least this long after the first reading.
    pub min_gap_s: i64,
    /// …and at most this long; after it, the pending alert is raised anyway.
    pub window_s: i64,
    /// The most a pending alert from a *low-quality* reading becomes when no clean repeat comes
    /// (CLINICAL.md §3.2: never a crisis without a clean repeat).
    pub low_quality_timeout_severity: Severity,
    /// Source.
    pub source: Source,
}

/// Durations by severity, seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(
    feature = "serde",
    serde(deny_unknown_fields, rename_all = "UPPERCASE")
)]
pub struct SeverityDurations {
    /// CRITICAL.
    pub critical: i64,
    /// URGENT.
    pub urgent: i64,
    /// ADVISORY.
    pub advisory: i64,
    /// INFO.
    pub info: i64,
}

impl SeverityDurations {
    /// The duration for `s`.
    pub fn get(&self, s: Severity) -> i64 {
        match s {
            Severity::Critical => self.critical,
            Severity::Urgent => self.urgent,
            Severity::Advisory => self.advisory,
            Severity::Info => self.info,
        }
    }
}

/// Episodes (CLINICAL.md §4.3).
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(deny_unknown_fields))]
pub struct EpisodeDef {
    /// Same-or-lower severity matches within this long of the episode's (re)opening merge into it.
    pub merge_s: SeverityDurations,
    /// The same for window rules (averages, trends): one alert a week.
    pub window_rule_merge_s: i64,
    /// Consecutive clean in-range readings that resolve an episode.
    pub resolve_after_in_range: u32,
    /// Source.
    pub source: Source,
}

/// Acknowledgement deadlines, seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(
    feature = "serde",
    serde(deny_unknown_fields, rename_all = "UPPERCASE")
)]
pub struct AckDurations {
    /// CRITICAL.
    pub critical: i64,
    /// URGENT.
    pub urgent: i64,
}

/// Escalation of unacknowledged alerts to the next tier (CLINICAL.md §4.3).
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(deny_unknown_fields))]
pub struct EscalationDef {
    /// An active alert not acknowledged this long after it became active moves to the next tier.
    pub ack_s: AckDurations,
    /// Source.
    pub source: Source,
}

/// What a rule looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum RuleKind {
    /// One glucose reading against a level (and/or a LO/HI censor).
    GlucoseLevel,
    /// One glucose reading against the target for its meal context.
    GlucoseTarget,
    /// One BP reading: systolic and/or diastolic.
    BpLevel,
    /// One BP reading's pulse.
    PulseLevel,
    /// A BLS status flag on BP readings.
    Flag,
    /// The 7-day home-BP average (window rule, evaluated on tick).
    BpAverage,
    /// Daily means above target on consecutive days (window rule, on tick).
    BpTrend,
    /// Days without readings (window rule, on tick).
    Adherence,
    /// A reported symptom/event, no measurement (ADA Level 3 hypoglycaemia).
    Reported,
}

impl RuleKind {
    /// `true` for rules evaluated on glucose readings.
    pub fn is_glucose(self) -> bool {
        matches!(
            self,
            RuleKind::GlucoseLevel | RuleKind::GlucoseTarget | RuleKind::Reported
        )
    }

    /// `true` for rules evaluated on each BP reading.
    pub fn is_bp_reading(self) -> bool {
        matches!(
            self,
            RuleKind::BpLevel | RuleKind::PulseLevel | RuleKind::Flag
        )
    }

    /// `true` for rules evaluated on [`super::Engine::on_tick`].
    pub fn is_window(self) -> bool {
        matches!(
            self,
            RuleKind::BpAverage | RuleKind::BpTrend | RuleKind::Adherence
        )
    }
}

/// A BLS Blood Pressure Measurement status flag a `flag` rule watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum FlagName {
    /// Status bit 2, irregular pulse.
    IrregularPulse,
    /// Status bits 3–4, pulse rate outside the cuff's range.
    PulseRateRange,
}

/// What an adherence rule counts days without.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum Measure {
    /// BP readings (patients who measure BP).
    Bp,
    /// Glucose readings of insulin-treated patients.
    GlucoseInsulin,
}

/// A condition that raises a `glucose_level` rule to its `escalate_to` severity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum EscalateIf {
    /// The patient is insulin-treated (settings, or an insulin medication id 1–5 in a GLS context).
    InsulinTreated,
    /// This reading and the previous glucose reading both meet the rule.
    TwoConsecutive,
    /// The GLS context says "major health issues" (health = 2; CLINICAL.md §1.4 sick-day logic).
    MajorHealthIssue,
}

/// Count matching sessions in a window (e.g. "≥ 3 sessions in 7 days").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(deny_unknown_fields))]
pub struct PatternDef {
    /// Sessions needed.
    pub sessions: u32,
    /// Window, days.
    pub within_days: u32,
}

/// "At least `count` of the last `of` readings".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(deny_unknown_fields))]
pub struct OfLastDef {
    /// Readings that must be flagged.
    pub count: u32,
    /// Of this many consecutive readings.
    pub of: u32,
}

/// The home-BP averaging window (CLINICAL.md §2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(deny_unknown_fields))]
pub struct WindowDef {
    /// Rolling window, days.
    pub days: u32,
    /// Readings needed (after discarding) for a decision.
    pub min_readings: u32,
    /// Discard the first day of a new measurement block.
    pub drop_first_day_of_new_block: bool,
    /// A day with readings starts a new block when this many days before it had none.
    pub new_block_gap_days: u32,
}

/// One step of an adherence rule.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(deny_unknown_fields))]
pub struct StepDef {
    /// Rule id the alert carries at this step (`ADH_BP_REMIND`, …).
    pub id: String,
    /// Whole days without a reading.
    pub days: u32,
    /// Severity at this step.
    pub severity: Severity,
    /// Message.
    pub message: String,
    /// Source of the day count.
    pub source: Source,
}

/// One threshold value: a comparison, the published number per unit, and its source.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(deny_unknown_fields))]
pub struct ThresholdValue {
    /// The comparison.
    pub op: Op,
    /// mg/dL value (glucose).
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub mg_dl: Option<Dec>,
    /// mmol/L value (glucose).
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub mmol_l: Option<Dec>,
    /// mmHg value (blood pressure).
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub mmhg: Option<Dec>,
    /// bpm value (pulse).
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub bpm: Option<Dec>,
    /// Where the number comes from.
    pub source: Source,
}

/// A threshold: its default value and optional per-profile alternatives.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(deny_unknown_fields))]
pub struct ThresholdDef {
    /// The comparison.
    pub op: Op,
    /// mg/dL value (glucose).
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub mg_dl: Option<Dec>,
    /// mmol/L value (glucose).
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub mmol_l: Option<Dec>,
    /// mmHg value (blood pressure).
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub mmhg: Option<Dec>,
    /// bpm value (pulse).
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub bpm: Option<Dec>,
    /// Where the number comes from.
    pub source: Source,
    /// Regional alternatives (CLINICAL.md §1–§2), each with its own source.
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "BTreeMap::is_empty")
    )]
    pub profile: BTreeMap<Profile, ThresholdValue>,
}

/// A threshold as it applies to one profile: copied numbers, borrowed source.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Resolved<'a> {
    /// The comparison.
    pub op: Op,
    /// mg/dL value.
    pub mg_dl: Option<Dec>,
    /// mmol/L value.
    pub mmol_l: Option<Dec>,
    /// mmHg value.
    pub mmhg: Option<Dec>,
    /// bpm value.
    pub bpm: Option<Dec>,
    /// Source.
    pub source: &'a Source,
}

impl ThresholdValue {
    fn resolved(&self) -> Resolved<'_> {
        Resolved {
            op: self.op,
            mg_dl: self.mg_dl,
            mmol_l: self.mmol_l,
            mmhg: self.mmhg,
            bpm: self.bpm,
            source: &self.source,
        }
    }
}

impl ThresholdDef {
    /// The value for `profile` (its alternative, or the default).
    pub fn resolve(&self, profile: Profile) -> Resolved<'_> {
        match self.profile.get(&profile) {
            Some(alt) => alt.resolved(),
            None => Resolved {
                op: self.op,
                mg_dl: self.mg_dl,
                mmol_l: self.mmol_l,
                mmhg: self.mmhg,
                bpm: self.bpm,
                source: &self.source,
            },
        }
    }
}

impl fmt::Display for Resolved<'_> {
    /// `"< 70 mg/dL | < 3.9 mmol/L"`, `">= 180 mmHg"`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for (v, unit) in [
            (self.mg_dl, "mg/dL"),
            (self.mmol_l, "mmol/L"),
            (self.mmhg, "mmHg"),
            (self.bpm, "bpm"),
        ] {
            if let Some(v) = v {
                if !first {
                    f.write_str(" | ")?;
                }
                write!(f, "{} {v} {unit}", self.op)?;
                first = false;
            }
        }
        Ok(())
    }
}

#[cfg(feature = "serde")]
fn yes() -> bool {
    true
}

/// One rule.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(deny_unknown_fields))]
pub struct RuleDef {
    /// Rule id (CLINICAL.md's, e.g. `GLU_HYPO_L1`).
    pub id: String,
    /// Episode family: alerts of one family for one patient merge into one episode (§4.3).
    pub family: String,
    /// What the rule looks at.
    pub kind: RuleKind,
    /// Severity when it fires.
    pub severity: Severity,
    /// Text for the patient / care team.
    pub message: String,
    /// Where the rule comes from.
    pub source: Source,
    /// Profiles the rule applies to (empty: all).
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Vec::is_empty")
    )]
    pub profiles: Vec<Profile>,
    /// Off by default when `false` (a patient override may turn it on).
    #[cfg_attr(feature = "serde", serde(default = "yes"))]
    pub enabled: bool,
    /// A CRITICAL safety floor: relaxing or disabling it needs a waiver with a reason (§4.6).
    #[cfg_attr(feature = "serde", serde(default))]
    pub safety_floor: bool,
    /// Needs a repeat measurement before it alerts (§4.2).
    #[cfg_attr(feature = "serde", serde(default))]
    pub confirm: bool,
    /// Severity when a listed symptom is reported (skips confirmation).
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub severity_if_symptoms: Option<Severity>,
    /// Symptoms that raise the rule to `severity_if_symptoms` (for `reported`: that fire it).
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Vec::is_empty")
    )]
    pub symptoms: Vec<Symptom>,
    /// `glucose_level`: fires on a censored reading of this side (LO / HI).
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub censored: Option<Censor>,
    /// `glucose_level`: severity when any of `escalate_if` holds.
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub escalate_to: Option<Severity>,
    /// Conditions for `escalate_to`.
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Vec::is_empty")
    )]
    pub escalate_if: Vec<EscalateIf>,
    /// With `pattern`: severity of a single matching reading before the pattern is met.
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub single_severity: Option<Severity>,
    /// Fires (at `severity`) only when this many sessions in the window match.
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub pattern: Option<PatternDef>,
    /// `flag`: which status flag.
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub flag: Option<FlagName>,
    /// `flag`: "≥ count of the last `of` readings".
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub of_last: Option<OfLastDef>,
    /// `bp_average`: the window.
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub window: Option<WindowDef>,
    /// `bp_trend`: consecutive days above target.
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub consecutive_days: Option<u32>,
    /// Care tier the alert opens at (0 nurse, 1 physician; `bp_trend` "escalate to physician").
    #[cfg_attr(feature = "serde", serde(default))]
    pub tier: u8,
    /// `adherence`: what is counted.
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub measure: Option<Measure>,
    /// `adherence`: steps by days without data, ascending.
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Vec::is_empty")
    )]
    pub steps: Vec<StepDef>,
    /// Named thresholds (see the kind table in the module docs).
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "BTreeMap::is_empty")
    )]
    pub threshold: BTreeMap<String, ThresholdDef>,
}

impl RuleDef {
    /// Whether the rule applies to `profile`.
    pub fn applies_to(&self, profile: Profile) -> bool {
        self.profiles.is_empty() || self.profiles.contains(&profile)
    }

    /// The quantity the rule's thresholds measure, if it has any.
    pub fn quantity(&self) -> Option<Quantity> {
        match self.kind {
            RuleKind::GlucoseLevel | RuleKind::GlucoseTarget => Some(Quantity::Glucose),
            RuleKind::BpLevel | RuleKind::BpAverage | RuleKind::BpTrend => Some(Quantity::Pressure),
            RuleKind::PulseLevel => Some(Quantity::Pulse),
            RuleKind::Flag | RuleKind::Adherence | RuleKind::Reported => None,
        }
    }

    /// `true` when relaxing or disabling the rule needs a waiver: a declared safety floor or any
    /// CRITICAL rule (CLINICAL.md §4.6).
    pub fn needs_waiver(&self) -> bool {
        self.safety_floor || self.severity == Severity::Critical
    }
}

/// What a threshold measures (which unit fields it must have).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantity {
    /// `mg_dl` and `mmol_l`.
    Glucose,
    /// `mmhg`.
    Pressure,
    /// `bpm`.
    Pulse,
}

/// Why a rule file is not usable. The message names the rule (and threshold) and says why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleFileError {
    /// The TOML did not parse or did not match the format.
    Parse(String),
    /// A version this crate does not read.
    Version(u32),
    /// Two rules share an id.
    DuplicateRule(String),
    /// A rule, threshold, step or section without a complete `source`.
    MissingSource {
        /// Where (`"rule GLU_HYPO_L1 threshold value (CN)"`, `"[confirmation]"`).
        at: String,
    },
    /// Anything else, with what is wrong.
    Invalid {
        /// Where.
        at: String,
        /// What.
        problem: String,
    },
}

impl fmt::Display for RuleFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RuleFileError::Parse(e) => write!(f, "rule file does not parse: {e}"),
            RuleFileError::Version(v) => write!(f, "rule file version {v} is not supported (1 is)"),
            RuleFileError::DuplicateRule(id) => write!(f, "rule {id} is defined twice"),
            RuleFileError::MissingSource { at } => {
                write!(f, "{at}: every number needs a source (cite + text)")
            }
            RuleFileError::Invalid { at, problem } => write!(f, "{at}: {problem}"),
        }
    }
}

fn invalid(at: &str, problem: impl Into<String>) -> RuleFileError {
    RuleFileError::Invalid {
        at: String::from(at),
        problem: problem.into(),
    }
}

fn need_source(s: &Source, at: impl FnOnce() -> String) -> Result<(), RuleFileError> {
    if s.is_complete() {
        Ok(())
    } else {
        Err(RuleFileError::MissingSource { at: at() })
    }
}

/// Checks that a glucose pair agrees: |mg/dL − mmol/L × 18.016| ≤ 1 mg/dL (every published pair in
/// CLINICAL.md §1.1/§3.4 does: 70/3.9, 54/3.0, 180/10.0, 250/13.9, 300/16.7, 600/33.3).
pub(crate) fn glucose_pair_agrees(mg_dl: Dec, mmol_l: Dec) -> bool {
    let diff = mg_dl.to_f64() - mmol_l.to_f64() * MG_PER_DL_PER_MMOL_PER_L;
    diff.abs() <= 1.0
}

fn check_units(
    q: Quantity,
    v: (Option<Dec>, Option<Dec>, Option<Dec>, Option<Dec>),
    at: &str,
) -> Result<(), RuleFileError> {
    let (mg, mmol, mmhg, bpm) = v;
    let ok = match q {
        Quantity::Glucose => match (mg, mmol) {
            (Some(a), Some(b)) => {
                if !glucose_pair_agrees(a, b) {
                    return Err(invalid(
                        at,
                        format!("mg_dl {a} and mmol_l {b} disagree by more than 1 mg/dL"),
                    ));
                }
                mmhg.is_none() && bpm.is_none()
            }
            _ => false,
        },
        Quantity::Pressure => mmhg.is_some() && mg.is_none() && mmol.is_none() && bpm.is_none(),
        Quantity::Pulse => bpm.is_some() && mg.is_none() && mmol.is_none() && mmhg.is_none(),
    };
    if ok {
        Ok(())
    } else {
        Err(invalid(
            at,
            match q {
                Quantity::Glucose => "needs mg_dl and mmol_l (both as published) and nothing else",
                Quantity::Pressure => "needs mmhg and nothing else",
                Quantity::Pulse => "needs bpm and nothing else",
            },
        ))
    }
}

/// A validated rule file.
#[derive(Debug, Clone, PartialEq)]
pub struct RuleSet {
    file: RuleFile,
    index: BTreeMap<String, usize>,
    history_s: i64,
}

impl RuleSet {
    /// Validates a rule file: version 1; unique ids; a complete source on every section, rule,
    /// threshold, regional alternative and adherence step; the threshold names and unit fields each
    /// kind needs; consistent glucose pairs; sane windows.
    ///
    /// # Errors
    /// The first problem found, naming the rule and threshold.
    pub fn new(mut file: RuleFile) -> Result<RuleSet, RuleFileError> {
        // mmol/L values keep their published decimal (TOML `3.0` reads as the float 3): at least one
        // place, the unit's display resolution (§3.4).
        for r in &mut file.rule {
            for t in r.threshold.values_mut() {
                t.mmol_l = t.mmol_l.map(|v| v.with_places(1));
                for alt in t.profile.values_mut() {
                    alt.mmol_l = alt.mmol_l.map(|v| v.with_places(1));
                }
            }
        }
        if file.version != 1 {
            return Err(RuleFileError::Version(file.version));
        }
        need_source(&file.session.source, || "[session]".into())?;
        need_source(&file.confirmation.source, || "[confirmation]".into())?;
        need_source(&file.episodes.source, || "[episodes]".into())?;
        need_source(&file.escalation.source, || "[escalation]".into())?;
        let c = &file.confirmation;
        if file.session.window_s <= 0 || c.min_gap_s < 0 || c.window_s <= c.min_gap_s {
            return Err(invalid(
                "[confirmation]",
                "need 0 <= min_gap_s < window_s and session.window_s > 0",
            ));
        }
        let m = &file.episodes.merge_s;
        if [
            m.critical,
            m.urgent,
            m.advisory,
            m.info,
            file.episodes.window_rule_merge_s,
        ]
        .iter()
        .any(|d| *d <= 0)
            || file.episodes.resolve_after_in_range == 0
        {
            return Err(invalid(
                "[episodes]",
                "durations and resolve_after_in_range must be positive",
            ));
        }
        if file.escalation.ack_s.critical <= 0 || file.escalation.ack_s.urgent <= 0 {
            return Err(invalid("[escalation]", "ack_s must be positive"));
        }
        let mut index = BTreeMap::new();
        let mut history_days: u32 = 1;
        for (i, r) in file.rule.iter().enumerate() {
            if index.insert(r.id.clone(), i).is_some() {
                return Err(RuleFileError::DuplicateRule(r.id.clone()));
            }
            check_rule(r)?;
            if let Some(p) = r.pattern {
                history_days = history_days.max(p.within_days);
            }
            if let Some(w) = r.window {
                history_days = history_days.max(w.days.saturating_add(w.new_block_gap_days));
            }
            if let Some(n) = r.consecutive_days {
                history_days = history_days.max(n);
            }
        }
        let history_s = (i64::from(history_days) + 2) * DAY_S;
        Ok(RuleSet {
            file,
            index,
            history_s,
        })
    }

    /// Parses and validates a TOML rule file.
    ///
    /// # Errors
    /// [`RuleFileError::Parse`] with the parser's message, or any [`RuleSet::new`] error.
    #[cfg(feature = "serde")]
    pub fn from_toml(text: &str) -> Result<RuleSet, RuleFileError> {
        use alloc::string::ToString;
        let file: RuleFile =
            toml::from_str(text).map_err(|e| RuleFileError::Parse(e.to_string()))?;
        RuleSet::new(file)
    }

    /// The default rules ([`DEFAULT_RULES_TOML`]).
    ///
    /// With `std` the file is parsed once per process and cloned after that: every configuration that
    /// names no rule file asks for it (both programs' `check`, each test, each fuzz input), and parsing
    /// the TOML costs about a hundred times what a clone does.
    ///
    /// # Errors
    /// Never for the file this crate ships (a test proves it); typed for the caller's sake.
    #[cfg(feature = "serde")]
    pub fn default_rules() -> Result<RuleSet, RuleFileError> {
        #[cfg(feature = "std")]
        {
            static PARSED: std::sync::OnceLock<Result<RuleSet, RuleFileError>> =
                std::sync::OnceLock::new();
            PARSED
                .get_or_init(|| RuleSet::from_toml(DEFAULT_RULES_TOML))
                .clone()
        }
        #[cfg(not(feature = "std"))]
        RuleSet::from_toml(DEFAULT_RULES_TOML)
    }

    /// The file.
    pub fn file(&self) -> &RuleFile {
        &self.file
    }

    /// The rules in file order.
    pub fn rules(&self) -> &[RuleDef] {
        &self.file.rule
    }

    /// A rule by id.
    pub fn rule(&self, id: &str) -> Option<&RuleDef> {
        self.index.get(id).and_then(|i| self.file.rule.get(*i))
    }

    /// How long BP history must be kept for the window and pattern rules, seconds.
    pub fn history_s(&self) -> i64 {
        self.history_s
    }
}

fn check_rule(r: &RuleDef) -> Result<(), RuleFileError> {
    let at = format!("rule {}", r.id);
    if r.id.trim().is_empty() || r.family.trim().is_empty() || r.message.trim().is_empty() {
        return Err(invalid(&at, "id, family and message must not be empty"));
    }
    need_source(&r.source, || at.clone())?;
    // Threshold names per kind: (required, optional).
    let (required, optional): (&[&str], &[&str]) = match r.kind {
        RuleKind::GlucoseLevel if r.censored.is_some() => (&[], &[PARAM_VALUE]),
        RuleKind::GlucoseLevel => (&[PARAM_VALUE], &[]),
        RuleKind::GlucoseTarget => (&TARGET_CONTEXTS, &[]),
        RuleKind::BpLevel => (&[], &[PARAM_SBP, PARAM_DBP]),
        RuleKind::PulseLevel => (&[PARAM_PULSE], &[]),
        RuleKind::BpAverage | RuleKind::BpTrend => (&[PARAM_SBP, PARAM_DBP], &[]),
        RuleKind::Flag | RuleKind::Adherence | RuleKind::Reported => (&[], &[]),
    };
    for p in required {
        if !r.threshold.contains_key(*p) {
            return Err(invalid(
                &at,
                format!("kind {:?} needs threshold {p}", r.kind),
            ));
        }
    }
    if r.kind == RuleKind::BpLevel && r.threshold.is_empty() {
        return Err(invalid(&at, "bp_level needs threshold sbp and/or dbp"));
    }
    for (name, t) in &r.threshold {
        if !required.contains(&name.as_str()) && !optional.contains(&name.as_str()) {
            return Err(invalid(
                &at,
                format!("kind {:?} has no threshold {name}", r.kind),
            ));
        }
        let tat = format!("{at} threshold {name}");
        need_source(&t.source, || tat.clone())?;
        if let Some(q) = r.quantity() {
            check_units(q, (t.mg_dl, t.mmol_l, t.mmhg, t.bpm), &tat)?;
            for (p, alt) in &t.profile {
                let pat = format!("{tat} ({p})");
                need_source(&alt.source, || pat.clone())?;
                check_units(q, (alt.mg_dl, alt.mmol_l, alt.mmhg, alt.bpm), &pat)?;
            }
        }
    }
    match r.kind {
        RuleKind::Flag if r.flag.is_none() => return Err(invalid(&at, "kind flag needs flag")),
        RuleKind::BpAverage if r.window.is_none() => {
            return Err(invalid(&at, "kind bp_average needs window"));
        }
        RuleKind::BpTrend if r.consecutive_days.unwrap_or(0) == 0 => {
            return Err(invalid(&at, "kind bp_trend needs consecutive_days >= 1"));
        }
        RuleKind::Adherence => {
            if r.measure.is_none() || r.steps.is_empty() {
                return Err(invalid(&at, "kind adherence needs measure and steps"));
            }
            let mut last = 0;
            for s in &r.steps {
                need_source(&s.source, || format!("{at} step {}", s.id))?;
                if s.days <= last || s.id.trim().is_empty() {
                    return Err(invalid(
                        &at,
                        "steps need ids and strictly ascending days > 0",
                    ));
                }
                last = s.days;
            }
        }
        RuleKind::Reported if r.symptoms.is_empty() => {
            return Err(invalid(&at, "kind reported needs symptoms"));
        }
        _ => {}
    }
    if r.severity_if_symptoms.is_some() == r.symptoms.is_empty() && r.kind != RuleKind::Reported {
        return Err(invalid(
            &at,
            "severity_if_symptoms and symptoms go together",
        ));
    }
    if r.escalate_to.is_some() == r.escalate_if.is_empty() {
        return Err(invalid(&at, "escalate_to and escalate_if go together"));
    }
    if let Some(p) = r.pattern
        && (p.sessions == 0 || p.within_days == 0)
    {
        return Err(invalid(&at, "pattern needs sessions and within_days > 0"));
    }
    if let Some(o) = r.of_last
        && (o.count == 0 || o.count > o.of)
    {
        return Err(invalid(&at, "of_last needs 0 < count <= of"));
    }
    if let Some(w) = r.window
        && (w.days == 0 || w.min_readings == 0)
    {
        return Err(invalid(&at, "window needs days and min_readings > 0"));
    }
    if r.single_severity.is_some() && r.pattern.is_none() {
        return Err(invalid(
            &at,
            "single_severity only makes sense with pattern",
        ));
    }
    Ok(())
}
