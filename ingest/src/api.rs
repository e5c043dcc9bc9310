//! The HTTP API (axum), for the CRM and for staff tools:
//!
//! | method | path | answer |
//! |---|---|---|
//! | GET | `/health` | instance, backend and row counts |
//! | GET | `/patients/{id}/readings?limit=N` | the patient's readings, newest first (default 100, max 1000) |
//! | GET | `/patients/{id}/alerts?limit=N` | the patient's alerts (latest state per episode), newest first |
//! | POST | `/alerts/{id}/ack` | acknowledge (body `{"by": "nurse-7"}`): 200, 409 already acknowledged, 404 |
//! | GET | `/readings/{id}/fhir` | the reading as a FHIR R4 PHD Observation (404 if unknown) |
//! | PUT | `/patients/{id}/settings` | the patient's profile and overrides (`protocol::rules::PatientSettings` as JSON): 200, or 422 with the guard-rail's message |
//!
//! New settings apply at once on the instance that took them and on the others at their next refresh
//! (every `rules.window_interval_s`).
//!
//! Alert ids contain `/` (`{patient}/{rule}/{time}`): percent-encode them in the path (`%2F`).
//! Patient ids must be pseudonyms (400 otherwise).
//!
//! Every answer that is not a success is JSON, `{"error": "…"}` (unknown routes, wrong methods and
//! unreadable parameters or bodies included), so a client needs one error path.
//!
//! A rejected reading (an impossible value or time, see `eval_error`) is served by the FHIR route with
//! `status` `entered-in-error` (FHIR R4 Observation.status), never as `final`.
//!
//! Every route but `/health` needs `Authorization: Bearer <api.token>` (401 with `WWW-Authenticate:
//! Bearer` otherwise; the token is compared in constant time). `/health` says only that the instance
//! runs and how many rows it holds, nothing about a patient. Serve it over TLS (a reverse proxy) when it
//! leaves the host.

use std::sync::Arc;

use axum::extract::{Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::config::Secret;
use crate::evaluate::Evaluator;
use crate::store::{AckResult, AnyStore, Store, StoreError};

#[derive(Debug, Clone)]
struct AppState {
    store: AnyStore,
    ev: Arc<Evaluator>,
    instance: String,
}

/// The API's routes; all but `/health` require `token` as a bearer token.
pub fn router(store: AnyStore, ev: Arc<Evaluator>, instance: String, token: Secret) -> Router {
    let patient_data = Router::new()
        .route("/patients/{id}/readings", get(readings))
        .route("/patients/{id}/alerts", get(alerts))
        .route("/alerts/{id}/ack", post(ack))
        .route("/readings/{id}/fhir", get(fhir))
        .route("/patients/{id}/settings", axum::routing::put(put_settings))
        .route_layer(middleware::from_fn_with_state(
            Arc::new(token),
            require_bearer,
        ));
    Router::new()
        .route("/health", get(health))
        .merge(patient_data)
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such route") })
        .layer(middleware::map_response(json_errors))
        .with_state(AppState {
            store,
            ev,
            instance,
        })
}

/// Makes every error answer JSON: axum's own (a query or body it cannot read, a wrong method) are plain
/// text or empty; they become `{"error": "<their text or the status's reason>"}`.
async fn json_errors(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 16 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_owned()
    } else {
        text
    };
    let mut out = error(status, &message);
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            out.headers_mut().insert(name.clone(), value.clone());
        }
    }
    out
}

/// A JSON error about a request body without the body's values: a field that is unknown, missing or
/// repeated is named (a key is no patient data); any other problem by its line and column.
fn body_error(what: &str, e: &serde_json::Error) -> String {
    let message = e.to_string();
    for prefix in ["unknown field", "missing field", "duplicate field"] {
        if message.starts_with(prefix) {
            let named = message
                .split([',', '\n'])
                .next()
                .unwrap_or(prefix)
                .split(" at line ")
                .next()
                .unwrap_or(prefix);
            return format!("{what}: {named}");
        }
    }
    format!("{what}: line {}, column {}", e.line(), e.column())
}

/// Lets a request through only with `Authorization: Bearer <token>`.
async fn require_bearer(
    State(token): State<Arc<Secret>>,
    request: Request,
    next: Next,
) -> Response {
    use subtle::ConstantTimeEq as _;
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
        .unwrap_or_default();
    if bool::from(given.ct_eq(token.expose())) {
        next.run(request).await
    } else {
        // Nothing about why (missing or wrong): a prober learns nothing.
        (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            Json(json!({"error": "unauthorized"})),
        )
            .into_response()
    }
}

