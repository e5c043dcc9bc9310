//! Tests of the rule engine: the default file, boundary tables for every default threshold in both
//! units and per profile (CLINICAL.md §1–§2 numbers), confirmation / episode / escalation sequences with
//! a fake clock, window rules, overrides and guard-rails, state persistence.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;

use super::file::{RuleKind, TARGET_CONTEXTS};
use super::*;
use crate::gatt::time::DateTime;
use crate::ieee11073::SFloat;
use crate::model::{
    BloodPressureRecord, Glucose, GlucoseContextInfo, GlucoseRecord, Measurement, Pressure,
    PressureUnit,
};
use crate::validate::{Censor, Flags, Outcome, TimeVerdict, Verdict};

const DAY: i64 = 86_400;
/// 2024-06-14 08:00 UTC.
const T0: i64 = 19_888 * DAY + 8 * 3600;

fn rules() -> RuleSet {
    RuleSet::default_rules().expect("default rules")
}

// --------------------------------------------------------------------------------------------
// Harness

struct H {
    e: Engine,
    n: u32,
}

fn with(settings: PatientSettings) -> H {
    H {
        e: Engine::new(rules(), vec![settings]).expect("settings"),
        n: 0,
    }
}

fn h(profile: Profile) -> H {
    with(PatientSettings {
        profile: Some(profile),
        ..PatientSettings::new("p1")
    })
}

fn verdict(outcome: Outcome, flags: Flags) -> Verdict {
    Verdict {
        outcome,
        flags,
        time: TimeVerdict {
            device_time: None,
            corrected_utc: None,
            doubt: None,
        },
    }
}

fn glucose_record(raw: SFloat, mol: bool, meal: Option<u8>) -> GlucoseRecord {
    GlucoseRecord {
        sequence_number: 1,
        numbering: crate::model::RecordNumbering::Gls,
        base_time: DateTime {
            year: 2024,
            month: 6,
            day: 14,
            hours: 8,
            minutes: 0,
            seconds: 0,
        },
        time_offset_min: None,
        concentration: Some(Glucose::from_wire(raw, mol)),
        sample_type: Some(1),
        sample_location: Some(1),
        sensor_status: None,
        context: meal.map(|m| GlucoseContextInfo {
            meal: Some(m),
            ..Default::default()
        }),
    }
}

/// A mg/dL meter reading (kg/L on the wire: exponent −5).
fn mg(v: i32) -> GlucoseRecord {
    glucose_record(SFloat::new(v, -5).expect("SFLOAT"), false, None)
}

/// A mmol/L meter reading in tenths (mol/L on the wire: exponent −4).
fn mmol10(tenths: i32) -> GlucoseRecord {
    glucose_record(SFloat::new(tenths, -4).expect("SFLOAT"), true, None)
}

fn meal(mut g: GlucoseRecord, m: u8) -> GlucoseRecord {
    g.context = Some(GlucoseContextInfo {
        meal: Some(m),
        ..g.context.unwrap_or_default()
    });
    g
}

fn bp_record(sys: i32, dia: i32, pulse: Option<i32>) -> BloodPressureRecord {
    let p = |v| Pressure {
        raw: SFloat::new(v, 0).expect("SFLOAT"),
        unit: PressureUnit::MmHg,
    };
    BloodPressureRecord {
        systolic: p(sys),
        diastolic: p(dia),
        mean_arterial_pressure: p(0),
        timestamp: None,
        pulse_rate: pulse.map(|v| SFloat::new(v, 0).expect("SFLOAT")),
        user_id: Some(1),
        measurement_status: None,
    }
}

impl H {
    fn feed(
        &mut self,
        t: i64,
        m: Measurement,
        outcome: Outcome,
        flags: Flags,
        symptoms: Symptoms,
    ) -> Vec<AlertAction> {
        self.n += 1;
        let id = format!("r{}", self.n);
        let v = verdict(outcome, flags);
        self.e.on_reading(&ReadingInput {
            patient: "p1",
            reading_id: &id,
            time_utc: t,
            measurement: &m,
            verdict: &v,
            symptoms,
        })
    }

    fn glu(&mut self, t: i64, g: GlucoseRecord) -> Vec<AlertAction> {
        self.feed(
            t,
            Measurement::Glucose(g),
            Outcome::Valid,
            Flags::default(),
            Symptoms::NONE,
        )
    }

    fn bp(&mut self, t: i64, sys: i32, dia: i32, pulse: i32) -> Vec<AlertAction> {
        self.bp_with(
            t,
            sys,
            dia,
            pulse,
            Outcome::Valid,
            Flags::default(),
            Symptoms::NONE,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn bp_with(
        &mut self,
        t: i64,
        sys: i32,
        dia: i32,
        pulse: i32,
        outcome: Outcome,
        flags: Flags,
        symptoms: Symptoms,
    ) -> Vec<AlertAction> {
        self.feed(
            t,
            Measurement::BloodPressure(bp_record(sys, dia, Some(pulse))),
            outcome,
            flags,
            symptoms,
        )
    }
}

/// `"open BP_CRISIS URGENT pending"`, `"confirm BP_CRISIS URGENT active"`, …
fn summary(actions: &[AlertAction]) -> Vec<String> {
    actions
        .iter()
        .map(|a| {
            let kind = match a {
                AlertAction::Open(_) => "open",
                AlertAction::Escalate { .. } => "escalate",
                AlertAction::Confirm { .. } => "confirm",
                AlertAction::Downgrade { .. } => "downgrade",
                AlertAction::Close { .. } => "close",
            };
            let al = a.alert();
            let status = match al.status {
                AlertStatus::Pending => "pending",
                AlertStatus::Active => "active",
                AlertStatus::Downgraded => "downgraded",
                AlertStatus::Closed => "closed",
            };
            format!("{kind} {} {} {status}", al.rule_id, al.severity)
        })
        .collect()
}

/// The rule id of the alert a single reading opens (pending or active), if any.
fn opened(actions: &[AlertAction]) -> Option<String> {
    actions.iter().find_map(|a| match a {
        AlertAction::Open(al) => Some(al.rule_id.clone()),
        _ => None,
    })
}

/// The action about `rule`, if any.
fn about<'a>(actions: &'a [AlertAction], rule: &str) -> Option<&'a AlertAction> {
    actions.iter().find(|a| a.alert().rule_id == rule)
}

// --------------------------------------------------------------------------------------------
// The default file

#[test]
fn default_file_parses_and_every_number_has_a_source() {
    let r = rules();
    let f = r.file();
    assert_eq!(f.version, 1);
    assert_eq!(f.default_profile, Profile::CN);
    let is_cite = |s: &Source| s.is_complete() && s.cite.starts_with("[S");
    for s in [
        &f.session.source,
        &f.confirmation.source,
        &f.episodes.source,
        &f.escalation.source,
    ] {
        assert!(is_cite(s), "{s:?}");
    }
    assert!(r.rules().len() >= 20);
    for rule in r.rules() {
        assert!(is_cite(&rule.source), "rule {}", rule.id);
        for (name, t) in &rule.threshold {
            assert!(is_cite(&t.source), "{}.{name}", rule.id);
            for (p, alt) in &t.profile {
                assert!(is_cite(&alt.source), "{}.{name} ({p})", rule.id);
            }
        }
        for s in &rule.steps {
            assert!(is_cite(&s.source), "{} step {}", rule.id, s.id);
        }
    }
}

/// Every CLINICAL.md rule id that has a number or a trigger is in the file.
#[test]
fn default_file_has_the_clinical_rules() {
    let r = rules();
    for id in [
        "GLU_LO",
        "GLU_HYPO_L2",
        "GLU_HYPO_L1",
        "GLU_HYPO_L3",
        "GLU_HYPO_CN",
        "GLU_LOW_WARN",
        "GLU_HI",
        "GLU_HYPER_CN",
        "GLU_HYPER_L2",
        "GLU_KETONE_ADA_PATIENT",
        "GLU_HYPER_L1",
        "GLU_ABOVE_TARGET",
        "BP_CRISIS",
        "BP_GRADE2",
        "BP_LOW",
        "BP_AVG_UNCONTROLLED",
        "BP_TREND_ESCALATE",
        "HR_BRADY_ADVISORY",
        "HR_BRADY_URGENT",
        "HR_TACHY_ADVISORY",
        "HR_TACHY_URGENT",
        "HR_DEVICE_RANGE",
        "IRREG_PULSE",
        "ADH_BP",
        "ADH_GLU_INSULIN",
    ] {
        assert!(r.rule(id).is_some(), "{id}");
    }
    let target = r.rule("GLU_ABOVE_TARGET").unwrap();
    assert_eq!(target.kind, RuleKind::GlucoseTarget);
    for c in TARGET_CONTEXTS {
        assert!(target.threshold.contains_key(c), "{c}");
    }
    // CRITICAL rules are safety floors.
    for rule in r.rules() {
        if rule.severity == Severity::Critical {
            assert!(rule.needs_waiver(), "{}", rule.id);
        }
    }
}

