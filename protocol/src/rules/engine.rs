//! The alert state machine (CLINICAL.md §4).
//!
//! Inputs: [`Engine::on_reading`] (a validated reading), [`Engine::on_symptoms`] (a symptom/event report),
//! [`Engine::on_tick`] (time passing: confirmation timeouts, unacknowledged escalation, window rules),
//! [`Engine::on_deadlines`] (the timeouts and escalations alone, at [`Engine::next_deadline`]),
//! [`Engine::acknowledge`]. Output: [`AlertAction`]s. State: [`EngineState`], plain data to persist.
//!
//! # Time
//!
//! Pure: `now` is an argument. Two kinds of time-driven work differ in how exact they must be. Window
//! rules (7-day average, trend, adherence) are about days and may run on a coarse interval. Deadlines
//! (a confirmation's timeout, an acknowledgement's) are minutes and must fire at their second:
//! [`Engine::next_deadline`] says when the next one is due, so the caller can sleep until then.
//!
//! # Per reading
//!
//! Every enabled rule for the reading's kind is evaluated; per **family** (the episode key, §4.3) the
//! most severe firing rule wins (ties: file order). Then, per family:
//!
//! 1. **Confirmation** (§4.2, §3.3). A firing rule with `confirm` opens a *pending* alert
//!    ([`AlertStatus::Pending`]: prompt the patient to re-measure). A clean repeat at least
//!    `min_gap_s` and at most `window_s` later that still meets it (or a higher rule of the family)
//!    → [`AlertAction::Confirm`] at full severity; a clean repeat that does not → [`AlertAction::Downgrade`]
//!    to INFO; no repeat in time → [`AlertAction::Confirm`] by timeout: **a missing repeat never silences
//!    an alert**. Symptoms skip confirmation. A low-quality BP reading (§3.2) only ever opens a pending
//!    alert, and without a clean repeat it is raised at most at `low_quality_timeout_severity`
//!    (ADVISORY): never a crisis alert from a low-quality reading alone.
//! 2. **Episodes** (§4.3). Without a pending step, a firing rule opens an episode
//!    ([`AlertAction::Open`]); later matches of the same or lower severity within the merge window
//!    (CRITICAL 1 h, URGENT 12 h, ADVISORY/INFO 24 h, window rules 7 days, counted from the (re)opening)
//!    merge into it silently; a higher severity escalates it ([`AlertAction::Escalate`]); a match after the
//!    window closes it ([`CloseReason::Expired`]) and opens a new one. Two consecutive clean in-range
//!    readings resolve it ([`CloseReason::InRange`]).
//!
//! CRITICAL and URGENT glucose rules have no confirmation step: CLINICAL.md §4.1–§4.2 says to treat
//! first and re-check (15-15 rule), so they alert at once and the re-check merges into or escalates the
//! episode.

use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use super::decimal::{Dec, Op};
use super::file::{
    DAY_S, EscalateIf, FlagName, Measure, PARAM_DBP, PARAM_PULSE, PARAM_SBP, PARAM_VALUE, Resolved,
    RuleDef, RuleKind, RuleSet, meal_context,
};
use super::overrides::{Override, OverrideError, PatientSettings};
use super::window::{BpEntry, Obs, daily_means, home_average, local_day};
use super::{Profile, Severity, Source, Symptoms};
use crate::ieee11073::Number;
use crate::model::{BloodPressureRecord, GlucoseRecord, GlucoseUnit, Measurement, PressureUnit};
use crate::validate::{Censor, Flags, Outcome, Verdict};

/// One reading for the engine.
#[derive(Debug, Clone, Copy)]
pub struct ReadingInput<'a> {
    /// Pseudonymous patient id.
    pub patient: &'a str,
    /// The reading's deterministic id.
    pub reading_id: &'a str,
    /// When it was measured, Unix seconds UTC (corrected device time, or receive time when untrusted).
    pub time_utc: i64,
    /// The measurement.
    pub measurement: &'a Measurement,
    /// Its validation verdict (rejected and control-solution readings are ignored).
    pub verdict: &'a Verdict,
    /// Symptoms reported with the reading (kiosk question); usually none.
    pub symptoms: Symptoms,
}

/// Where an alert is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum AlertStatus {
    /// Waiting for a repeat measurement (patient prompt only).
    Pending,
    /// Raised to the care team.
    Active,
    /// The repeat was in range: closed at INFO.
    Downgraded,
    /// Ended.
    Closed,
}

impl AlertStatus {
    /// The name as in the JSON form and the stores' `status` column (`"pending"`, …).
    pub fn name(self) -> &'static str {
        match self {
            AlertStatus::Pending => "pending",
            AlertStatus::Active => "active",
            AlertStatus::Downgraded => "downgraded",
            AlertStatus::Closed => "closed",
        }
    }
}

/// The threshold an alert crossed, in the unit it was compared in.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct ThresholdRef {
    /// Threshold name (`value`, `sbp`, `fasting`, …).
    pub param: String,
    /// Comparison.
    pub op: Op,
    /// Value as published (or as the clinician set it).
    pub value: Dec,
    /// Unit (`mg/dL`, `mmol/L`, `mmHg`, `bpm`).
    pub unit: String,
    /// `true` when a patient override set it.
    pub overridden: bool,
}

/// A value the alert is about.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct ObservedValue {
    /// What (`glucose`, `sbp`, `dbp`, `pulse`, `sbp_avg`, `days_without_data`, …).
    pub param: String,
    /// Value (display; decisions were made exactly).
    pub value: f64,
    /// Unit.
    pub unit: String,
}

/// An alert (one per episode).
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Alert {
    /// Deterministic id: `{patient}/{rule_id}/{time}` of the reading (or tick) that opened it, so two
    /// services evaluating the same stream agree.
    pub id: String,
    /// Patient.
    pub patient: String,
    /// The rule in force (changes when the episode escalates).
    pub rule_id: String,
    /// Episode family.
    pub family: String,
    /// Severity.
    pub severity: Severity,
    /// Status.
    pub status: AlertStatus,
    /// The patient's profile when raised.
    pub profile: Profile,
    /// The readings of the episode, oldest first.
    pub reading_ids: Vec<String>,
    /// The threshold crossed (none for LO/HI, flags, adherence, reports).
    pub threshold: Option<ThresholdRef>,
    /// The values it is about.
    pub observed: Vec<ObservedValue>,
    /// Where the threshold comes from (a guideline, or the patient override and its reason).
    pub source: Source,
    /// For people: the rule's message and the comparison.
    pub message: String,
    /// Opened at (Unix s).
    pub opened_utc: i64,
    /// Last changed at.
    pub updated_utc: i64,
    /// Care tier: 0 nurse, 1 next tier (physician / on-call).
    pub tier: u8,
    /// Acknowledged by the care team.
    pub acknowledged: bool,
}

/// Why a pending alert became active.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum ConfirmedBy {
    /// A clean repeat met the rule.
    Repeat,
    /// No repeat within the window: alerted anyway (§4.2).
    Timeout,
    /// Symptoms were reported.
    Symptoms,
}

/// Why an episode escalated.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(tag = "kind", rename_all = "snake_case"))]
pub enum Escalation {
    /// A higher severity in the same family (re-open on higher severity, §4.3).
    Severity {
        /// The previous severity.
        from: Severity,
    },
    /// Not acknowledged in time: next care tier (§4.3).
    Unacknowledged,
    /// The next step of an adherence rule (§4.5).
    NextStep {
        /// The previous step's rule id.
        from_rule: String,
    },
}

/// Why an episode closed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(tag = "kind", rename_all = "snake_case"))]
pub enum CloseReason {
    /// Consecutive in-range readings, or the window value back under the threshold.
    InRange,
    /// A more severe confirmed alert of the family replaced it.
    Superseded {
        /// The replacing alert's id.
        by: String,
    },
    /// The merge window passed and a new episode opens.
    Expired,
    /// Adherence: a reading arrived.
    DataReceived,
}

