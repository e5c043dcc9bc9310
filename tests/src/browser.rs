//! The kiosk pages in a real browser: headless Chromium driven over WebDriver (chromedriver, started
//! here on a free loopback port), and a [`ScriptedKiosk`] for `gateway::kiosk::web::serve` to serve.
//!
//! - [`Browser::start`] — `None` (after printing why) when Chromium or chromedriver is not installed, so a
//!   test can skip; CI installs both (Debian `chromium`, `chromium-driver`, and `fonts-wqy-microhei` for
//!   the zh-CN text). Once installed, a browser that does not start fails the test.
//! - [`KioskServer`] — the real web server on a free loopback port, over a [`ScriptedKiosk`] whose patient
//!   screen the test sets and which records every action the pages asked of it ([`Call`]).
//!
//! One browser at a time in a test process: Chromium is heavy on a 2-core machine, and parallel
//! instances only make each test's timing noisier.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use gateway::kiosk::{
    Advice, CheckInBy, HeldReading, KioskControl, KioskError, MeasurementKind, PatientScreen,
    ResultView, SessionView, StaffId, StaffToken, StaffView,
};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// One browser at a time (see the module doc).
static ONE_BROWSER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A headless Chromium session over chromedriver. Dropping it kills chromedriver and the browser it
/// started (their process group); [`close`](Self::close) ends the session politely first.
#[derive(Debug)]
pub struct Browser {
    client: Client,
    driver: Child,
    _profile: tempfile::TempDir,
    _turn: tokio::sync::MutexGuard<'static, ()>,
}

/// Where Chromium and chromedriver are: `PHG_CHROMIUM` / `PHG_CHROMEDRIVER`, else the first of the usual
/// names on `PATH`; `Err` says what is missing.
pub fn find_browser() -> Result<(PathBuf, PathBuf), String> {
    let chromium = from_env_or_path(
        "PHG_CHROMIUM",
        &["chromium", "chromium-browser", "google-chrome"],
    );
    let driver = from_env_or_path("PHG_CHROMEDRIVER", &["chromedriver"]);
    match (chromium, driver) {
        (Some(c), Some(d)) => Ok((c, d)),
        (None, _) => Err("no Chromium (install Debian's `chromium` or set PHG_CHROMIUM)".into()),
        (_, None) => Err(
            "no chromedriver (install Debian's `chromium-driver` or set PHG_CHROMEDRIVER)".into(),
        ),
    }
}

fn from_env_or_path(env: &str, names: &[&str]) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| names.iter().map(move |n| dir.join(n)))
        .find(|p| p.is_file())
}

