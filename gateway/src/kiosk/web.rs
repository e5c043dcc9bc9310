//! The kiosk's web server: the patient page and the staff page (issue 12 items 3 and 4).
//!
//! One axum server, on `[kiosk] listen` (loopback by default; a kiosk browser in full-screen mode opens
//! it). Everything it serves is embedded in the binary (`web/`: HTML, CSS, JS, translations), so a kiosk
//! works with the clinic's internet down.
//!
//! | method | path | who | answer |
//! |---|---|---|---|
//! | GET | `/` | patient | the patient page |
//! | GET | `/staff` | staff | the staff page (its data needs the token) |
//! | GET | `/assets/{file}` | both | CSS and JS |
//! | GET | `/i18n` | both | the languages: `[{"code": "zh-CN", "name": "中文"}, …]`, the default first |
//! | GET | `/i18n/{code}` | both | one language's texts (JSON) |
//! | GET | `/events` | patient | Server-Sent Events: `screen` events carrying [`PatientScreen`] as JSON, the current one first |
//! | POST | `/api/answer` | patient | `{"session", "reading_id", "yes"}` → 204 |
//! | POST | `/api/done` | patient | `{"session"}` → 204 (check-out) |
//! | GET | `/api/staff` | staff | [`StaffView`](super::StaffView) |
//! | POST | `/api/checkin` | staff | `{"patient"}` → [`SessionView`](super::SessionView) |
//! | POST | `/api/checkout` | staff | 204 |
//! | POST | `/api/assign` | staff | `{"reading_id", "patient"}` → 204 |
//! | POST | `/api/discard` | staff | `{"reading_id", "reason"}` → 204 |
//!
//! Security, and why:
//! - Staff routes need `Authorization: Bearer <token>`, compared in constant time with every configured
//!   token (the match's id is the [`StaffId`] in audit events). A header, never a cookie: a browser does not
//!   attach it to a cross-site request, so another page cannot act as staff. No token configured: every
//!   staff route refuses.
//! - The patient routes carry the session number: an answer or a "done" from a page that still shows an
//!   earlier patient's screen is refused (409) and cannot touch the current patient's session. Request
//!   bodies must be `application/json`, which a cross-site form cannot send without a CORS preflight that
//!   this server never grants.
//! - Requests must name the server by an IP address or `localhost` (`Host`): a DNS-rebinding page under
//!   another name cannot read the patient screen.
//! - `Content-Security-Policy` allows nothing from elsewhere (no inline script either); `/api` and `/events`
//!   are `no-store`. No patient id is ever in a URL: ids travel in JSON bodies only.
//! - Every error is JSON, `{"error": "…"}`; it never quotes a patient id.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::Deserialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::{KioskControl, KioskError, PatientScreen, StaffId, StaffToken};

/// Serves the kiosk pages on `listener` until `shutdown`.
///
/// # Errors
///
/// An I/O error of the listener.
pub async fn serve<K: KioskControl>(
    listener: tokio::net::TcpListener,
    kiosk: Arc<K>,
    staff: Vec<StaffToken>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = router(kiosk, staff, shutdown.clone());
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

/// A language the pages offer: its code and its texts (JSON, embedded). The first is the default.
///
/// To add a language: put `web/i18n/<code>.json` beside the others (same keys; `_name` is how the
/// language names itself on the switch) and add one line here.
const LANGUAGES: &[(&str, &str)] = &[
    ("zh-CN", include_str!("web/i18n/zh-CN.json")),
    ("en", include_str!("web/i18n/en.json")),
];

/// The embedded files, by the path they are served at, with their content type.
const ASSETS: &[(&str, &str, &str)] = &[
    (
        "kiosk.css",
        "text/css; charset=utf-8",
        include_str!("web/kiosk.css"),
    ),
    (
        "i18n.js",
        "text/javascript; charset=utf-8",
        include_str!("web/i18n.js"),
    ),
    (
        "patient.js",
        "text/javascript; charset=utf-8",
        include_str!("web/patient.js"),
    ),
    (
        "staff.js",
        "text/javascript; charset=utf-8",
        include_str!("web/staff.js"),
    ),
];

const PATIENT_PAGE: &str = include_str!("web/patient.html");
const STAFF_PAGE: &str = include_str!("web/staff.html");

/// Nothing from elsewhere, nothing inline: the pages run only the scripts and styles served here.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                   img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// How often an idle event stream sends a comment, so a proxy or the browser does not drop it and a
/// page notices a dead server (its `EventSource` reconnects).
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// The largest request body accepted: the API's bodies are a few short strings.
const MAX_BODY: usize = 4 * 1024;

struct AppState<K> {
    kiosk: Arc<K>,
    shutdown: CancellationToken,
}

impl<K> Clone for AppState<K> {
    fn clone(&self) -> Self {
        Self {
            kiosk: Arc::clone(&self.kiosk),
            shutdown: self.shutdown.clone(),
        }
    }
}

/// The routes (see the module doc). Event streams end when `shutdown` fires, so a graceful shutdown does
/// not wait for the kiosk browser to go away.
fn router<K: KioskControl>(
    kiosk: Arc<K>,
    staff: Vec<StaffToken>,
    shutdown: CancellationToken,
) -> Router {
    let staff_api = Router::new()
        .route("/api/staff", get(staff_view::<K>))
        .route("/api/checkin", post(check_in::<K>))
        .route("/api/checkout", post(check_out::<K>))
        .route("/api/assign", post(assign::<K>))
        .route("/api/discard", post(discard::<K>))
        .route_layer(middleware::from_fn_with_state(
            Arc::new(staff),
            require_staff,
        ));
    Router::new()
        .route("/", get(|| async { page(PATIENT_PAGE) }))
        .route("/staff", get(|| async { page(STAFF_PAGE) }))
        .route("/assets/{file}", get(asset))
        .route("/i18n", get(languages))
        .route("/i18n/{code}", get(language))
        .route("/events", get(events::<K>))
        .route("/api/answer", post(answer::<K>))
        .route("/api/done", post(done::<K>))
        .merge(staff_api)
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such route") })
        .layer(middleware::map_response(json_errors))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn(local_host_only))
        .layer(middleware::from_fn(security_headers))
        .with_state(AppState { kiosk, shutdown })
}

