//! The clinic kiosk end to end (issue 12 items 1, 2; issue 13 item 4): the real `gateway` binary with a
//! simulated kiosk cuff, real Mosquitto (or the embedded broker), an independent MQTT subscriber, and the
//! card reader board's own firmware logic on a pseudo-terminal (as in `card_reader.rs`).
//!
//! - a card tap checks its patient in (through the CRM's `phg.config/2` card map, a keyed hash of the
//!   UID): readings measured during the session arrive for that patient; the cuff's stored memory and
//!   readings with nobody checked in are held as `unattributed`; an unknown card shows an error;
//! - held readings survive a SIGKILL; after the restart staff assign one (it arrives with its original
//!   id, and an audit event) and discard another (an event says so);
//! - a session that timed out attributes nothing measured afterwards.
#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed test

use std::cell::{Cell, RefCell};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc as std_mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use firmware::board::Board;
use firmware::indicator::Indicator;
use firmware::reader::Reader;
use firmware::testing::{FakeMfrc522, FakePin};
use gateway::kiosk::{KioskControl, KioskError, StaffId};
use phg_tests::process::GatewayProcess;
use phg_tests::{Subscriber, TestBroker, unique_id};
use protocol::link::Indication;
use rumqttc::{AsyncClient, MqttOptions, QoS};
use serde_json::Value;

const KEY: &str = "5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a";
const TOKEN: &str = "kiosk-test-token-0123456789abcdef-xyz";
const CARD: [u8; 7] = [0x04, 0x5A, 0x3C, 0x21, 0x7F, 0x61, 0x80];
const UNKNOWN_CARD: [u8; 4] = [0xDE, 0xAD, 0xBE, 0xEF];
const PATIENT: &str = "p-kiosk-0042";
const CUFF: &str = "sim-kiosk-cuff";

// ---------------------------------------------------------------------------------------------------
// The board on a pseudo-terminal
// ---------------------------------------------------------------------------------------------------

fn pty() -> (OwnedFd, PathBuf) {
    use rustix::pty::{OpenptFlags, grantpt, openpt, ptsname, unlockpt};
    let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC).unwrap();
    grantpt(&master).unwrap();
    unlockpt(&master).unwrap();
    let mut termios = rustix::termios::tcgetattr(&master).unwrap();
    termios.make_raw();
    rustix::termios::tcsetattr(&master, rustix::termios::OptionalActions::Now, &termios).unwrap();
    let name = ptsname(&master, Vec::new()).unwrap();
    (master, PathBuf::from(name.to_str().unwrap()))
}

struct PtySerial(OwnedFd);

impl embedded_io::ErrorType for PtySerial {
    type Error = embedded_io::ErrorKind;
}

impl embedded_io::ReadReady for PtySerial {
    fn read_ready(&mut self) -> Result<bool, Self::Error> {
        use rustix::event::{PollFd, PollFlags, Timespec, poll};
        let mut fds = [PollFd::new(&self.0, PollFlags::IN)];
        let zero = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        poll(&mut fds, Some(&zero)).map_err(|_| embedded_io::ErrorKind::Other)?;
        let revents = fds[0].revents();
        Ok(revents.contains(PollFlags::IN))
    }
}

impl embedded_io::Read for PtySerial {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, Self::Error> {
        rustix::io::read(&self.0, buf).map_err(|_| embedded_io::ErrorKind::Other)
    }
}

