//! The kiosk card reader end to end without hardware (issue 13, 5a): the firmware's own logic (its
//! `Board` loop, with the register-level fake MFRC522 the `mfrc522` driver runs against unchanged) on
//! one end of a pseudo-terminal pair, the gateway's card reader (`tokio-serial`) on the other.
#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed test

use std::cell::{Cell, RefCell};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc as std_mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use firmware::board::Board;
use firmware::indicator::Indicator;
use firmware::reader::Reader;
use firmware::testing::{FakeMfrc522, FakePin};
use gateway::sources::card_reader::{self, CardReader, Event};
use protocol::link::{Counters, Indication, Uid};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// A new pseudo-terminal: the master (the board's end) in raw mode, and the slave's path (the
/// gateway's "serial port").
fn pty() -> (OwnedFd, PathBuf) {
    use rustix::pty::{OpenptFlags, grantpt, openpt, ptsname, unlockpt};
    let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC).unwrap();
    grantpt(&master).unwrap();
    unlockpt(&master).unwrap();
    // Raw from the start: with the default line discipline the board's first frames would be echoed
    // back to it and 0x0A rewritten, before the gateway opens the port and sets it raw itself.
    let mut termios = rustix::termios::tcgetattr(&master).unwrap();
    termios.make_raw();
    rustix::termios::tcsetattr(&master, rustix::termios::OptionalActions::Now, &termios).unwrap();
    let name = ptsname(&master, Vec::new()).unwrap();
    (master, PathBuf::from(name.to_str().unwrap()))
}

/// The board's serial port: the pty master, with optional damage (every `corrupt_every`-th byte,
/// in either direction, gets a bit flipped).
struct PtySerial {
    fd: OwnedFd,
    corrupt_every: usize,
    bytes: usize,
    damaged: Arc<AtomicUsize>,
}