/// What the engine tells the service to do.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(tag = "action", rename_all = "snake_case"))]
pub enum AlertAction {
    /// A new alert: pending (prompt the patient to re-measure) or active.
    Open(Alert),
    /// An open alert is more severe, or moved to the next care tier.
    Escalate {
        /// The alert after the change.
        alert: Alert,
        /// Why.
        reason: Escalation,
    },
    /// A pending alert is now active.
    Confirm {
        /// The alert, active.
        alert: Alert,
        /// How.
        by: ConfirmedBy,
    },
    /// A pending alert's repeat was in range: closed at INFO.
    Downgrade {
        /// The alert, downgraded.
        alert: Alert,
        /// Its severity before.
        from: Severity,
    },
    /// An episode ended.
    Close {
        /// The alert, closed.
        alert: Alert,
        /// Why.
        reason: CloseReason,
    },
}

impl AlertAction {
    /// The alert the action is about.
    pub fn alert(&self) -> &Alert {
        match self {
            AlertAction::Open(a)
            | AlertAction::Escalate { alert: a, .. }
            | AlertAction::Confirm { alert: a, .. }
            | AlertAction::Downgrade { alert: a, .. }
            | AlertAction::Close { alert: a, .. } => a,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
struct Episode {
    alert: Alert,
    /// Merge window start: the (re)opening.
    window_start_utc: i64,
    merge_s: i64,
    /// Active since (acknowledgement deadline counts from here).
    active_since_utc: i64,
    in_range: u32,
    ack_escalated: bool,
}

#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
struct Pending {
    alert: Alert,
    first_utc: i64,
    deadline_utc: i64,
    low_quality: bool,
    merge_s: i64,
}

#[derive(Debug, Clone, PartialEq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(default))]
struct PatientState {
    episodes: BTreeMap<String, Episode>,
    pending: BTreeMap<String, Pending>,
    bp: Vec<BpEntry>,
    glucose_streaks: BTreeMap<String, u32>,
    last_bp_utc: Option<i64>,
    last_glucose_utc: Option<i64>,
    insulin_seen: bool,
}

/// Everything the engine remembers between calls: open episodes, pending confirmations, recent BP
/// history, last-reading times. Serializable (feature `serde`) so a service can persist it and rebuild
/// the engine with [`Engine::with_state`].
#[derive(Debug, Clone, PartialEq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(default))]
pub struct EngineState {
    patients: BTreeMap<String, PatientState>,
}

impl EngineState {
    /// The patient's open alerts: active episodes and pending confirmations.
    pub fn open_alerts(&self, patient: &str) -> Vec<&Alert> {
        self.patients.get(patient).map_or_else(Vec::new, |p| {
            p.episodes
                .values()
                .map(|e| &e.alert)
                .chain(p.pending.values().map(|p| &p.alert))
                .collect()
        })
    }

    /// Every patient's active episodes (each one's current alert): for counts without patient ids
    /// (`gateway status`).
    pub fn episodes(&self) -> impl Iterator<Item = &Alert> + '_ {
        self.patients
            .values()
            .flat_map(|p| p.episodes.values().map(|e| &e.alert))
    }

    /// How many alerts wait for a confirming reading, over every patient.
    pub fn pending_confirmations(&self) -> usize {
        self.patients.values().map(|p| p.pending.len()).sum()
    }
}

/// One BP reading the engine keeps for its window and pattern rules, in the engine's own serde form.
/// For a service that stores this history apart from the rest of the state: ingest keeps a row per
/// kept reading, so a batch writes the readings it added instead of the whole history again
/// ([`Engine::take_bp_history`], [`Engine::put_bp_history`]). Entries never change once kept; they are
/// added and pruned.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(transparent))]
pub struct KeptBpReading(BpEntry);

impl KeptBpReading {
    /// The reading's id.
    pub fn reading_id(&self) -> &str {
        &self.0.reading_id
    }

    /// When it was measured (Unix s).
    pub fn time_utc(&self) -> i64 {
        self.0.time_utc
    }
}

/// The rule engine: rules, validated patient settings, state.
#[derive(Debug, Clone)]
pub struct Engine {
    rules: RuleSet,
    patients: BTreeMap<String, PatientSettings>,
    state: EngineState,
}

// ------------------------------------------------------------------------------------------------
// Evaluation

/// A threshold in force for one patient at one time.
#[derive(Clone, Copy)]
struct Th<'a> {
    eff: Resolved<'a>,
    default: Resolved<'a>,
    ovr: Option<&'a Override>,
}

impl Th<'_> {
    fn source(&self) -> Source {
        match self.ovr {
            Some(o) => Source {
                cite: format!("patient override by {}", o.set_by),
                text: format!(
                    "{}{}; guideline default {} {} {}",
                    o.reason,
                    o.waiver
                        .as_deref()
                        .map(|w| format!(" (waiver: {w})"))
                        .unwrap_or_default(),
                    self.default,
                    self.default.source.cite,
                    self.default.source.text
                ),
            },
            None => self.eff.source.clone(),
        }
    }

    fn reference(&self, param: &str, value: Dec, unit: &str) -> ThresholdRef {
        ThresholdRef {
            param: param.into(),
            op: self.eff.op,
            value,
            unit: unit.into(),
            overridden: self.ovr.is_some(),
        }
    }
}

struct Ctx<'a> {
    rules: &'a RuleSet,
    settings: &'a PatientSettings,
    profile: Profile,
    patient: &'a str,
}

impl<'a> Ctx<'a> {
    fn enabled(&self, r: &RuleDef, t: i64) -> bool {
        match self.settings.toggle_for(&r.id, t) {
            Some(on) => on,
            None => {
                r.enabled
                    && r.applies_to(self.profile)
                    && !(self.settings.pacemaker
                        && matches!(r.kind, RuleKind::PulseLevel | RuleKind::Flag))
            }
        }
    }

