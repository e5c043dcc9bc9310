//! The board's loop: serial bytes in → link → `Show` to the indicator; reader polls → presentations →
//! link → serial bytes out. [`Board::step`] takes the time; [`Board::run`] is the forever-loop around it.

use embedded_hal::delay::DelayNs;
use embedded_hal::digital::OutputPin;
use embedded_hal::spi::SpiDevice;
use embedded_io::{Read, ReadReady, Write};
use protocol::link::{BoardEndpoint, BoardMessage, GatewayMessage, Hello, MAX_WIRE, Timing};

use crate::indicator::Indicator;
use crate::reader::{Presence, Reader};

/// How often the reader is polled (a WUPA that no card answers costs the driver's 25 ms timeout).
pub const POLL_MS: u64 = 100;
/// How often the board says it is alive when it has nothing else to say.
pub const HEARTBEAT_MS: u64 = 5_000;
/// The loop's period in [`Board::run`].
pub const TICK_MS: u32 = 5;

/// What resets the board unless fed: the MCU's independent watchdog on the board image. [`Board::run`]
/// feeds it once per completed loop turn, so a turn that never ends (a bus that hangs, a driver stuck
/// waiting) resets the board instead of leaving a kiosk with a dead card reader.
pub trait Watchdog {
    /// Restarts the watchdog's countdown.
    fn feed(&mut self);
}

/// The board's worst loop turn is a reader re-initialisation plus a poll (tens of milliseconds); the
/// watchdog allows this much, with the margin the STM32's LSI clock needs (17–47 kHz, DS10314 §6.3.8).
pub const WATCHDOG_MS: u32 = 2_000;

/// The board: reader, indicator and link, joined.
#[derive(Debug)]
pub struct Board<'a, SPI: SpiDevice, G, R, B, S> {
    reader: Reader<'a, SPI>,
    presence: Presence,
    reader_ok: bool,
    indicator: Indicator<G, R, B>,
    serial: S,
    link: BoardEndpoint,
    board_id: u32,
    /// Whether the gateway acknowledged a `Hello`: until it has, heartbeats are `Hello`s (a gateway
    /// that opens its port after the board started has missed the first one).
    greeted: bool,
    next_poll_ms: u64,
    next_heartbeat_ms: u64,
}

