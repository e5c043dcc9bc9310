//! Per-patient settings and threshold overrides with guard-rails (CLINICAL.md §4.6).
//!
//! Precedence: patient override > regional profile > the rule file's default. Every override names who
//! set it and why (`set_by`, `reason`: the §4.6 model `threshold_override {rule_id, value, unit, set_by,
//! reason, effective_from, review_by}`). Guard-rails:
//!
//! - Tightening any threshold (firing for more values) is always allowed.
//! - Relaxing an INFO, ADVISORY or URGENT threshold is allowed (§4.6: "clinicians may relax
//!   ADVISORY/URGENT thresholds").
//! - Relaxing or disabling a CRITICAL rule or a declared `safety_floor` (LO/HI, < 3.0 mmol/L, BP crisis)
//!   needs a non-empty `waiver` — "stay on unless explicitly waived with a reason".
//! - Values must lie in the plausibility window of their quantity (CLINICAL.md §3, [`crate::validate`]).
//! - A glucose override may give one unit; the other is derived at display resolution (mg/dL integer,
//!   mmol/L one decimal, §3.4). When both are given they must agree within 1 mg/dL.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use super::decimal::{Dec, round_half_away};
use super::file::{
    PARAM_DBP, PARAM_SBP, Quantity, Resolved, RuleDef, RuleSet, glucose_pair_agrees,
};
use super::{Profile, Severity};
use crate::model::MG_PER_DL_PER_MMOL_PER_L;
use crate::validate::{DIASTOLIC_MMHG, GLUCOSE_MG_DL, GLUCOSE_MMOL_L, PULSE_BPM, SYSTOLIC_MMHG};

/// One clinician decision about one rule for one patient: a new threshold value, or the rule turned
/// on/off.
#[derive(Debug, Clone, PartialEq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(deny_unknown_fields))]
pub struct Override {
    /// The rule (`GLU_HYPO_L1`).
    pub rule_id: String,
    /// The threshold (`value`, `sbp`, `fasting`, …); absent for an on/off decision.
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub param: Option<String>,
    /// New mg/dL value.
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub mg_dl: Option<Dec>,
    /// New mmol/L value.
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub mmol_l: Option<Dec>,
    /// New mmHg value.
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub mmhg: Option<Dec>,
    /// New bpm value.
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub bpm: Option<Dec>,
    /// Turn the rule on or off (without `param`).
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub enabled: Option<bool>,
    /// Who decided (a clinician id).
    pub set_by: String,
    /// Why (clinical rationale).
    pub reason: String,
    /// For relaxing a safety floor: the explicit waiver, with its reason.
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub waiver: Option<String>,
    /// Applies to readings at or after this time (Unix s); absent: always.
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub effective_from_utc: Option<i64>,
    /// When the clinician should review it (informational; the service lists due reviews).
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub review_by_utc: Option<i64>,
}

impl Override {
    fn effective_at(&self, t: i64) -> bool {
        self.effective_from_utc.is_none_or(|f| f <= t)
    }
}

/// What the engine knows about one patient (from the CRM; pseudonymous id only, DESIGN.md promise 8).
#[derive(Debug, Clone, PartialEq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(deny_unknown_fields))]
pub struct PatientSettings {
    /// Pseudonymous patient id.
    pub patient: String,
    /// Regional profile; absent: the rule file's default.
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub profile: Option<Profile>,
    /// Insulin-treated: stricter hyperglycaemia handling and glucose adherence (CLINICAL.md §1.2, §4.5).
    #[cfg_attr(feature = "serde", serde(default))]
    pub insulin_treated: bool,
    /// Pacemaker: cuff pulse and rhythm rules off (CLINICAL.md §2.4 note, [S25-BP]).
    #[cfg_attr(feature = "serde", serde(default))]
    pub pacemaker: bool,
    /// Measures BP at home (BP adherence applies even before a first reading).
    #[cfg_attr(feature = "serde", serde(default))]
    pub monitors_bp: bool,
    /// Local time minus UTC, seconds (local days for the 7-day average and trends).
    #[cfg_attr(feature = "serde", serde(default))]
    pub utc_offset_s: i32,
    /// Enrolment time: adherence counts from here until a first reading.
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub enrolled_utc: Option<i64>,
    /// Threshold overrides and rule toggles.
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Vec::is_empty")
    )]
    pub overrides: Vec<Override>,
}