    fn threshold(&self, r: &'a RuleDef, param: &str, t: i64) -> Option<Th<'a>> {
        let def = r.threshold.get(param)?;
        let default = def.resolve(self.profile);
        let ovr = self.settings.override_for(&r.id, param, t);
        let eff = match ovr {
            Some(o) => Resolved {
                mg_dl: o.mg_dl.or(default.mg_dl),
                mmol_l: o.mmol_l.or(default.mmol_l),
                mmhg: o.mmhg.or(default.mmhg),
                bpm: o.bpm.or(default.bpm),
                ..default
            },
            None => default,
        };
        Some(Th { eff, default, ovr })
    }

    fn merge_s(&self, r: &RuleDef, s: Severity) -> i64 {
        let e = &self.rules.file().episodes;
        match r.kind {
            RuleKind::Adherence => i64::MAX,
            k if k.is_window() => e.window_rule_merge_s,
            _ => e.merge_s.get(s),
        }
    }

    fn alert(&self, f: &Fire, family: &str, t: i64, status: AlertStatus) -> Alert {
        Alert {
            id: format!("{}/{}/{}", self.patient, f.rule_id, t),
            patient: self.patient.into(),
            rule_id: f.rule_id.clone(),
            family: family.into(),
            severity: f.severity,
            status,
            profile: self.profile,
            reading_ids: f.reading_ids.clone(),
            threshold: f.threshold.clone(),
            observed: f.observed.clone(),
            source: f.source.clone(),
            message: f.message.clone(),
            opened_utc: t,
            updated_utc: t,
            tier: f.tier,
            acknowledged: false,
        }
    }
}

/// A rule that fires for an input.
#[derive(Debug, Clone)]
struct Fire {
    rule_id: String,
    severity: Severity,
    confirm: bool,
    by_symptoms: bool,
    reading_ids: Vec<String>,
    threshold: Option<ThresholdRef>,
    observed: Vec<ObservedValue>,
    source: Source,
    message: String,
    tier: u8,
    merge_s: i64,
}

/// A rule's (and then a family's) verdict on an input. Short-lived (one evaluation), so the size of
/// `Fire` is not worth a box.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)]
enum Eval {
    /// Does not meet the rule: counts towards resolving the episode.
    InRange,
    /// Meets the condition but raises nothing (pattern not complete, low quality): no resolution.
    Elevated,
    /// Cannot tell (censored value, no pulse): no effect.
    Unknown,
    /// Fires.
    Fire(Fire),
}

impl Eval {
    fn rank(&self) -> u8 {
        match self {
            Eval::InRange => 0,
            Eval::Unknown => 1,
            Eval::Elevated => 2,
            Eval::Fire(_) => 3,
        }
    }
}

/// Folds a rule's verdict into its family's: the most severe firing rule wins (first on ties); else
/// Elevated beats Unknown beats InRange.
fn fold(families: &mut Vec<(String, Eval)>, family: &str, e: Eval) {
    let Some((_, cur)) = families.iter_mut().find(|(f, _)| f == family) else {
        families.push((family.into(), e));
        return;
    };
    let replace = match (&*cur, &e) {
        (Eval::Fire(a), Eval::Fire(b)) => b.severity > a.severity,
        (a, b) => b.rank() > a.rank(),
    };
    if replace {
        *cur = e;
    }
}

fn observed(param: &str, value: f64, unit: &str) -> ObservedValue {
    ObservedValue {
        param: param.into(),
        value,
        unit: unit.into(),
    }
}

/// An SFLOAT as an exact decimal, its exponent shifted (glucose kg/L → mg/dL is +5, mol/L → mmol/L +3).
fn exact(n: Number, shift: i8) -> Option<Dec> {
    match n {
        Number::Finite { mantissa, exponent } => Some(Dec::new(
            i64::from(mantissa),
            exponent.saturating_add(shift),
        )),
        _ => None,
    }
}

/// (threshold with its source, observed values, detail) when a glucose rule is met.
type GlucoseHit = (Option<(ThresholdRef, Source)>, Vec<ObservedValue>, String);

enum GlucoseObs {
    Value(Dec, GlucoseUnit),
    Censored(Censor),
}

struct GlucoseCtx {
    obs: GlucoseObs,
    meal: Option<u8>,
    health: Option<u8>,
    insulin: bool,
}

fn eval_glucose(
    ctx: &Ctx<'_>,
    r: &RuleDef,
    g: &GlucoseCtx,
    streak: &mut u32,
    input: &ReadingInput<'_>,
) -> Eval {
    let t = input.time_utc;
    let rid = vec![String::from(input.reading_id)];
    if r.kind == RuleKind::Reported {
        return if input.symptoms.any_of(&r.symptoms) {
            Eval::Fire(Fire {
                rule_id: r.id.clone(),
                severity: r.severity,
                confirm: false,
                by_symptoms: true,
                reading_ids: rid,
                threshold: None,
                observed: Vec::new(),
                source: r.source.clone(),
                message: format!("{} (reported)", r.message),
                tier: r.tier,
                merge_s: ctx.merge_s(r, r.severity),
            })
        } else {
            Eval::InRange
        };
    }
    let param = match r.kind {
        RuleKind::GlucoseTarget => meal_context(g.meal),
        _ => PARAM_VALUE,
    };
    let hit: Option<GlucoseHit> = match &g.obs {
        GlucoseObs::Censored(c) => {
            if r.censored == Some(*c) {
                let shown = match c {
                    Censor::Low => "LO",
                    Censor::High => "HI",
                };
                Some((None, Vec::new(), format!("meter shows {shown}")))
            } else {
                return Eval::Unknown;
            }
        }
        GlucoseObs::Value(v, unit) => {
            let Some(th) = ctx.threshold(r, param, t) else {
                return Eval::InRange; // a censored-only rule (GLU_LO) on a numeric reading
            };
            let tv = match unit {
                GlucoseUnit::MgPerDl => th.eff.mg_dl,
                GlucoseUnit::MmolPerL => th.eff.mmol_l,
            };
            let Some(tv) = tv else {
                return Eval::Unknown;
            };
            if th.eff.op.holds(v.cmp(&tv)) {
                let u = unit.symbol();
                let ctx_note = if r.kind == RuleKind::GlucoseTarget {
                    format!(", {param} target")
                } else {
                    String::new()
                };
                Some((
                    Some((th.reference(param, tv, u), th.source())),
                    vec![observed("glucose", v.to_f64(), u)],
                    format!(
                        "glucose {} {u} {} {} {u}{ctx_note}",
                        shown(*v, *unit),
                        th.eff.op,
                        shown(tv, *unit)
                    ),
                ))
            } else {
                None
            }
        }
    };
    let Some((threshold, obs, detail)) = hit else {
        *streak = 0;
        return Eval::InRange;
    };
    *streak = streak.saturating_add(1);
    let mut severity = r.severity;
    let mut why = String::new();
    if let Some(to) = r.escalate_to {
        for c in &r.escalate_if {
            let (holds, label) = match c {
                EscalateIf::InsulinTreated => (g.insulin, "insulin-treated"),
                EscalateIf::TwoConsecutive => (*streak >= 2, "2 consecutive readings"),
                EscalateIf::MajorHealthIssue => (g.health == Some(2), "major health issue"),
            };
            if holds && to > severity {
                severity = to;
                why = format!("; {label}");
            }
        }
    }
    let by_symptoms = match r.severity_if_symptoms {
        Some(s) if input.symptoms.any_of(&r.symptoms) => {
            severity = severity.max(s);
            true
        }
        _ => false,
    };
    let (threshold, source) = match threshold {
        Some((th, src)) => (Some(th), src),
        None => (None, r.source.clone()),
    };
    Eval::Fire(Fire {
        rule_id: r.id.clone(),
        severity,
        confirm: r.confirm && !by_symptoms,
        by_symptoms,
        reading_ids: rid,
        threshold,
        observed: obs,
        source,
        message: format!("{} ({detail}{why})", r.message),
        tier: r.tier,
        merge_s: ctx.merge_s(r, severity),
    })
}

/// A glucose value as people see it: mmol/L with at least one decimal, mg/dL whole (CLINICAL.md §3.4
/// rule 2). Never fewer digits than the value has, so the meter's resolution is kept and nothing is
/// rounded across the threshold ("3.0 mmol/L < 3.9", not "3 mmol/L"; issue 11 item 15).
fn shown(v: Dec, unit: GlucoseUnit) -> Dec {
    match unit {
        GlucoseUnit::MmolPerL => v.with_places(1),
        GlucoseUnit::MgPerDl => v,
    }
}

/// The first of `params` the entry meets: (param, threshold in force, value as shown).
fn bp_hit<'a>(
    ctx: &Ctx<'a>,
    r: &'a RuleDef,
    e: &BpEntry,
    t: i64,
) -> Option<(&'static str, Th<'a>, Dec, String)> {
    let params: &[&'static str] = match r.kind {
        RuleKind::PulseLevel => &[PARAM_PULSE],
        _ => &[PARAM_SBP, PARAM_DBP],
    };
    for p in params {
        let Some(th) = ctx.threshold(r, p, t) else {
            continue;
        };
        let (ord, tv, v) = if *p == PARAM_PULSE {
            let (Some(pulse), Some(tv)) = (e.pulse, th.eff.bpm) else {
                continue;
            };
            (pulse.cmp(&tv), tv, pulse.to_string())
        } else {
            let Some(tv) = th.eff.mmhg else { continue };
            let obs = if *p == PARAM_SBP { e.sbp } else { e.dbp };
            (obs.cmp_dec(tv), tv, obs.to_string())
        };
        if th.eff.op.holds(ord) {
            return Some((p, th, tv, v));
        }
    }
    None
}

/// Distinct sessions in `(t − days, t]` with an entry meeting `pred`.
fn sessions_matching(
    history: &[BpEntry],
    t: i64,
    days: u32,
    pred: impl Fn(&BpEntry) -> bool,
) -> u32 {
    let from = t.saturating_sub(i64::from(days).saturating_mul(DAY_S));
    let mut sessions: Vec<i64> = history
        .iter()
        .filter(|e| e.time_utc > from && e.time_utc <= t && pred(e))
        .map(|e| e.session_utc)
        .collect();
    sessions.dedup();
    u32::try_from(sessions.len()).unwrap_or(u32::MAX)
}