impl embedded_io::Write for PtySerial {
    fn write(&mut self, buf: &[u8]) -> Result<usize, Self::Error> {
        let mut written = 0;
        while written < buf.len() {
            written += rustix::io::write(&self.0, &buf[written..])
                .map_err(|_| embedded_io::ErrorKind::Other)?;
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }
}

enum Cmd {
    Place(Vec<u8>),
    Remove,
}

/// The firmware's `Board` (fake MFRC522, real link logic) in a thread, in real time.
struct BoardThread {
    cmds: std_mpsc::Sender<Cmd>,
    showing: Arc<Mutex<Indication>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl BoardThread {
    fn start(master: OwnedFd) -> Self {
        let (cmds, rx) = std_mpsc::channel();
        let showing = Arc::new(Mutex::new(Indication::Ready));
        let stop = Arc::new(AtomicBool::new(false));
        let (v, s) = (showing.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let spi = RefCell::new(FakeMfrc522::new());
            let pins = [Cell::new(false), Cell::new(false), Cell::new(false)];
            let indicator =
                Indicator::new(FakePin(&pins[0]), FakePin(&pins[1]), FakePin(&pins[2]), 0);
            let start = Instant::now();
            let mut board = Board::new(Reader::new(&spi), indicator, PtySerial(master), 0x7E57, 0);
            while !s.load(Ordering::Relaxed) {
                while let Ok(cmd) = rx.try_recv() {
                    match cmd {
                        Cmd::Place(uid) => spi.borrow_mut().place_card(&uid),
                        Cmd::Remove => spi.borrow_mut().remove_card(),
                    }
                }
                board.step(start.elapsed().as_millis() as u64);
                *v.lock().unwrap() = board.showing();
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        Self {
            cmds,
            showing,
            stop,
            thread: Some(thread),
        }
    }

    fn showing(&self) -> Indication {
        *self.showing.lock().unwrap()
    }

    async fn wait_showing(&self, want: &[Indication], what: &str) -> Indication {
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            let now = self.showing();
            if want.contains(&now) {
                return now;
            }
            assert!(
                Instant::now() < end,
                "the board never showed {what} ({want:?}); it shows {now:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Taps a card: placed, held briefly, removed.
    async fn tap(&self, uid: &[u8]) {
        self.cmds.send(Cmd::Place(uid.to_vec())).unwrap();
        tokio::time::sleep(Duration::from_millis(800)).await;
        self.cmds.send(Cmd::Remove).unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

impl Drop for BoardThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// The gateway and the CRM side
// ---------------------------------------------------------------------------------------------------

struct Setup {
    gateway_id: String,
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Self {
        Self {
            gateway_id: unique_id("kiosk"),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn root(&self) -> String {
        format!("phg/v1/{}", self.gateway_id)
    }

    fn hold_file(&self) -> PathBuf {
        self.dir.path().join("kiosk-hold.json")
    }

    /// A configuration: the kiosk (with a reader at `reader`, if any) and, when `measure_every_s` is
    /// `Some`, the simulated kiosk cuff with `stored` readings in its memory.
    fn config(
        &self,
        broker: &TestBroker,
        reader: Option<&Path>,
        idle_timeout_s: u64,
        cuff: Option<(usize, u64)>,
    ) -> String {
        let mut c = format!(
            r#"
gateway_id = "{gw}"

[mqtt]
broker = "{url}"
version = "{version}"

[journal]
dir = "{dir}/journal"

[kiosk]
listen = "127.0.0.1:0"
devices = ["{CUFF}"]
idle_timeout_s = {idle_timeout_s}
hold_file = "{hold}"
card_key = "{KEY}"
"#,
            gw = self.gateway_id,
            url = broker.url(),
            version = broker.mqtt_version_setting(),
            dir = self.dir.path().display(),
            hold = self.hold_file().display(),
        );
        if let Some(r) = reader {
            c += &format!("reader = \"{}\"\n", r.display());
        }
        c += &format!("\n[[kiosk.staff]]\nid = \"desk-1\"\ntoken = \"{TOKEN}\"\n");
        if let Some((stored, measure_every_s)) = cuff {
            c += &format!(
                "\n[[simulated]]\nkind = \"cuff\"\nid = \"{CUFF}\"\nstored = {stored}\n\
                 measure_every_s = {measure_every_s}\nconnect_every_s = 1\n"
            );
        }
        c
    }

    fn start(&self, config: &str) -> GatewayProcess {
        GatewayProcess::run(&self.dir.path().join("gateway.toml"), config).unwrap()
    }

    /// The CRM's configuration, retained on the gateway's config topic: the card → patient map.
    async fn publish_cards(&self, broker: std::net::SocketAddr) {
        let hash = gateway::kiosk::card::CardKey::from_hex(KEY)
            .unwrap()
            .hash(&CARD);
        let payload = serde_json::json!({
            "schema": "phg.config/2",
            "version": 1,
            "cards": [{"card": hash, "patient": PATIENT}],
        });
        let mut opts = MqttOptions::new(unique_id("crm"), broker.ip().to_string(), broker.port());
        opts.set_keep_alive(Duration::from_secs(5));
        let (client, mut events) = AsyncClient::new(opts, 8);
        client
            .publish(
                format!("{}/config", self.root()),
                QoS::AtLeastOnce,
                true,
                payload.to_string(),
            )
            .await
            .unwrap();
        let acked = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) =
                    events.poll().await
                {
                    break;
                }
            }
        })
        .await;
        assert!(
            acked.is_ok(),
            "the broker never took the CRM's configuration"
        );
    }
}

fn json(payload: &[u8]) -> Value {
    serde_json::from_slice(payload).unwrap()
}

fn of_type(sub: &mut Subscriber, suffix: &str) -> Vec<Value> {
    sub.received()
        .iter()
        .filter(|r| r.topic.ends_with(suffix))
        .map(|r| json(&r.payload))
        .collect()
}

fn events(sub: &mut Subscriber, kind: &str) -> Vec<Value> {
    of_type(sub, "/events")
        .into_iter()
        .filter(|e| e["event"]["type"] == kind)
        .collect()
}

async fn wait_until(sub: &mut Subscriber, what: &str, mut f: impl FnMut(&mut Subscriber) -> bool) {
    let end = Instant::now() + Duration::from_secs(40);
    while !f(sub) {
        assert!(Instant::now() < end, "never saw {what}");
        sub.collect_for(Duration::from_millis(200)).await;
    }
}

fn now_rfc3339(offset_s: i64) -> String {
    protocol::wire::rfc3339_utc(gateway::sources::collector::now_utc() + offset_s).unwrap()
}

fn held_ids(path: &Path) -> Vec<String> {
    let file: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    file["held"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["reading_id"].as_str().unwrap().to_owned())
        .collect()
}

// ---------------------------------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_card_tap_checks_in_and_readings_measured_in_the_session_go_to_that_patient() {
    phg_tests::init_tracing();
    let broker = TestBroker::start().unwrap();
    let setup = Setup::new();
    setup.publish_cards(broker.addr()).await;
    let mut sub = Subscriber::connect(broker.addr(), &format!("{}/#", setup.root()))
        .await
        .unwrap();
    let (master, pty_path) = pty();
    let board = BoardThread::start(master);
    let gw = setup.start(&setup.config(&broker, Some(&pty_path), 120, Some((3, 2))));

    // Nobody is checked in: the cuff's memory and what it measures now are held, not guessed.
    wait_until(&mut sub, "three unattributed readings", |s| {
        events(s, "unattributed").len() >= 3
    })
    .await;
    assert!(
        of_type(&mut sub, "/readings").is_empty(),
        "a reading was attributed with nobody checked in"
    );
    assert!(held_ids(&setup.hold_file()).len() >= 3);

    assert!(
        gw.stderr()
            .wait_for(
                "configuration from the CRM applied",
                0,
                Duration::from_secs(20)
            )
            .await
            .is_some(),
        "the CRM's card map was never applied"
    );
    // A card the CRM does not know: an error on the board, no session.
    board.tap(&UNKNOWN_CARD).await;
    board
        .wait_showing(&[Indication::Error], "the unknown card's error")
        .await;

    let checked_in_at = now_rfc3339(-1);
    board.tap(&CARD).await;
    board
        .wait_showing(
            &[
                Indication::CheckedIn,
                Indication::Measuring,
                Indication::ResultOk,
                Indication::SeeANurse,
            ],
            "the check-in",
        )
        .await;
    wait_until(&mut sub, "a reading for the checked-in patient", |s| {
        !of_type(s, "/readings").is_empty()
    })
    .await;
    for r in of_type(&mut sub, "/readings") {
        assert_eq!(r["patient"], PATIENT, "{r}");
        assert_eq!(r["device"]["id"], CUFF);
        let measured = r["time"]["corrected"].as_str().unwrap();
        assert!(
            measured >= checked_in_at.as_str(),
            "a reading measured at {measured}, before the check-in at {checked_in_at}, was attributed"
        );
    }
    // The result reaches the board.
    board
        .wait_showing(&[Indication::ResultOk, Indication::SeeANurse], "the result")
        .await;
    // Nothing the cuff replayed from before the check-in went to the patient; no card UID anywhere.
    let uid_hex = protocol::wire::to_hex(&CARD);
    for r in sub.received() {
        let text = String::from_utf8_lossy(&r.payload).to_lowercase();
        assert!(!text.contains(&uid_hex), "a card UID on {}", r.topic);
    }

    // The board is unplugged: the CRM hears one `device_error` for it, not one per reopen attempt
    // (the gateway retries every second).
    let reader_errors = |s: &mut Subscriber| -> Vec<Value> {
        events(s, "device_error")
            .into_iter()
            .filter(|e| e["event"]["device"] == "card-reader")
            .collect()
    };
    assert!(
        reader_errors(&mut sub).is_empty(),
        "a device_error while the board worked"
    );
    drop(board);
    wait_until(&mut sub, "the card reader's device_error", |s| {
        !reader_errors(s).is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let errors = reader_errors(&mut sub);
    assert_eq!(errors.len(), 1, "one event per streak: {errors:?}");
    assert_eq!(errors[0]["event"]["stage"], "link", "{}", errors[0]);

    let exit = gw.terminate(Duration::from_secs(20)).await.unwrap();
    let log = exit.stderr.join("\n");
    assert!(
        !log.to_lowercase().contains(&uid_hex),
        "a card UID in the log"
    );
    assert!(!log.contains(PATIENT), "a patient id in the INFO log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_readings_survive_sigkill_and_staff_assign_or_discard_them_with_an_event() {
    phg_tests::init_tracing();
    let broker = TestBroker::start().unwrap();
    let setup = Setup::new();
    let mut sub = Subscriber::connect(broker.addr(), &format!("{}/#", setup.root()))
        .await
        .unwrap();
    let gw = setup.start(&setup.config(&broker, None, 120, Some((3, 0))));
    wait_until(&mut sub, "three unattributed readings", |s| {
        events(s, "unattributed").len() >= 3
    })
    .await;
    let seen: Vec<String> = events(&mut sub, "unattributed")
        .iter()
        .map(|e| e["event"]["reading_id"].as_str().unwrap().to_owned())
        .collect();
    for e in events(&mut sub, "unattributed") {
        assert!(e["event"]["reading"]["time"]["received"].is_string());
    }
    gw.kill9().unwrap();
    let mut held = held_ids(&setup.hold_file());
    held.sort();
    let mut expected = seen.clone();
    expected.sort();
    expected.dedup();
    assert_eq!(held, expected, "the hold after SIGKILL");

    // The gateway again (in this process, to drive the staff side as the staff page does), without the
    // simulated cuff: what staff see is what the hold kept.
    let config = gateway::config::Config::parse(
        &setup.config(&broker, None, 120, None),
        Path::new("(test)"),
    )
    .unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let hooks = gateway::app::RunHooks {
        kiosk: Some(tx),
        ..Default::default()
    };
    let run = tokio::spawn(gateway::app::run_with(config, stop.clone(), hooks));
    let (kiosk, _addr) = tokio::time::timeout(Duration::from_secs(20), rx)
        .await
        .unwrap()
        .unwrap();
    let view = kiosk.staff_view();
    let mut listed: Vec<String> = view.held.iter().map(|h| h.reading_id.clone()).collect();
    listed.sort();
    assert_eq!(
        listed, expected,
        "the staff page's held readings after the restart"
    );
    assert!(
        view.held
            .iter()
            .all(|h| h.reason == "no_session" && h.unit == "mmHg")
    );

    let staff = StaffId("desk-1".into());
    let (assigned, discarded) = (&expected[0], &expected[1]);
    kiosk
        .assign(assigned, "p-kiosk-0007", &staff)
        .await
        .unwrap();
    assert_eq!(
        kiosk.assign(assigned, "p-kiosk-0007", &staff).await,
        Err(KioskError::NoSuchReading)
    );
    assert!(matches!(
        kiosk.discard(discarded, "  ", &staff).await,
        Err(KioskError::InvalidReason(_))
    ));
    assert!(matches!(
        kiosk.assign(discarded, "Jane Doe", &staff).await,
        Err(KioskError::InvalidPatient(_))
    ));
    kiosk
        .discard(discarded, "cuff demonstration", &staff)
        .await
        .unwrap();
    let left: Vec<String> = kiosk
        .staff_view()
        .held
        .iter()
        .map(|h| h.reading_id.clone())
        .collect();
    assert_eq!(left, vec![expected[2].clone()]);
    assert_eq!(held_ids(&setup.hold_file()), left);

    wait_until(&mut sub, "the assigned reading and both events", |s| {
        !of_type(s, "/readings").is_empty()
            && !events(s, "reading_assigned").is_empty()
            && !events(s, "reading_discarded").is_empty()
    })
    .await;
    let readings = of_type(&mut sub, "/readings");
    assert_eq!(readings.len(), 1, "{readings:?}");
    assert_eq!(
        readings[0]["id"],
        assigned.as_str(),
        "the original reading id"
    );
    assert_eq!(readings[0]["patient"], "p-kiosk-0007");
    let audit = &events(&mut sub, "reading_assigned")[0]["event"];
    assert_eq!(audit["reading_id"], assigned.as_str());
    assert_eq!(audit["staff"], "desk-1");
    assert_eq!(audit["from"], "unattributed");
    assert_eq!(audit["patient"], "p-kiosk-0007");
    assert_eq!(audit["held_reason"], "no_session");
    let gone = &events(&mut sub, "reading_discarded")[0]["event"];
    assert_eq!(gone["reading_id"], discarded.as_str());
    assert_eq!(gone["reason"], "cuff demonstration");
    assert_eq!(gone["staff"], "desk-1");

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_timed_out_attributes_nothing_measured_afterwards() {
    phg_tests::init_tracing();
    let broker = TestBroker::start().unwrap();
    let setup = Setup::new();
    setup.publish_cards(broker.addr()).await;
    let mut sub = Subscriber::connect(broker.addr(), &format!("{}/#", setup.root()))
        .await
        .unwrap();
    let (master, pty_path) = pty();
    let board = BoardThread::start(master);
    // A 2 s idle timeout and a measurement every 5 s.
    let gw = setup.start(&setup.config(&broker, Some(&pty_path), 2, Some((0, 5))));
    board.wait_showing(&[Indication::Ready], "ready").await;
    // Wait for the gateway's link to the board and for the CRM's card map before tapping (a card
    // tapped before the map arrives is unknown, as it should be).
    for line in [
        "card reader board says hello",
        "configuration from the CRM applied",
    ] {
        assert!(
            gw.stderr()
                .wait_for(line, 0, Duration::from_secs(20))
                .await
                .is_some(),
            "never logged {line:?}; log:\n{}",
            gw.stderr().text()
        );
    }
    board.tap(&CARD).await;
    assert!(
        gw.stderr()
            .wait_for("kiosk check-in", 0, Duration::from_secs(20))
            .await
            .is_some(),
        "the card never checked in; log:\n{}",
        gw.stderr().text()
    );
    assert!(
        gw.stderr()
            .wait_for("idle timeout", 0, Duration::from_secs(20))
            .await
            .is_some(),
        "the session never timed out; log:\n{}",
        gw.stderr().text()
    );
    // Whole seconds, and a second of slack for the timer.
    let ended = now_rfc3339(1);
    board
        .wait_showing(&[Indication::Ready], "ready after the time-out")
        .await;
    wait_until(
        &mut sub,
        "a reading measured after the time-out, held",
        |s| {
            events(s, "unattributed").iter().any(|e| {
                e["event"]["reading"]["time"]["corrected"]
                    .as_str()
                    .is_some_and(|t| t > ended.as_str())
            })
        },
    )
    .await;
    for r in of_type(&mut sub, "/readings") {
        let measured = r["time"]["corrected"].as_str().unwrap();
        assert!(
            measured <= ended.as_str(),
            "a reading measured at {measured}, after the session ended at {ended}, was attributed"
        );
    }
    gw.terminate(Duration::from_secs(20)).await.unwrap();
    drop(board);
}
