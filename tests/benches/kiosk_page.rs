//! How long a patient waits for a result to appear: from the kiosk's screen change (the `watch` send the
//! kiosk state makes when a reading's decision is ready) to the result text in the page's DOM, through
//! the real web server, Server-Sent Events and headless Chromium. Goal (issue 12): p99 under 300 ms.
//!
//! `cargo bench -p phg-tests --bench kiosk_page [-- --quick]` prints `P99_MS kiosk_state_to_dom X`;
//! asserts nothing. Skips (printing why) when Chromium or chromedriver is not installed.
//!
//! The two ends are timed on the same clock: the send's wall-clock time in this process, and the
//! browser's `performance.timeOrigin + performance.now()` when a MutationObserver sees the new value
//! in `#result-value` (installed before the send; the observer runs before the next paint).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use gateway::kiosk::{Advice, MeasurementKind, ResultView};
use phg_tests::browser::{Browser, KioskServer};
use serde_json::json;

/// Installs an observer that resolves `window.__seen` with the time `#result-value` shows `arguments[0]`.
const ARM: &str = "const want = arguments[0];\
    window.__seen = new Promise((resolve) => {\
      const el = document.getElementById('result-value');\
      const check = () => {\
        if (el.textContent === want) { obs.disconnect(); resolve(performance.timeOrigin + performance.now()); }\
      };\
      const obs = new MutationObserver(check);\
      obs.observe(document.getElementById('screen'), {subtree: true, childList: true, characterData: true, attributes: true});\
      check();\
    });\
    return true;";

/// Waits for the armed observer and returns its time (ms since the epoch).
const WAIT: &str = "const done = arguments[arguments.length - 1]; window.__seen.then(done);";

#[tokio::main]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let samples = if quick { 30 } else { 200 };
    let Some(b) = Browser::start().await else {
        return;
    };
    let server = KioskServer::start(Vec::new()).await;
    b.open(&format!("{}/", server.url)).await;
    server.kiosk.card_check_in("pt-0000bench0001");

    let mut ms = Vec::with_capacity(samples);
    // An upper bound on one clock: the send until WebDriver has brought the observer's answer back.
    let mut round_trip_ms = Vec::with_capacity(samples);
    for i in 0..samples + 5 {
        // Distinct values, as consecutive readings would be.
        let value = format!("{}.{}", 4 + i % 10, i % 10);
        let value = if i % 2 == 0 {
            value
        } else {
            format!("{value}0")
        };
        b.client()
            .execute(ARM, vec![json!(value)])
            .await
            .expect("observer installed");
        let sent = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("after 1970")
            .as_secs_f64()
            * 1000.0;
        let t0 = std::time::Instant::now();
        server.kiosk.show_result(ResultView {
            reading_id: format!("r-bench-{i}"),
            kind: MeasurementKind::Glucose,
            value: value.clone(),
            unit: "mmol/L".into(),
            pulse_bpm: None,
            advice: Advice::Normal,
            question: None,
        });
        let seen = tokio::time::timeout(
            Duration::from_secs(10),
            b.client().execute_async(WAIT, Vec::new()),
        )
        .await
        .expect("the value in the DOM within 10 s")
        .expect("script runs")
        .as_f64()
        .expect("a time");
        // The first few warm up the page's code paths (not counted).
        if i >= 5 {
            ms.push((seen - sent).max(0.0));
            round_trip_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
        }
    }
    ms.sort_by(f64::total_cmp);
    round_trip_ms.sort_by(f64::total_cmp);
    let pct_of =
        |v: &[f64], p: f64| v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1];
    let pct = |p: f64| pct_of(&ms, p);
    println!(
        "kiosk state -> DOM over {} results: p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms (goal p99 < 300 ms)",
        ms.len(),
        pct(0.50),
        pct(0.90),
        pct(0.99),
        ms[ms.len() - 1]
    );
    println!(
        "upper bound (send until WebDriver returned the observer's answer): p50 {:.1} ms, p99 {:.1} ms",
        pct_of(&round_trip_ms, 0.50),
        pct_of(&round_trip_ms, 0.99)
    );
    println!("P99_MS kiosk_state_to_dom {:.1}", pct(0.99));
    b.close().await;
    server.stop().await;
}