fn bp_observed(e: &BpEntry) -> Vec<ObservedValue> {
    let mut v = vec![
        observed("sbp", e.sbp.to_f64(), "mmHg"),
        observed("dbp", e.dbp.to_f64(), "mmHg"),
    ];
    if let Some(p) = e.pulse {
        v.push(observed("pulse", p.to_f64(), "bpm"));
    }
    v
}

/// Evaluates a BP-reading rule on `history`'s last entry (the reading), with the history up to it.
fn eval_bp(ctx: &Ctx<'_>, r: &RuleDef, history: &[BpEntry], input: &ReadingInput<'_>) -> Eval {
    let Some(e) = history.last() else {
        return Eval::Unknown;
    };
    let t = input.time_utc;
    let fire = |severity: Severity,
                confirm: bool,
                by_symptoms: bool,
                threshold: Option<ThresholdRef>,
                source: Source,
                detail: String| {
        Eval::Fire(Fire {
            rule_id: r.id.clone(),
            severity,
            confirm,
            by_symptoms,
            reading_ids: vec![e.reading_id.clone()],
            threshold,
            observed: bp_observed(e),
            source,
            message: format!("{} ({detail})", r.message),
            tier: r.tier,
            merge_s: ctx.merge_s(r, severity),
        })
    };
    match r.kind {
        RuleKind::BpLevel | RuleKind::PulseLevel => {
            if r.kind == RuleKind::PulseLevel && e.pulse.is_none() {
                return Eval::Unknown;
            }
            let Some((param, th, tv, v)) = bp_hit(ctx, r, e, t) else {
                return Eval::InRange;
            };
            let unit = if param == PARAM_PULSE { "bpm" } else { "mmHg" };
            let threshold = Some(th.reference(param, tv, unit));
            let detail = format!("{param} {v} {unit} {} {tv} {unit}", th.eff.op);
            if let Some(p) = r.pattern {
                if e.low_quality {
                    return Eval::Elevated;
                }
                let n = sessions_matching(history, t, p.within_days, |h| {
                    !h.low_quality && bp_hit(ctx, r, h, t).is_some()
                });
                let severity = if n >= p.sessions {
                    r.severity
                } else if let Some(s) = r.single_severity {
                    s
                } else {
                    return Eval::Elevated;
                };
                let detail = format!(
                    "{detail}; {n} session(s) in {} days, {} needed",
                    p.within_days, p.sessions
                );
                return fire(severity, false, false, threshold, th.source(), detail);
            }
            match r.severity_if_symptoms {
                Some(s) if input.symptoms.any_of(&r.symptoms) => {
                    fire(s, false, true, threshold, th.source(), detail)
                }
                _ if e.low_quality && !r.confirm => Eval::Elevated,
                _ => fire(
                    r.severity,
                    r.confirm || e.low_quality,
                    false,
                    threshold,
                    th.source(),
                    detail,
                ),
            }
        }
        RuleKind::Flag => {
            let flagged = |h: &BpEntry| match r.flag {
                Some(FlagName::IrregularPulse) => h.irregular,
                Some(FlagName::PulseRateRange) => h.pulse_range,
                None => false,
            };
            if !flagged(e) {
                return Eval::InRange;
            }
            let mut why = Vec::new();
            if let Some(o) = r.of_last {
                let of = usize::try_from(o.of).unwrap_or(usize::MAX);
                let n = history.iter().rev().take(of).filter(|h| flagged(h)).count();
                if u32::try_from(n).unwrap_or(u32::MAX) >= o.count {
                    why.push(format!("{n} of the last {} readings flagged", o.of));
                }
            }
            if let Some(p) = r.pattern {
                let n = sessions_matching(history, t, p.within_days, flagged);
                if n >= p.sessions {
                    why.push(format!("{n} flagged sessions in {} days", p.within_days));
                }
            }
            if r.of_last.is_none() && r.pattern.is_none() {
                why.push(String::from("flag set"));
            }
            if why.is_empty() {
                Eval::Elevated
            } else {
                fire(
                    r.severity,
                    false,
                    false,
                    None,
                    r.source.clone(),
                    why.join("; "),
                )
            }
        }
        _ => Eval::Unknown,
    }
}

// ------------------------------------------------------------------------------------------------
// State transitions

fn family_confirmation_window(ctx: &Ctx<'_>) -> (i64, i64) {
    let c = &ctx.rules.file().confirmation;
    (c.min_gap_s, c.window_s)
}

/// Pending → active (by a repeat, a timeout or symptoms); supersedes a lower active episode.
#[allow(clippy::too_many_arguments)]
fn confirm_pending(
    ctx: &Ctx<'_>,
    st: &mut PatientState,
    family: &str,
    fire: Option<Fire>,
    raise_to: Option<Severity>,
    by: ConfirmedBy,
    t: i64,
    out: &mut Vec<AlertAction>,
) {
    let Some(mut p) = st.pending.remove(family) else {
        return;
    };
    if let Some(f) = fire {
        for id in f.reading_ids.iter() {
            if !p.alert.reading_ids.contains(id) {
                p.alert.reading_ids.push(id.clone());
            }
        }
        if f.severity > p.alert.severity {
            p.alert.rule_id = f.rule_id;
            p.alert.severity = f.severity;
            p.alert.threshold = f.threshold;
            p.alert.source = f.source;
            p.alert.message = f.message;
            p.merge_s = f.merge_s;
        }
        p.alert.observed = f.observed;
    }
    if let Some(s) = raise_to
        && s > p.alert.severity
    {
        p.alert.severity = s;
        p.alert.message = format!("{} (symptoms reported)", p.alert.message);
        p.merge_s = ctx.rules.file().episodes.merge_s.get(s);
    }
    if by == ConfirmedBy::Timeout && p.low_quality {
        // CLINICAL.md §3.2: never a crisis alert from a low-quality reading without a clean repeat.
        let cap = ctx.rules.file().confirmation.low_quality_timeout_severity;
        if p.alert.severity > cap {
            p.alert.severity = cap;
            p.merge_s = ctx.rules.file().episodes.merge_s.get(cap);
        }
        p.alert.message = format!(
            "{} — unconfirmed: low-quality reading and no clean repeat",
            p.alert.message
        );
    }
    p.alert.status = AlertStatus::Active;
    p.alert.updated_utc = t;
    if let Some(mut e) = st.episodes.remove(family) {
        if e.alert.severity >= p.alert.severity {
            // The family's episode already covers it (it escalated meanwhile): fold the readings in.
            for id in &p.alert.reading_ids {
                if !e.alert.reading_ids.contains(id) {
                    e.alert.reading_ids.push(id.clone());
                }
            }
            p.alert.status = AlertStatus::Closed;
            out.push(AlertAction::Close {
                alert: p.alert,
                reason: CloseReason::Superseded {
                    by: e.alert.id.clone(),
                },
            });
            st.episodes.insert(family.into(), e);
            return;
        }
        e.alert.status = AlertStatus::Closed;
        e.alert.updated_utc = t;
        out.push(AlertAction::Confirm {
            alert: p.alert.clone(),
            by,
        });
        out.push(AlertAction::Close {
            alert: e.alert,
            reason: CloseReason::Superseded {
                by: p.alert.id.clone(),
            },
        });
    } else {
        out.push(AlertAction::Confirm {
            alert: p.alert.clone(),
            by,
        });
    }
    st.episodes.insert(
        family.into(),
        Episode {
            alert: p.alert,
            window_start_utc: t,
            merge_s: p.merge_s,
            active_since_utc: t,
            in_range: 0,
            ack_escalated: false,
        },
    );
}

