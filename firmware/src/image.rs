//! The board image: this crate's logic on an STM32F4, for a bare-metal target only (docs/card-reader.md
//! has the wiring). `src/bin/black-pill.rs` and `src/bin/netduinoplus2.rs` are its two entry points.
//!
//! - feature `black-pill` (the default): WeAct STM32F411CEU6 "Black Pill", 25 MHz crystal, 96 MHz.
//! - feature `netduinoplus2` (with `--no-default-features`): the STM32F405 of QEMU's `netduinoplus2`
//!   machine, on the 16 MHz HSI (QEMU 7.2 does not model the clock controller: a wait for a PLL lock
//!   never ends). Same pins, same logic.
#[cfg(all(feature = "black-pill", feature = "netduinoplus2"))]
compile_error!("choose one board: `black-pill` or `netduinoplus2` (with --no-default-features)");

use core::cell::RefCell;

use crate::board::Board;
use crate::indicator::Indicator;
use crate::reader::Reader;
use embedded_hal_bus::spi::ExclusiveDevice;
use embedded_hal_nb::serial::Read as _;
use panic_halt as _;
use stm32f4xx_hal::pac::USART1;
use stm32f4xx_hal::serial::{Rx, Tx};
use stm32f4xx_hal::{nb, pac, prelude::*, rcc::Config};

/// USART1 as the embedded-io port the board logic wants (the HAL implements only `Write` for it).
struct Port {
    tx: Tx<USART1>,
    rx: Rx<USART1>,
    peeked: Option<u8>,
}

impl embedded_io::ErrorType for Port {
    type Error = stm32f4xx_hal::serial::Error;
}

impl embedded_io::ReadReady for Port {
    fn read_ready(&mut self) -> Result<bool, Self::Error> {
        if self.peeked.is_none() {
            match self.rx.read() {
                Ok(byte) => self.peeked = Some(byte),
                Err(nb::Error::WouldBlock) => {}
                Err(nb::Error::Other(e)) => return Err(e),
            }
        }
        Ok(self.peeked.is_some())
    }
}

impl embedded_io::Read for Port {
    /// Returns what has arrived, at least one byte if any has (it does not wait: the board loop
    /// asks `read_ready` first).
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, Self::Error> {
        let mut n = 0;
        for slot in buf.iter_mut() {
            let byte = match self.peeked.take() {
                Some(byte) => byte,
                None => match self.rx.read() {
                    Ok(byte) => byte,
                    Err(nb::Error::WouldBlock) => break,
                    Err(nb::Error::Other(e)) if n == 0 => return Err(e),
                    Err(nb::Error::Other(_)) => break,
                },
            };
            *slot = byte;
            n += 1;
        }
        Ok(n)
    }
}

impl embedded_io::Write for Port {
    fn write(&mut self, buf: &[u8]) -> Result<usize, Self::Error> {
        embedded_io::Write::write(&mut self.tx, buf)
    }
    fn flush(&mut self) -> Result<(), Self::Error> {
        embedded_io::Write::flush(&mut self.tx)
    }
}

/// The STM32's independent watchdog (RM0383 §17): clocked by the LSI, so it resets a board whose
/// main clock or loop stopped.
struct Iwdg(stm32f4xx_hal::watchdog::IndependentWatchdog);

impl crate::board::Watchdog for Iwdg {
    fn feed(&mut self) {
        self.0.feed();
    }
}

/// A number for this board in `Hello`: the 96-bit factory id folded to 32 bits (RM0383 §24.1).
#[cfg(feature = "black-pill")]
fn board_id() -> u32 {
    let uid = stm32f4xx_hal::signature::Uid::get();
    let lot = uid
        .lot_num()
        .bytes()
        .fold(0u32, |h, b| h.rotate_left(5) ^ u32::from(b));
    (u32::from(uid.x()) << 16 | u32::from(uid.y())) ^ lot ^ u32::from(uid.waf_num())
}

/// QEMU does not map the factory id's system-memory page: reading it would fault.
#[cfg(feature = "netduinoplus2")]
fn board_id() -> u32 {
    0x0E_4D_00_02
}

/// Sets the board up and runs the card reader forever.
pub fn run() -> ! {
    // `take` is `None` only on a second call; there is none, so halting is unreachable in practice.
    let (Some(dp), Some(cp)) = (pac::Peripherals::take(), cortex_m::Peripherals::take()) else {
        #[allow(clippy::empty_loop)]
        loop {}
    };
    #[cfg(feature = "black-pill")]
    let config = Config::hse(25.MHz()).sysclk(96.MHz());
    #[cfg(feature = "netduinoplus2")]
    let config = Config::hsi();
    let mut rcc = dp.RCC.freeze(config);
    let gpioa = dp.GPIOA.split(&mut rcc);
    let gpiob = dp.GPIOB.split(&mut rcc);

    // The MFRC522 on SPI1 (mode 0, 1 MHz: well under its 10 MHz, robust on a flying lead); NSS on
    // PA4 driven by embedded-hal-bus; its reset line (PB0) held high.
    let mut reset = gpiob.pb0.into_push_pull_output();
    reset.set_high();
    let bus = dp.SPI1.spi(
        (Some(gpioa.pa5), Some(gpioa.pa6), Some(gpioa.pa7)),
        embedded_hal::spi::MODE_0,
        1.MHz(),
        &mut rcc,
    );
    // The chip-select pin's error type is `Infallible`: this cannot fail.
    let Ok(spi) = ExclusiveDevice::new_no_delay(bus, gpioa.pa4.into_push_pull_output());
    let spi = RefCell::new(spi);

    // The link on USART1 (PA9 TX, PA10 RX), 115 200 8N1.
    let Ok(serial) = dp
        .USART1
        .serial((gpioa.pa9, gpioa.pa10), 115_200.bps(), &mut rcc)
    else {
        #[allow(clippy::empty_loop)]
        loop {}
    };
    let (tx, rx) = serial.split();
    let port = Port {
        tx,
        rx,
        peeked: None,
    };

    let indicator = Indicator::new(
        gpiob.pb12.into_push_pull_output(),
        gpiob.pb13.into_push_pull_output(),
        gpiob.pb14.into_push_pull_output(),
        0,
    );
    let mut delay = cp.SYST.delay(&rcc.clocks);
    let mut board = Board::new(Reader::new(&spi), indicator, port, board_id(), 0);
    // Started last, after the reader's first probe in `Board::new`. QEMU 7.2's netduinoplus2 does not
    // model the IWDG (its registers read 0 and ignore writes), so there it never fires: only hardware
    // exercises a reset.
    let mut watchdog = Iwdg(stm32f4xx_hal::watchdog::IndependentWatchdog::new(dp.IWDG));
    watchdog.0.start(crate::board::WATCHDOG_MS.millis());
    board.run(&mut delay, &mut watchdog, 0)
}