/// Dec serializes back to the decimal it was read as; the file survives a serde round trip.
#[test]
fn rule_file_serde_round_trip() {
    let f = rules().file().clone();
    let json = serde_json::to_string(&f).unwrap();
    let back: RuleFile = serde_json::from_str(&json).unwrap();
    assert_eq!(back, f);
    assert!(json.contains("\"mmol_l\":3.9"), "{json}");
}

#[test]
fn invalid_rule_files_are_rejected_with_the_rule_named() {
    let base = DEFAULT_RULES_TOML;
    // A threshold without a source.
    let bad = base.replacen(
        "source = { cite = \"[S1][S2]\", text = \"ADA SoC Sect. 6 Table 6.3 / IHSG 2017: Level 2 < 54 mg/dL (3.0 mmol/L)\" }",
        "source = { cite = \"\", text = \"\" }",
        1,
    );
    assert_ne!(bad, base);
    let e = RuleSet::from_toml(&bad).unwrap_err();
    assert_eq!(
        e.to_string(),
        "rule GLU_HYPO_L2 threshold value: every number needs a source (cite + text)"
    );
    // A pair that disagrees (54 mg/dL vs 3.9 mmol/L).
    let bad = base.replacen("mg_dl = 54\nmmol_l = 3.0", "mg_dl = 54\nmmol_l = 3.9", 1);
    let e = RuleSet::from_toml(&bad).unwrap_err();
    assert!(e.to_string().contains("GLU_HYPO_L2") && e.to_string().contains("disagree"));
    // A duplicate id.
    let bad = base.replacen("id = \"GLU_HYPO_L1\"", "id = \"GLU_HYPO_L2\"", 1);
    assert_eq!(
        RuleSet::from_toml(&bad).unwrap_err(),
        RuleFileError::DuplicateRule("GLU_HYPO_L2".into())
    );
    // A typo in a field name.
    let bad = base.replacen("safety_floor = true", "safety_flor = true", 1);
    assert!(matches!(
        RuleSet::from_toml(&bad),
        Err(RuleFileError::Parse(_))
    ));
    // A glucose threshold with one unit only.
    let bad = base.replacen("mg_dl = 70\nmmol_l = 3.9", "mmol_l = 3.9", 1);
    assert!(
        RuleSet::from_toml(&bad)
            .unwrap_err()
            .to_string()
            .contains("GLU_HYPO_L1 threshold value: needs mg_dl and mmol_l")
    );
}

// --------------------------------------------------------------------------------------------
// Boundary tables: every default threshold, just below / at / just above, in both units, per
// profile where they differ. Each row is a fresh engine and one reading; the expected value is the
// rule that opens an alert (the family's winner), or None.

type GluRow = (
    Profile,
    fn(i32) -> GlucoseRecord,
    i32,
    Option<u8>,
    Option<&'static str>,
);

fn run_glucose_rows(rows: &[GluRow]) {
    for (profile, make, v, meal_ctx, want) in rows {
        let mut e = h(*profile);
        let mut g = make(*v);
        if let Some(m) = meal_ctx {
            g = meal(g, *m);
        }
        let unit = g.concentration.map_or("?", |c| c.unit.symbol());
        let got = opened(&e.glu(T0, g));
        assert_eq!(
            got.as_deref(),
            *want,
            "{profile} value {v} ({unit}; mmol/L in tenths) meal {meal_ctx:?}"
        );
    }
}

/// CLINICAL.md §1.1 hypoglycaemia, §1.1 CN low warning: < 54 / 3.0, < 70 / 3.9, < 80 / 4.4 (CN).
#[test]
fn boundaries_glucose_low() {
    use Profile::*;
    let m: fn(i32) -> GlucoseRecord = mg;
    let x: fn(i32) -> GlucoseRecord = mmol10;
    let rows: Vec<GluRow> = vec![
        // GLU_HYPO_L2 < 54 mg/dL | < 3.0 mmol/L (all profiles)
        (US, m, 53, None, Some("GLU_HYPO_L2")),
        (US, m, 54, None, Some("GLU_HYPO_L1")),
        (US, m, 55, None, Some("GLU_HYPO_L1")),
        (US, x, 29, None, Some("GLU_HYPO_L2")),
        (US, x, 30, None, Some("GLU_HYPO_L1")),
        (US, x, 31, None, Some("GLU_HYPO_L1")),
        (CN, x, 29, None, Some("GLU_HYPO_L2")),
        (CN, x, 30, None, Some("GLU_HYPO_L1")),
        (EU, m, 53, None, Some("GLU_HYPO_L2")),
        (EU, m, 54, None, Some("GLU_HYPO_L1")),
        // GLU_HYPO_L1 < 70 mg/dL | < 3.9 mmol/L: 70 mg/dL is not < 70 (though 3.886 mmol/L)
        (US, m, 69, None, Some("GLU_HYPO_L1")),
        (US, m, 70, None, None),
        (US, m, 71, None, None),
        (US, x, 38, None, Some("GLU_HYPO_L1")),
        (US, x, 39, None, None),
        (US, x, 40, None, None),
        (EU, x, 38, None, Some("GLU_HYPO_L1")),
        (EU, x, 39, None, None),
        // CN: below L1 the INFO low warning < 80 mg/dL | < 4.4 mmol/L takes over
        (CN, x, 38, None, Some("GLU_HYPO_L1")),
        (CN, x, 39, None, Some("GLU_LOW_WARN")),
        (CN, m, 69, None, Some("GLU_HYPO_L1")),
        (CN, m, 70, None, Some("GLU_LOW_WARN")),
        (CN, m, 79, None, Some("GLU_LOW_WARN")),
        (CN, m, 80, None, None),
        (CN, m, 81, None, None),
        (CN, x, 43, None, Some("GLU_LOW_WARN")),
        (CN, x, 44, None, None),
        (CN, x, 45, None, None),
        // GLU_LOW_WARN is CN only
        (US, m, 79, None, None),
        (EU, x, 43, None, None),
    ];
    run_glucose_rows(&rows);
}

/// CLINICAL.md §1.2: > 180 / 10.0, > 240 / 13.3 (US), > 250 / 13.9, ≥ 300 / 16.7 (CN), > 600 / 33.3.
#[test]
fn boundaries_glucose_high() {
    use Profile::*;
    let m: fn(i32) -> GlucoseRecord = mg;
    let x: fn(i32) -> GlucoseRecord = mmol10;
    let rows: Vec<GluRow> = vec![
        // GLU_HYPER_L1 > 180 | > 10.0 (unknown context: the target ceiling ≥ 180 / ≥ 10.0 fires at 180)
        (US, m, 179, None, None),
        (US, m, 180, None, Some("GLU_ABOVE_TARGET")),
        (US, m, 181, None, Some("GLU_HYPER_L1")),
        (CN, x, 99, None, None),
        (CN, x, 100, None, Some("GLU_ABOVE_TARGET")),
        (CN, x, 101, None, Some("GLU_HYPER_L1")),
        (EU, m, 181, None, Some("GLU_HYPER_L1")),
        // GLU_KETONE_ADA_PATIENT > 240 | > 13.3 (US only)
        (US, m, 239, None, Some("GLU_HYPER_L1")),
        (US, m, 240, None, Some("GLU_HYPER_L1")),
        (US, m, 241, None, Some("GLU_KETONE_ADA_PATIENT")),
        (US, x, 132, None, Some("GLU_HYPER_L1")),
        (US, x, 133, None, Some("GLU_HYPER_L1")),
        (US, x, 134, None, Some("GLU_KETONE_ADA_PATIENT")),
        (EU, m, 241, None, Some("GLU_HYPER_L1")),
        (CN, x, 134, None, Some("GLU_HYPER_L1")),
        // GLU_HYPER_L2 > 250 | > 13.9 (all profiles)
        (US, m, 250, None, Some("GLU_KETONE_ADA_PATIENT")),
        (US, m, 251, None, Some("GLU_HYPER_L2")),
        (US, x, 139, None, Some("GLU_KETONE_ADA_PATIENT")),
        (US, x, 140, None, Some("GLU_HYPER_L2")),
        (CN, m, 249, None, Some("GLU_HYPER_L1")),
        (CN, m, 250, None, Some("GLU_HYPER_L1")),
        (CN, m, 251, None, Some("GLU_HYPER_L2")),
        (CN, x, 138, None, Some("GLU_HYPER_L1")),
        (CN, x, 139, None, Some("GLU_HYPER_L1")),
        (CN, x, 140, None, Some("GLU_HYPER_L2")),
        (EU, x, 139, None, Some("GLU_HYPER_L1")),
        (EU, x, 140, None, Some("GLU_HYPER_L2")),
        // GLU_HYPER_CN ≥ 300 | ≥ 16.7 (CN only)
        (CN, m, 299, None, Some("GLU_HYPER_L2")),
        (CN, m, 300, None, Some("GLU_HYPER_CN")),
        (CN, m, 301, None, Some("GLU_HYPER_CN")),
        (CN, x, 166, None, Some("GLU_HYPER_L2")),
        (CN, x, 167, None, Some("GLU_HYPER_CN")),
        (CN, x, 168, None, Some("GLU_HYPER_CN")),
        (US, m, 300, None, Some("GLU_HYPER_L2")),
        (EU, x, 167, None, Some("GLU_HYPER_L2")),
        // GLU_HI > 600 | > 33.3 (all profiles)
        (US, m, 599, None, Some("GLU_HYPER_L2")),
        (US, m, 600, None, Some("GLU_HYPER_L2")),
        (US, m, 601, None, Some("GLU_HI")),
        (CN, x, 332, None, Some("GLU_HYPER_CN")),
        (CN, x, 333, None, Some("GLU_HYPER_CN")),
        (CN, x, 334, None, Some("GLU_HI")),
        (EU, x, 333, None, Some("GLU_HYPER_L2")),
        (EU, x, 334, None, Some("GLU_HI")),
    ];
    run_glucose_rows(&rows);
}