fn downgrade_pending(
    st: &mut PatientState,
    family: &str,
    reading_id: Option<&str>,
    t: i64,
    out: &mut Vec<AlertAction>,
) {
    if let Some(mut p) = st.pending.remove(family) {
        let from = p.alert.severity;
        p.alert.severity = Severity::Info;
        p.alert.status = AlertStatus::Downgraded;
        p.alert.updated_utc = t;
        if let Some(id) = reading_id {
            p.alert.reading_ids.push(id.into());
        }
        p.alert.message = format!("{} — repeat in range", p.alert.message);
        out.push(AlertAction::Downgrade {
            alert: p.alert,
            from,
        });
    }
}

fn add_reading(alert: &mut Alert, ids: &[String], t: i64) {
    for id in ids {
        if !alert.reading_ids.contains(id) {
            alert.reading_ids.push(id.clone());
        }
    }
    alert.updated_utc = t;
}

/// Applies a family's verdict on one reading (or report) to its pending alert and episode.
#[allow(clippy::too_many_arguments)]
fn apply(
    ctx: &Ctx<'_>,
    st: &mut PatientState,
    family: &str,
    eval: Eval,
    reading_id: Option<&str>,
    t: i64,
    clean: bool,
    out: &mut Vec<AlertAction>,
) {
    let (min_gap, _) = family_confirmation_window(ctx);
    // 1. A pending confirmation in this family.
    if let Some(p) = st.pending.get_mut(family) {
        let candidate = clean && t >= p.first_utc.saturating_add(min_gap) && t <= p.deadline_utc;
        match eval {
            Eval::Fire(f) if f.severity >= p.alert.severity && (candidate || !f.confirm) => {
                let by = if f.by_symptoms {
                    ConfirmedBy::Symptoms
                } else {
                    ConfirmedBy::Repeat
                };
                confirm_pending(ctx, st, family, Some(f), None, by, t, out);
                return;
            }
            Eval::Fire(f) if !candidate && f.severity >= p.alert.severity => {
                // Too soon for a confirmation (same measurement burst) or low quality: keep waiting.
                add_reading(&mut p.alert, &f.reading_ids, t);
                if f.severity > p.alert.severity {
                    p.alert.rule_id = f.rule_id;
                    p.alert.severity = f.severity;
                    p.alert.threshold = f.threshold;
                    p.alert.message = f.message;
                    p.alert.source = f.source;
                    p.merge_s = f.merge_s;
                }
                return;
            }
            Eval::Unknown => {}
            _ if candidate => {
                // A clean repeat in the window that does not meet the pending rule.
                downgrade_pending(st, family, reading_id, t, out);
                apply_episode(ctx, st, family, eval, t, clean, out);
                return;
            }
            _ => {}
        }
        apply_episode(ctx, st, family, eval, t, clean, out);
        return;
    }
    apply_episode(ctx, st, family, eval, t, clean, out);
}

fn apply_episode(
    ctx: &Ctx<'_>,
    st: &mut PatientState,
    family: &str,
    eval: Eval,
    t: i64,
    clean: bool,
    out: &mut Vec<AlertAction>,
) {
    let (_, window) = family_confirmation_window(ctx);
    match eval {
        Eval::Fire(f) => {
            // An episode past its merge window ends; the match opens a new one.
            let expired = st
                .episodes
                .get(family)
                .is_some_and(|e| t.saturating_sub(e.window_start_utc) > e.merge_s);
            if expired && let Some(mut e) = st.episodes.remove(family) {
                e.alert.status = AlertStatus::Closed;
                e.alert.updated_utc = t;
                out.push(AlertAction::Close {
                    alert: e.alert,
                    reason: CloseReason::Expired,
                });
            }
            if let Some(e) = st.episodes.get_mut(family) {
                e.in_range = 0;
                if f.severity <= e.alert.severity {
                    add_reading(&mut e.alert, &f.reading_ids, t);
                    return;
                }
                if !f.confirm {
                    let from = e.alert.severity;
                    add_reading(&mut e.alert, &f.reading_ids, t);
                    e.alert.rule_id = f.rule_id;
                    e.alert.severity = f.severity;
                    e.alert.threshold = f.threshold;
                    e.alert.observed = f.observed;
                    e.alert.source = f.source;
                    e.alert.message = f.message;
                    e.alert.acknowledged = false;
                    e.window_start_utc = t;
                    e.active_since_utc = t;
                    e.merge_s = f.merge_s;
                    e.ack_escalated = false;
                    out.push(AlertAction::Escalate {
                        alert: e.alert.clone(),
                        reason: Escalation::Severity { from },
                    });
                    return;
                }
                // A higher rule that needs confirmation: pend it beside the episode.
            }
            if f.confirm {
                let alert = ctx.alert(&f, family, t, AlertStatus::Pending);
                out.push(AlertAction::Open(alert.clone()));
                st.pending.insert(
                    family.into(),
                    Pending {
                        alert,
                        first_utc: t,
                        deadline_utc: t.saturating_add(window),
                        low_quality: !clean,
                        merge_s: f.merge_s,
                    },
                );
            } else {
                let alert = ctx.alert(&f, family, t, AlertStatus::Active);
                out.push(AlertAction::Open(alert.clone()));
                st.episodes.insert(
                    family.into(),
                    Episode {
                        alert,
                        window_start_utc: t,
                        merge_s: f.merge_s,
                        active_since_utc: t,
                        in_range: 0,
                        ack_escalated: false,
                    },
                );
            }
        }
        Eval::Elevated => {
            if let Some(e) = st.episodes.get_mut(family) {
                e.in_range = 0;
            }
        }
        Eval::Unknown => {}
        Eval::InRange => {
            if !clean {
                return;
            }
            let resolve = ctx.rules.file().episodes.resolve_after_in_range;
            let done = match st.episodes.get_mut(family) {
                Some(e) => {
                    e.in_range = e.in_range.saturating_add(1);
                    e.in_range >= resolve
                }
                None => false,
            };
            if done && let Some(mut e) = st.episodes.remove(family) {
                e.alert.status = AlertStatus::Closed;
                e.alert.updated_utc = t;
                out.push(AlertAction::Close {
                    alert: e.alert,
                    reason: CloseReason::InRange,
                });
            }
        }
    }
}

/// Window rules: fire opens (or, after the merge window, re-opens) an episode; in range closes it.
fn apply_window(
    ctx: &Ctx<'_>,
    st: &mut PatientState,
    family: &str,
    eval: Eval,
    now: i64,
    out: &mut Vec<AlertAction>,
) {
    match eval {
        Eval::Fire(f) => apply_episode(ctx, st, family, Eval::Fire(f), now, true, out),
        Eval::InRange => {
            if let Some(mut e) = st.episodes.remove(family) {
                e.alert.status = AlertStatus::Closed;
                e.alert.updated_utc = now;
                out.push(AlertAction::Close {
                    alert: e.alert,
                    reason: CloseReason::InRange,
                });
            }
        }
        Eval::Elevated | Eval::Unknown => {}
    }
}

fn timeouts(ctx: &Ctx<'_>, st: &mut PatientState, now: i64, out: &mut Vec<AlertAction>) {
    let due: Vec<(String, i64)> = st
        .pending
        .iter()
        .filter(|(_, p)| timeout_due(p) <= now)
        .map(|(f, p)| (f.clone(), p.deadline_utc))
        .collect();
    for (family, deadline) in due {
        confirm_pending(
            ctx,
            st,
            &family,
            None,
            None,
            ConfirmedBy::Timeout,
            deadline,
            out,
        );
    }
}

/// When an episode moves to the next care tier if nobody acknowledges it (§4.3: CRITICAL after
/// 15–30 min, URGENT after 4 h); `None` when it never does (acknowledged, already escalated, or a
/// severity without an acknowledgement deadline).
fn ack_deadline(rules: &RuleSet, e: &Episode) -> Option<i64> {
    let ack = rules.file().escalation.ack_s;
    let limit = match e.alert.severity {
        Severity::Critical => ack.critical,
        Severity::Urgent => ack.urgent,
        _ => return None,
    };
    if e.alert.acknowledged || e.ack_escalated {
        return None;
    }
    Some(e.active_since_utc.saturating_add(limit))
}