fn page(html: &'static str) -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], html).into_response()
}

async fn asset(Path(file): Path<String>) -> Response {
    match ASSETS.iter().find(|(name, _, _)| *name == file) {
        Some((_, content_type, body)) => {
            ([(header::CONTENT_TYPE, *content_type)], *body).into_response()
        }
        None => error(StatusCode::NOT_FOUND, "no such asset"),
    }
}

async fn languages() -> Response {
    let list: Vec<_> = LANGUAGES
        .iter()
        .map(|(code, text)| {
            // The files are ours and checked by a test; a broken one still gets listed under its code.
            let name = serde_json::from_str::<serde_json::Value>(text)
                .ok()
                .and_then(|v| v.get("_name").and_then(|n| n.as_str()).map(str::to_owned))
                .unwrap_or_else(|| (*code).to_owned());
            json!({"code": code, "name": name})
        })
        .collect();
    Json(list).into_response()
}

async fn language(Path(code): Path<String>) -> Response {
    match LANGUAGES.iter().find(|(c, _)| *c == code) {
        Some((_, text)) => (
            [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
            *text,
        )
            .into_response(),
        None => error(StatusCode::NOT_FOUND, "no such language"),
    }
}

/// The patient screen as Server-Sent Events: the current screen at once, then every change. A page that
/// reconnects (its `EventSource` does so by itself) gets the current screen first, so it never keeps
/// showing a screen that has been replaced.
async fn events<K: KioskControl>(State(app): State<AppState<K>>) -> Response {
    let rx = app.kiosk.screen();
    let stream = futures_util::stream::unfold((rx, true), |(mut rx, first)| async move {
        if !first && rx.changed().await.is_err() {
            // The kiosk is gone (the gateway is stopping): end the stream.
            return None;
        }
        let screen: PatientScreen = rx.borrow_and_update().clone();
        Some((screen_event(&screen), (rx, false)))
    });
    let stream = futures_util::StreamExt::take_until(stream, app.shutdown.cancelled_owned());
    let mut response = Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response();
    // Behind a buffering reverse proxy (nginx), events would otherwise wait for a full buffer.
    response
        .headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

fn screen_event(screen: &PatientScreen) -> Result<Event, Infallible> {
    // PatientScreen is plain data (strings, numbers, enums): serializing it cannot fail; if it ever did,
    // an empty object makes the page show nothing rather than something stale.
    let data = serde_json::to_string(screen).unwrap_or_else(|_| "{}".to_owned());
    Ok(Event::default().event("screen").data(data))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Answer {
    session: u64,
    reading_id: String,
    yes: bool,
}

async fn answer<K: KioskControl>(
    State(app): State<AppState<K>>,
    body: Result<Json<Answer>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(a) = match body {
        Ok(b) => b,
        Err(e) => return rejection(&e),
    };
    match app
        .kiosk
        .answer_symptoms(a.session, &a.reading_id, a.yes)
        .await
    {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => kiosk_error(&e),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Done {
    session: u64,
}

/// Check-out from the patient page. Only the session the page shows may be ended: the screen is checked
/// first, so a page left over from an earlier patient cannot end the current one's session. (A check-in
/// between this check and the check-out is a window of microseconds, against a person tapping a card.)
async fn done<K: KioskControl>(
    State(app): State<AppState<K>>,
    body: Result<Json<Done>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(d) = match body {
        Ok(b) => b,
        Err(e) => return rejection(&e),
    };
    let current = screen_session(&app.kiosk.screen().borrow());
    if current != Some(d.session) {
        return kiosk_error(&KioskError::StaleSession);
    }
    match app.kiosk.check_out(None).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => kiosk_error(&e),
    }
}

/// The session a patient screen belongs to, if any.
fn screen_session(screen: &PatientScreen) -> Option<u64> {
    match screen {
        PatientScreen::Idle | PatientScreen::CardUnknown => None,
        PatientScreen::CheckedIn { session, .. }
        | PatientScreen::Measuring { session, .. }
        | PatientScreen::Result { session, .. } => Some(*session),
    }
}

/// Lets a staff request through only with `Authorization: Bearer <token>` of a configured token, and
/// hands the handler that token's [`StaffId`].
async fn require_staff(
    State(tokens): State<Arc<Vec<StaffToken>>>,
    mut request: Request,
    next: Next,
) -> Response {
    use subtle::ConstantTimeEq as _;
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
        .unwrap_or_default();
    // Every token is compared (no early exit), so the time taken does not say which one nearly matched.
    let mut found: Option<StaffId> = None;
    for t in tokens.iter() {
        let matches = bool::from(given.ct_eq(t.token.as_bytes())) && !given.is_empty();
        if matches && found.is_none() {
            found = Some(t.id.clone());
        }
    }
    match found {
        Some(id) => {
            request.extensions_mut().insert(id);
            next.run(request).await
        }
        // Nothing about why (missing, wrong, none configured): a prober learns nothing.
        None => (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            Json(json!({"error": "unauthorized"})),
        )
            .into_response(),
    }
}

async fn staff_view<K: KioskControl>(State(app): State<AppState<K>>) -> Response {
    Json(app.kiosk.staff_view()).into_response()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckIn {
    patient: String,
}

async fn check_in<K: KioskControl>(
    State(app): State<AppState<K>>,
    Extension(by): Extension<StaffId>,
    body: Result<Json<CheckIn>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(c) = match body {
        Ok(b) => b,
        Err(e) => return rejection(&e),
    };
    match app.kiosk.check_in(&c.patient, &by).await {
        Ok(session) => Json(session).into_response(),
        Err(e) => kiosk_error(&e),
    }
}

async fn check_out<K: KioskControl>(
    State(app): State<AppState<K>>,
    Extension(by): Extension<StaffId>,
) -> Response {
    match app.kiosk.check_out(Some(&by)).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => kiosk_error(&e),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Assign {
    reading_id: String,
    patient: String,
}

async fn assign<K: KioskControl>(
    State(app): State<AppState<K>>,
    Extension(by): Extension<StaffId>,
    body: Result<Json<Assign>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(a) = match body {
        Ok(b) => b,
        Err(e) => return rejection(&e),
    };
    match app.kiosk.assign(&a.reading_id, &a.patient, &by).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => kiosk_error(&e),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Discard {
    reading_id: String,
    reason: String,
}

async fn discard<K: KioskControl>(
    State(app): State<AppState<K>>,
    Extension(by): Extension<StaffId>,
    body: Result<Json<Discard>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(d) = match body {
        Ok(b) => b,
        Err(e) => return rejection(&e),
    };
    match app.kiosk.discard(&d.reading_id, &d.reason, &by).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => kiosk_error(&e),
    }
}

/// A refused kiosk action as JSON: `{"error": <the server's words>, "code": <a stable name>}`; the staff
/// page says it in its own language (`staff_error_<code>`).
fn kiosk_error(e: &KioskError) -> Response {
    let (status, code) = error_code(e);
    // KioskError's texts name rules, never values (see its docs), so they can be shown.
    (status, Json(json!({"error": e.to_string(), "code": code}))).into_response()
}

/// The HTTP status and the stable code of a refused kiosk action.
fn error_code(e: &KioskError) -> (StatusCode, &'static str) {
    match e {
        KioskError::InvalidPatient(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_patient"),
        KioskError::NoSuchReading => (StatusCode::NOT_FOUND, "no_such_reading"),
        KioskError::StaleSession => (StatusCode::CONFLICT, "stale_session"),
        KioskError::InvalidReason(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_reason"),
        KioskError::Storage(_) => (StatusCode::SERVICE_UNAVAILABLE, "storage"),
    }
}

/// A body that could not be read, without quoting it (it may hold a patient id).
fn rejection(e: &axum::extract::rejection::JsonRejection) -> Response {
    use axum::extract::rejection::JsonRejection as R;
    let (status, message) = match e {
        R::MissingJsonContentType(_) => (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "expected Content-Type: application/json".to_owned(),
        ),
        R::JsonDataError(d) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            field_problem(&d.body_text()),
        ),
        R::JsonSyntaxError(_) => (StatusCode::BAD_REQUEST, "not JSON".to_owned()),
        _ => (e.status(), "unreadable body".to_owned()),
    };
    error(status, &message)
}

/// serde's message for a body of the wrong shape, cut to the field it names (a key is no patient data;
/// a value could be).
fn field_problem(text: &str) -> String {
    for prefix in ["unknown field", "missing field", "invalid type"] {
        if let Some(at) = text.find(prefix) {
            let named: String = text[at..]
                .split([',', ':'])
                .next()
                .unwrap_or(prefix)
                .to_owned();
            return format!("body: {named}");
        }
    }
    "body: wrong shape".to_owned()
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({"error": message}))).into_response()
}

/// Makes every error answer JSON: axum's own (a wrong method, a body over the limit) are plain text.
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
    let (parts, _) = response.into_parts();
    let mut out = error(status, status.canonical_reason().unwrap_or("error"));
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            out.headers_mut().insert(name.clone(), value.clone());
        }
    }
    out
}

/// Refuses a request that names this server by anything but an IP address or `localhost`: a page on
/// another site whose name was re-pointed at this address (DNS rebinding) would otherwise be
/// same-origin with the patient page.
async fn local_host_only(request: Request, next: Next) -> Response {
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if is_address_host(host) {
        next.run(request).await
    } else {
        error(StatusCode::MISDIRECTED_REQUEST, "use the kiosk's address")
    }
}

/// `true` for `127.0.0.1:8088`, `[::1]:8088`, `localhost`, `192.168.1.20` — a host that is an address,
/// not a name that someone else's DNS decides.
fn is_address_host(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port
        match rest.split_once(']') {
            Some((v6, _)) => return v6.parse::<std::net::Ipv6Addr>().is_ok(),
            None => return false,
        }
    } else {
        host.rsplit_once(':').map_or(host, |(name, _port)| name)
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::Ipv4Addr>().is_ok()
}

/// Security headers on every answer; `no-store` for the API and the event stream (patient data must not
/// stay in a cache), `no-cache` for the pages (revalidated, so an upgraded gateway serves its new page).
async fn security_headers(request: Request, next: Next) -> Response {
    let path = request.uri().path();
    let dynamic = path.starts_with("/api/") || path == "/events";
    let mut response = next.run(request).await;
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(if dynamic { "no-store" } else { "no-cache" }),
    );
    response
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use axum::body::Body;
    use axum::http::{Method, Request};
    use http_body_util::BodyExt as _;
    use tower::ServiceExt as _;

    use super::super::{
        Advice, CardReaderFailure, CheckInBy, MeasurementKind, ResultView, SessionView, StaffView,
        SymptomQuestion,
    };
    use super::*;

    /// A kiosk whose screen the test sets and which records what the server asked of it.
    struct Scripted {
        screen: tokio::sync::watch::Sender<PatientScreen>,
        calls: Mutex<Vec<String>>,
    }

    impl Scripted {
        fn new() -> Arc<Self> {
            Arc::new(Self {
                screen: tokio::sync::watch::channel(PatientScreen::Idle).0,
                calls: Mutex::new(Vec::new()),
            })
        }
        fn record(&self, call: String) {
            self.calls.lock().expect("not poisoned").push(call);
        }
        fn calls(&self) -> Vec<String> {
            self.calls.lock().expect("not poisoned").clone()
        }
        fn current_session(&self) -> Option<u64> {
            screen_session(&self.screen.borrow())
        }
    }

    impl KioskControl for Scripted {
        fn screen(&self) -> tokio::sync::watch::Receiver<PatientScreen> {
            self.screen.subscribe()
        }
        fn staff_view(&self) -> StaffView {
            StaffView {
                session: None,
                held: Vec::new(),
                devices: Vec::new(),
                card_reader: None,
                journal_depth: 3,
                broker_connected: true,
            }
        }
        async fn check_in(&self, patient: &str, by: &StaffId) -> Result<SessionView, KioskError> {
            self.record(format!("check_in {patient} by {}", by.0));
            if !protocol::wire::is_valid_pseudonym(patient) {
                return Err(KioskError::InvalidPatient("shape".into()));
            }
            Ok(SessionView {
                session: 8,
                patient: patient.to_owned(),
                by: CheckInBy::Staff,
                started_utc: "2026-12-05T08:00:00Z".into(),
                expires_utc: "2026-12-05T08:03:00Z".into(),
            })
        }
        async fn check_out(&self, by: Option<&StaffId>) -> Result<(), KioskError> {
            self.record(format!("check_out by {:?}", by.map(|b| b.0.clone())));
            Ok(())
        }
        async fn assign(
            &self,
            reading_id: &str,
            patient: &str,
            by: &StaffId,
        ) -> Result<(), KioskError> {
            self.record(format!("assign {reading_id} to {patient} by {}", by.0));
            Ok(())
        }
        async fn discard(
            &self,
            reading_id: &str,
            reason: &str,
            by: &StaffId,
        ) -> Result<(), KioskError> {
            self.record(format!("discard {reading_id} ({reason}) by {}", by.0));
            Ok(())
        }
        async fn answer_symptoms(
            &self,
            session: u64,
            reading_id: &str,
            yes: bool,
        ) -> Result<(), KioskError> {
            if self.current_session() != Some(session) {
                return Err(KioskError::StaleSession);
            }
            self.record(format!("answer {session} {reading_id} {yes}"));
            Ok(())
        }
    }

    fn tokens() -> Vec<StaffToken> {
        vec![
            StaffToken {
                id: StaffId("nurse-desk".into()),
                token: "t0k3n-for-the-nurse-desk".into(),
            },
            StaffToken {
                id: StaffId("doctor-room".into()),
                token: "another-long-staff-token".into(),
            },
        ]
    }

    fn app(kiosk: &Arc<Scripted>) -> Router {
        router(Arc::clone(kiosk), tokens(), CancellationToken::new())
    }

    fn request(
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> Request<Body> {
        let mut b = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, "127.0.0.1:8088");
        if let Some(t) = token {
            b = b.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        match body {
            Some(json) => b
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(json.to_owned())),
            None => b.body(Body::empty()),
        }
        .expect("a valid request")
    }

    async fn send(
        app: Router,
        req: Request<Body>,
    ) -> (StatusCode, axum::http::HeaderMap, serde_json::Value) {
        let response = app.oneshot(req).await.expect("infallible");
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response
            .into_body()
            .collect()
            .await
            .expect("a body")
            .to_bytes();
        let json = if bytes.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::String(
                String::from_utf8_lossy(&bytes).into_owned(),
            ))
        };
        (status, headers, json)
    }

    fn result_screen(session: u64) -> PatientScreen {
        PatientScreen::Result {
            session,
            patient_hint: "7f3a".into(),
            result: ResultView {
                reading_id: "r-1".into(),
                kind: MeasurementKind::BloodPressure,
                value: "186/112".into(),
                unit: "mmHg".into(),
                pulse_bpm: Some(88),
                advice: Advice::MeasureAgain,
                question: Some(SymptomQuestion::CrisisSymptoms),
            },
        }
    }

    #[tokio::test]
    async fn staff_routes_refuse_without_or_with_a_wrong_token_and_touch_nothing() {
        let kiosk = Scripted::new();
        let routes: [(Method, &str, Option<&str>); 5] = [
            (Method::GET, "/api/staff", None),
            (
                Method::POST,
                "/api/checkin",
                Some(r#"{"patient":"p-1234abcd"}"#),
            ),
            (Method::POST, "/api/checkout", None),
            (
                Method::POST,
                "/api/assign",
                Some(r#"{"reading_id":"r-1","patient":"p-1234abcd"}"#),
            ),
            (
                Method::POST,
                "/api/discard",
                Some(r#"{"reading_id":"r-1","reason":"a test"}"#),
            ),
        ];
        for (method, path, body) in routes {
            for token in [
                None,
                Some("wrong"),
                Some(""),
                Some("t0k3n-for-the-nurse-des"),
            ] {
                let (status, headers, json) =
                    send(app(&kiosk), request(method.clone(), path, token, body)).await;
                assert_eq!(
                    status,
                    StatusCode::UNAUTHORIZED,
                    "{method} {path} with {token:?}"
                );
                assert_eq!(json, json!({"error": "unauthorized"}), "{path}");
                assert_eq!(headers[header::WWW_AUTHENTICATE], "Bearer");
            }
        }
        assert!(
            kiosk.calls().is_empty(),
            "refused requests reached the kiosk: {:?}",
            kiosk.calls()
        );
    }

    #[tokio::test]
    async fn no_configured_token_means_no_staff_access() {
        let kiosk = Scripted::new();
        let app = router(Arc::clone(&kiosk), Vec::new(), CancellationToken::new());
        let (status, _, _) =
            send(app, request(Method::POST, "/api/checkout", Some(""), None)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert!(kiosk.calls().is_empty());
    }

    #[tokio::test]
    async fn staff_actions_reach_the_kiosk_under_the_matching_tokens_id() {
        let kiosk = Scripted::new();
        let nurse = Some("t0k3n-for-the-nurse-desk");
        let doctor = Some("another-long-staff-token");
        let (status, headers, view) =
            send(app(&kiosk), request(Method::GET, "/api/staff", nurse, None)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(view["journal_depth"], 3);
        assert_eq!(view["broker_connected"], true);
        assert_eq!(headers[header::CACHE_CONTROL], "no-store");

        let (status, _, session) = send(
            app(&kiosk),
            request(
                Method::POST,
                "/api/checkin",
                doctor,
                Some(r#"{"patient":"p-1234abcd"}"#),
            ),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(session["session"], 8);
        assert_eq!(session["by"], "staff");

        let (status, _, _) = send(
            app(&kiosk),
            request(
                Method::POST,
                "/api/assign",
                nurse,
                Some(r#"{"reading_id":"r-9","patient":"p-1234abcd"}"#),
            ),
        )
        .await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        let (status, _, _) = send(
            app(&kiosk),
            request(
                Method::POST,
                "/api/discard",
                nurse,
                Some(r#"{"reading_id":"r-8","reason":"demo"}"#),
            ),
        )
        .await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        let (status, _, _) = send(
            app(&kiosk),
            request(Method::POST, "/api/checkout", doctor, None),
        )
        .await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        assert_eq!(
            kiosk.calls(),
            [
                "check_in p-1234abcd by doctor-room",
                "assign r-9 to p-1234abcd by nurse-desk",
                "discard r-8 (demo) by nurse-desk",
                "check_out by Some(\"doctor-room\")",
            ]
        );
    }

    #[tokio::test]
    async fn kiosk_refusals_are_json_and_never_quote_the_patient_id() {
        let kiosk = Scripted::new();
        let nurse = Some("t0k3n-for-the-nurse-desk");
        let (status, _, json) = send(
            app(&kiosk),
            request(
                Method::POST,
                "/api/checkin",
                nurse,
                Some(r#"{"patient":"Zhang San"}"#),
            ),
        )
        .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(json["code"], "invalid_patient");
        assert!(!json.to_string().contains("Zhang"), "{json}");

        // A body of the wrong shape: the field is named, the value is not.
        let (status, _, json) = send(
            app(&kiosk),
            request(
                Method::POST,
                "/api/checkin",
                nurse,
                Some(r#"{"patient":"p-1","name":"Zhang San"}"#),
            ),
        )
        .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(
            json["error"]
                .as_str()
                .is_some_and(|e| e.contains("unknown field")),
            "{json}"
        );
        assert!(!json.to_string().contains("Zhang"), "{json}");

        // Not JSON by its content type (what a cross-site form would send).
        let req = Request::builder()
            .method(Method::POST)
            .uri("/api/done")
            .header(header::HOST, "127.0.0.1:8088")
            .header(header::CONTENT_TYPE, "text/plain")
            .body(Body::from(r#"{"session":1}"#))
            .expect("a request");
        let (status, _, json) = send(app(&kiosk), req).await;
        assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        assert!(json["error"].is_string());

        let (status, _, json) =
            send(app(&kiosk), request(Method::GET, "/nowhere", None, None)).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(json["error"].is_string());
        let (status, _, json) = send(
            app(&kiosk),
            request(Method::DELETE, "/api/done", None, None),
        )
        .await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        assert!(json["error"].is_string());
    }

    #[tokio::test]
    async fn a_stale_pages_answer_or_done_is_refused_and_the_current_one_is_taken() {
        let kiosk = Scripted::new();
        kiosk.screen.send_replace(result_screen(5));

        let (status, _, json) = send(
            app(&kiosk),
            request(
                Method::POST,
                "/api/answer",
                None,
                Some(r#"{"session":4,"reading_id":"r-1","yes":true}"#),
            ),
        )
        .await;
        assert_eq!(status, StatusCode::CONFLICT);
        assert_eq!(json["code"], "stale_session");
        let (status, _, json) = send(
            app(&kiosk),
            request(Method::POST, "/api/done", None, Some(r#"{"session":4}"#)),
        )
        .await;
        assert_eq!(status, StatusCode::CONFLICT);
        assert_eq!(json["code"], "stale_session");
        assert!(kiosk.calls().is_empty(), "{:?}", kiosk.calls());

        let (status, _, _) = send(
            app(&kiosk),
            request(
                Method::POST,
                "/api/answer",
                None,
                Some(r#"{"session":5,"reading_id":"r-1","yes":true}"#),
            ),
        )
        .await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        let (status, _, _) = send(
            app(&kiosk),
            request(Method::POST, "/api/done", None, Some(r#"{"session":5}"#)),
        )
        .await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        assert_eq!(kiosk.calls(), ["answer 5 r-1 true", "check_out by None"]);

        // Nobody checked in: there is no session to end.
        kiosk.screen.send_replace(PatientScreen::Idle);
        let (status, _, _) = send(
            app(&kiosk),
            request(Method::POST, "/api/done", None, Some(r#"{"session":5}"#)),
        )
        .await;
        assert_eq!(status, StatusCode::CONFLICT);
    }

    /// The next `screen` event's data from an SSE body.
    async fn next_screen(body: &mut Body) -> serde_json::Value {
        let mut text = String::new();
        loop {
            let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
                .await
                .expect("an event within 5 s")
                .expect("the stream is open")
                .expect("a frame");
            if let Ok(data) = frame.into_data() {
                text.push_str(&String::from_utf8_lossy(&data));
            }
            if let Some(end) = text.find("\n\n") {
                let event = &text[..end];
                if event.lines().any(|l| l == "event: screen") {
                    let data = event
                        .lines()
                        .find_map(|l| l.strip_prefix("data: "))
                        .expect("a data line");
                    return serde_json::from_str(data).expect("JSON data");
                }
                text.drain(..end + 2);
            }
        }
    }

    #[tokio::test]
    async fn events_deliver_the_current_screen_then_every_change_and_end_at_shutdown() {
        let kiosk = Scripted::new();
        let shutdown = CancellationToken::new();
        let app = router(Arc::clone(&kiosk), tokens(), shutdown.clone());
        let response = app
            .oneshot(request(Method::GET, "/events", None, None))
            .await
            .expect("infallible");
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "text/event-stream"
        );
        assert_eq!(response.headers()[header::CACHE_CONTROL], "no-store");
        let mut body = response.into_body();
        assert_eq!(next_screen(&mut body).await, json!({"state": "idle"}));

        kiosk.screen.send_replace(PatientScreen::CheckedIn {
            session: 5,
            patient_hint: "7f3a".into(),
        });
        assert_eq!(
            next_screen(&mut body).await,
            json!({"state": "checked_in", "session": 5, "patient_hint": "7f3a"})
        );
        kiosk.screen.send_replace(result_screen(5));
        let screen = next_screen(&mut body).await;
        assert_eq!(screen["state"], "result");
        assert_eq!(screen["result"]["value"], "186/112");
        assert_eq!(screen["result"]["question"], "crisis_symptoms");
        kiosk.screen.send_replace(PatientScreen::Idle);
        assert_eq!(next_screen(&mut body).await, json!({"state": "idle"}));

        shutdown.cancel();
        let end = tokio::time::timeout(Duration::from_secs(5), async {
            while let Some(frame) = body.frame().await {
                frame.expect("a frame");
            }
        })
        .await;
        assert!(end.is_ok(), "the event stream outlived the shutdown");
    }

    #[tokio::test]
    async fn serve_stops_at_shutdown_even_with_an_event_stream_open() {
        let kiosk = Scripted::new();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve(
            listener,
            Arc::clone(&kiosk),
            tokens(),
            shutdown.clone(),
        ));
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        tokio::io::AsyncWriteExt::write_all(
            &mut stream,
            b"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        )
        .await
        .expect("write");
        let mut buf = [0u8; 512];
        let n = tokio::io::AsyncReadExt::read(&mut stream, &mut buf)
            .await
            .expect("read");
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("serve returned within 5 s")
            .expect("not panicked")
            .expect("no I/O error");
    }

    #[tokio::test]
    async fn pages_carry_a_strict_csp_and_refuse_a_foreign_host_name() {
        let kiosk = Scripted::new();
        for path in [
            "/",
            "/staff",
            "/assets/patient.js",
            "/assets/kiosk.css",
            "/i18n",
            "/i18n/en",
        ] {
            let (status, headers, _) =
                send(app(&kiosk), request(Method::GET, path, None, None)).await;
            assert_eq!(status, StatusCode::OK, "{path}");
            let csp = headers[header::CONTENT_SECURITY_POLICY]
                .to_str()
                .expect("ascii");
            assert!(
                csp.contains("default-src 'none'") && csp.contains("script-src 'self'"),
                "{csp}"
            );
            assert!(!csp.contains("http") && !csp.contains("unsafe"), "{csp}");
            assert_eq!(headers[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
        }
        let req = Request::builder()
            .uri("/events")
            .header(header::HOST, "evil.example:8088")
            .body(Body::empty())
            .expect("a request");
        let (status, _, json) = send(app(&kiosk), req).await;
        assert_eq!(status, StatusCode::MISDIRECTED_REQUEST);
        assert!(json["error"].is_string());
        for ok in [
            "127.0.0.1:8088",
            "localhost:8088",
            "[::1]:8088",
            "192.168.1.20",
            "LOCALHOST",
        ] {
            assert!(is_address_host(ok), "{ok}");
        }
        for bad in [
            "evil.example",
            "127.0.0.1.evil.example:80",
            "",
            "[::1",
            "kiosk.local:8088",
        ] {
            assert!(!is_address_host(bad), "{bad}");
        }
    }

    /// Every text the pages show comes from the translation files: each language has every key the
    /// pages use (the HTML's `data-t`, the scripts' `t("…")`, and the keys built from the contract's
    /// enums), and no page or script carries Chinese text of its own.
    #[test]
    fn every_language_has_every_text_the_pages_use() {
        let mut keys: Vec<String> = Vec::new();
        for html in [PATIENT_PAGE, STAFF_PAGE] {
            for attr in ["data-t=\"", "data-t-placeholder=\""] {
                for part in html.split(attr).skip(1) {
                    keys.push(part.split('"').next().unwrap_or_default().to_owned());
                }
            }
        }
        for (_, _, js) in ASSETS {
            // `t("key"` and `KioskI18n.t("key"`, not `createElement("td"`: `t` must start a word.
            for (at, _) in js.match_indices("t(\"") {
                let word_start = js[..at]
                    .chars()
                    .next_back()
                    .is_none_or(|c| !(c.is_alphanumeric() || c == '_'));
                let key = js[at + 3..].split('"').next().unwrap_or_default();
                // `t("advice_" + …)`: a prefix, checked below with the enum values.
                if word_start && !key.ends_with('_') {
                    keys.push(key.to_owned());
                }
            }
        }
        for advice in [
            Advice::Normal,
            Advice::Low,
            Advice::High,
            Advice::MeasureAgain,
            Advice::SeeNurse,
        ] {
            let a = enum_name(&advice);
            keys.push(format!("advice_{a}"));
            keys.push(format!("advice_{a}_detail"));
        }
        for q in [
            SymptomQuestion::CrisisSymptoms,
            SymptomQuestion::LowGlucoseSymptoms,
        ] {
            keys.push(format!("question_{}", enum_name(&q)));
        }
        for k in [MeasurementKind::Glucose, MeasurementKind::BloodPressure] {
            let k = enum_name(&k);
            keys.extend([
                format!("kind_{k}"),
                format!("measuring_{k}"),
                format!("staff_kind_{k}"),
            ]);
        }
        for by in [CheckInBy::Card, CheckInBy::Staff] {
            keys.push(format!("staff_by_{}", enum_name(&by)));
        }
        for f in [
            CardReaderFailure::BoardUnplugged,
            CardReaderFailure::BoardSilent,
            CardReaderFailure::ReaderNotResponding,
            CardReaderFailure::ReaderBus,
            CardReaderFailure::ReaderInit,
        ] {
            keys.push(format!("staff_failure_{}", enum_name(&f)));
        }
        for e in [
            KioskError::InvalidPatient(String::new()),
            KioskError::NoSuchReading,
            KioskError::StaleSession,
            KioskError::InvalidReason(String::new()),
            KioskError::Storage(String::new()),
        ] {
            keys.push(format!("staff_error_{}", error_code(&e).1));
        }
        // The BLE source's session stages (`sources::ble`, `sources::collector`); one without a text is
        // shown as the source names it, so this list only has to be complete to be all in words.
        for stage in [
            "connect",
            "discover",
            "discovery",
            "subscribe",
            "racp",
            "racp_write",
            "transfer",
            "pipeline",
            "pairing",
            "deadline",
        ] {
            keys.push(format!("staff_stage_{stage}"));
        }
        for unit in ["mmol/L", "mg/dL", "mmHg", "kPa"] {
            keys.push(format!("unit_{unit}"));
        }
        assert!(
            keys.len() > 60,
            "found only {} keys: is the scan broken?",
            keys.len()
        );
        let first: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(LANGUAGES[0].1).expect("valid JSON");
        assert_eq!(LANGUAGES[0].0, "zh-CN", "zh-CN is the default");
        for (code, text) in LANGUAGES {
            let texts: serde_json::Map<String, serde_json::Value> =
                serde_json::from_str(text).unwrap_or_else(|e| panic!("{code}: {e}"));
            for key in &keys {
                assert!(
                    texts.get(key).is_some_and(|v| v.is_string()),
                    "{code} lacks {key:?}"
                );
            }
            let mut a: Vec<_> = texts.keys().collect();
            let mut b: Vec<_> = first.keys().collect();
            a.sort();
            b.sort();
            assert_eq!(a, b, "{code} has other keys than {}", LANGUAGES[0].0);
        }
        let has_cjk = |s: &str| s.chars().any(|c| ('\u{4e00}'..='\u{9fff}').contains(&c));
        assert!(!has_cjk(PATIENT_PAGE) && !has_cjk(STAFF_PAGE));
        assert!(ASSETS.iter().all(|(_, _, body)| !has_cjk(body)));
    }

    fn enum_name<T: serde::Serialize>(v: &T) -> String {
        serde_json::to_value(v)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .expect("a unit variant serializes as its name")
    }
}