impl Browser {
    /// Starts chromedriver and a headless Chromium session (window 1280×900), or prints why it cannot
    /// and returns `None` when either is not installed.
    ///
    /// # Panics
    ///
    /// When both are installed but the session does not start within 30 s.
    pub async fn start() -> Option<Self> {
        let (chromium, driver_bin) = match find_browser() {
            Ok(found) => found,
            Err(why) => {
                println!("SKIP: {why}");
                return None;
            }
        };
        let turn = ONE_BROWSER.lock().await;
        let addr = crate::free_loopback_port().expect("a free loopback port");
        let mut cmd = Command::new(&driver_bin);
        cmd.arg(format!("--port={}", addr.port()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // Its own process group: Drop kills chromedriver and the Chromium it started together, even
        // when a test panics before `close`.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let driver = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", driver_bin.display()));
        let profile = tempfile::tempdir().expect("a temporary browser profile");
        let mut browser_guard = DriverGuard(Some(driver));
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            assert!(
                Instant::now() < deadline,
                "chromedriver did not listen on {addr} within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut caps = serde_json::Map::new();
        caps.insert("browserName".into(), json!("chrome"));
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": chromium,
                "args": [
                    "--headless=new",
                    // Tests run as root in CI, where Chromium's sandbox cannot start.
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--no-first-run",
                    "--disable-extensions",
                    "--window-size=1280,900",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            }),
        );
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = tokio::time::timeout(
            Duration::from_secs(30),
            ClientBuilder::new(connector)
                .capabilities(caps)
                .connect(&format!("http://{addr}")),
        )
        .await
        .expect("a WebDriver session within 30 s")
        .expect("a WebDriver session");
        Some(Self {
            client,
            driver: browser_guard.0.take().expect("the driver is still held"),
            _profile: profile,
            _turn: turn,
        })
    }

    /// The WebDriver client.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Opens `url` and waits until the page has loaded its texts and shows a screen (`#screen`'s
    /// `data-state` is no longer `loading`), or until the staff page shows its login or console.
    ///
    /// # Panics
    ///
    /// When the page does not get there within 10 s.
    pub async fn open(&self, url: &str) {
        self.client.goto(url).await.expect("navigation");
        self.wait_for(
            "the page to start",
            "const s = document.getElementById('screen');\
             if (s) return s.dataset.state !== 'loading';\
             return !document.getElementById('login').hidden || !document.getElementById('console').hidden;",
            Duration::from_secs(10),
        )
        .await;
    }

    /// Runs `script` (a function body, `return`ing a value) every 20 ms until its value is truthy, and
    /// returns that value.
    ///
    /// # Panics
    ///
    /// When it is not truthy within `timeout` (the message names `what` and the last value).
    pub async fn wait_for(&self, what: &str, script: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self
                .client
                .execute(script, Vec::new())
                .await
                .expect("script runs");
            let truthy = match &v {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::String(s) => !s.is_empty(),
                Value::Number(n) => n.as_f64().is_some_and(|n| n != 0.0),
                _ => true,
            };
            if truthy {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "waited {timeout:?} for {what}; last value {v}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the element `css` is shown (not `hidden`, nor inside something hidden) and its text
    /// contains `expected`; returns its text.
    ///
    /// # Panics
    ///
    /// When it does not within 5 s.
    pub async fn wait_text(&self, css: &str, expected: &str) -> String {
        let script = format!(
            "const e = document.querySelector({css}); \
             return e && e.offsetParent !== null && e.textContent.includes({expected}) ? e.textContent : '';",
            css = json!(css),
            expected = json!(expected),
        );
        self.wait_for(
            &format!("{css} to show {expected:?}"),
            &script,
            Duration::from_secs(5),
        )
        .await
        .as_str()
        .unwrap_or_default()
        .to_owned()
    }

    /// The text of `css` (its `textContent`, shown or not; empty when there is no such element).
    pub async fn text(&self, css: &str) -> String {
        let script = format!(
            "const e = document.querySelector({}); return e ? e.textContent : '';",
            json!(css)
        );
        let v = self
            .client
            .execute(&script, Vec::new())
            .await
            .expect("script runs");
        v.as_str().unwrap_or_default().to_owned()
    }

    /// The attribute `name` of `css` (empty when either is missing).
    pub async fn attr(&self, css: &str, name: &str) -> String {
        let script = format!(
            "const e = document.querySelector({}); return e ? (e.getAttribute({}) || '') : '';",
            json!(css),
            json!(name)
        );
        let v = self
            .client
            .execute(&script, Vec::new())
            .await
            .expect("script runs");
        v.as_str().unwrap_or_default().to_owned()
    }

    /// `true` when `css` is shown.
    pub async fn is_shown(&self, css: &str) -> bool {
        let script = format!(
            "const e = document.querySelector({}); return Boolean(e && e.offsetParent !== null);",
            json!(css)
        );
        self.client
            .execute(&script, Vec::new())
            .await
            .expect("script runs")
            == json!(true)
    }

    /// Clicks `css`.
    ///
    /// # Panics
    ///
    /// When there is no such element or it cannot be clicked.
    pub async fn click(&self, css: &str) {
        self.client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("{css}: {e}"))
            .click()
            .await
            .unwrap_or_else(|e| panic!("clicking {css}: {e}"));
    }

    /// Types `text` into `css`.
    ///
    /// # Panics
    ///
    /// When there is no such element.
    pub async fn type_into(&self, css: &str, text: &str) {
        let e = self
            .client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("{css}: {e}"));
        e.clear()
            .await
            .unwrap_or_else(|e| panic!("clearing {css}: {e}"));
        e.send_keys(text)
            .await
            .unwrap_or_else(|e| panic!("typing into {css}: {e}"));
    }

    /// Saves a PNG of the window as `name` in the directory `PHG_SCREENSHOTS` names (relative to the
    /// workspace root), when it is set; returns the path written.
    ///
    /// # Panics
    ///
    /// When the screenshot cannot be taken or written.
    pub async fn screenshot_if_asked(&self, name: &str) -> Option<PathBuf> {
        let dir = PathBuf::from(std::env::var_os("PHG_SCREENSHOTS")?);
        let dir = if dir.is_absolute() {
            dir
        } else {
            workspace_root().join(dir)
        };
        std::fs::create_dir_all(&dir).expect("the screenshot directory");
        let png = self.client.screenshot().await.expect("a screenshot");
        let path = dir.join(name);
        std::fs::write(&path, png).expect("writing the screenshot");
        println!("screenshot: {}", path.display());
        Some(path)
    }

    /// Ends the WebDriver session (Chromium exits), then chromedriver.
    pub async fn close(self) {
        let _ = self.client.clone().close().await;
        // Drop kills chromedriver.
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        kill_group(&mut self.driver);
    }
}

/// Kills chromedriver's process group if `start` fails half-way.
struct DriverGuard(Option<Child>);

impl Drop for DriverGuard {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            kill_group(child);
        }
    }
}