impl PtySerial {
    fn damage(&mut self, b: &mut u8) {
        self.bytes += 1;
        if self.corrupt_every > 0 && self.bytes.is_multiple_of(self.corrupt_every) {
            *b ^= 0x24;
            self.damaged.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl embedded_io::ErrorType for PtySerial {
    type Error = embedded_io::ErrorKind;
}

impl embedded_io::ReadReady for PtySerial {
    fn read_ready(&mut self) -> Result<bool, Self::Error> {
        use rustix::event::{PollFd, PollFlags, Timespec, poll};
        let mut fds = [PollFd::new(&self.fd, PollFlags::IN)];
        let zero = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        poll(&mut fds, Some(&zero)).map_err(|_| embedded_io::ErrorKind::Other)?;
        let revents = fds[0].revents();
        if revents.contains(PollFlags::HUP) && !revents.contains(PollFlags::IN) {
            // Nobody has the slave open (the gateway reopens it): nothing to read.
            return Ok(false);
        }
        Ok(revents.contains(PollFlags::IN))
    }
}

impl embedded_io::Read for PtySerial {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, Self::Error> {
        let n = rustix::io::read(&self.fd, &mut *buf).map_err(|_| embedded_io::ErrorKind::Other)?;
        for b in &mut buf[..n] {
            self.damage(b);
        }
        Ok(n)
    }
}

impl embedded_io::Write for PtySerial {
    fn write(&mut self, buf: &[u8]) -> Result<usize, Self::Error> {
        let mut out = buf.to_vec();
        for b in &mut out {
            self.damage(b);
        }
        let mut written = 0;
        while written < out.len() {
            written += rustix::io::write(&self.fd, &out[written..])
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
    /// The MFRC522 stops (or starts again) answering on its bus.
    ReaderAlive(bool),
}

#[derive(Debug, Clone, Copy)]
struct View {
    showing: Indication,
    counters: Counters,
}

/// The firmware's `Board` in a thread, in real time, on `master`.
struct BoardThread {
    cmds: std_mpsc::Sender<Cmd>,
    view: Arc<Mutex<View>>,
    damaged: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl BoardThread {
    fn start(master: OwnedFd, corrupt_every: usize) -> Self {
        let (cmds, rx) = std_mpsc::channel();
        let view = Arc::new(Mutex::new(View {
            showing: Indication::Ready,
            counters: Counters::default(),
        }));
        let damaged = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (v, d, s) = (view.clone(), damaged.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let spi = RefCell::new(FakeMfrc522::new());
            let pins = [Cell::new(false), Cell::new(false), Cell::new(false)];
            let indicator =
                Indicator::new(FakePin(&pins[0]), FakePin(&pins[1]), FakePin(&pins[2]), 0);
            let serial = PtySerial {
                fd: master,
                corrupt_every,
                bytes: 0,
                damaged: d,
            };
            let start = Instant::now();
            let mut board = Board::new(Reader::new(&spi), indicator, serial, 0x7E57, 0);
            while !s.load(Ordering::Relaxed) {
                while let Ok(cmd) = rx.try_recv() {
                    match cmd {
                        Cmd::Place(uid) => spi.borrow_mut().place_card(&uid),
                        Cmd::Remove => spi.borrow_mut().remove_card(),
                        Cmd::ReaderAlive(alive) => spi.borrow_mut().set_alive(alive),
                    }
                }
                board.step(start.elapsed().as_millis() as u64);
                *v.lock().unwrap() = View {
                    showing: board.showing(),
                    counters: board.link_counters(),
                };
                std::thread::sleep(Duration::from_millis(2));
            }
            // Dropping the board closes the master: the "cable" is pulled.
        });
        Self {
            cmds,
            view,
            damaged,
            thread: Some(thread),
            stop,
        }
    }

    fn view(&self) -> View {
        *self.view.lock().unwrap()
    }

    fn unplug(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
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

fn gateway_side(path: &Path) -> (CardReader, mpsc::Receiver<Event>, CancellationToken) {
    let (tx, rx) = mpsc::channel(16);
    let stop = CancellationToken::new();
    let mut config = card_reader::Config::new(path);
    config.reopen_every = Duration::from_millis(100);
    let (reader, _task) = card_reader::spawn(config, tx, stop.clone());
    (reader, rx, stop)
}

async fn next_event(rx: &mut mpsc::Receiver<Event>, what: &str) -> Event {
    tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .unwrap_or_else(|_| panic!("no {what} within 20 s"))
        .expect("card reader task stopped")
}

/// Events other than Hello within `d` (Hellos are the board's idempotent start message).
async fn events_for(rx: &mut mpsc::Receiver<Event>, d: Duration) -> Vec<Event> {
    let mut out = Vec::new();
    let end = tokio::time::Instant::now() + d;
    while let Ok(Some(e)) = tokio::time::timeout_at(end, rx.recv()).await {
        out.push(e);
    }
    out
}

async fn wait_showing(board: &BoardThread, want: Indication) {
    let end = Instant::now() + Duration::from_secs(20);
    while board.view().showing != want {
        assert!(Instant::now() < end, "the board never showed {want:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const CARD: [u8; 7] = [0x04, 0x5A, 0x3C, 0x21, 0x7F, 0x61, 0x80];

/// Tap → exactly one `CardPresented` at the gateway while the card is held → `Show` → the board shows
/// it; run once on a clean line and once with every 23rd byte damaged in both directions.
async fn tap_round_trip(corrupt_every: usize) -> (Counters, Counters, usize) {
    phg_tests::init_tracing();
    let (master, path) = pty();
    let board = BoardThread::start(master, corrupt_every);
    let (reader, mut events, stop) = gateway_side(&path);

    let Event::Hello(hello) = next_event(&mut events, "Hello").await else {
        panic!("Hello first")
    };
    assert!(hello.reader_ok);
    assert_eq!(hello.board_id, 0x7E57);
    let status = reader.status();
    assert!(
        status.port_open && status.last_heard.is_some(),
        "{status:?}"
    );
    assert_eq!((status.reader_ok, status.last_fault), (Some(true), None));

    board.cmds.send(Cmd::Place(CARD.to_vec())).unwrap();
    // Held for 3 s: about 30 reader polls, one presentation.
    let got = events_for(&mut events, Duration::from_secs(3)).await;
    let taps: Vec<_> = got
        .iter()
        .filter(|e| matches!(e, Event::CardPresented(_)))
        .collect();
    assert_eq!(
        taps,
        [&Event::CardPresented(Uid::new(&CARD).unwrap())],
        "all events: {got:?}"
    );

    assert!(reader.show(Indication::CheckedIn).await);
    wait_showing(&board, Indication::CheckedIn).await;
    assert!(reader.show(Indication::SeeANurse).await);
    wait_showing(&board, Indication::SeeANurse).await;

    // Removed and tapped again: a second presentation.
    board.cmds.send(Cmd::Remove).unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    board.cmds.send(Cmd::Place(CARD.to_vec())).unwrap();
    loop {
        if let Event::CardPresented(uid) = next_event(&mut events, "second tap").await {
            assert_eq!(uid.as_bytes(), CARD);
            break;
        }
    }
    let gateway = reader.counters();
    let board_counters = board.view().counters;
    let damaged = board.damaged.load(Ordering::Relaxed);
    stop.cancel();
    (gateway, board_counters, damaged)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tap_reaches_the_gateway_once_and_its_show_reaches_the_board() {
    let (gateway, board, _) = tap_round_trip(0).await;
    println!("clean line: gateway {gateway:?}\n            board {board:?}");
    assert_eq!(gateway.frames_bad(), 0);
    assert_eq!(board.frames_bad(), 0);
    assert_eq!(gateway.given_up + board.given_up, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_damaged_bytes_the_tap_still_arrives_once_and_the_damage_is_counted() {
    let (gateway, board, damaged) = tap_round_trip(23).await;
    println!(
        "every 23rd byte damaged ({damaged} bytes):\n  gateway {gateway:?} frames_bad={}\n  board   {board:?} frames_bad={}",
        gateway.frames_bad(),
        board.frames_bad()
    );
    assert!(damaged > 0);
    assert!(
        gateway.frames_bad() + board.frames_bad() > 0,
        "damage must be seen and dropped"
    );
    assert!(
        board.retransmissions + gateway.retransmissions > 0,
        "and repaired by retransmission"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unplugged_board_is_reopened_when_it_comes_back() {
    phg_tests::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    // The stable name a udev rule (or /dev/serial/by-id) gives the board; the pty behind it changes.
    let link = dir.path().join("card-reader");
    let (master, pts) = pty();
    std::os::unix::fs::symlink(&pts, &link).unwrap();
    let board = BoardThread::start(master, 0);
    let (reader, mut events, stop) = gateway_side(&link);
    assert!(matches!(
        next_event(&mut events, "Hello").await,
        Event::Hello(_)
    ));

    assert!(reader.answering(tokio::time::Instant::now()));

    board.unplug();
    std::fs::remove_file(&link).unwrap();
    loop {
        if next_event(&mut events, "Unplugged").await == Event::Unplugged {
            break;
        }
    }
    // What the staff page shows meanwhile: the board is gone.
    assert!(!reader.status().port_open);
    assert!(!reader.answering(tokio::time::Instant::now()));
    // Away for a while: the gateway keeps trying (and logs the streak once).
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Reopening failed meanwhile: reported once for the streak, not once per attempt.
    let away = events_for(&mut events, Duration::from_millis(100)).await;
    assert_eq!(
        away.iter()
            .filter(|e| matches!(e, Event::OpenFailed(_)))
            .count(),
        1,
        "{away:?}"
    );

    let (master, pts) = pty();
    std::os::unix::fs::symlink(&pts, &link).unwrap();
    let board = BoardThread::start(master, 0);
    assert!(matches!(
        next_event(&mut events, "Hello after replug").await,
        Event::Hello(_)
    ));
    board.cmds.send(Cmd::Place(CARD.to_vec())).unwrap();
    loop {
        if let Event::CardPresented(uid) = next_event(&mut events, "tap after replug").await {
            assert_eq!(uid.as_bytes(), CARD);
            break;
        }
    }
    assert!(reader.show(Indication::ResultOk).await);
    wait_showing(&board, Indication::ResultOk).await;
    assert!(reader.answering(tokio::time::Instant::now()));
    stop.cancel();
}

/// The board's MFRC522 stops answering while the board itself runs on: the gateway hears a `Fault`,
/// and its state (what the staff page shows) says the board answers but its reader does not work;
/// when the reader comes back the board says hello again and the state says so, keeping the last fault.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_card_reader_is_reported_while_the_board_still_answers() {
    use protocol::link::ReaderFault;
    phg_tests::init_tracing();
    let (master, path) = pty();
    let board = BoardThread::start(master, 0);
    let (reader, mut events, stop) = gateway_side(&path);
    assert!(matches!(
        next_event(&mut events, "Hello").await,
        Event::Hello(h) if h.reader_ok
    ));

    board.cmds.send(Cmd::ReaderAlive(false)).unwrap();
    loop {
        if let Event::Fault(fault) = next_event(&mut events, "Fault").await {
            assert_eq!(fault, ReaderFault::NotResponding);
            break;
        }
    }
    let status = reader.status();
    assert_eq!(status.reader_ok, Some(false), "{status:?}");
    assert_eq!(status.last_fault, Some(ReaderFault::NotResponding));
    assert!(
        reader.answering(tokio::time::Instant::now()),
        "the board itself still answers"
    );

    board.cmds.send(Cmd::ReaderAlive(true)).unwrap();
    loop {
        if let Event::Hello(hello) = next_event(&mut events, "Hello after recovery").await
            && hello.reader_ok
        {
            break;
        }
    }
    let status = reader.status();
    assert_eq!(status.reader_ok, Some(true), "{status:?}");
    assert_eq!(status.last_fault, Some(ReaderFault::NotResponding), "kept");
    stop.cancel();
}