/// The first second at which [`timeouts`] confirms `p`: the window's last second still waits for the
/// repeat (a repeat at `deadline_utc` confirms), so the timeout is due one second after it.
fn timeout_due(p: &Pending) -> i64 {
    p.deadline_utc.saturating_add(1)
}

fn ack_escalations(ctx: &Ctx<'_>, st: &mut PatientState, now: i64, out: &mut Vec<AlertAction>) {
    for e in st.episodes.values_mut() {
        if ack_deadline(ctx.rules, e).is_none_or(|due| now < due) {
            continue;
        }
        e.ack_escalated = true;
        e.alert.tier = e.alert.tier.saturating_add(1);
        e.alert.updated_utc = now;
        out.push(AlertAction::Escalate {
            alert: e.alert.clone(),
            reason: Escalation::Unacknowledged,
        });
    }
}

fn close_adherence(
    ctx: &Ctx<'_>,
    st: &mut PatientState,
    measure: Measure,
    t: i64,
    out: &mut Vec<AlertAction>,
) {
    for r in ctx.rules.rules() {
        if r.kind != RuleKind::Adherence || r.measure != Some(measure) {
            continue;
        }
        if let Some(mut e) = st.episodes.remove(&r.family) {
            e.alert.status = AlertStatus::Closed;
            e.alert.updated_utc = t;
            out.push(AlertAction::Close {
                alert: e.alert,
                reason: CloseReason::DataReceived,
            });
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn window_fire(
    ctx: &Ctx<'_>,
    r: &RuleDef,
    severity: Severity,
    reading_ids: Vec<String>,
    threshold: Option<ThresholdRef>,
    observed: Vec<ObservedValue>,
    source: Source,
    detail: String,
) -> Eval {
    Eval::Fire(Fire {
        rule_id: r.id.clone(),
        severity,
        confirm: false,
        by_symptoms: false,
        reading_ids,
        threshold,
        observed,
        source,
        message: format!("{} ({detail})", r.message),
        tier: r.tier,
        merge_s: ctx.merge_s(r, severity),
    })
}

fn eval_average(ctx: &Ctx<'_>, r: &RuleDef, st: &PatientState, now: i64) -> Eval {
    let (Some(w), Some(ts), Some(td)) = (
        r.window,
        ctx.threshold(r, PARAM_SBP, now),
        ctx.threshold(r, PARAM_DBP, now),
    ) else {
        return Eval::Unknown;
    };
    let offset = i64::from(ctx.settings.utc_offset_s);
    let Some(avg) = home_average(&st.bp, now, offset, &w) else {
        return Eval::Unknown;
    };
    let hit = [(PARAM_SBP, ts, avg.sbp), (PARAM_DBP, td, avg.dbp)]
        .into_iter()
        .find_map(|(p, th, mean)| {
            let tv = th.eff.mmhg?;
            th.eff.op.holds(mean.cmp_dec(tv)).then_some((p, th, tv))
        });
    let Some((param, th, tv)) = hit else {
        return Eval::InRange;
    };
    let detail = format!(
        "{}-day home average {:.1}/{:.1} mmHg over {} readings in {} sessions{}; {param} {} {tv} mmHg",
        w.days,
        avg.sbp.to_f64(),
        avg.dbp.to_f64(),
        avg.readings,
        avg.sessions,
        if avg.dropped_first_day {
            ", first day discarded"
        } else {
            ""
        },
        th.eff.op
    );
    window_fire(
        ctx,
        r,
        r.severity,
        avg.reading_ids,
        Some(th.reference(&format!("{param}_avg"), tv, "mmHg")),
        vec![
            observed("sbp_avg", avg.sbp.to_f64(), "mmHg"),
            observed("dbp_avg", avg.dbp.to_f64(), "mmHg"),
        ],
        th.source(),
        detail,
    )
}

fn eval_trend(ctx: &Ctx<'_>, r: &RuleDef, st: &PatientState, now: i64) -> Eval {
    let (Some(n), Some(ts), Some(td)) = (
        r.consecutive_days,
        ctx.threshold(r, PARAM_SBP, now),
        ctx.threshold(r, PARAM_DBP, now),
    ) else {
        return Eval::Unknown;
    };
    let (Some(tvs), Some(tvd)) = (ts.eff.mmhg, td.eff.mmhg) else {
        return Eval::Unknown;
    };
    let offset = i64::from(ctx.settings.utc_offset_s);
    let days = daily_means(&st.bp, now, offset);
    let Some(latest) = days.last() else {
        return Eval::Unknown;
    };
    if latest.day < local_day(now, offset) - 1 {
        return Eval::Unknown; // no data today or yesterday
    }
    let above = |d: &super::window::DayMean| {
        ts.eff.op.holds(d.sbp.cmp_dec(tvs)) || td.eff.op.holds(d.dbp.cmp_dec(tvd))
    };
    if !above(latest) {
        return Eval::InRange;
    }
    let mut run = 0u32;
    let mut expect = latest.day;
    let mut ids = Vec::new();
    for d in days.iter().rev() {
        if d.day != expect || !above(d) {
            break;
        }
        run = run.saturating_add(1);
        expect -= 1;
        ids.splice(0..0, d.reading_ids.iter().cloned());
    }
    if run < n {
        return Eval::Elevated;
    }
    let detail = format!(
        "daily mean above {} {tvs}/{tvd} mmHg on {run} consecutive days",
        ts.eff.op
    );
    window_fire(
        ctx,
        r,
        r.severity,
        ids,
        Some(ts.reference("sbp_daily_mean", tvs, "mmHg")),
        vec![observed("days", f64::from(run), "d")],
        ts.source(),
        detail,
    )
}

fn adherence(
    ctx: &Ctx<'_>,
    r: &RuleDef,
    st: &mut PatientState,
    now: i64,
    out: &mut Vec<AlertAction>,
) {
    let s = ctx.settings;
    let (applies, last) = match r.measure {
        Some(Measure::Bp) => (
            s.monitors_bp || st.last_bp_utc.is_some(),
            st.last_bp_utc.max(s.enrolled_utc),
        ),
        Some(Measure::GlucoseInsulin) => (
            s.insulin_treated || st.insulin_seen,
            st.last_glucose_utc.max(s.enrolled_utc),
        ),
        None => (false, None),
    };
    let Some(last) = last.filter(|_| applies) else {
        return;
    };
    let days = now.saturating_sub(last).div_euclid(DAY_S);
    let Some(step) = r.steps.iter().rev().find(|s| i64::from(s.days) <= days) else {
        return;
    };
    let f = Fire {
        rule_id: step.id.clone(),
        severity: step.severity,
        confirm: false,
        by_symptoms: false,
        reading_ids: Vec::new(),
        threshold: None,
        observed: vec![observed("days_without_data", days as f64, "d")],
        source: step.source.clone(),
        message: format!("{} ({days} days without a reading)", step.message),
        tier: r.tier,
        merge_s: i64::MAX,
    };
    match st.episodes.get_mut(&r.family) {
        None => {
            let alert = ctx.alert(&f, &r.family, now, AlertStatus::Active);
            out.push(AlertAction::Open(alert.clone()));
            st.episodes.insert(
                r.family.clone(),
                Episode {
                    alert,
                    window_start_utc: now,
                    merge_s: i64::MAX,
                    active_since_utc: now,
                    in_range: 0,
                    ack_escalated: false,
                },
            );
        }
        Some(e) if e.alert.rule_id != f.rule_id => {
            let from_rule = core::mem::replace(&mut e.alert.rule_id, f.rule_id);
            e.alert.severity = f.severity;
            e.alert.message = f.message;
            e.alert.source = f.source;
            e.alert.observed = f.observed;
            e.alert.updated_utc = now;
            e.active_since_utc = now;
            out.push(AlertAction::Escalate {
                alert: e.alert.clone(),
                reason: Escalation::NextStep { from_rule },
            });
        }
        Some(_) => {}
    }
}

/// Drops BP history the rules no longer need (keeping at least the last few for "2 of 3").
fn prune(rules: &RuleSet, st: &mut PatientState, now: i64) {
    let keep_last = rules
        .rules()
        .iter()
        .filter_map(|r| r.of_last.map(|o| o.of))
        .max()
        .unwrap_or(0);
    let keep_last = usize::try_from(keep_last).unwrap_or(usize::MAX);
    let cutoff = now.saturating_sub(rules.history_s());
    let len = st.bp.len();
    let mut i = 0usize;
    st.bp.retain(|e| {
        let from_end = len.saturating_sub(i);
        i += 1;
        e.time_utc >= cutoff || from_end <= keep_last
    });
}

// ------------------------------------------------------------------------------------------------
// The engine

impl Engine {
    /// An engine with `rules` and the patients' settings (each validated: guard-rails in
    /// [`super::overrides`]).
    ///
    /// # Errors
    /// The first invalid override; nothing is built.
    pub fn new(
        rules: RuleSet,
        patient_overrides: Vec<PatientSettings>,
    ) -> Result<Engine, OverrideError> {
        Engine::with_state(rules, patient_overrides, EngineState::default())
    }

    /// As [`Engine::new`], resuming from persisted state.
    ///
    /// # Errors
    /// The first invalid override.
    pub fn with_state(
        rules: RuleSet,
        patient_overrides: Vec<PatientSettings>,
        state: EngineState,
    ) -> Result<Engine, OverrideError> {
        let mut patients = BTreeMap::new();
        for p in patient_overrides {
            let p = p.validated(&rules)?;
            patients.insert(p.patient.clone(), p);
        }
        Ok(Engine {
            rules,
            patients,
            state,
        })
    }

    /// Replaces one patient's settings (from the CRM). An invalid one is rejected and the previous
    /// settings stay.
    ///
    /// # Errors
    /// The first invalid override.
    pub fn set_patient(&mut self, settings: PatientSettings) -> Result<(), OverrideError> {
        let s = settings.validated(&self.rules)?;
        self.patients.insert(s.patient.clone(), s);
        Ok(())
    }

    /// The rules.
    pub fn rules(&self) -> &RuleSet {
        &self.rules
    }

    /// A patient's validated settings.
    pub fn patient(&self, patient: &str) -> Option<&PatientSettings> {
        self.patients.get(patient)
    }

    /// The state to persist.
    pub fn state(&self) -> &EngineState {
        &self.state
    }

    /// Moves a patient's kept BP readings out of the state, oldest first (equal times in the order
    /// they were kept). The engine evaluates without them until [`Engine::put_bp_history`] puts them
    /// back: take them only to persist the rest of the state.
    pub fn take_bp_history(&mut self, patient: &str) -> Vec<KeptBpReading> {
        self.state
            .patients
            .get_mut(patient)
            .map(|st| core::mem::take(&mut st.bp))
            .unwrap_or_default()
            .into_iter()
            .map(KeptBpReading)
            .collect()
    }

    /// Replaces a patient's kept BP readings with `history`, which must be in the order
    /// [`Engine::take_bp_history`] gave (it is sorted by time again, keeping the order of equal times).
    pub fn put_bp_history(&mut self, patient: &str, history: Vec<KeptBpReading>) {
        if history.is_empty() && !self.state.patients.contains_key(patient) {
            return;
        }
        let mut bp: Vec<BpEntry> = history.into_iter().map(|k| k.0).collect();
        bp.sort_by_key(|e| e.time_utc);
        self.state.patients.entry(patient.into()).or_default().bp = bp;
    }

    /// Marks an active alert acknowledged (stops the unacknowledged escalation). `false` when the
    /// patient has no open episode with that id.
    pub fn acknowledge(&mut self, patient: &str, alert_id: &str) -> bool {
        let Some(st) = self.state.patients.get_mut(patient) else {
            return false;
        };
        match st.episodes.values_mut().find(|e| e.alert.id == alert_id) {
            Some(e) => {
                e.alert.acknowledged = true;
                true
            }
            None => false,
        }
    }

    /// Evaluates one reading. Rejected and control-solution readings produce nothing and are not kept.
    pub fn on_reading(&mut self, input: &ReadingInput<'_>) -> Vec<AlertAction> {
        let mut out = Vec::new();
        let (clean, low_quality) = match input.verdict.outcome {
            Outcome::Valid | Outcome::Censored { .. } => (true, false),
            Outcome::LowQuality => (false, true),
            Outcome::ControlSolution | Outcome::Rejected { .. } => return out,
        };
        let Engine {
            rules,
            patients,
            state,
        } = self;
        let default_settings;
        let settings = match patients.get(input.patient) {
            Some(s) => s,
            None => {
                default_settings = PatientSettings::new(input.patient);
                &default_settings
            }
        };
        let ctx = Ctx {
            rules,
            settings,
            profile: settings.profile.unwrap_or(rules.file().default_profile),
            patient: input.patient,
        };
        let st = state.patients.entry(input.patient.into()).or_default();
        let t = input.time_utc;
        timeouts(&ctx, st, t, &mut out);
        let mut families: Vec<(String, Eval)> = Vec::new();
        match input.measurement {
            Measurement::Glucose(g) => {
                let Some(gc) = glucose_ctx(g, input.verdict, settings, st) else {
                    return out;
                };
                st.last_glucose_utc = st.last_glucose_utc.max(Some(t));
                close_adherence(&ctx, st, Measure::GlucoseInsulin, t, &mut out);
                for r in rules.rules() {
                    if !r.kind.is_glucose() || !ctx.enabled(r, t) {
                        continue;
                    }
                    let streak = st.glucose_streaks.entry(r.id.clone()).or_insert(0);
                    let e = eval_glucose(&ctx, r, &gc, streak, input);
                    fold(&mut families, &r.family, e);
                }
            }
            Measurement::BloodPressure(b) => {
                let Some(entry) = bp_entry(b, input, low_quality, rules, st) else {
                    return out;
                };
                st.last_bp_utc = st.last_bp_utc.max(Some(t));
                close_adherence(&ctx, st, Measure::Bp, t, &mut out);
                // Insert in time order; evaluate against the history up to this reading.
                let pos = st.bp.partition_point(|e| e.time_utc <= t);
                st.bp.insert(pos, entry);
                let upto = st.bp.get(..=pos).unwrap_or(&[]);
                for r in rules.rules() {
                    if !r.kind.is_bp_reading() || !ctx.enabled(r, t) {
                        continue;
                    }
                    fold(&mut families, &r.family, eval_bp(&ctx, r, upto, input));
                }
                prune(rules, st, t);
            }
        }
        for (family, eval) in families {
            apply(
                &ctx,
                st,
                &family,
                eval,
                Some(input.reading_id),
                t,
                clean,
                &mut out,
            );
        }
        out
    }

    /// A symptom or event report without a measurement: fires `reported` rules (ADA Level 3
    /// hypoglycaemia), confirms pending alerts whose rule names a reported symptom, and escalates open
    /// episodes to their `severity_if_symptoms` (CLINICAL.md §2.3, §4.2: symptoms skip confirmation).
    pub fn on_symptoms(
        &mut self,
        patient: &str,
        time_utc: i64,
        symptoms: Symptoms,
    ) -> Vec<AlertAction> {
        let mut out = Vec::new();
        let Engine {
            rules,
            patients,
            state,
        } = self;
        let default_settings;
        let settings = match patients.get(patient) {
            Some(s) => s,
            None => {
                default_settings = PatientSettings::new(patient);
                &default_settings
            }
        };
        let ctx = Ctx {
            rules,
            settings,
            profile: settings.profile.unwrap_or(rules.file().default_profile),
            patient,
        };
        let st = state.patients.entry(patient.into()).or_default();
        let t = time_utc;
        timeouts(&ctx, st, t, &mut out);
        // Pending alerts and open episodes whose rule reacts to these symptoms.
        let raise = |rule_id: &str| {
            rules.rule(rule_id).and_then(|r| {
                r.severity_if_symptoms
                    .filter(|_| symptoms.any_of(&r.symptoms))
            })
        };
        let pend: Vec<(String, Severity)> = st
            .pending
            .iter()
            .filter_map(|(f, p)| raise(&p.alert.rule_id).map(|s| (f.clone(), s)))
            .collect();
        for (family, s) in pend {
            confirm_pending(
                &ctx,
                st,
                &family,
                None,
                Some(s),
                ConfirmedBy::Symptoms,
                t,
                &mut out,
            );
        }
        for e in st.episodes.values_mut() {
            let Some(s) = raise(&e.alert.rule_id) else {
                continue;
            };
            if s > e.alert.severity && t.saturating_sub(e.window_start_utc) <= e.merge_s {
                let from = e.alert.severity;
                e.alert.severity = s;
                e.alert.message = format!("{} (symptoms reported)", e.alert.message);
                e.alert.updated_utc = t;
                e.alert.acknowledged = false;
                e.active_since_utc = t;
                e.ack_escalated = false;
                e.merge_s = rules.file().episodes.merge_s.get(s);
                out.push(AlertAction::Escalate {
                    alert: e.alert.clone(),
                    reason: Escalation::Severity { from },
                });
            }
        }
        // Reported-event rules.
        let mut families: Vec<(String, Eval)> = Vec::new();
        for r in rules.rules() {
            if r.kind != RuleKind::Reported || !ctx.enabled(r, t) || !symptoms.any_of(&r.symptoms) {
                continue;
            }
            let f = Fire {
                rule_id: r.id.clone(),
                severity: r.severity,
                confirm: false,
                by_symptoms: true,
                reading_ids: Vec::new(),
                threshold: None,
                observed: Vec::new(),
                source: r.source.clone(),
                message: format!("{} (reported)", r.message),
                tier: r.tier,
                merge_s: ctx.merge_s(r, r.severity),
            };
            fold(&mut families, &r.family, Eval::Fire(f));
        }
        for (family, eval) in families {
            apply(&ctx, st, &family, eval, None, t, false, &mut out);
        }
        out
    }

    /// Time passes: pending confirmations time out (alerted anyway), unacknowledged CRITICAL/URGENT
    /// alerts move to the next tier, window rules (7-day average, trend, adherence) are evaluated, old
    /// BP history is dropped. Idempotent: calling it again at the same time does nothing more.
    pub fn on_tick(&mut self, now_utc: i64) -> Vec<AlertAction> {
        self.pass(now_utc, true)
    }

    /// The deadlines of [`Engine::on_tick`] alone, without the window rules: pending confirmations
    /// past their window are alerted anyway (§4.2), unacknowledged CRITICAL/URGENT alerts move to the
    /// next tier (§4.3). A service calls it at [`Engine::next_deadline`]. Idempotent.
    pub fn on_deadlines(&mut self, now_utc: i64) -> Vec<AlertAction> {
        self.pass(now_utc, false)
    }

    /// The earliest time (Unix s) at which time alone changes something: a pending confirmation times
    /// out ("no repeat within 15 min → alert anyway", CLINICAL.md §4.2) or an unacknowledged
    /// CRITICAL/URGENT alert moves to the next tier (§4.3). `None` when nothing waits.
    ///
    /// These deadlines are minutes apart and clinically bound, so a service must not leave them to its
    /// window-rule interval (an hour by default): it sleeps until this time or its next window tick,
    /// whichever is first, and calls [`Engine::on_deadlines`] (issue 11 item 13). Every call that changes
    /// the state may change it.
    pub fn next_deadline(&self) -> Option<i64> {
        self.state
            .patients
            .values()
            .flat_map(|st| {
                st.pending.values().map(timeout_due).chain(
                    st.episodes
                        .values()
                        .filter_map(|e| ack_deadline(&self.rules, e)),
                )
            })
            .min()
    }

    /// One pass over every patient at `now_utc`: deadlines, and with `window` the window rules.
    fn pass(&mut self, now_utc: i64, window: bool) -> Vec<AlertAction> {
        let mut out = Vec::new();
        let Engine {
            rules,
            patients,
            state,
        } = self;
        // Patients with settings get adherence checks even before their first reading.
        if window {
            for id in patients.keys() {
                if !state.patients.contains_key(id) {
                    state.patients.insert(id.clone(), PatientState::default());
                }
            }
        }
        for (id, st) in state.patients.iter_mut() {
            let default_settings;
            let settings = match patients.get(id) {
                Some(s) => s,
                None => {
                    default_settings = PatientSettings::new(id);
                    &default_settings
                }
            };
            let ctx = Ctx {
                rules,
                settings,
                profile: settings.profile.unwrap_or(rules.file().default_profile),
                patient: id,
            };
            timeouts(&ctx, st, now_utc, &mut out);
            ack_escalations(&ctx, st, now_utc, &mut out);
            if !window {
                continue;
            }
            for r in rules.rules() {
                if !r.kind.is_window() || !ctx.enabled(r, now_utc) {
                    continue;
                }
                match r.kind {
                    RuleKind::BpAverage => {
                        let e = eval_average(&ctx, r, st, now_utc);
                        apply_window(&ctx, st, &r.family, e, now_utc, &mut out);
                    }
                    RuleKind::BpTrend => {
                        let e = eval_trend(&ctx, r, st, now_utc);
                        apply_window(&ctx, st, &r.family, e, now_utc, &mut out);
                    }
                    RuleKind::Adherence => adherence(&ctx, r, st, now_utc, &mut out),
                    _ => {}
                }
            }
            prune(rules, st, now_utc);
        }
        out
    }
}

fn glucose_ctx(
    g: &GlucoseRecord,
    verdict: &Verdict,
    settings: &PatientSettings,
    st: &mut PatientState,
) -> Option<GlucoseCtx> {
    let obs = match verdict.outcome {
        Outcome::Censored { censor } => GlucoseObs::Censored(censor),
        _ => {
            let c = g.concentration?;
            let shift = match c.unit {
                GlucoseUnit::MgPerDl => 5,
                GlucoseUnit::MmolPerL => 3,
            };
            GlucoseObs::Value(exact(c.raw.0, shift)?, c.unit)
        }
    };
    // CLINICAL.md §1.4: a medication id 1–5 (insulin) marks the patient insulin-treated.
    let insulin_now = g
        .context
        .and_then(|c| c.medication)
        .is_some_and(|(id, _, _)| (1..=5).contains(&id));
    if insulin_now {
        st.insulin_seen = true;
    }
    Some(GlucoseCtx {
        obs,
        meal: g.context.and_then(|c| c.meal),
        health: g.context.and_then(|c| c.health),
        insulin: settings.insulin_treated || st.insulin_seen,
    })
}

fn bp_entry(
    b: &BloodPressureRecord,
    input: &ReadingInput<'_>,
    low_quality: bool,
    rules: &RuleSet,
    st: &PatientState,
) -> Option<BpEntry> {
    let side = |p: crate::model::Pressure| match p.unit {
        PressureUnit::MmHg => exact(p.raw.0, 0).map(Obs::Exact),
        PressureUnit::KPa => p.mmhg().map(Obs::Approx),
    };
    let t = input.time_utc;
    let window = rules.file().session.window_s;
    // §3.3: a session is the readings within `window` of its first reading.
    let prev = st.bp.iter().rev().find(|e| e.time_utc <= t);
    let session_utc = match prev {
        Some(p) if t.saturating_sub(p.session_utc) <= window => p.session_utc,
        _ => t,
    };
    Some(BpEntry {
        time_utc: t,
        reading_id: input.reading_id.into(),
        session_utc,
        sbp: side(b.systolic)?,
        dbp: side(b.diastolic)?,
        pulse: b.pulse_rate.and_then(|p| exact(p.0, 0)),
        low_quality,
        irregular: input.verdict.flags.contains(Flags::IRREGULAR_PULSE),
        pulse_range: input.verdict.flags.contains(Flags::PULSE_RATE_RANGE),
    })
}
