//! The alert rule engine: rules as data, evaluated exactly in the unit the patient saw (DESIGN.md
//! "Alerts"; issue 5 part 1; every number from `CLINICAL.md`).
//!
//! # Layers
//!
//! - [`file`](mod@file) — the rule file format ([`RuleFile`], TOML through serde) and its validation into a
//!   [`RuleSet`]. Every rule *and every threshold* carries its guideline [`Source`] (a CLINICAL.md citation
//!   key such as `"[S1]"` plus text). [`DEFAULT_RULES_TOML`] is CLINICAL.md §1–§5 as a file with CN, US and
//!   EU profiles.
//! - [`overrides`] — per-patient settings from the CRM ([`PatientSettings`]): profile, insulin treatment,
//!   pacemaker, threshold overrides with guard-rails (CLINICAL.md §4.6). An invalid override is an
//!   [`OverrideError`] that names the rule and says why.
//! - [`engine`] — the state machine: [`Engine::on_reading`], [`Engine::on_tick`],
//!   [`Engine::on_deadlines`] (at [`Engine::next_deadline`]), [`Engine::on_symptoms`],
//!   [`Engine::acknowledge`] → [`AlertAction`]s. Confirmation by a repeat
//!   (§4.2), episodes with escalation (§4.3), window rules (§2.2 7-day average, §2.3 trend, §4.5
//!   adherence). Its [`EngineState`] is plain data (serde with the `serde` feature) for a service to
//!   persist.
//! - [`decimal`] — [`Dec`], the exact decimal every threshold and every SFLOAT reading is compared as
//!   (CLINICAL.md §3.4 rule 3: 70 mg/dL is not < 70; 3.9 mmol/L is not < 3.9).
//!
//! # Features
//!
//! The module needs `alloc`. Parsing TOML ([`RuleSet::from_toml`], [`RuleSet::default_rules`]) needs
//! `serde`, which brings the `toml` crate (0.9, no_std + alloc, so it builds for Cortex-M too). Without
//! `serde` a [`RuleFile`] can still be built in code and validated with [`RuleSet::new`].
//!
//! Pure: no I/O, no clock. Times are Unix seconds (UTC) passed in; local days use the patient's
//! [`PatientSettings::utc_offset_s`].

use alloc::string::String;
use core::fmt;

pub mod decimal;
pub mod engine;
pub mod file;
pub mod overrides;
mod window;

#[cfg(all(test, feature = "serde"))]
mod tests;

pub use decimal::{Dec, DecError, Op};
pub use engine::{
    Alert, AlertAction, AlertStatus, CloseReason, ConfirmedBy, Engine, EngineState, Escalation,
    KeptBpReading, ObservedValue, ReadingInput, ThresholdRef,
};
#[cfg(feature = "serde")]
pub use file::DEFAULT_RULES_TOML;
pub use file::{RuleFile, RuleFileError, RuleSet};
pub use overrides::{Override, OverrideError, PatientSettings};

/// Alert severity tiers (CLINICAL.md §4.1), ordered `Info < Advisory < Urgent < Critical`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "UPPERCASE"))]
pub enum Severity {
    /// Weekly summary only (above-target single glucose, grade-2 single BP).
    Info,
    /// Next business day / batched nurse review (averages, patterns).
    Advisory,
    /// Same-day nurse call (Level 1 hypo, confirmed BP crisis without symptoms, HR < 40 / > 120).
    Urgent,
    /// Page on-call now (LO, Level 2 hypo, HI, BP crisis with symptoms).
    Critical,
}

impl Severity {
    /// The name as in the rule file (`"CRITICAL"`, …).
    pub fn name(self) -> &'static str {
        match self {
            Severity::Info => "INFO",
            Severity::Advisory => "ADVISORY",
            Severity::Urgent => "URGENT",
            Severity::Critical => "CRITICAL",
        }
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Regional profile (CLINICAL.md §1–§2: where guidelines differ, each threshold has per-profile values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum Profile {
    /// China: CDS 2020 glucose targets, 中国高血压防治指南 2018/2024, public-health spec 2017.
    CN,
    /// United States: ADA Standards of Care, ACC/AHA 2017 / AHA/ACC 2025.
    US,
    /// Europe: ESH 2023 for blood pressure; glucose as ADA (CLINICAL.md has no separate EU glucose values).
    EU,
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Profile::CN => "CN",
            Profile::US => "US",
            Profile::EU => "EU",
        })
    }
}

