//! The kiosk pages in headless Chromium (issue 12 items 3–5): what a patient and a nurse see and do,
//! against the real web server (`gateway::kiosk::web::serve`) over a scripted kiosk state.
//!
//! Skips (printing why) when Chromium or chromedriver is not installed; CI installs both, and
//! `fonts-wqy-microhei` for the zh-CN text. `PHG_SCREENSHOTS=docs/img` writes the result screen in both
//! languages (docs/img/kiosk-result-zh-CN.png, kiosk-result-en.png), the result after a "yes" and the
//! staff page.

use std::time::Duration;

use gateway::kiosk::{Advice, HeldReading, MeasurementKind, ResultView, SymptomQuestion};
use phg_tests::browser::{Browser, Call, KioskServer, staff_token};

const NURSE_TOKEN: &str = "nurse-desk-token-0123456789";

fn staff() -> Vec<gateway::kiosk::StaffToken> {
    vec![staff_token("nurse-desk", NURSE_TOKEN)]
}

fn glucose(reading_id: &str, value: &str, advice: Advice) -> ResultView {
    ResultView {
        reading_id: reading_id.into(),
        kind: MeasurementKind::Glucose,
        value: value.into(),
        unit: "mmol/L".into(),
        pulse_bpm: None,
        advice,
        question: None,
    }
}

fn crisis_bp(reading_id: &str) -> ResultView {
    ResultView {
        reading_id: reading_id.into(),
        kind: MeasurementKind::BloodPressure,
        value: "186/112".into(),
        unit: "mmHg".into(),
        pulse_bpm: Some(92),
        advice: Advice::MeasureAgain,
        question: Some(SymptomQuestion::CrisisSymptoms),
    }
}

async fn state(b: &Browser, expected: &str) {
    b.wait_for(
        &format!("screen {expected}"),
        &format!("return document.getElementById('screen').dataset.state === '{expected}';"),
        Duration::from_secs(5),
    )
    .await;
}

#[tokio::test]
async fn check_in_measuring_and_result_with_advice_in_both_languages() {
    let Some(b) = Browser::start().await else {
        return;
    };
    let server = KioskServer::start(staff()).await;
    let kiosk = &server.kiosk;
    b.open(&format!("{}/", server.url)).await;

    // zh-CN by default: "tap your card".
    state(&b, "idle").await;
    b.wait_text("#s-idle h1", "请刷卡").await;
    assert!(!b.is_shown("#done").await, "no check-out without a session");

    let session = kiosk.card_check_in("pt-00c0ffee7f3a");
    state(&b, "checked_in").await;
    b.wait_text("#s-checked_in h1", "已签到").await;
    // At most the last 4 characters of the pseudonymous id, never the whole id.
    b.wait_text("#who", "7f3a").await;
    assert!(
        !b.text("body").await.contains("c0ffee"),
        "more of the id than its last 4 characters"
    );

    kiosk.show_measuring(MeasurementKind::BloodPressure, Some(142.0));
    state(&b, "measuring").await;
    b.wait_text("#measuring-title", "正在测量血压").await;
    b.wait_text("#cuff", "142").await;

    kiosk.show_result(glucose("r-glu-1", "7.7", Advice::High));
    state(&b, "result").await;
    b.wait_text("#result-value", "7.7").await;
    b.wait_text("#result-unit", "mmol/L").await;
    b.wait_text("#advice-title", "偏高").await;
    // Large type: the result at least 32 px (CSS pixels), the advice too.
    for css in ["#result-value", "#advice-title"] {
        let px = b
            .client()
            .execute(
                &format!(
                    "return parseFloat(getComputedStyle(document.querySelector('{css}')).fontSize);"
                ),
                Vec::new(),
            )
            .await
            .expect("script runs");
        assert!(px.as_f64().is_some_and(|px| px >= 32.0), "{css} is {px} px");
    }
    // Spoken in the page's language (silently skipped when the browser has no voice for it).
    let speech = b
        .wait_for(
            "the speech text",
            "return document.getElementById('screen').dataset.speech;",
            Duration::from_secs(5),
        )
        .await;
    let speech = speech.as_str().unwrap_or_default();
    assert!(
        speech.contains("7.7") && speech.contains("毫摩尔每升") && speech.contains("偏高"),
        "{speech}"
    );
    let spoken = b.attr("#screen", "data-spoken").await;
    assert!(spoken == "spoken" || spoken == "no-voice", "{spoken:?}");

    // The language switch: the same result in English, every word from en.json.
    b.click("#lang-en").await;
    b.wait_text("#advice-title", "High").await;
    b.wait_text("#result-kind", "Your glucose").await;
    b.wait_text("#who", "number ending 7f3a").await;
    b.wait_for(
        "English speech",
        "return document.getElementById('screen').dataset.speech.includes('millimoles per litre');",
        Duration::from_secs(5),
    )
    .await;
    b.click("#lang-zh-CN").await;
    b.wait_text("#advice-title", "偏高").await;
    assert_eq!(server.kiosk.session().map(|s| s.session), Some(session));

    b.close().await;
    server.stop().await;
}