/// CLINICAL.md §1.3–§1.4 targets by meal context: fasting/preprandial > 130 / 7.2 (ADA; US, EU),
/// > 126 / 7.0 (CDS; CN); postprandial, casual, bedtime, unknown ≥ 180 / ≥ 10.0 (peak < 180 / < 10.0).
#[test]
fn boundaries_glucose_targets_by_context() {
    use Profile::*;
    let m: fn(i32) -> GlucoseRecord = mg;
    let x: fn(i32) -> GlucoseRecord = mmol10;
    let t = Some("GLU_ABOVE_TARGET");
    let mut rows: Vec<GluRow> = Vec::new();
    for ctx in [3u8, 1] {
        // fasting (3), preprandial (1)
        rows.extend_from_slice(&[
            (US, m, 129, Some(ctx), None),
            (US, m, 130, Some(ctx), None),
            (US, m, 131, Some(ctx), t),
            (US, x, 71, Some(ctx), None),
            (US, x, 72, Some(ctx), None),
            (US, x, 73, Some(ctx), t),
            (EU, m, 130, Some(ctx), None),
            (EU, m, 131, Some(ctx), t),
            (CN, x, 69, Some(ctx), None),
            (CN, x, 70, Some(ctx), None),
            (CN, x, 71, Some(ctx), t),
            (CN, m, 125, Some(ctx), None),
            (CN, m, 126, Some(ctx), None),
            (CN, m, 127, Some(ctx), t),
        ]);
    }
    for ctx in [Some(2u8), Some(4), Some(5), Some(0), Some(9), None] {
        // postprandial, casual, bedtime, reserved/absent = unknown
        for p in [US, CN, EU] {
            rows.extend_from_slice(&[
                (p, m, 179, ctx, None),
                (p, m, 180, ctx, t),
                (p, m, 181, ctx, Some("GLU_HYPER_L1")),
                (p, x, 99, ctx, None),
                (p, x, 100, ctx, t),
                (p, x, 101, ctx, Some("GLU_HYPER_L1")),
            ]);
        }
    }
    run_glucose_rows(&rows);
    // The fasting target does not change the hypo rules (§1.4 rule 1).
    run_glucose_rows(&[(US, m, 69, Some(3), Some("GLU_HYPO_L1"))]);
}

/// Exact decimal comparison: 3.9 mmol/L is not < 3.9 however the SFLOAT encodes it.
#[test]
fn glucose_compares_exactly_in_the_native_unit() {
    for (mantissa, exp) in [(39, -4), (390, -5)] {
        let g = glucose_record(SFloat::new(mantissa, exp).unwrap(), true, None);
        assert_eq!(opened(&h(Profile::US).glu(T0, g)), None, "{mantissa}e{exp}");
    }
    // 3.89 mmol/L is below 3.9.
    let g = glucose_record(SFloat::new(389, -5).unwrap(), true, None);
    assert_eq!(
        opened(&h(Profile::US).glu(T0, g)).as_deref(),
        Some("GLU_HYPO_L1")
    );
    // The alert carries the threshold in the unit compared.
    let a = h(Profile::US).glu(T0, mmol10(38));
    let th = a[0].alert().threshold.clone().unwrap();
    assert_eq!(
        (th.op, th.value, th.unit.as_str()),
        (Op::Lt, Dec::new(39, -1), "mmol/L")
    );
    assert!(
        a[0].alert()
            .message
            .contains("glucose 3.8 mmol/L < 3.9 mmol/L"),
        "{}",
        a[0].alert().message
    );
}

/// CLINICAL.md §3.1: LO / HI (censored) → GLU_LO / GLU_HI, CRITICAL, whatever the number.
#[test]
fn censored_readings_fire_lo_and_hi() {
    for (censor, rule) in [(Censor::Low, "GLU_LO"), (Censor::High, "GLU_HI")] {
        let mut e = h(Profile::CN);
        let a = e.feed(
            T0,
            Measurement::Glucose(mg(100)),
            Outcome::Censored { censor },
            Flags::default(),
            Symptoms::NONE,
        );
        assert_eq!(summary(&a), vec![format!("open {rule} CRITICAL active")]);
    }
}

/// The China referral profile's ≤ 3.9 (GLU_HYPO_CN) is off by default and turned on by an override.
#[test]
fn cn_referral_rule_uses_less_or_equal_when_enabled() {
    let mut s = PatientSettings::new("p1");
    s.profile = Some(Profile::CN);
    s.overrides.push(Override {
        rule_id: "GLU_HYPO_CN".into(),
        enabled: Some(true),
        set_by: "dr-li".into(),
        reason: "public-health referral programme".into(),
        ..Default::default()
    });
    for (make, v, want) in [
        (mmol10 as fn(i32) -> GlucoseRecord, 38, "GLU_HYPO_L1"),
        (mmol10, 39, "GLU_HYPO_CN"),
        (mmol10, 40, "GLU_LOW_WARN"),
        (mg, 70, "GLU_HYPO_CN"),
        (mg, 71, "GLU_LOW_WARN"),
    ] {
        let mut e = with(s.clone());
        assert_eq!(opened(&e.glu(T0, make(v))).as_deref(), Some(want), "{v}");
    }
}