/// Where a number comes from: a CLINICAL.md citation key (`"[S1]"`, several allowed: `"[S12][S9]"`) and
/// a short text quoting or describing the guideline statement.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(deny_unknown_fields))]
pub struct Source {
    /// Citation key(s) from CLINICAL.md §7, e.g. `"[S1][S2]"`.
    pub cite: String,
    /// What the source says (and, for a derived number, how it was derived).
    pub text: String,
}

impl Source {
    /// `true` when both the key and the text are present (a key must look like `[S…]` or name a
    /// patient override).
    pub fn is_complete(&self) -> bool {
        !self.cite.trim().is_empty() && !self.text.trim().is_empty()
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.cite, self.text)
    }
}

/// A symptom a patient (or a kiosk question) reports. Symptoms skip confirmation (CLINICAL.md §4.2) and
/// raise the rules that name them to their `severity_if_symptoms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum Symptom {
    /// A severe hypoglycaemic event needing assistance (ADA Level 3, CLINICAL.md §1.1, S1).
    SevereHypoglycaemia,
    /// Chest pain, dyspnoea, back pain, numbness/weakness, vision change or speech difficulty (AHA
    /// hypertensive crisis page, CLINICAL.md §2.3, S21).
    CrisisSymptoms,
    /// Dizziness or syncope (BP_LOW and HR_BRADY_URGENT, CLINICAL.md §2.3–§2.4).
    DizzinessOrSyncope,
}

impl Symptom {
    /// Every symptom, in a fixed order (the order [`Symptoms::iter`] yields them in).
    pub const ALL: [Symptom; 3] = [
        Symptom::SevereHypoglycaemia,
        Symptom::CrisisSymptoms,
        Symptom::DizzinessOrSyncope,
    ];

    /// The name as in the rule file and on the wire (`"crisis_symptoms"`, …).
    pub fn name(self) -> &'static str {
        match self {
            Symptom::SevereHypoglycaemia => "severe_hypoglycaemia",
            Symptom::CrisisSymptoms => "crisis_symptoms",
            Symptom::DizzinessOrSyncope => "dizziness_or_syncope",
        }
    }

    /// The symptom named `name` ([`Symptom::name`]); `None` for a name this version does not know.
    pub fn from_name(name: &str) -> Option<Symptom> {
        Symptom::ALL.into_iter().find(|s| s.name() == name)
    }

    fn bit(self) -> u8 {
        match self {
            Symptom::SevereHypoglycaemia => 1,
            Symptom::CrisisSymptoms => 2,
            Symptom::DizzinessOrSyncope => 4,
        }
    }
}

/// A set of [`Symptom`]s (empty by default).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Symptoms(u8);

impl Symptoms {
    /// No symptoms.
    pub const NONE: Symptoms = Symptoms(0);

    /// The set holding `symptoms`.
    pub fn of(symptoms: &[Symptom]) -> Symptoms {
        Symptoms(symptoms.iter().fold(0, |a, s| a | s.bit()))
    }

    /// `true` when `s` is in the set.
    pub fn contains(self, s: Symptom) -> bool {
        self.0 & s.bit() != 0
    }

    /// `true` when any of `list` is in the set.
    pub fn any_of(self, list: &[Symptom]) -> bool {
        list.iter().any(|s| self.contains(*s))
    }

    /// `true` for the empty set.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The symptoms in the set, in [`Symptom::ALL`]'s order.
    pub fn iter(self) -> impl Iterator<Item = Symptom> {
        Symptom::ALL.into_iter().filter(move |s| self.contains(*s))
    }
}