#[tokio::test]
async fn a_yes_to_the_symptom_question_reaches_the_kiosk_and_shows_see_a_nurse() {
    let Some(b) = Browser::start().await else {
        return;
    };
    let server = KioskServer::start(staff()).await;
    let kiosk = &server.kiosk;
    b.open(&format!("{}/", server.url)).await;
    let session = kiosk.card_check_in("pt-0000000042ab");
    kiosk.show_result(crisis_bp("r-bp-7"));
    state(&b, "result").await;
    b.wait_text("#result-value", "186/112").await;
    b.wait_text("#advice-title", "请再测一次").await;
    b.wait_text("#question-text", "胸痛").await;
    b.wait_text("#yes", "有").await;
    b.wait_text("#no", "没有").await;
    b.wait_text("#result-pulse", "92").await;
    let speech = b.attr("#screen", "data-speech").await;
    assert!(
        speech.contains("高压 186") && speech.contains("胸痛"),
        "{speech}"
    );

    b.screenshot_if_asked("kiosk-result-zh-CN.png").await;
    b.click("#lang-en").await;
    b.wait_text("#question-text", "chest pain").await;
    b.wait_text("#advice-title", "Measure again").await;
    b.screenshot_if_asked("kiosk-result-en.png").await;

    b.click("#yes").await;
    let call = kiosk
        .wait_call(Duration::from_secs(5), |c| matches!(c, Call::Answer { .. }))
        .await;
    assert_eq!(
        call,
        Call::Answer {
            session,
            reading_id: "r-bp-7".into(),
            yes: true
        }
    );
    // The engine's new decision: see a nurse now (and the question is gone).
    b.wait_text("#advice-title", "See a nurse now").await;
    assert_eq!(b.attr("#advice", "data-advice").await, "see_nurse");
    assert!(!b.is_shown("#question").await);
    b.screenshot_if_asked("kiosk-see-nurse-en.png").await;

    b.close().await;
    server.stop().await;
}

#[tokio::test]
async fn a_critical_result_shows_see_a_nurse() {
    let Some(b) = Browser::start().await else {
        return;
    };
    let server = KioskServer::start(staff()).await;
    let kiosk = &server.kiosk;
    b.open(&format!("{}/", server.url)).await;
    kiosk.card_check_in("pt-000000000lo1");
    kiosk.show_result(ResultView {
        question: Some(SymptomQuestion::LowGlucoseSymptoms),
        ..glucose("r-glu-lo", "2.6", Advice::SeeNurse)
    });
    state(&b, "result").await;
    b.wait_text("#advice-title", "请马上找护士").await;
    b.wait_text("#question-text", "发抖").await;
    assert_eq!(b.attr("#advice", "data-advice").await, "see_nurse");
    // A "no" is recorded too, and the advice stays.
    b.click("#no").await;
    kiosk
        .wait_call(Duration::from_secs(5), |c| {
            matches!(c, Call::Answer { yes: false, .. })
        })
        .await;
    b.wait_text("#answered", "已记录").await;
    b.wait_text("#advice-title", "请马上找护士").await;

    b.close().await;
    server.stop().await;
}