impl PatientSettings {
    /// Settings with every default.
    pub fn new(patient: &str) -> PatientSettings {
        PatientSettings {
            patient: String::from(patient),
            ..Default::default()
        }
    }

    /// The override of `rule_id`'s threshold `param` in force at `t` (the latest effective one).
    pub fn override_for(&self, rule_id: &str, param: &str, t: i64) -> Option<&Override> {
        self.overrides
            .iter()
            .filter(|o| {
                o.rule_id == rule_id && o.param.as_deref() == Some(param) && o.effective_at(t)
            })
            .max_by_key(|o| o.effective_from_utc.unwrap_or(i64::MIN))
    }

    /// The on/off decision for `rule_id` in force at `t`.
    pub fn toggle_for(&self, rule_id: &str, t: i64) -> Option<bool> {
        self.overrides
            .iter()
            .filter(|o| o.rule_id == rule_id && o.param.is_none() && o.effective_at(t))
            .max_by_key(|o| o.effective_from_utc.unwrap_or(i64::MIN))
            .and_then(|o| o.enabled)
    }

    /// Checks every override against `rules` (guard-rails in the module docs) and returns the settings
    /// with each glucose override's missing unit derived.
    ///
    /// # Errors
    /// The first invalid override, naming the rule and saying why.
    pub fn validated(mut self, rules: &RuleSet) -> Result<PatientSettings, OverrideError> {
        let profile = self.profile.unwrap_or(rules.file().default_profile);
        let patient = self.patient.clone();
        for o in &mut self.overrides {
            check_override(&patient, profile, rules, o)?;
        }
        Ok(self)
    }
}

/// Why an override is rejected. The message names the patient, the rule (and threshold) and the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OverrideError {
    /// No such rule in the rule file.
    UnknownRule {
        /// Patient.
        patient: String,
        /// Rule.
        rule_id: String,
    },
    /// The rule has no such threshold.
    UnknownThreshold {
        /// Patient.
        patient: String,
        /// Rule.
        rule_id: String,
        /// Threshold.
        param: String,
    },
    /// `set_by` or `reason` is empty.
    MissingReason {
        /// Patient.
        patient: String,
        /// Rule.
        rule_id: String,
    },
    /// Neither a threshold value nor an on/off decision, or both, or values for a toggle.
    Malformed {
        /// Patient.
        patient: String,
        /// Rule.
        rule_id: String,
        /// What is wrong.
        problem: &'static str,
    },
    /// The value is in the wrong unit for the rule.
    WrongUnit {
        /// Patient.
        patient: String,
        /// Rule.
        rule_id: String,
        /// Threshold.
        param: String,
        /// The unit fields it takes.
        expected: &'static str,
    },
    /// mg/dL and mmol/L disagree.
    InconsistentUnits {
        /// Patient.
        patient: String,
        /// Rule.
        rule_id: String,
        /// Threshold.
        param: String,
        /// Given mg/dL.
        mg_dl: Dec,
        /// Given mmol/L.
        mmol_l: Dec,
    },
    /// Outside the plausibility window of the quantity.
    Implausible {
        /// Patient.
        patient: String,
        /// Rule.
        rule_id: String,
        /// Threshold.
        param: String,
        /// Value given.
        value: Dec,
        /// Its unit.
        unit: &'static str,
    },
    /// Relaxes or disables a CRITICAL rule / safety floor without a waiver.
    NeedsWaiver {
        /// Patient.
        patient: String,
        /// Rule.
        rule_id: String,
        /// Threshold (absent when disabling the rule).
        param: Option<String>,
        /// The rule's severity.
        severity: Severity,
        /// The default in force (`"< 54 mg/dL | < 3.0 mmol/L"`).
        from: String,
        /// The override (`"< 45 mg/dL | < 2.5 mmol/L"` or `"disabled"`).
        to: String,
    },
}

