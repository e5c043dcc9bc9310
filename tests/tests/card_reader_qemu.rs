//! Firmware in the loop (issue 13, 5b): the real thumbv7em board image — built for QEMU's
//! `netduinoplus2` (STM32F405) from the same sources as the Black Pill image — boots in
//! `qemu-system-arm` with its USART1 on a pty, and the gateway's card reader talks to it over the link.
//!
//! What QEMU exercises: the Cortex-M4F image's start-up (cortex-m-rt, the HAL's GPIO/SPI/USART setup on
//! the HSI clock), the firmware's loop, and the link's framing, CRC, acknowledgement and retransmission
//! on the board's own USART. What only hardware can: the MFRC522 (QEMU has no device on SPI1, so the
//! board reports its reader as not responding — which exercises the fault path), the Black Pill's
//! 25 MHz crystal and PLL, the LEDs and buzzer, real cards, and timing (QEMU's SysTick does not run at
//! the rate the HAL programmed).
#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed test

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use gateway::sources::card_reader::{self, Event};
use protocol::link::ReaderFault;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Builds the QEMU image (a no-op when it is up to date; `.ci/run` builds it beforehand).
fn qemu_image() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let target_dir =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    let mut cmd = phg_tests::process::cargo_build().expect("run under cargo (cargo test)");
    cmd.current_dir(&root)
        .args([
            "--quiet",
            "-p",
            "firmware",
            "--release",
            "--target",
            "thumbv7em-none-eabihf",
        ])
        .args([
            "--no-default-features",
            "--features",
            "netduinoplus2",
            "--target-dir",
        ])
        .arg(&target_dir);
    let status = cmd
        .status()
        .expect("running cargo build for the QEMU image");
    assert!(
        status.success(),
        "building the netduinoplus2 image failed: {status}"
    );
    target_dir.join("thumbv7em-none-eabihf/release/netduinoplus2")
}

/// Kills QEMU however the test ends.
struct Qemu(std::process::Child);
impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_board_image_boots_in_qemu_and_speaks_the_link() {
    phg_tests::init_tracing();
    if Command::new("qemu-system-arm")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped: qemu-system-arm not installed (CI installs it)");
        return;
    }
    let image = qemu_image();
    let mut child = Command::new("qemu-system-arm")
        .args([
            "-M",
            "netduinoplus2",
            "-display",
            "none",
            "-monitor",
            "none",
            "-serial",
            "pty",
            "-kernel",
        ])
        .arg(&image)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting qemu-system-arm");
    let stdout = child.stdout.take().unwrap();
    let qemu = Qemu(child);
    // "char device redirected to /dev/pts/N (label serial0)"
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let pts = line
        .split_whitespace()
        .find(|w| w.starts_with("/dev/pts/"))
        .unwrap_or_else(|| panic!("no pty in QEMU's output: {line:?}"))
        .to_owned();

    let (tx, mut events) = mpsc::channel(16);
    let stop = CancellationToken::new();
    let mut config = card_reader::Config::new(&pts);
    config.ping_every = Duration::from_millis(300);
    let (reader, _task) = card_reader::spawn(config, tx, stop.clone());

    // The image started before the port was open: what it sent meanwhile is lost (its first Hello may
    // have been given up), and until a Hello is acknowledged each heartbeat is a Hello again.
    let mut hello = None;
    let mut fault = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while hello.is_none() {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(Event::Hello(h))) => hello = Some(h),
            Ok(Some(Event::Fault(f))) => fault = Some(f),
            Ok(Some(other)) => panic!("unexpected {other:?}"),
            Ok(None) => panic!("card reader task stopped"),
            Err(_) => break,
        }
    }
    // Pings are acknowledged by the board: let a few go round.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let counters = reader.counters();
    stop.cancel();
    drop(qemu);
    println!(
        "QEMU netduinoplus2 image {}: hello {hello:?}, fault {fault:?}\n  gateway link {counters:?}",
        image.display()
    );

    let hello = hello.expect("a Hello from the board image");
    assert_eq!(hello.firmware, firmware::VERSION);
    assert!(!hello.reader_ok, "QEMU has no MFRC522 on SPI1");
    // A Fault may have been given up before the port was open; if it arrived it says why.
    if let Some(f) = fault {
        assert_eq!(f, ReaderFault::NotResponding);
    }
    assert!(
        counters.frames_good >= 3,
        "Hello and the board's Acks of the gateway's Pings: {counters:?}"
    );
    assert_eq!(counters.frames_bad(), 0);
    assert_eq!(
        counters.given_up, 0,
        "every Ping was acknowledged by the image"
    );
}