#[tokio::test]
async fn after_check_out_the_screen_clears_and_a_stale_page_cannot_end_the_next_session() {
    let Some(b) = Browser::start().await else {
        return;
    };
    let server = KioskServer::start(staff()).await;
    let kiosk = &server.kiosk;
    b.open(&format!("{}/", server.url)).await;
    kiosk.card_check_in("pt-00000000aaaa");
    kiosk.show_result(glucose("r-1", "5.4", Advice::Normal));
    b.wait_text("#advice-title", "正常").await;
    b.click("#lang-en").await;
    b.wait_text("#advice-title", "Normal").await;

    b.click("#done").await;
    kiosk
        .wait_call(Duration::from_secs(5), |c| {
            *c == Call::CheckOut { by: None }
        })
        .await;
    state(&b, "idle").await;
    // Nothing of the patient is left on the page, and the next patient starts in the default language.
    b.wait_text("#s-idle h1", "请刷卡").await;
    assert!(!b.is_shown("#who").await && !b.is_shown("#done").await);
    let body = b.text("body").await;
    assert!(!body.contains("aaaa") && !body.contains("5.4"), "{body}");

    // A page still showing an earlier session must not end the current one.
    let next = kiosk.card_check_in("pt-00000000bbbb");
    let stale = b
        .client()
        .execute_async(
            "const done = arguments[arguments.length - 1];\
             fetch('/api/done', {method: 'POST', headers: {'Content-Type': 'application/json'},\
                                 body: JSON.stringify({session: arguments[0]})}).then(r => done(r.status));",
            vec![serde_json::json!(next - 1)],
        )
        .await
        .expect("script runs");
    assert_eq!(stale, serde_json::json!(409));
    assert_eq!(kiosk.session().map(|s| s.session), Some(next));

    b.close().await;
    server.stop().await;
}