impl fmt::Display for OverrideError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OverrideError::UnknownRule { patient, rule_id } => {
                write!(
                    f,
                    "patient {patient}: override of {rule_id} rejected: no such rule"
                )
            }
            OverrideError::UnknownThreshold {
                patient,
                rule_id,
                param,
            } => write!(
                f,
                "patient {patient}: override of {rule_id}.{param} rejected: the rule has no threshold {param}"
            ),
            OverrideError::MissingReason { patient, rule_id } => write!(
                f,
                "patient {patient}: override of {rule_id} rejected: set_by and reason are required"
            ),
            OverrideError::Malformed {
                patient,
                rule_id,
                problem,
            } => write!(
                f,
                "patient {patient}: override of {rule_id} rejected: {problem}"
            ),
            OverrideError::WrongUnit {
                patient,
                rule_id,
                param,
                expected,
            } => write!(
                f,
                "patient {patient}: override of {rule_id}.{param} rejected: give {expected}"
            ),
            OverrideError::InconsistentUnits {
                patient,
                rule_id,
                param,
                mg_dl,
                mmol_l,
            } => write!(
                f,
                "patient {patient}: override of {rule_id}.{param} rejected: {mg_dl} mg/dL and {mmol_l} mmol/L disagree (factor 18.016)"
            ),
            OverrideError::Implausible {
                patient,
                rule_id,
                param,
                value,
                unit,
            } => write!(
                f,
                "patient {patient}: override of {rule_id}.{param} rejected: {value} {unit} is outside the plausible range (CLINICAL.md §3)"
            ),
            OverrideError::NeedsWaiver {
                patient,
                rule_id,
                param,
                severity,
                from,
                to,
            } => {
                let what = match param {
                    Some(p) => format!("{rule_id}.{p}"),
                    None => rule_id.clone(),
                };
                write!(
                    f,
                    "patient {patient}: override of {what} rejected: it relaxes a {severity} safety floor ({from} -> {to}) and needs a waiver with a reason (CLINICAL.md §4.6)"
                )
            }
        }
    }
}

fn nonempty(s: &str) -> bool {
    !s.trim().is_empty()
}

/// Derives the missing glucose unit at display resolution (§3.4): mg/dL whole, mmol/L one decimal.
fn derive_glucose(o: &mut Override) {
    match (o.mg_dl, o.mmol_l) {
        (Some(mg), None) => {
            let tenths = round_half_away(mg.to_f64() / MG_PER_DL_PER_MMOL_PER_L * 10.0);
            o.mmol_l = Some(Dec::new(tenths, -1));
        }
        (None, Some(mmol)) => {
            let mg = round_half_away(mmol.to_f64() * MG_PER_DL_PER_MMOL_PER_L);
            o.mg_dl = Some(Dec::new(mg, 0));
        }
        _ => {}
    }
}

fn within(v: Dec, (lo, hi): (f64, f64)) -> bool {
    let x = v.to_f64();
    lo <= x && x <= hi
}

fn display_values(op: super::decimal::Op, o: &Override) -> String {
    let mut s = String::new();
    for (v, unit) in [
        (o.mg_dl, "mg/dL"),
        (o.mmol_l, "mmol/L"),
        (o.mmhg, "mmHg"),
        (o.bpm, "bpm"),
    ] {
        if let Some(v) = v {
            if !s.is_empty() {
                s.push_str(" | ");
            }
            s.push_str(&format!("{op} {v} {unit}"));
        }
    }
    s
}