fn kill_group(child: &mut Child) {
    if let Some(pid) = i32::try_from(child.id())
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    {
        let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_owned)
}

/// What the pages asked of the kiosk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    /// `check_in(patient, by)`.
    CheckIn {
        /// The patient id.
        patient: String,
        /// The staff token's id.
        by: String,
    },
    /// `check_out(by)`; `None` from the patient page.
    CheckOut {
        /// The staff token's id, if staff.
        by: Option<String>,
    },
    /// `assign(reading_id, patient, by)`.
    Assign {
        /// The held reading.
        reading_id: String,
        /// The patient id.
        patient: String,
        /// The staff token's id.
        by: String,
    },
    /// `discard(reading_id, reason, by)`.
    Discard {
        /// The held reading.
        reading_id: String,
        /// Why.
        reason: String,
        /// The staff token's id.
        by: String,
    },
    /// `answer_symptoms(session, reading_id, yes)` (accepted ones only).
    Answer {
        /// The session the page showed.
        session: u64,
        /// The reading the question was about.
        reading_id: String,
        /// Symptoms.
        yes: bool,
    },
}

/// A kiosk whose patient screen the test sets, and which acts as the real one does on what the pages
/// send: a check-in starts a session (screen `CheckedIn`), a check-out ends it (`Idle`), an assignment or
/// a discard removes the held reading, and a "yes" to a question turns the result into "see a nurse"
/// (as the edge engine does with symptoms). Every accepted action is recorded as a [`Call`].
#[derive(Debug)]
pub struct ScriptedKiosk {
    screen: watch::Sender<PatientScreen>,
    state: Mutex<State>,
    calls: watch::Sender<Vec<Call>>,
}

#[derive(Debug, Default)]
struct State {
    next_session: u64,
    session: Option<SessionView>,
    held: VecDeque<HeldReading>,
}

impl Default for ScriptedKiosk {
    fn default() -> Self {
        Self {
            screen: watch::channel(PatientScreen::Idle).0,
            state: Mutex::new(State {
                next_session: 1,
                ..State::default()
            }),
            calls: watch::channel(Vec::new()).0,
        }
    }
}

impl ScriptedKiosk {
    /// Shows `screen` on the patient page (what the kiosk's state sends on a change).
    pub fn show(&self, screen: PatientScreen) {
        self.screen.send_replace(screen);
    }

    /// The screen now.
    pub fn screen_now(&self) -> PatientScreen {
        self.screen.borrow().clone()
    }

    /// A card check-in of `patient`: a new session, screen `CheckedIn`; returns the session.
    pub fn card_check_in(&self, patient: &str) -> u64 {
        self.start_session(patient, CheckInBy::Card).session
    }

    /// Shows `result` for the current session.
    ///
    /// # Panics
    ///
    /// When nobody is checked in.
    pub fn show_result(&self, result: ResultView) {
        let s = self.session().expect("a session to show a result in");
        self.show(PatientScreen::Result {
            session: s.session,
            patient_hint: hint(&s.patient),
            result,
        });
    }