#[tokio::test]
async fn the_staff_page_needs_the_token_then_lists_and_assigns_held_readings() {
    let Some(b) = Browser::start().await else {
        return;
    };
    let server = KioskServer::start(staff()).await;
    let kiosk = &server.kiosk;
    for (id, value) in [("r-held-1", "138/88"), ("r-held-2", "141/90")] {
        kiosk.hold(HeldReading {
            reading_id: id.into(),
            device: "AA:BB:CC:00:11:22".into(),
            kind: MeasurementKind::BloodPressure,
            value: value.into(),
            unit: "mmHg".into(),
            measured_utc: Some("2026-12-05T07:58:00Z".into()),
            received_utc: "2026-12-05T07:58:02Z".into(),
            reason: "no_session".into(),
        });
    }
    b.open(&format!("{}/staff", server.url)).await;
    assert!(b.is_shown("#login").await && !b.is_shown("#console").await);
    assert!(
        !b.text("body").await.contains("138/88"),
        "held readings shown without a token"
    );

    // A wrong token is refused.
    b.type_into("#token", "not-the-token").await;
    b.click("#token-save").await;
    b.wait_text("#login-error", "令牌无效").await;
    assert!(!b.is_shown("#console").await);

    // The right one shows the held readings, the devices, the journal and the broker.
    b.type_into("#token", NURSE_TOKEN).await;
    b.click("#token-save").await;
    b.wait_text("#held-rows", "138/88").await;
    b.wait_text("#held-rows", "141/90").await;
    b.wait_text("#held-rows", "无人签到").await;
    b.wait_text("#device-rows", "AA:BB:CC:00:11:22").await;
    // The card reader board answers but its reader has failed: staff see it before patients queue.
    b.wait_text("#card-reader", "读卡器").await;
    b.wait_text("#card-reader", "读卡模块故障").await;
    // Failures in the page's language too, from the server's codes: the board's, and a device
    // session's stage (its cause is BlueZ's own words).
    b.wait_text("#card-reader", "读卡模块无响应").await;
    b.wait_text("#device-rows", "连接: org.bluez.Error.Failed")
        .await;
    b.wait_text("#device-rows", "12% · 电量低，请更换").await;
    assert!(
        !b.text("tr[data-device='AA:BB:CC:00:11:22']")
            .await
            .contains("电量低"),
        "80 % shown as low"
    );
    assert!(
        !b.text("#device-rows").await.contains("connect:")
            && !b.text("#card-reader").await.contains("not responding"),
        "English failure words on the zh-CN page"
    );
    b.wait_text("#journal-depth", "2").await;
    b.wait_text("#broker", "正常").await;
    b.screenshot_if_asked("kiosk-staff-zh-CN.png").await;

    // Assign one to a patient: it reaches the kiosk under the token's id, and leaves the list.
    let row = "#held-rows tr[data-reading-id='r-held-1']";
    b.type_into(&format!("{row} .assign-patient"), "pt-000000001234")
        .await;
    b.click(&format!("{row} .assign")).await;
    let call = kiosk
        .wait_call(Duration::from_secs(5), |c| matches!(c, Call::Assign { .. }))
        .await;
    assert_eq!(
        call,
        Call::Assign {
            reading_id: "r-held-1".into(),
            patient: "pt-000000001234".into(),
            by: "nurse-desk".into()
        }
    );
    b.wait_for(
        "the assigned row to go",
        "return document.querySelector(\"#held-rows tr[data-reading-id='r-held-1']\") === null;",
        Duration::from_secs(5),
    )
    .await;

    // A discard without a reason is refused (and says so); with one it goes through.
    let row = "#held-rows tr[data-reading-id='r-held-2']";
    b.click(&format!("{row} .discard")).await;
    b.wait_text("#message", "未完成").await;
    b.wait_text("#message", "必须填写原因").await;
    b.type_into(&format!("{row} .discard-reason"), "demonstration")
        .await;
    b.click(&format!("{row} .discard")).await;
    kiosk
        .wait_call(Duration::from_secs(5), |c| {
            matches!(c, Call::Discard { .. })
        })
        .await;
    b.wait_text("#no-held", "没有未归属的读数").await;

    // Staff check-in by patient id shows on the patient screen's session.
    b.type_into("#checkin-patient", "pt-00000000beef").await;
    b.click("#checkin").await;
    b.wait_text("#session-patient", "pt-00000000beef").await;
    assert!(kiosk.calls().contains(&Call::CheckIn {
        patient: "pt-00000000beef".into(),
        by: "nurse-desk".into()
    }));
    b.click("#checkout").await;
    kiosk
        .wait_call(Duration::from_secs(5), |c| {
            *c == Call::CheckOut {
                by: Some("nurse-desk".into()),
            }
        })
        .await;
    b.wait_text("#no-session", "无人签到").await;

    b.close().await;
    server.stop().await;
}