#[derive(Debug, Deserialize)]
struct Limit {
    limit: Option<i64>,
}

impl Limit {
    fn get(&self) -> i64 {
        self.limit.unwrap_or(100).clamp(1, 1000)
    }
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

fn internal(e: &StoreError) -> Response {
    tracing::error!(error = %e, "api: storage error");
    error(StatusCode::SERVICE_UNAVAILABLE, "storage unavailable")
}

async fn health(State(s): State<AppState>) -> Response {
    match s.store.counts().await {
        Ok(c) => Json(json!({
            "instance": s.instance,
            "backend": s.store.backend(),
            "counts": c,
        }))
        .into_response(),
        Err(e) => internal(&e),
    }
}

async fn readings(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<Limit>,
) -> Response {
    if !protocol::wire::is_valid_pseudonym(&id) {
        return error(StatusCode::BAD_REQUEST, "not a pseudonymous patient id");
    }
    match s.store.readings_of(&id, q.get()).await {
        Ok(rows) => Json(json!({ "patient": id, "readings": rows })).into_response(),
        Err(e) => internal(&e),
    }
}

async fn alerts(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<Limit>,
) -> Response {
    if !protocol::wire::is_valid_pseudonym(&id) {
        return error(StatusCode::BAD_REQUEST, "not a pseudonymous patient id");
    }
    match s.store.alerts_of(&id, q.get()).await {
        Ok(rows) => Json(json!({ "patient": id, "alerts": rows })).into_response(),
        Err(e) => internal(&e),
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct AckBody {
    by: Option<String>,
}

async fn ack(
    State(s): State<AppState>,
    Path(id): Path<String>,
    body: Option<Json<AckBody>>,
) -> Response {
    let by = body
        .and_then(|Json(b)| b.by)
        .filter(|b| !b.trim().is_empty())
        .unwrap_or_else(|| "api".to_owned());
    if by.len() > 128 {
        return error(StatusCode::BAD_REQUEST, "`by` is longer than 128 bytes");
    }
    match s
        .store
        .acknowledge(&id, &by, Arc::clone(&s.ev), crate::now_ms())
        .await
    {
        Ok(AckResult::Acknowledged) => {
            // The alert id starts with the patient id: at debug level only (STYLE: no patient ids at INFO).
            tracing::info!("alert acknowledged");
            tracing::debug!(alert = %id, by = %by, "alert acknowledged");
            Json(json!({ "alert": id, "status": "acknowledged", "by": by })).into_response()
        }
        Ok(AckResult::Already) => error(StatusCode::CONFLICT, "already acknowledged"),
        Ok(AckResult::NotFound) => error(StatusCode::NOT_FOUND, "no such alert"),
        Err(e) => internal(&e),
    }
}

async fn fhir(State(s): State<AppState>, Path(id): Path<String>) -> Response {
    match s.store.reading(&id).await {
        Ok(Some(row)) => match crate::fhir::observation_of(&row.reading, row.eval_error.as_deref())
        {
            Some(obs) => ([("content-type", "application/fhir+json")], Json(obs)).into_response(),
            None => error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "the stored reading cannot be rendered as FHIR",
            ),
        },
        Ok(None) => error(StatusCode::NOT_FOUND, "no such reading"),
        Err(e) => internal(&e),
    }
}

async fn put_settings(State(s): State<AppState>, Path(id): Path<String>, body: String) -> Response {
    if !protocol::wire::is_valid_pseudonym(&id) {
        return error(StatusCode::BAD_REQUEST, "not a pseudonymous patient id");
    }
    let settings: protocol::rules::PatientSettings = match serde_json::from_str(&body) {
        Ok(p) => p,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                &body_error("not patient settings", &e),
            );
        }
    };
    if settings.patient != id {
        return error(StatusCode::BAD_REQUEST, "`patient` differs from the path");
    }
    if let Err(e) = s.ev.set_patient(settings.clone()) {
        return error(StatusCode::UNPROCESSABLE_ENTITY, &e.to_string());
    }
    let json = match serde_json::to_string(&settings) {
        Ok(j) => j,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    };
    match s.store.put_patient(&id, &json, crate::now_ms()).await {
        Ok(()) => {
            tracing::info!("patient settings updated");
            tracing::debug!(patient = %id, "patient settings updated");
            Json(json!({ "patient": id, "status": "updated" })).into_response()
        }
        Err(e) => internal(&e),
    }
}
