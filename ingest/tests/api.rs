//! The HTTP API over real HTTP (axum on a loopback port, reqwest as the client), on SQLite.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use ingest::evaluate::{Evaluator, Sink};
use ingest::store::{AnyStore, Channel, Inbound, Store};
use ingest::testing::{bp_message, glucose_message, reading_uuid};
use protocol::rules::RuleSet;
use serde_json::Value;

const T0: i64 = 1_795_420_800;

fn reading(payload: String) -> Inbound {
    Inbound {
        topic: "phg/v1/gw-test/readings".into(),
        channel: Channel::Readings,
        payload: payload.into_bytes(),
        max_len: None,
    }
}

/// A patient's readings and alerts, acknowledging an alert (once; then 409; unknown 404), a name
/// instead of a pseudonym refused (400), the health counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patient_readings_alerts_and_acknowledgement_over_http() {
    let dir = tempfile::tempdir().unwrap();
    let store = AnyStore::open(&format!(
        "sqlite://{}",
        dir.path().join("db.sqlite").display()
    ))
    .await
    .unwrap();
    let ev = Arc::new(Evaluator::new(
        RuleSet::default_rules().unwrap(),
        vec![Sink::Mqtt],
    ));
    store
        .ingest(
            vec![
                reading(glucose_message("r-1", "p-0001", 110, T0)),
                reading(glucose_message("r-2", "p-0001", 45, T0 + 300)),
                reading(bp_message("r-3", "p-0002", 120, 75, 70, T0)),
                // Impossible (systolic 900): stored as rejected, never evaluated.
                reading(bp_message("r-4", "p-0002", 900, 10, 70, T0 + 60)),
            ],
            Arc::clone(&ev),
            "a",
            1,
        )
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    const TOKEN: &str = "test-api-token-0123456789";
    let app = ingest::api::router(store, ev, "a".into(), ingest::config::Secret::new(TOKEN));
    tokio::spawn(async move { axum::serve(listener, app).await });

    // Without the bearer token (or with another) nothing about a patient is served; /health is.
    let anonymous = reqwest::Client::new();
    for (auth, what) in [
        (None, "no token"),
        (Some("Bearer not-the-token-at-all"), "a wrong token"),
        (Some(TOKEN), "the token without `Bearer `"),
    ] {
        for path in [
            "/patients/p-0001/readings",
            "/readings/r-3/fhir",
            "/patients/p-0001/alerts",
        ] {
            let mut r = anonymous.get(format!("{base}{path}"));
            if let Some(a) = auth {
                r = r.header("authorization", a);
            }
            let r = r.send().await.unwrap();
            assert_eq!(r.status().as_u16(), 401, "{what}: {path}");
            assert_eq!(r.headers()["www-authenticate"], "Bearer");
            assert!(!r.text().await.unwrap().contains("p-0001"));
        }
    }
    let r = anonymous
        .put(format!("{base}/patients/p-0003/settings"))
        .header("content-type", "application/json")
        .body(r#"{"patient": "p-0003", "profile": "US"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status().as_u16(),
        401,
        "settings cannot be changed anonymously"
    );
    let r = anonymous
        .get(format!("{base}/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);

    let mut auth = reqwest::header::HeaderMap::new();
    auth.insert(
        reqwest::header::AUTHORIZATION,
        reqwest::header::HeaderValue::from_str(&format!("Bearer {TOKEN}")).unwrap(),
    );
    let http = reqwest::Client::builder()
        .default_headers(auth)
        .build()
        .unwrap();
    let get = |path: String| {
        let http = http.clone();
        let url = format!("{base}{path}");
        async move {
            let r = http.get(url).send().await.unwrap();
            let status = r.status().as_u16();
            let text = r.text().await.unwrap();
            (
                status,
                serde_json::from_str::<Value>(&text).unwrap_or(Value::Null),
            )
        }
    };

    let (status, body) = get("/patients/p-0001/readings".into()).await;
    assert_eq!(status, 200);
    let ids: Vec<&str> = body["readings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        [reading_uuid("r-2"), reading_uuid("r-1")],
        "newest first, only this patient's"
    );
    let (_, body) = get("/patients/p-0001/readings?limit=1".into()).await;
    assert_eq!(body["readings"].as_array().unwrap().len(), 1);

    let (status, body) = get("/patients/p-0001/alerts".into()).await;
    assert_eq!(status, 200);
    let alerts = body["alerts"].as_array().unwrap();
    assert_eq!(alerts.len(), 1, "{body}");
    assert_eq!(alerts[0]["rule_id"], "GLU_HYPO_L2");
    assert_eq!(alerts[0]["alert"]["threshold"]["unit"], "mg/dL");
    let id = alerts[0]["id"].as_str().unwrap().to_owned();
    let (_, body) = get("/patients/p-0002/alerts".into()).await;
    assert!(body["alerts"].as_array().unwrap().is_empty(), "{body}");

    // Alert ids contain '/': percent-encoded in the path.
    let ack_url = format!("{base}/alerts/{}/ack", id.replace('/', "%2F"));
    let r = http
        .post(&ack_url)
        .header("content-type", "application/json")
        .body(r#"{"by": "nurse-7"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let r = http.post(&ack_url).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 409, "already acknowledged");
    let r = http
        .post(format!("{base}/alerts/p-0001%2FNOPE%2F1/ack"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    let (_, body) = get("/patients/p-0001/alerts".into()).await;
    assert_eq!(body["alerts"][0]["acknowledged_by"], "nurse-7");

    let (status, body) = get(format!("/readings/{}/fhir", reading_uuid("r-3"))).await;
    assert_eq!(status, 200);
    assert_eq!(body["resourceType"], "Observation");
    assert_eq!(body["component"][0]["valueQuantity"]["value"], 120.0);
    let (status, _) = get("/readings/nope/fhir".into()).await;
    assert_eq!(status, 404);
    // A rejected reading is no result: never a `final` Observation (FHIR R4 Observation.status).
    let (status, body) = get(format!("/readings/{}/fhir", reading_uuid("r-4"))).await;
    assert_eq!(status, 200);
    assert_eq!(body["status"], "entered-in-error", "{body}");
    let (_, body) = get("/patients/p-0002/alerts".into()).await;
    assert!(
        body["alerts"].as_array().unwrap().is_empty(),
        "no alert on a rejected reading: {body}"
    );

    // Settings from the CRM: a valid profile change is taken; relaxing a critical safety floor
    // without a waiver is refused with the guard-rail's message.
    let put = |body: &'static str| {
        let http = http.clone();
        let url = format!("{base}/patients/p-0003/settings");
        async move {
            let r = http
                .put(url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    let (status, text) = put(r#"{"patient": "p-0003", "profile": "US"}"#).await;
    assert_eq!(status, 200, "{text}");
    let (status, text) = put(
        r#"{"patient": "p-0003", "overrides": [{"rule_id": "GLU_HYPO_L2", "mg_dl": "40",
            "set_by": "dr-1", "reason": "test"}]}"#,
    )
    .await;
    assert_eq!(status, 422, "{text}");
    assert!(text.contains("GLU_HYPO_L2"), "{text}");
    let (status, _) = put(r#"{"patient": "p-9999"}"#).await;
    assert_eq!(status, 400, "path and body disagree");
    // An unknown settings field is named (not a column number).
    let (status, text) = put(r#"{"patient": "p-0003", "profil": "US"}"#).await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("unknown field `profil`"), "{text}");

    // Every error is JSON, axum's own rejections and unknown routes included.
    for path in [
        "/patients/p-0001/readings?limit=abc",
        "/no/such/route",
        "/readings/nope/fhir",
    ] {
        let (status, body) = get(path.into()).await;
        assert!(status >= 400, "{path}: {status}");
        assert!(body["error"].is_string(), "{path}: {status} {body}");
    }
    let r = http.delete(format!("{base}/health")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 405);
    let body: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert!(body["error"].is_string(), "{body}");

    let (status, _) = get("/patients/Jane%20Doe/readings".into()).await;
    assert_eq!(status, 400, "only pseudonymous ids");
    let (status, body) = get("/health".into()).await;
    assert_eq!(status, 200);
    assert_eq!(body["backend"], "sqlite");
    assert_eq!(body["counts"]["readings"], 4);
}