/// The pages served by the real gateway (`gateway demo`: its kiosk state, pipeline and edge engine, with
/// simulated clinic devices and patients): a card check-in's measurement shows as a result with advice,
/// the screen clears at check-out, a crisis-range reading asks about symptoms and the patient's "yes" on the
/// page turns it into "see a nurse"; the staff API refuses without the token; on the staff page, a reading
/// measured without a check-in is listed and assigned.
#[tokio::test]
async fn the_demo_gateways_pages_follow_its_clinic_day() {
    let Some(b) = Browser::start().await else {
        return;
    };
    let mut demo = Some(
        phg_tests::process::GatewayProcess::spawn(&["demo", "--for", "150", "--quiet"])
            .expect("gateway demo starts"),
    );
    let out = demo.as_ref().expect("running").stdout().clone();
    let page = out
        .wait_for("kiosk page: http://", 0, Duration::from_secs(60))
        .await
        .unwrap_or_else(|| panic!("no kiosk page line; stdout:\n{}", out.text()));
    let url = page
        .split("kiosk page: ")
        .nth(1)
        .expect("a URL")
        .trim()
        .to_owned();
    let staff_line = out
        .wait_for("staff page: ", 0, Duration::from_secs(5))
        .await
        .expect("a staff page line");
    let token = staff_line
        .split("(token: ")
        .nth(1)
        .and_then(|t| t.strip_suffix(')'))
        .expect("the demo token")
        .to_owned();

    b.open(&url).await;
    // The staff API refuses without the token or with a wrong one, and answers with it.
    for (auth, expected) in [
        ("", 401),
        ("Bearer wrong-token", 401),
        (&*format!("Bearer {token}"), 200),
    ] {
        let status = b
            .client()
            .execute_async(
                "const done = arguments[arguments.length - 1];\
                 const headers = arguments[0] ? {Authorization: arguments[0]} : {};\
                 fetch('/api/staff', {headers}).then(r => done(r.status));",
                vec![serde_json::json!(auth)],
            )
            .await
            .expect("script runs");
        assert_eq!(status, serde_json::json!(expected), "{auth:?}");
    }
    // 1. A card check-in and a blood pressure in range.
    b.wait_for(
        "the first patient's result",
        "return document.getElementById('screen').dataset.state === 'result' \
                && document.getElementById('result-unit').textContent === 'mmHg';",
        Duration::from_secs(40),
    )
    .await;
    b.wait_text("#who", "0042").await;
    let value = b.text("#result-value").await;
    assert!(value.contains('/'), "{value}");
    let advice = b.attr("#advice", "data-advice").await;
    assert!(!advice.is_empty(), "no advice shown");
    // 2. "done": the screen clears, nothing of that patient stays.
    b.wait_for(
        "the screen to clear after check-out",
        "return document.getElementById('screen').dataset.state === 'idle';",
        Duration::from_secs(20),
    )
    .await;
    assert!(!b.text("body").await.contains(&value));
    // 4. The crisis-range reading asks about symptoms; the patient answers on the page.
    b.wait_for(
        "the symptom question",
        "const q = document.getElementById('question'); return q.offsetParent !== null;",
        Duration::from_secs(60),
    )
    .await;
    b.wait_text("#question-text", "胸痛").await;
    b.click("#yes").await;
    b.wait_for(
        "see a nurse",
        "return document.getElementById('advice').dataset.advice === 'see_nurse';",
        Duration::from_secs(10),
    )
    .await;
    b.wait_text("#advice-title", "请马上找护士").await;

    // 3. On the staff page: the reading measured without a check-in, assigned by the desk.
    b.open(&format!("{}staff", url)).await;
    b.type_into("#token", &token).await;
    b.click("#token-save").await;
    let id = b
        .wait_for(
            "a held reading measured without a check-in",
            "for (const tr of document.querySelectorAll('#held-rows tr')) \
               if (tr.textContent.includes('138/')) return tr.dataset.readingId; \
             return '';",
            Duration::from_secs(10),
        )
        .await;
    let id = id.as_str().expect("a reading id").to_owned();
    let row = format!("#held-rows tr[data-reading-id='{id}']");
    b.type_into(&format!("{row} .assign-patient"), "p-clinic-0045")
        .await;
    b.click(&format!("{row} .assign")).await;
    b.wait_text("#message", "已完成").await;
    b.wait_for(
        "the assigned reading to leave the list",
        &format!(
            "return document.querySelector(\"#held-rows tr[data-reading-id='{id}']\") === null;"
        ),
        Duration::from_secs(10),
    )
    .await;

    b.close().await;
    if let Some(d) = demo.take() {
        d.terminate(Duration::from_secs(10))
            .await
            .expect("the demo stops");
    }
}