    /// Shows the current session's measuring screen.
    ///
    /// # Panics
    ///
    /// When nobody is checked in.
    pub fn show_measuring(&self, kind: MeasurementKind, cuff_pressure_mmhg: Option<f32>) {
        let s = self.session().expect("a session to measure in");
        self.show(PatientScreen::Measuring {
            session: s.session,
            patient_hint: hint(&s.patient),
            kind,
            cuff_pressure_mmhg,
        });
    }

    /// Holds `reading` as unattributed (listed on the staff page).
    pub fn hold(&self, reading: HeldReading) {
        self.lock().held.push_back(reading);
    }

    /// The current session.
    pub fn session(&self) -> Option<SessionView> {
        self.lock().session.clone()
    }

    /// Every accepted action so far.
    pub fn calls(&self) -> Vec<Call> {
        self.calls.borrow().clone()
    }

    /// Waits until a recorded call satisfies `f`.
    ///
    /// # Panics
    ///
    /// When none does within `timeout`.
    pub async fn wait_call(&self, timeout: Duration, f: impl Fn(&Call) -> bool) -> Call {
        let mut rx = self.calls.subscribe();
        let found = tokio::time::timeout(timeout, rx.wait_for(|calls| calls.iter().any(&f))).await;
        match found {
            Ok(Ok(calls)) => calls.iter().find(|c| f(c)).cloned().expect("just found"),
            _ => panic!("no such call within {timeout:?}; calls: {:?}", self.calls()),
        }
    }

    fn record(&self, call: Call) {
        self.calls.send_modify(|c| c.push(call));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Short, await-free critical sections only.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn start_session(&self, patient: &str, by: CheckInBy) -> SessionView {
        let view = {
            let mut st = self.lock();
            let session = st.next_session;
            st.next_session += 1;
            let view = SessionView {
                session,
                patient: patient.to_owned(),
                by,
                started_utc: "2026-12-05T08:00:00Z".into(),
                expires_utc: "2026-12-05T08:03:00Z".into(),
            };
            st.session = Some(view.clone());
            view
        };
        self.show(PatientScreen::CheckedIn {
            session: view.session,
            patient_hint: hint(patient),
        });
        view
    }
}

/// At most the last 4 characters of a pseudonymous id (what the patient page may show).
fn hint(patient: &str) -> String {
    let chars: Vec<char> = patient.chars().collect();
    chars[chars.len().saturating_sub(4)..].iter().collect()
}

fn session_of(screen: &PatientScreen) -> Option<u64> {
    match screen {
        PatientScreen::Idle | PatientScreen::CardUnknown => None,
        PatientScreen::CheckedIn { session, .. }
        | PatientScreen::Measuring { session, .. }
        | PatientScreen::Result { session, .. } => Some(*session),
    }
}

impl KioskControl for ScriptedKiosk {
    fn screen(&self) -> watch::Receiver<PatientScreen> {
        self.screen.subscribe()
    }

    fn staff_view(&self) -> StaffView {
        let st = self.lock();
        StaffView {
            session: st.session.clone(),
            held: st.held.iter().cloned().collect(),
            devices: vec![
                gateway::kiosk::DeviceView {
                    device: "AA:BB:CC:00:11:22".into(),
                    kind: Some(MeasurementKind::BloodPressure),
                    connected: true,
                    battery_percent: Some(80),
                    battery_low: false,
                    failure: Some(gateway::kiosk::DeviceFailure {
                        stage: "connect".into(),
                        cause: "org.bluez.Error.Failed: le-connection-abort-by-local".into(),
                    }),
                },
                // A glucometer whose battery is nearly flat: staff should see it before it dies.
                gateway::kiosk::DeviceView {
                    device: "AA:BB:CC:00:11:33".into(),
                    kind: Some(MeasurementKind::Glucose),
                    connected: false,
                    battery_percent: Some(12),
                    battery_low: true,
                    failure: None,
                },
            ],
            // A board whose reader has failed: staff must see that cards will not work.
            card_reader: Some(gateway::kiosk::CardReaderView {
                connected: true,
                reader_ok: Some(false),
                failure: Some(gateway::kiosk::CardReaderFailure::ReaderNotResponding),
            }),
            journal_depth: 2,
            broker_connected: true,
        }
    }