type BpRow = (Profile, i32, i32, i32, Option<&'static str>);

fn run_bp_rows(rows: &[BpRow]) {
    for (profile, s, d, p, want) in rows {
        let mut e = h(*profile);
        let got = opened(&e.bp(T0, *s, *d, *p));
        assert_eq!(got.as_deref(), *want, "{profile} {s}/{d} pulse {p}");
    }
}

/// CLINICAL.md §2.3: crisis ≥ 180 and/or ≥ 110 (CN, EU) / ≥ 120 (US); grade 2 ≥ 160 / ≥ 100; low < 90 / < 60.
#[test]
fn boundaries_blood_pressure() {
    use Profile::*;
    let c = Some("BP_CRISIS");
    let g = Some("BP_GRADE2");
    let l = Some("BP_LOW");
    let mut rows: Vec<BpRow> = Vec::new();
    for p in [CN, US, EU] {
        rows.extend_from_slice(&[
            (p, 179, 80, 70, g),
            (p, 180, 80, 70, c),
            (p, 181, 80, 70, c),
            (p, 159, 80, 70, None),
            (p, 160, 80, 70, g),
            (p, 161, 80, 70, g),
            (p, 150, 99, 70, None),
            (p, 150, 100, 70, g),
            (p, 150, 101, 70, g),
            (p, 89, 70, 70, l),
            (p, 90, 70, 70, None),
            (p, 91, 70, 70, None),
            (p, 120, 59, 70, l),
            (p, 120, 60, 70, None),
            (p, 120, 61, 70, None),
        ]);
    }
    for p in [CN, EU] {
        rows.extend_from_slice(&[
            (p, 150, 109, 70, g),
            (p, 150, 110, 70, c),
            (p, 150, 111, 70, c),
        ]);
    }
    rows.extend_from_slice(&[
        (US, 150, 110, 70, g),
        (US, 150, 119, 70, g),
        (US, 150, 120, 70, c),
        (US, 150, 121, 70, c),
    ]);
    run_bp_rows(&rows);
}

/// CLINICAL.md §2.4 single-reading pulse rules: < 40, > 120 (the < 50 / > 100 rules need 2 sessions).
#[test]
fn boundaries_pulse_single() {
    use Profile::*;
    let mut rows: Vec<BpRow> = Vec::new();
    for p in [CN, US, EU] {
        rows.extend_from_slice(&[
            (p, 120, 80, 39, Some("HR_BRADY_URGENT")),
            (p, 120, 80, 40, None),
            (p, 120, 80, 41, None),
            (p, 120, 80, 119, None),
            (p, 120, 80, 120, None),
            (p, 120, 80, 121, Some("HR_TACHY_URGENT")),
        ]);
    }
    run_bp_rows(&rows);
}

/// CLINICAL.md §2.4: < 50 and > 100 bpm on ≥ 2 sessions in 7 days → ADVISORY.
#[test]
fn boundaries_pulse_patterns() {
    for (pulse, want) in [
        (49, Some("HR_BRADY_ADVISORY")),
        (50, None),
        (51, None),
        (99, None),
        (100, None),
        (101, Some("HR_TACHY_ADVISORY")),
    ] {
        let mut e = h(Profile::CN);
        assert_eq!(
            opened(&e.bp(T0, 120, 80, pulse)),
            None,
            "first session {pulse}"
        );
        let got = opened(&e.bp(T0 + DAY, 120, 80, pulse));
        assert_eq!(got.as_deref(), want, "second session {pulse}");
    }
    // Two readings in one session are one session.
    let mut e = h(Profile::CN);
    assert_eq!(opened(&e.bp(T0, 120, 80, 45)), None);
    assert_eq!(opened(&e.bp(T0 + 60, 120, 80, 45)), None);
    // Readings more than 7 days back do not count (the window is (t − 7 d, t]).
    assert_eq!(opened(&e.bp(T0 + 7 * DAY + 60, 120, 80, 45)), None);
}

/// A kPa cuff: no published kPa threshold, so the value is converted (§3.4) and compared in mmHg.
#[test]
fn kpa_cuff_is_compared_in_mmhg() {
    let kpa = |sys_tenths: i32| {
        let p = |v| Pressure {
            raw: SFloat::new(v, -1).unwrap(),
            unit: PressureUnit::KPa,
        };
        BloodPressureRecord {
            systolic: p(sys_tenths),
            diastolic: p(107), // 80.3 mmHg
            mean_arterial_pressure: p(0),
            timestamp: None,
            pulse_rate: Some(SFloat::new(70, 0).unwrap()),
            user_id: None,
            measurement_status: None,
        }
    };
    for (tenths, want) in [(239, Some("BP_GRADE2")), (240, Some("BP_CRISIS"))] {
        // 23.9 kPa = 179.26 mmHg; 24.0 kPa = 180.01 mmHg
        let mut e = h(Profile::CN);
        let a = e.feed(
            T0,
            Measurement::BloodPressure(kpa(tenths)),
            Outcome::Valid,
            Flags::default(),
            Symptoms::NONE,
        );
        assert_eq!(opened(&a).as_deref(), want);
    }
}

// --------------------------------------------------------------------------------------------
// Confirmation (CLINICAL.md §4.2, §3.3)

#[test]
fn crisis_confirmed_by_a_repeat_at_least_a_minute_later() {
    let mut e = h(Profile::CN);
    assert_eq!(
        summary(&e.bp(T0, 185, 95, 70)),
        ["open BP_CRISIS URGENT pending"]
    );
    // 59 s later: same burst, not a confirmation (§3.3: a repeat is >= 1 min after the first).
    assert!(e.bp(T0 + 59, 186, 95, 70).is_empty());
    let a = e.bp(T0 + 60, 182, 96, 70);
    assert_eq!(summary(&a), ["confirm BP_CRISIS URGENT active"]);
    assert!(matches!(
        a[0],
        AlertAction::Confirm {
            by: ConfirmedBy::Repeat,
            ..
        }
    ));
    assert_eq!(a[0].alert().reading_ids, ["r1", "r2", "r3"]);
    assert_eq!(a[0].alert().id, format!("p1/BP_CRISIS/{T0}"));
    assert!(a[0].alert().source.cite.contains("[S21]"));
}

#[test]
fn crisis_downgraded_when_the_repeat_is_in_range() {
    let mut e = h(Profile::CN);
    e.bp(T0, 185, 95, 70);
    let a = e.bp(T0 + 120, 150, 90, 70);
    assert_eq!(summary(&a), ["downgrade BP_CRISIS INFO downgraded"]);
    assert!(matches!(
        a[0],
        AlertAction::Downgrade {
            from: Severity::Urgent,
            ..
        }
    ));
    // A repeat that only meets grade 2 downgrades the crisis and opens the grade-2 INFO.
    let mut e = h(Profile::CN);
    e.bp(T0, 185, 95, 70);
    assert_eq!(
        summary(&e.bp(T0 + 120, 165, 95, 70)),
        [
            "downgrade BP_CRISIS INFO downgraded",
            "open BP_GRADE2 INFO active"
        ]
    );
}

/// A missing repeat never silences an URGENT alert: raised at the window's end.
#[test]
fn crisis_alerted_anyway_when_no_repeat_comes() {
    let mut e = h(Profile::CN);
    e.bp(T0, 185, 95, 70);
    assert!(e.on_tick(T0 + 900).is_empty()); // the window's last second still waits
    let a = e.on_tick(T0 + 901);
    assert_eq!(summary(&a), ["confirm BP_CRISIS URGENT active"]);
    assert!(matches!(
        a[0],
        AlertAction::Confirm {
            by: ConfirmedBy::Timeout,
            ..
        }
    ));
    assert!(e.on_tick(T0 + 902).is_empty());
    // A late repeat after the timeout merges into the active episode.
    assert!(e.bp(T0 + 1000, 190, 100, 70).is_empty());
    // A reading after the deadline with no tick in between: the timeout is applied first.
    let mut e = h(Profile::CN);
    e.bp(T0, 185, 95, 70);
    assert_eq!(
        summary(&e.bp(T0 + 2000, 120, 80, 70)),
        ["confirm BP_CRISIS URGENT active"]
    );
}

/// Issue 11 item 13: a confirmation's timeout and an acknowledgement's deadline are announced by
/// `next_deadline`, and `on_deadlines` fires each at its second without running the window rules.
#[test]
fn deadlines_are_announced_and_fire_at_their_second() {
    let mut e = h(Profile::CN);
    assert_eq!(e.e.next_deadline(), None);
    e.bp(T0, 185, 95, 70); // pending crisis: no repeat within 15 min → alert anyway (§4.2)
    assert_eq!(e.e.next_deadline(), Some(T0 + 901));
    assert!(e.e.on_deadlines(T0 + 900).is_empty());
    let a = e.e.on_deadlines(T0 + 901);
    assert_eq!(summary(&a), ["confirm BP_CRISIS URGENT active"]);
    // Now an active URGENT: the next deadline is its acknowledgement (4 h from activation, §4.3).
    let active = a[0].alert().updated_utc;
    assert_eq!(e.e.next_deadline(), Some(active + 14_400));
    assert!(e.e.on_deadlines(active + 14_399).is_empty());
    assert_eq!(
        summary(&e.e.on_deadlines(active + 14_400)),
        ["escalate BP_CRISIS URGENT active"]
    );
    assert_eq!(e.e.next_deadline(), None, "escalated once; nothing waits");

    // A CRITICAL glucose alert: acknowledgement due 30 min after it opened; acknowledging it ends the
    // wait.
    let mut e = h(Profile::US);
    let id = e.glu(T0, mg(50))[0].alert().id.clone();
    assert_eq!(e.e.next_deadline(), Some(T0 + 1800));
    assert!(e.e.acknowledge("p1", &id));
    assert_eq!(e.e.next_deadline(), None);

    // Deadlines only: an adherence step that `on_tick` would open is left to the window rules.
    let mut e = with(PatientSettings {
        monitors_bp: true,
        enrolled_utc: Some(T0),
        ..PatientSettings::new("p1")
    });
    assert!(e.e.on_deadlines(T0 + 7 * DAY).is_empty());
    assert_eq!(e.e.next_deadline(), None);
    assert_eq!(
        summary(&e.on_tick(T0 + 7 * DAY)),
        ["open ADH_BP_REMIND INFO active"]
    );
}

/// Issue 11 item 15, CLINICAL.md §3.4 rule 2: messages show mmol/L with one decimal whatever the
/// SFLOAT's exponent, mg/dL and mmHg whole, and a kPa cuff's converted value to one decimal.
#[test]
fn messages_keep_each_units_resolution() {
    let msg = |a: &[AlertAction]| a[0].alert().message.clone();
    // 3.0 mmol/L sent as 3 × 10^-3 mol/L (as ingest rebuilds it from JSON's 3.0).
    let mut e = h(Profile::CN);
    let m = msg(&e.glu(
        T0,
        glucose_record(SFloat::new(3, -3).expect("SFLOAT"), true, None),
    ));
    assert!(m.contains("glucose 3.0 mmol/L < 3.9 mmol/L"), "{m}");
    let mut e = h(Profile::US);
    let m = msg(&e.glu(T0, mg(54)));
    assert!(m.contains("glucose 54 mg/dL < 70 mg/dL"), "{m}");
    let mut e = h(Profile::CN);
    let m = msg(&e.bp(T0, 185, 95, 70));
    assert!(m.contains("sbp 185 mmHg >= 180 mmHg"), "{m}");
    // 24.0 kPa = 180.01 mmHg.
    let kpa = |v| Pressure {
        raw: SFloat::new(v, -1).expect("SFLOAT"),
        unit: PressureUnit::KPa,
    };
    let mut e = h(Profile::CN);
    let m = msg(&e.feed(
        T0,
        Measurement::BloodPressure(BloodPressureRecord {
            systolic: kpa(240),
            diastolic: kpa(107),
            mean_arterial_pressure: kpa(0),
            timestamp: None,
            pulse_rate: None,
            user_id: None,
            measurement_status: None,
        }),
        Outcome::Valid,
        Flags::default(),
        Symptoms::NONE,
    ));
    assert!(m.contains("sbp 180.0 mmHg >= 180 mmHg"), "{m}");
}

/// CLINICAL.md §3.2: a low-quality reading never fires a crisis without a clean repeat.
#[test]
fn low_quality_crisis_needs_a_clean_repeat() {
    let lq = |e: &mut H, t, s, d| {
        e.bp_with(
            t,
            s,
            d,
            70,
            Outcome::LowQuality,
            Flags::BODY_MOVEMENT,
            Symptoms::NONE,
        )
    };
    let mut e = h(Profile::CN);
    assert_eq!(
        summary(&lq(&mut e, T0, 190, 100)),
        ["open BP_CRISIS URGENT pending"]
    );
    assert!(lq(&mut e, T0 + 120, 190, 100).is_empty()); // another low-quality one does not confirm
    let a = e.on_tick(T0 + 901);
    assert_eq!(summary(&a), ["confirm BP_CRISIS ADVISORY active"]);
    assert!(a[0].alert().message.contains("unconfirmed"));
    // A clean repeat confirms at full severity.
    let mut e = h(Profile::CN);
    lq(&mut e, T0, 190, 100);
    assert_eq!(
        summary(&e.bp(T0 + 120, 188, 99, 70)),
        ["confirm BP_CRISIS URGENT active"]
    );
    // A low-quality grade-2 reading (no confirmation rule) raises nothing.
    let mut e = h(Profile::CN);
    assert!(lq(&mut e, T0, 165, 95).is_empty());
}

/// Symptoms skip confirmation (§4.2) and make the crisis CRITICAL (§2.3).
#[test]
fn crisis_with_symptoms_is_critical_at_once() {
    let mut e = h(Profile::CN);
    let a = e.bp_with(
        T0,
        185,
        95,
        70,
        Outcome::Valid,
        Flags::default(),
        Symptoms::of(&[Symptom::CrisisSymptoms]),
    );
    assert_eq!(summary(&a), ["open BP_CRISIS CRITICAL active"]);
    // Reported after the reading: the pending alert is confirmed by symptoms.
    let mut e = h(Profile::CN);
    e.bp(T0, 185, 95, 70);
    let a = e.on_symptoms("p1", T0 + 60, Symptoms::of(&[Symptom::CrisisSymptoms]));
    assert_eq!(summary(&a), ["confirm BP_CRISIS CRITICAL active"]);
    assert!(matches!(
        a[0],
        AlertAction::Confirm {
            by: ConfirmedBy::Symptoms,
            ..
        }
    ));
    // Symptoms that the rule does not name change nothing.
    let mut e = h(Profile::CN);
    e.bp(T0, 185, 95, 70);
    assert!(
        e.on_symptoms("p1", T0 + 60, Symptoms::of(&[Symptom::DizzinessOrSyncope]))
            .is_empty()
    );
}

#[test]
fn low_bp_and_slow_pulse_confirmation() {
    let mut e = h(Profile::EU);
    assert_eq!(
        summary(&e.bp(T0, 85, 55, 38)),
        [
            "open BP_LOW ADVISORY pending",
            "open HR_BRADY_URGENT URGENT pending"
        ]
    );
    assert_eq!(
        summary(&e.bp(T0 + 180, 86, 58, 45)),
        [
            "confirm BP_LOW ADVISORY active",
            "downgrade HR_BRADY_URGENT INFO downgraded"
        ]
    );
}

/// A confirmed higher alert supersedes the family's lower episode.
#[test]
fn confirmed_crisis_supersedes_grade2_episode() {
    let mut e = h(Profile::CN);
    assert_eq!(
        summary(&e.bp(T0, 165, 90, 70)),
        ["open BP_GRADE2 INFO active"]
    );
    assert_eq!(
        summary(&e.bp(T0 + 600, 185, 90, 70)),
        ["open BP_CRISIS URGENT pending"]
    );
    assert_eq!(
        summary(&e.bp(T0 + 700, 183, 90, 70)),
        [
            "confirm BP_CRISIS URGENT active",
            "close BP_GRADE2 INFO closed"
        ]
    );
}

// --------------------------------------------------------------------------------------------
// Episodes and escalation (CLINICAL.md §4.3)

#[test]
fn hypo_episode_merges_escalates_and_resolves() {
    let mut e = h(Profile::CN);
    // Level 1: URGENT at once (15-15 instructions), no confirmation step.
    assert_eq!(
        summary(&e.glu(T0, mmol10(36))),
        ["open GLU_HYPO_L1 URGENT active"]
    );
    // The re-check 15 minutes later, still Level 1: merged, no new alert.
    assert!(e.glu(T0 + 900, mmol10(35)).is_empty());
    // Now Level 2: the episode escalates.
    let a = e.glu(T0 + 1800, mmol10(28));
    assert_eq!(summary(&a), ["escalate GLU_HYPO_L2 CRITICAL active"]);
    assert!(matches!(
        &a[0],
        AlertAction::Escalate {
            reason: Escalation::Severity {
                from: Severity::Urgent
            },
            ..
        }
    ));
    assert_eq!(a[0].alert().id, format!("p1/GLU_HYPO_L1/{T0}"));
    assert_eq!(a[0].alert().reading_ids, ["r1", "r2", "r3"]);
    // One in-range reading does not resolve; a low one resets the count; two in a row do.
    assert!(e.glu(T0 + 2700, mmol10(60)).is_empty());
    assert!(e.glu(T0 + 3000, mmol10(37)).is_empty());
    assert!(e.glu(T0 + 3300, mmol10(60)).is_empty());
    assert_eq!(
        summary(&e.glu(T0 + 3600, mmol10(62))),
        ["close GLU_HYPO_L2 CRITICAL closed"]
    );
    assert!(e.state().open_alerts("p1").is_empty());
}

#[test]
fn episode_reopens_after_its_merge_window() {
    let mut e = h(Profile::US);
    e.glu(T0, mg(50));
    assert!(e.glu(T0 + 3600, mg(50)).is_empty()); // within CRITICAL 1 h of opening
    assert_eq!(
        summary(&e.glu(T0 + 3601, mg(52))),
        [
            "close GLU_HYPO_L2 CRITICAL closed",
            "open GLU_HYPO_L2 CRITICAL active"
        ]
    );
}

#[test]
fn unacknowledged_alerts_move_to_the_next_tier() {
    let mut e = h(Profile::US);
    e.glu(T0, mg(50)); // CRITICAL
    assert!(e.on_tick(T0 + 1799).is_empty());
    let a = e.on_tick(T0 + 1800);
    assert_eq!(summary(&a), ["escalate GLU_HYPO_L2 CRITICAL active"]);
    assert!(matches!(
        &a[0],
        AlertAction::Escalate {
            reason: Escalation::Unacknowledged,
            ..
        }
    ));
    assert_eq!(a[0].alert().tier, 1);
    assert!(e.on_tick(T0 + 3000).is_empty());
    // Acknowledged in time: no escalation.
    let mut e = h(Profile::US);
    let id = e.glu(T0, mg(60))[0].alert().id.clone(); // URGENT, 4 h
    assert!(e.e.acknowledge("p1", &id));
    assert!(!e.e.acknowledge("p1", "nope"));
    assert!(e.on_tick(T0 + 5 * 3600).is_empty());
}

/// GLU_HYPER_L2: ADVISORY; URGENT on 2 consecutive readings, for insulin-treated patients, or with a
/// "major health issues" context (CLINICAL.md §1.2, §1.4).
#[test]
fn hyper_l2_escalation_conditions() {
    let mut e = h(Profile::US);
    assert_eq!(
        summary(&e.glu(T0, mg(260))),
        ["open GLU_HYPER_L2 ADVISORY active"]
    );
    let a = e.glu(T0 + 3600, mg(270));
    assert_eq!(summary(&a), ["escalate GLU_HYPER_L2 URGENT active"]);
    assert!(a[0].alert().message.contains("2 consecutive"));
    // Not consecutive when a reading in between is not above 250.
    let mut e = h(Profile::US);
    e.glu(T0, mg(260));
    e.glu(T0 + 1800, mg(200));
    assert!(e.glu(T0 + 3600, mg(260)).is_empty());
    // Insulin-treated (settings).
    let mut e = with(PatientSettings {
        insulin_treated: true,
        ..PatientSettings::new("p1")
    });
    assert_eq!(
        summary(&e.glu(T0, mmol10(150))),
        ["open GLU_HYPER_L2 URGENT active"]
    );
    // Insulin seen in the GLS context (medication id 1, rapid-acting).
    let mut e = h(Profile::EU);
    let mut g = mg(260);
    g.context = Some(GlucoseContextInfo {
        medication: Some((1, Some(4.0), true)),
        ..Default::default()
    });
    assert_eq!(summary(&e.glu(T0, g)), ["open GLU_HYPER_L2 URGENT active"]);
    // Major health issue.
    let mut e = h(Profile::EU);
    let mut g = mg(260);
    g.context = Some(GlucoseContextInfo {
        health: Some(2),
        ..Default::default()
    });
    assert_eq!(summary(&e.glu(T0, g)), ["open GLU_HYPER_L2 URGENT active"]);
}

/// CLINICAL.md §2.4: no alert on a single irregular-pulse flag; ≥ 2 of 3 consecutive readings.
#[test]
fn irregular_pulse_two_of_three() {
    let irr = |e: &mut H, t| {
        e.bp_with(
            t,
            125,
            80,
            72,
            Outcome::Valid,
            Flags::IRREGULAR_PULSE,
            Symptoms::NONE,
        )
    };
    let mut e = h(Profile::EU);
    assert!(irr(&mut e, T0).is_empty());
    assert!(e.bp(T0 + 60, 124, 80, 70).is_empty());
    assert_eq!(
        summary(&irr(&mut e, T0 + 120)),
        ["open IRREG_PULSE ADVISORY active"]
    );
    // Flags 3 readings apart: 1 of 3 each time, but 2 sessions in 7 days.
    let mut e = h(Profile::EU);
    assert!(irr(&mut e, T0).is_empty());
    e.bp(T0 + 60, 124, 80, 70);
    e.bp(T0 + 120, 124, 80, 70);
    assert!(e.bp(T0 + DAY, 124, 80, 70).is_empty());
    assert_eq!(
        opened(&irr(&mut e, T0 + DAY + 60)).as_deref(),
        Some("IRREG_PULSE")
    );
    // A pacemaker patient: rhythm and pulse rules are off.
    let mut e = with(PatientSettings {
        pacemaker: true,
        ..PatientSettings::new("p1")
    });
    irr(&mut e, T0);
    assert!(irr(&mut e, T0 + 60).is_empty());
    assert!(e.bp(T0 + 120, 120, 80, 35).is_empty());
}

#[test]
fn device_pulse_range_flag() {
    let mut e = h(Profile::CN);
    let a = e.bp_with(
        T0,
        120,
        80,
        70,
        Outcome::Valid,
        Flags::PULSE_RATE_RANGE,
        Symptoms::NONE,
    );
    assert_eq!(summary(&a), ["open HR_DEVICE_RANGE ADVISORY active"]);
}

/// Grade 2: INFO per reading, ADVISORY at the third session in 7 days (CLINICAL.md §2.3).
#[test]
fn grade2_pattern_escalates_on_the_third_session() {
    let mut e = h(Profile::CN);
    assert_eq!(
        summary(&e.bp(T0, 165, 90, 70)),
        ["open BP_GRADE2 INFO active"]
    );
    assert!(e.bp(T0 + DAY / 2, 162, 95, 70).is_empty());
    let a = e.bp(T0 + DAY, 161, 90, 70);
    assert_eq!(summary(&a), ["escalate BP_GRADE2 ADVISORY active"]);
    assert!(
        a[0].alert()
            .message
            .contains("3 session(s) in 7 days, 3 needed")
    );
}

#[test]
fn severe_hypoglycaemia_report_is_critical() {
    let mut e = h(Profile::CN);
    let a = e.on_symptoms("p1", T0, Symptoms::of(&[Symptom::SevereHypoglycaemia]));
    assert_eq!(summary(&a), ["open GLU_HYPO_L3 CRITICAL active"]);
    // With an open Level 1 episode it escalates that episode.
    let mut e = h(Profile::CN);
    e.glu(T0, mmol10(35));
    assert_eq!(
        summary(&e.on_symptoms(
            "p1",
            T0 + 600,
            Symptoms::of(&[Symptom::SevereHypoglycaemia])
        )),
        ["escalate GLU_HYPO_L3 CRITICAL active"]
    );
}

#[test]
fn rejected_and_control_readings_are_ignored() {
    let mut e = h(Profile::CN);
    let a = e.feed(
        T0,
        Measurement::Glucose(mg(40)),
        Outcome::ControlSolution,
        Flags::default(),
        Symptoms::NONE,
    );
    assert!(a.is_empty());
    assert!(e.e.state().open_alerts("p1").is_empty());
}

// --------------------------------------------------------------------------------------------
// Window rules: 7-day average (CLINICAL.md §2.2), trend (§2.3), adherence (§4.5)

/// Feeds a home-BP week: `days` days, morning (07:00) and evening (19:00) sessions of `per` readings
/// 1 min apart; `f(day, session, i)` gives (sbp, dbp).
fn week(e: &mut H, start_day: i64, days: i64, per: i64, f: impl Fn(i64, i64, i64) -> (i32, i32)) {
    for d in 0..days {
        for (s, hour) in [(0, 7), (1, 19)] {
            for i in 0..per {
                let t = (start_day + d) * DAY + hour * 3600 + i * 60;
                let (sys, dia) = f(d, s, i);
                e.bp(t, sys, dia, 70);
            }
        }
    }
}

const DAY0: i64 = 19_888;

/// The worked example: day 1 is high (new block) and discarded; days 2–7 average exactly 135/84.
#[test]
fn seven_day_average_discards_day_one_and_is_exact() {
    let mut e = h(Profile::CN);
    week(&mut e, DAY0, 7, 2, |d, _, i| {
        if d == 0 {
            (160, 95)
        } else if i == 0 {
            (134, 84)
        } else {
            (136, 84)
        }
    });
    let now = (DAY0 + 6) * DAY + 22 * 3600;
    let a = e.on_tick(now);
    let open = about(&a, "BP_AVG_UNCONTROLLED").unwrap();
    assert!(matches!(open, AlertAction::Open(_)));
    let al = open.alert();
    assert_eq!(al.severity, Severity::Advisory);
    assert_eq!(al.reading_ids.len(), 24); // 6 days × 2 sessions × 2 readings; day 1's 4 dropped
    assert!(
        al.message
            .contains("7-day home average 135.0/84.0 mmHg over 24 readings in 12 sessions, first day discarded; sbp >= 135 mmHg"),
        "{}",
        al.message
    );
    assert_eq!(
        al.threshold.as_ref().map(|t| t.value),
        Some(Dec::new(135, 0))
    );
    // Ticking again within the week merges silently.
    assert!(e.on_tick(now + 3600).is_empty());

    // Same week at 134/84 after day 1: no alert, although day 1 included would average 137.7.
    let mut e = h(Profile::CN);
    week(&mut e, DAY0, 7, 2, |d, _, _| {
        if d == 0 { (160, 95) } else { (134, 84) }
    });
    assert!(e.on_tick(now).is_empty());
}

/// Exact rational means: sessions of 3 readings (China 2024) averaging 134.67 vs exactly 135.
#[test]
fn average_of_three_reading_sessions_is_exact() {
    for (readings, fires) in [([134, 135, 136], true), ([134, 134, 136], false)] {
        let mut e = h(Profile::EU);
        week(&mut e, DAY0, 7, 3, |_, _, i| {
            (readings[usize::try_from(i).unwrap()], 80)
        });
        let a = e.on_tick((DAY0 + 6) * DAY + 22 * 3600);
        assert_eq!(
            about(&a, "BP_AVG_UNCONTROLLED").is_some(),
            fires,
            "{readings:?}"
        );
    }
}

/// BP_AVG_UNCONTROLLED boundaries per profile: ≥ 135/85 (CN, EU), ≥ 130/80 (US).
#[test]
fn boundaries_seven_day_average() {
    use Profile::*;
    let rows: [(Profile, i32, i32, bool); 18] = [
        (CN, 134, 80, false),
        (CN, 135, 80, true),
        (CN, 136, 80, true),
        (CN, 120, 84, false),
        (CN, 120, 85, true),
        (CN, 120, 86, true),
        (EU, 134, 84, false),
        (EU, 135, 80, true),
        (EU, 120, 85, true),
        (US, 129, 79, false),
        (US, 130, 70, true),
        (US, 131, 70, true),
        (US, 120, 79, false),
        (US, 120, 80, true),
        (US, 120, 81, true),
        (CN, 130, 80, false),
        (EU, 130, 80, false),
        (US, 134, 84, true),
    ];
    for (p, s, d, fires) in rows {
        let mut e = h(p);
        week(&mut e, DAY0, 7, 2, |_, _, _| (s, d));
        let a = e.on_tick((DAY0 + 6) * DAY + 22 * 3600);
        assert_eq!(
            about(&a, "BP_AVG_UNCONTROLLED").is_some(),
            fires,
            "{p} {s}/{d}: {:?}",
            summary(&a)
        );
    }
}

/// ≥ 12 readings after discarding (ESH/AHA); fewer → no decision, and low-quality readings don't count.
#[test]
fn average_needs_twelve_readings() {
    let mut e = h(Profile::CN);
    // Day 1 (dropped) + 3 days × 2 sessions × 2 = 12 readings.
    week(&mut e, DAY0, 4, 2, |_, _, _| (150, 90));
    assert_eq!(
        opened(&e.on_tick((DAY0 + 3) * DAY + 22 * 3600)).as_deref(),
        Some("BP_AVG_UNCONTROLLED")
    );
    let mut e = h(Profile::CN);
    week(&mut e, DAY0, 4, 2, |_, _, _| (150, 90));
    // …but one of them low quality leaves 11.
    let mut e2 = h(Profile::CN);
    let mut n = 0;
    for d in 0..4 {
        for hour in [7, 19] {
            for i in 0..2 {
                n += 1;
                let t = (DAY0 + d) * DAY + hour * 3600 + i * 60;
                let outcome = if n == 16 {
                    Outcome::LowQuality
                } else {
                    Outcome::Valid
                };
                e2.bp_with(t, 150, 90, 70, outcome, Flags::CUFF_LOOSE, Symptoms::NONE);
            }
        }
    }
    let a = e2.on_tick((DAY0 + 3) * DAY + 22 * 3600);
    assert!(
        !summary(&a).iter().any(|s| s.contains("BP_AVG")),
        "{:?}",
        summary(&a)
    );
    // Back under the threshold: the episode closes.
    let now = (DAY0 + 3) * DAY + 22 * 3600;
    e.on_tick(now);
    let mut later = e;
    week(&mut later, DAY0 + 4, 7, 2, |_, _, _| (120, 75));
    let a = later.on_tick((DAY0 + 10) * DAY + 22 * 3600);
    assert!(summary(&a).contains(&"close BP_AVG_UNCONTROLLED ADVISORY closed".to_string()));
}

/// BP_TREND_ESCALATE: daily mean above target on 5 consecutive days → tier 1 (physician).
#[test]
fn trend_five_consecutive_days() {
    let mut e = h(Profile::CN);
    week(&mut e, DAY0, 4, 1, |_, _, _| (138, 80));
    assert!(
        !summary(&e.on_tick((DAY0 + 3) * DAY + 22 * 3600))
            .iter()
            .any(|s| s.contains("TREND"))
    );
    week(&mut e, DAY0 + 4, 1, 1, |_, _, _| (135, 80));
    let a = e.on_tick((DAY0 + 4) * DAY + 22 * 3600);
    let t = a
        .iter()
        .find(|x| x.alert().rule_id == "BP_TREND_ESCALATE")
        .unwrap();
    assert!(matches!(t, AlertAction::Open(_)));
    assert_eq!(t.alert().tier, 1);
    // A day at 134/84 breaks the run.
    let mut e = h(Profile::CN);
    week(&mut e, DAY0, 4, 1, |d, _, _| {
        if d == 2 { (134, 84) } else { (140, 80) }
    });
    week(&mut e, DAY0 + 4, 1, 1, |_, _, _| (140, 80));
    assert!(
        !summary(&e.on_tick((DAY0 + 4) * DAY + 22 * 3600))
            .iter()
            .any(|s| s.contains("TREND"))
    );
}

#[test]
fn adherence_bp_steps_and_data_closes() {
    let mut e = with(PatientSettings {
        monitors_bp: true,
        enrolled_utc: Some(T0),
        ..PatientSettings::new("p1")
    });
    assert!(e.on_tick(T0 + 7 * DAY - 1).is_empty());
    assert_eq!(
        summary(&e.on_tick(T0 + 7 * DAY)),
        ["open ADH_BP_REMIND INFO active"]
    );
    assert!(e.on_tick(T0 + 8 * DAY).is_empty());
    let a = e.on_tick(T0 + 14 * DAY);
    assert_eq!(summary(&a), ["escalate ADH_BP_CARE_TEAM ADVISORY active"]);
    assert!(matches!(
        &a[0],
        AlertAction::Escalate {
            reason: Escalation::NextStep { .. },
            ..
        }
    ));
    assert_eq!(
        summary(&e.on_tick(T0 + 21 * DAY)),
        ["escalate ADH_BP_INACTIVE ADVISORY active"]
    );
    assert_eq!(
        summary(&e.bp(T0 + 22 * DAY, 120, 80, 70)),
        ["close ADH_BP_INACTIVE ADVISORY closed"]
    );
    assert!(e.on_tick(T0 + 22 * DAY + 60).is_empty());
}

#[test]
fn adherence_glucose_only_for_insulin_treated() {
    let mut e = h(Profile::CN);
    e.glu(T0, mg(120));
    assert!(e.on_tick(T0 + 10 * DAY).is_empty());
    let mut e = with(PatientSettings {
        insulin_treated: true,
        ..PatientSettings::new("p1")
    });
    e.glu(T0, mg(120));
    assert!(e.on_tick(T0 + 3 * DAY - 1).is_empty());
    assert_eq!(
        summary(&e.on_tick(T0 + 3 * DAY)),
        ["open ADH_GLU_REMIND INFO active"]
    );
    assert_eq!(
        summary(&e.on_tick(T0 + 7 * DAY)),
        ["escalate ADH_GLU_CARE_TEAM ADVISORY active"]
    );
}

// --------------------------------------------------------------------------------------------
// Overrides and guard-rails (CLINICAL.md §4.6)

fn ovr(rule: &str, param: &str) -> Override {
    Override {
        rule_id: rule.into(),
        param: Some(param.into()),
        set_by: "dr-x".into(),
        reason: "individualised target".into(),
        ..Default::default()
    }
}

fn settings_with(o: Override) -> PatientSettings {
    PatientSettings {
        overrides: vec![o],
        ..PatientSettings::new("p1")
    }
}

#[test]
fn relaxing_an_advisory_threshold_works() {
    // BP_LOW < 90 relaxed to < 85 for a patient who lives at 88/65.
    let mut o = ovr("BP_LOW", "sbp");
    o.mmhg = Some(Dec::new(85, 0));
    let mut e = with(settings_with(o));
    assert!(e.bp(T0, 88, 65, 70).is_empty());
    let a = e.bp(T0 + DAY, 84, 65, 70);
    assert_eq!(summary(&a), ["open BP_LOW ADVISORY pending"]);
    let al = a[0].alert();
    let th = al.threshold.as_ref().unwrap();
    assert!(th.overridden && th.value == Dec::new(85, 0));
    assert_eq!(al.source.cite, "patient override by dr-x");
    assert!(al.source.text.contains("guideline default < 90 mmHg [S22]"));
    // An ADVISORY glucose target: an older adult's bedtime ceiling (ADA 2016 complex: 100–180 → 200).
    let mut o = ovr("GLU_ABOVE_TARGET", "bedtime");
    o.mg_dl = Some(Dec::new(200, 0));
    let mut e = with(settings_with(o));
    assert!(e.glu(T0, meal(mg(180), 5)).is_empty());
    assert_eq!(
        opened(&e.glu(T0 + DAY, meal(mg(180), 2))).as_deref(),
        Some("GLU_ABOVE_TARGET")
    );
    // Its mmol/L value was derived at display resolution: 200 / 18.016 = 11.1.
    let s = e.e.patient("p1").unwrap();
    assert_eq!(s.overrides[0].mmol_l, Some(Dec::new(111, -1)));
}

#[test]
fn relaxing_a_critical_floor_needs_a_waiver() {
    let mut o = ovr("GLU_HYPO_L2", "value");
    o.mg_dl = Some(Dec::new(45, 0));
    let err = Engine::new(rules(), vec![settings_with(o.clone())]).unwrap_err();
    assert!(matches!(err, OverrideError::NeedsWaiver { .. }));
    assert_eq!(
        err.to_string(),
        "patient p1: override of GLU_HYPO_L2.value rejected: it relaxes a CRITICAL safety floor \
         (< 54 mg/dL | < 3.0 mmol/L -> < 45 mg/dL | < 2.5 mmol/L) and needs a waiver with a reason \
         (CLINICAL.md §4.6)"
    );
    // A blank waiver is no waiver.
    o.waiver = Some("  ".into());
    assert!(Engine::new(rules(), vec![settings_with(o.clone())]).is_err());
    // With a waiver: accepted, and 50 mg/dL is now Level 1, not Level 2.
    o.waiver = Some("hypoglycaemia unawareness reviewed; CGM alarm at 45".into());
    let mut e = with(settings_with(o));
    let a = e.glu(T0, mg(50));
    assert_eq!(summary(&a), ["open GLU_HYPO_L1 URGENT active"]);
    // 44 mg/dL a day later (the URGENT episode's 12 h window has passed): Level 2 under the waiver.
    assert_eq!(
        summary(&e.glu(T0 + DAY, mg(44))),
        [
            "close GLU_HYPO_L1 URGENT closed",
            "open GLU_HYPO_L2 CRITICAL active"
        ]
    );
    // Tightening a floor needs no waiver; disabling one does.
    let mut o = ovr("GLU_HYPO_L2", "value");
    o.mmol_l = Some(Dec::new(32, -1));
    assert!(Engine::new(rules(), vec![settings_with(o)]).is_ok());
    let off = Override {
        rule_id: "GLU_LO".into(),
        enabled: Some(false),
        set_by: "dr-x".into(),
        reason: "meter LO unreliable".into(),
        ..Default::default()
    };
    let err = Engine::new(rules(), vec![settings_with(off.clone())]).unwrap_err();
    assert!(err.to_string().contains(
        "override of GLU_LO rejected: it relaxes a CRITICAL safety floor (enabled -> disabled)"
    ));
    let waived = Override {
        waiver: Some("patient in hospice; family informed".into()),
        ..off
    };
    assert!(Engine::new(rules(), vec![settings_with(waived)]).is_ok());
    // BP_CRISIS is a declared safety floor although URGENT.
    let mut o = ovr("BP_CRISIS", "sbp");
    o.mmhg = Some(Dec::new(190, 0));
    assert!(matches!(
        Engine::new(rules(), vec![settings_with(o)]),
        Err(OverrideError::NeedsWaiver {
            severity: Severity::Urgent,
            ..
        })
    ));
}

#[test]
fn invalid_overrides_are_rejected_with_a_message() {
    let cases: Vec<(Override, &str)> = vec![
        (
            Override {
                mg_dl: Some(Dec::new(60, 0)),
                ..ovr("GLU_NOPE", "value")
            },
            "patient p1: override of GLU_NOPE rejected: no such rule",
        ),
        (
            Override {
                mg_dl: Some(Dec::new(60, 0)),
                ..ovr("GLU_HYPO_L1", "sbp")
            },
            "patient p1: override of GLU_HYPO_L1.sbp rejected: the rule has no threshold sbp",
        ),
        (
            Override {
                mmhg: Some(Dec::new(60, 0)),
                ..ovr("GLU_HYPO_L1", "value")
            },
            "patient p1: override of GLU_HYPO_L1.value rejected: give mg_dl and/or mmol_l",
        ),
        (
            Override {
                mg_dl: Some(Dec::new(54, 0)),
                mmol_l: Some(Dec::new(50, -1)),
                ..ovr("GLU_HYPO_L1", "value")
            },
            "patient p1: override of GLU_HYPO_L1.value rejected: 54 mg/dL and 5.0 mmol/L disagree (factor 18.016)",
        ),
        (
            Override {
                mg_dl: Some(Dec::new(5, 0)),
                ..ovr("GLU_HYPO_L1", "value")
            },
            "patient p1: override of GLU_HYPO_L1.value rejected: 5 mg/dL is outside the plausible range (CLINICAL.md §3)",
        ),
        (
            Override {
                mg_dl: Some(Dec::new(60, 0)),
                reason: " ".into(),
                ..ovr("GLU_HYPO_L1", "value")
            },
            "patient p1: override of GLU_HYPO_L1 rejected: set_by and reason are required",
        ),
    ];
    for (o, msg) in cases {
        let err = Engine::new(rules(), vec![settings_with(o)]).unwrap_err();
        assert_eq!(err.to_string(), msg);
    }
    // set_patient keeps the previous settings on error.
    let mut e = Engine::new(rules(), vec![PatientSettings::new("p1")]).unwrap();
    let mut bad = ovr("GLU_HYPO_L2", "value");
    bad.mg_dl = Some(Dec::new(40, 0));
    assert!(e.set_patient(settings_with(bad)).is_err());
    assert!(e.patient("p1").unwrap().overrides.is_empty());
}

#[test]
fn override_applies_from_its_effective_time() {
    let mut o = ovr("BP_LOW", "sbp");
    o.mmhg = Some(Dec::new(85, 0));
    o.effective_from_utc = Some(T0 + DAY);
    let mut e = with(settings_with(o));
    assert_eq!(opened(&e.bp(T0, 88, 65, 70)).as_deref(), Some("BP_LOW"));
    let mut e2 = with(settings_with(Override {
        effective_from_utc: Some(T0 + DAY),
        mmhg: Some(Dec::new(85, 0)),
        ..ovr("BP_LOW", "sbp")
    }));
    assert!(e2.bp(T0 + DAY, 88, 65, 70).is_empty());
}

// --------------------------------------------------------------------------------------------
// Persistence

/// A service persists the state mid-confirmation and resumes: same outcome as without the restart.
#[test]
fn state_survives_a_restart() {
    let mut e = h(Profile::CN);
    e.bp(T0, 185, 95, 70);
    e.glu(T0, mmol10(35));
    let json = serde_json::to_string(e.e.state()).unwrap();
    let state: EngineState = serde_json::from_str(&json).unwrap();
    assert_eq!(&state, e.e.state());
    let settings = e.e.patient("p1").cloned().unwrap();
    let mut resumed = H {
        e: Engine::with_state(rules(), vec![settings], state).unwrap(),
        n: 10,
    };
    assert_eq!(
        summary(&resumed.bp(T0 + 120, 182, 96, 70)),
        ["confirm BP_CRISIS URGENT active"]
    );
    assert_eq!(resumed.e.state().open_alerts("p1").len(), 2);
    // Actions serialize for the wire.
    let a = resumed.glu(T0 + 600, mmol10(28));
    let js = serde_json::to_string(&a[0]).unwrap();
    assert!(js.contains("\"action\":\"escalate\""), "{js}");
    assert!(js.contains("\"severity\":\"CRITICAL\""), "{js}");
}

impl H {
    fn on_tick(&mut self, t: i64) -> Vec<AlertAction> {
        self.e.on_tick(t)
    }

    fn on_symptoms(&mut self, p: &str, t: i64, s: Symptoms) -> Vec<AlertAction> {
        self.e.on_symptoms(p, t, s)
    }

    fn state(&self) -> &EngineState {
        self.e.state()
    }
}

/// The stores' `status` column holds [`AlertStatus::name`]; the alert's JSON (its `body`) holds the serde
/// name. The CRM reads both: they must be the same word for every status.
#[cfg(feature = "serde")]
#[test]
fn alert_status_name_is_its_json_name() {
    for s in [
        AlertStatus::Pending,
        AlertStatus::Active,
        AlertStatus::Downgraded,
        AlertStatus::Closed,
    ] {
        assert_eq!(
            serde_json::to_string(&s).unwrap(),
            format!("\"{}\"", s.name())
        );
    }
}