impl<'a, SPI, G, R, B, S> Board<'a, SPI, G, R, B, S>
where
    SPI: SpiDevice,
    G: OutputPin,
    R: OutputPin,
    B: OutputPin,
    S: Read + ReadReady + Write,
{
    /// Starts the board: probes the reader and queues `Hello`.
    pub fn new(
        reader: Reader<'a, SPI>,
        indicator: Indicator<G, R, B>,
        serial: S,
        board_id: u32,
        now_ms: u64,
    ) -> Self {
        let mut board = Self {
            reader,
            presence: Presence::default(),
            reader_ok: false,
            indicator,
            serial,
            link: BoardEndpoint::new(Timing::default()),
            board_id,
            greeted: false,
            next_poll_ms: now_ms.saturating_add(POLL_MS),
            next_heartbeat_ms: now_ms.saturating_add(HEARTBEAT_MS),
        };
        let first = board.reader.poll();
        board.reader_ok = first.is_ok();
        board.hello();
        if let Err(fault) = first {
            board.link.send(BoardMessage::Fault(fault));
        }
        if let Ok(Some(uid)) = first {
            board.presence.observe(Some(uid));
            board.link.send(BoardMessage::CardPresented(uid));
        }
        board
    }

    fn hello(&mut self) {
        self.greeted = false;
        self.link.send(BoardMessage::Hello(Hello {
            firmware: crate::VERSION,
            board_id: self.board_id,
            reader_ok: self.reader_ok,
        }));
    }

    /// One turn of the loop at `now_ms`.
    pub fn step(&mut self, now_ms: u64) {
        self.receive(now_ms);
        if now_ms >= self.next_poll_ms {
            self.next_poll_ms = now_ms.saturating_add(POLL_MS);
            self.poll_reader();
        }
        if now_ms >= self.next_heartbeat_ms {
            self.next_heartbeat_ms = now_ms.saturating_add(HEARTBEAT_MS);
            // Only when idle: any frame in flight already tells the gateway the board is alive.
            if self.link.is_idle() {
                if self.greeted {
                    self.link.send(BoardMessage::Heartbeat);
                } else {
                    self.hello();
                }
            }
        }
        self.transmit(now_ms);
        self.indicator.tick(now_ms);
    }

    fn receive(&mut self, now_ms: u64) {
        let mut buf = [0u8; 32];
        // A serial error (overrun, framing) loses bytes, which the CRC and retransmission cover.
        while let Ok(true) = self.serial.read_ready() {
            let Ok(n) = self.serial.read(&mut buf) else {
                break;
            };
            if n == 0 {
                break;
            }
            for &byte in buf.get(..n).unwrap_or(&[]) {
                match self.link.receive(byte) {
                    Some(GatewayMessage::Show(indication)) => {
                        self.indicator.show(indication, now_ms)
                    }
                    // The Ack it gets is the answer.
                    Some(GatewayMessage::Ping) | Some(GatewayMessage::Ack) | None => {}
                }
                if let Some(BoardMessage::Hello(_)) = self.link.take_acknowledged() {
                    self.greeted = true;
                }
            }
        }
    }

    fn poll_reader(&mut self) {
        match self.reader.poll() {
            Ok(seen) => {
                if !self.reader_ok {
                    // Recovered: a Hello with reader_ok says so.
                    self.reader_ok = true;
                    self.hello();
                }
                if let Some(uid) = self.presence.observe(seen) {
                    self.link.send(BoardMessage::CardPresented(uid));
                }
            }
            Err(fault) => {
                if self.reader_ok {
                    self.reader_ok = false;
                    self.link.send(BoardMessage::Fault(fault));
                }
                // Whatever was on a dead reader is no longer known to be there.
                self.presence = Presence::default();
            }
        }
    }

    fn transmit(&mut self, now_ms: u64) {
        let mut wire = [0u8; MAX_WIRE];
        while let Some(n) = self.link.transmit(now_ms, &mut wire) {
            // A write error loses the frame; retransmission covers a data frame, the peer's own
            // retransmission a lost Ack.
            let _ = self.serial.write_all(wire.get(..n).unwrap_or(&[]));
        }
        let _ = self.serial.flush();
    }

    /// What the link counted.
    pub fn link_counters(&self) -> protocol::link::Counters {
        self.link.counters()
    }

    /// What the indicator shows.
    pub fn showing(&self) -> protocol::link::Indication {
        self.indicator.showing()
    }

    /// How many times the reader was initialised.
    pub fn reader_inits(&self) -> u32 {
        self.reader.inits()
    }

    /// Runs forever: a step every [`TICK_MS`], the time counted from the delays (the loop's own work
    /// is not counted, so time runs a little slow; nothing here needs better). The watchdog is fed after
    /// each completed step.
    pub fn run<D: DelayNs, W: Watchdog>(
        &mut self,
        delay: &mut D,
        watchdog: &mut W,
        start_ms: u64,
    ) -> ! {
        let mut now = start_ms;
        loop {
            self.step(now);
            watchdog.feed();
            delay.delay_ms(TICK_MS);
            now = now.wrapping_add(u64::from(TICK_MS));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{FakeMfrc522, FakePin};
    use core::cell::{Cell, RefCell};
    use protocol::link::{GatewayEndpoint, Indication, ReaderFault, Uid};
    use std::collections::VecDeque;
    use std::rc::Rc;
    use std::vec::Vec;

    /// One end of an in-memory serial line.
    #[derive(Clone, Default)]
    struct Line {
        to_board: Rc<RefCell<VecDeque<u8>>>,
        from_board: Rc<RefCell<Vec<u8>>>,
    }
    impl embedded_io::ErrorType for Line {
        type Error = core::convert::Infallible;
    }
    impl Read for Line {
        fn read(&mut self, buf: &mut [u8]) -> Result<usize, Self::Error> {
            let mut q = self.to_board.borrow_mut();
            let n = buf.len().min(q.len());
            for b in buf.iter_mut().take(n) {
                *b = q.pop_front().unwrap();
            }
            Ok(n)
        }
    }
    impl ReadReady for Line {
        fn read_ready(&mut self) -> Result<bool, Self::Error> {
            Ok(!self.to_board.borrow().is_empty())
        }
    }
    impl Write for Line {
        fn write(&mut self, buf: &[u8]) -> Result<usize, Self::Error> {
            self.from_board.borrow_mut().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> Result<(), Self::Error> {
            Ok(())
        }
    }

    /// The gateway's end, run by hand.
    struct Gateway {
        link: GatewayEndpoint,
        line: Line,
        received: Vec<BoardMessage>,
        ack: bool,
    }
    impl Gateway {
        fn exchange(&mut self, now: u64) {
            let bytes: Vec<u8> = self.line.from_board.borrow_mut().drain(..).collect();
            for b in bytes {
                if let Some(m) = self.link.receive(b) {
                    self.received.push(m);
                }
            }
            let mut wire = [0u8; MAX_WIRE];
            while let Some(n) = self.link.transmit(now, &mut wire) {
                if self.ack || wire[..n] != encode_ack_prefix(&wire[..n]) {
                    self.line.to_board.borrow_mut().extend(&wire[..n]);
                }
            }
        }
    }
    /// Whether a frame is an Ack is visible only after decoding; this returns the frame unchanged
    /// unless it is one, so `!=` means "not an ack".
    fn encode_ack_prefix(frame: &[u8]) -> Vec<u8> {
        let mut d = protocol::link::Decoder::default();
        let is_ack = frame
            .iter()
            .filter_map(|&b| d.push::<GatewayMessage>(b))
            .any(|r| matches!(r, Ok((_, GatewayMessage::Ack))));
        if is_ack { frame.to_vec() } else { Vec::new() }
    }

    struct Rig {
        spi: &'static RefCell<FakeMfrc522>,
        pins: &'static [Cell<bool>; 3],
    }
    fn rig() -> Rig {
        Rig {
            spi: Box::leak(Box::new(RefCell::new(FakeMfrc522::new()))),
            pins: Box::leak(Box::new([
                Cell::new(false),
                Cell::new(false),
                Cell::new(false),
            ])),
        }
    }

    type TestBoard =
        Board<'static, FakeMfrc522, FakePin<'static>, FakePin<'static>, FakePin<'static>, Line>;

    fn start(r: &Rig, ack: bool) -> (TestBoard, Gateway) {
        let line = Line::default();
        let indicator = Indicator::new(
            FakePin(&r.pins[0]),
            FakePin(&r.pins[1]),
            FakePin(&r.pins[2]),
            0,
        );
        let board = Board::new(Reader::new(r.spi), indicator, line.clone(), 0xB0A2D, 0);
        let gw = Gateway {
            link: GatewayEndpoint::new(Timing::default()),
            line,
            received: Vec::new(),
            ack,
        };
        (board, gw)
    }

    fn run(board: &mut TestBoard, gw: &mut Gateway, from: u64, to: u64) {
        let mut t = from;
        while t < to {
            board.step(t);
            gw.exchange(t);
            t += 5;
        }
    }

    /// Counts feeds; the delay ends the forever-loop (by unwinding) after a number of turns.
    #[derive(Default)]
    struct CountingWatchdog(u32);
    impl Watchdog for CountingWatchdog {
        fn feed(&mut self) {
            self.0 += 1;
        }
    }
    struct StopAfter(u32);
    impl DelayNs for StopAfter {
        fn delay_ns(&mut self, _: u32) {}
        fn delay_ms(&mut self, _: u32) {
            self.0 = self.0.checked_sub(1).expect("end of the test's loop turns");
        }
    }

    #[test]
    fn the_watchdog_is_fed_once_per_completed_loop_turn() {
        let r = rig();
        let (mut board, _gw) = start(&r, true);
        let mut watchdog = CountingWatchdog::default();
        let turns = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            board.run(&mut StopAfter(40), &mut watchdog, 0)
        }));
        assert!(turns.is_err(), "run never returns");
        // 41 turns began; the 41st delay ended the loop after its feed.
        assert_eq!(watchdog.0, 41);
    }

    fn uid(b: &[u8]) -> Uid {
        Uid::new(b).unwrap()
    }

    #[test]
    fn a_tap_is_presented_once_while_held_and_again_after_removal() {
        let r = rig();
        let (mut board, mut gw) = start(&r, true);
        run(&mut board, &mut gw, 0, 500);
        assert!(matches!(
            gw.received[..],
            [BoardMessage::Hello(Hello {
                reader_ok: true,
                board_id: 0xB0A2D,
                ..
            })]
        ));
        r.spi.borrow_mut().place_card(&[9, 8, 7, 6, 5, 4, 3]);
        run(&mut board, &mut gw, 500, 3000);
        r.spi.borrow_mut().remove_card();
        run(&mut board, &mut gw, 3000, 4000);
        r.spi.borrow_mut().place_card(&[9, 8, 7, 6, 5, 4, 3]);
        run(&mut board, &mut gw, 4000, 4500);
        let cards: Vec<_> = gw
            .received
            .iter()
            .filter(|m| matches!(m, BoardMessage::CardPresented(_)))
            .collect();
        assert_eq!(
            cards,
            [&BoardMessage::CardPresented(uid(&[9, 8, 7, 6, 5, 4, 3])); 2]
        );
        assert_eq!(board.link_counters().retransmissions, 0);
    }

    #[test]
    fn show_from_the_gateway_drives_the_leds() {
        let r = rig();
        let (mut board, mut gw) = start(&r, true);
        run(&mut board, &mut gw, 0, 200);
        gw.link.send(GatewayMessage::Show(Indication::SeeANurse));
        run(&mut board, &mut gw, 200, 400);
        assert_eq!(board.showing(), Indication::SeeANurse);
        assert!(r.pins[1].get() && !r.pins[0].get(), "red on, green off");
        gw.link.send(GatewayMessage::Show(Indication::ResultOk));
        run(&mut board, &mut gw, 400, 2000);
        assert!(r.pins[0].get() && !r.pins[1].get(), "green on, red off");
        assert!(gw.link.is_idle(), "both Shows acknowledged by the board");
    }

    #[test]
    fn an_unacknowledged_tap_is_retransmitted_and_the_gateway_acts_once() {
        let r = rig();
        let (mut board, mut gw) = start(&r, true);
        run(&mut board, &mut gw, 0, 300);
        r.spi.borrow_mut().place_card(&[1, 2, 3, 4]);
        // The gateway's Acks are lost for a second: the board sends again, the gateway delivers once.
        gw.ack = false;
        run(&mut board, &mut gw, 300, 1300);
        gw.ack = true;
        run(&mut board, &mut gw, 1300, 3000);
        let c = board.link_counters();
        assert!(c.retransmissions >= 2, "{c:?}");
        assert_eq!(c.given_up, 0);
        let cards = gw
            .received
            .iter()
            .filter(|m| matches!(m, BoardMessage::CardPresented(_)))
            .count();
        assert_eq!(cards, 1);
        assert!(gw.link.counters().duplicates >= 2);
    }

    #[test]
    fn a_reader_that_stops_answering_is_reported_once_and_recovers() {
        let r = rig();
        let (mut board, mut gw) = start(&r, true);
        run(&mut board, &mut gw, 0, 300);
        r.spi.borrow_mut().set_alive(false);
        run(&mut board, &mut gw, 300, 2000);
        r.spi.borrow_mut().set_alive(true);
        r.spi.borrow_mut().place_card(&[1, 2, 3, 4]);
        run(&mut board, &mut gw, 2000, 2500);
        let faults = gw
            .received
            .iter()
            .filter(|m| matches!(m, BoardMessage::Fault(ReaderFault::NotResponding)))
            .count();
        assert_eq!(faults, 1, "{:?}", gw.received);
        let hellos: Vec<_> = gw
            .received
            .iter()
            .filter_map(|m| match m {
                BoardMessage::Hello(h) => Some(h.reader_ok),
                _ => None,
            })
            .collect();
        assert_eq!(hellos, [true, true], "start, then recovery");
        assert!(
            matches!(gw.received.last(), Some(BoardMessage::CardPresented(_))),
            "reads cards again"
        );
        assert_eq!(board.reader_inits(), 2);
    }

    #[test]
    fn a_board_without_a_reader_says_so_in_hello() {
        let r = rig();
        r.spi.borrow_mut().set_alive(false);
        let (mut board, mut gw) = start(&r, true);
        run(&mut board, &mut gw, 0, 300);
        assert!(matches!(
            gw.received[..],
            [
                BoardMessage::Hello(Hello {
                    reader_ok: false,
                    ..
                }),
                BoardMessage::Fault(ReaderFault::NotResponding)
            ]
        ));
    }

    #[test]
    fn a_gateway_that_missed_the_hello_gets_it_again_instead_of_a_heartbeat() {
        let r = rig();
        let (mut board, mut gw) = start(&r, true);
        // Nobody listens for 3 s: the Hello is sent 8 times and given up.
        let mut t = 0;
        while t < 3000 {
            board.step(t);
            gw.line.from_board.borrow_mut().clear();
            t += 5;
        }
        assert_eq!(board.link_counters().given_up, 1);
        run(&mut board, &mut gw, 3000, 11_000);
        let kinds: Vec<_> = gw.received.iter().map(core::mem::discriminant).collect();
        let hello = core::mem::discriminant(&gw.received[0]);
        assert!(
            matches!(gw.received[0], BoardMessage::Hello(_)),
            "{:?}",
            gw.received
        );
        assert_eq!(
            kinds.iter().filter(|k| **k == hello).count(),
            1,
            "{:?}",
            gw.received
        );
        assert_eq!(
            gw.received.len(),
            2,
            "then one heartbeat: {:?}",
            gw.received
        );
    }

    #[test]
    fn an_idle_board_sends_heartbeats() {
        let r = rig();
        let (mut board, mut gw) = start(&r, true);
        run(&mut board, &mut gw, 0, 11_000);
        let beats = gw
            .received
            .iter()
            .filter(|m| matches!(m, BoardMessage::Heartbeat))
            .count();
        assert_eq!(beats, 2);
    }
}