fn check_override(
    patient: &str,
    profile: Profile,
    rules: &RuleSet,
    o: &mut Override,
) -> Result<(), OverrideError> {
    let rule_id = o.rule_id.clone();
    let rule: &RuleDef = rules
        .rule(&rule_id)
        .ok_or_else(|| OverrideError::UnknownRule {
            patient: patient.into(),
            rule_id: rule_id.clone(),
        })?;
    if !nonempty(&o.set_by) || !nonempty(&o.reason) {
        return Err(OverrideError::MissingReason {
            patient: patient.into(),
            rule_id,
        });
    }
    let has_values = o.mg_dl.is_some() || o.mmol_l.is_some() || o.mmhg.is_some() || o.bpm.is_some();
    let waived = o.waiver.as_deref().is_some_and(nonempty);
    let Some(param) = o.param.clone() else {
        // An on/off decision.
        let Some(enabled) = o.enabled else {
            return Err(OverrideError::Malformed {
                patient: patient.into(),
                rule_id,
                problem: "give a threshold (param + value) or enabled = true/false",
            });
        };
        if has_values {
            return Err(OverrideError::Malformed {
                patient: patient.into(),
                rule_id,
                problem: "values need a param",
            });
        }
        if !enabled && rule.needs_waiver() && !waived {
            return Err(OverrideError::NeedsWaiver {
                patient: patient.into(),
                rule_id,
                param: None,
                severity: rule.severity,
                from: "enabled".into(),
                to: "disabled".into(),
            });
        }
        return Ok(());
    };
    if o.enabled.is_some() {
        return Err(OverrideError::Malformed {
            patient: patient.into(),
            rule_id,
            problem: "enabled goes without param",
        });
    }
    let Some(def) = rule.threshold.get(&param) else {
        return Err(OverrideError::UnknownThreshold {
            patient: patient.into(),
            rule_id,
            param,
        });
    };
    let wrong_unit = |expected| OverrideError::WrongUnit {
        patient: patient.into(),
        rule_id: rule_id.clone(),
        param: param.clone(),
        expected,
    };
    let implausible = |value, unit| OverrideError::Implausible {
        patient: patient.into(),
        rule_id: rule_id.clone(),
        param: param.clone(),
        value,
        unit,
    };
    match rule.quantity() {
        Some(Quantity::Glucose) => {
            if o.mmhg.is_some() || o.bpm.is_some() || (o.mg_dl.is_none() && o.mmol_l.is_none()) {
                return Err(wrong_unit("mg_dl and/or mmol_l"));
            }
            if let (Some(mg), Some(mmol)) = (o.mg_dl, o.mmol_l)
                && !glucose_pair_agrees(mg, mmol)
            {
                return Err(OverrideError::InconsistentUnits {
                    patient: patient.into(),
                    rule_id,
                    param,
                    mg_dl: mg,
                    mmol_l: mmol,
                });
            }
            derive_glucose(o);
            o.mmol_l = o.mmol_l.map(|v| v.with_places(1));
            if let Some(mg) = o.mg_dl.filter(|v| !within(*v, GLUCOSE_MG_DL)) {
                return Err(implausible(mg, "mg/dL"));
            }
            if let Some(mmol) = o.mmol_l.filter(|v| !within(*v, GLUCOSE_MMOL_L)) {
                return Err(implausible(mmol, "mmol/L"));
            }
        }
        Some(Quantity::Pressure) => {
            let Some(v) = o
                .mmhg
                .filter(|_| o.mg_dl.is_none() && o.mmol_l.is_none() && o.bpm.is_none())
            else {
                return Err(wrong_unit("mmhg"));
            };
            let window = if param == PARAM_DBP {
                DIASTOLIC_MMHG
            } else if param == PARAM_SBP {
                SYSTOLIC_MMHG
            } else {
                (DIASTOLIC_MMHG.0, SYSTOLIC_MMHG.1)
            };
            if !within(v, window) {
                return Err(implausible(v, "mmHg"));
            }
        }
        Some(Quantity::Pulse) => {
            let Some(v) = o
                .bpm
                .filter(|_| o.mg_dl.is_none() && o.mmol_l.is_none() && o.mmhg.is_none())
            else {
                return Err(wrong_unit("bpm"));
            };
            if !within(v, PULSE_BPM) {
                return Err(implausible(v, "bpm"));
            }
        }
        None => {
            return Err(OverrideError::UnknownThreshold {
                patient: patient.into(),
                rule_id,
                param,
            });
        }
    }
    // Guard-rail: does it relax the threshold in force for this patient's profile?
    let current: Resolved<'_> = def.resolve(profile);
    let relaxes = [
        (current.mg_dl, o.mg_dl),
        (current.mmol_l, o.mmol_l),
        (current.mmhg, o.mmhg),
        (current.bpm, o.bpm),
    ]
    .iter()
    .any(|(from, to)| match (from, to) {
        (Some(f), Some(t)) => current.op.relaxes(*f, *t),
        _ => false,
    });
    if relaxes && rule.needs_waiver() && !waived {
        return Err(OverrideError::NeedsWaiver {
            patient: patient.into(),
            rule_id,
            param: Some(param),
            severity: rule.severity,
            from: format!("{current}"),
            to: display_values(current.op, o),
        });
    }
    Ok(())
}