    async fn check_in(&self, patient: &str, by: &StaffId) -> Result<SessionView, KioskError> {
        if patient.is_empty() || patient.contains(char::is_whitespace) {
            return Err(KioskError::InvalidPatient("not a pseudonym".into()));
        }
        self.record(Call::CheckIn {
            patient: patient.to_owned(),
            by: by.0.clone(),
        });
        Ok(self.start_session(patient, CheckInBy::Staff))
    }

    async fn check_out(&self, by: Option<&StaffId>) -> Result<(), KioskError> {
        self.record(Call::CheckOut {
            by: by.map(|b| b.0.clone()),
        });
        self.lock().session = None;
        self.show(PatientScreen::Idle);
        Ok(())
    }

    async fn assign(
        &self,
        reading_id: &str,
        patient: &str,
        by: &StaffId,
    ) -> Result<(), KioskError> {
        if patient.is_empty() || patient.contains(char::is_whitespace) {
            return Err(KioskError::InvalidPatient("not a pseudonym".into()));
        }
        let mut st = self.lock();
        let at = st
            .held
            .iter()
            .position(|h| h.reading_id == reading_id)
            .ok_or(KioskError::NoSuchReading)?;
        st.held.remove(at);
        drop(st);
        self.record(Call::Assign {
            reading_id: reading_id.to_owned(),
            patient: patient.to_owned(),
            by: by.0.clone(),
        });
        Ok(())
    }

    async fn discard(
        &self,
        reading_id: &str,
        reason: &str,
        by: &StaffId,
    ) -> Result<(), KioskError> {
        if reason.trim().is_empty() {
            return Err(KioskError::InvalidReason("required".into()));
        }
        let mut st = self.lock();
        let at = st
            .held
            .iter()
            .position(|h| h.reading_id == reading_id)
            .ok_or(KioskError::NoSuchReading)?;
        st.held.remove(at);
        drop(st);
        self.record(Call::Discard {
            reading_id: reading_id.to_owned(),
            reason: reason.to_owned(),
            by: by.0.clone(),
        });
        Ok(())
    }

    async fn answer_symptoms(
        &self,
        session: u64,
        reading_id: &str,
        yes: bool,
    ) -> Result<(), KioskError> {
        let mut screen = self.screen_now();
        if session_of(&screen) != Some(session) {
            return Err(KioskError::StaleSession);
        }
        let PatientScreen::Result { result, .. } = &mut screen else {
            return Err(KioskError::StaleSession);
        };
        if result.reading_id != reading_id {
            return Err(KioskError::StaleSession);
        }
        self.record(Call::Answer {
            session,
            reading_id: reading_id.to_owned(),
            yes,
        });
        result.question = None;
        if yes {
            result.advice = Advice::SeeNurse;
        }
        self.show(screen);
        Ok(())
    }
}

/// The kiosk's real web server on a free loopback port, over a [`ScriptedKiosk`].
#[derive(Debug)]
pub struct KioskServer {
    /// `http://127.0.0.1:PORT`
    pub url: String,
    /// The kiosk it serves.
    pub kiosk: Arc<ScriptedKiosk>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<io::Result<()>>,
}

impl KioskServer {
    /// Serves a fresh [`ScriptedKiosk`] with `staff` tokens.
    ///
    /// # Panics
    ///
    /// When no loopback port can be bound.
    pub async fn start(staff: Vec<StaffToken>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a loopback port");
        let addr: SocketAddr = listener.local_addr().expect("its address");
        let kiosk = Arc::new(ScriptedKiosk::default());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(gateway::kiosk::web::serve(
            listener,
            Arc::clone(&kiosk),
            staff,
            shutdown.clone(),
        ));
        Self {
            url: format!("http://{addr}"),
            kiosk,
            shutdown,
            task,
        }
    }

    /// Stops the server and waits for it.
    ///
    /// # Panics
    ///
    /// When it does not stop within 5 s or ended with an error.
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("the kiosk server stops within 5 s")
            .expect("not panicked")
            .expect("no I/O error");
    }
}

/// A staff token for tests.
pub fn staff_token(id: &str, token: &str) -> StaffToken {
    StaffToken {
        id: StaffId(id.to_owned()),
        token: token.to_owned(),
    }
}
