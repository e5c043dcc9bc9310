//! The card reader: an NXP MFRC522 on SPI, driven through the `mfrc522` crate.
//!
//! A reader can vanish (a loose cable, a brown-out) and come back. The driver cannot tell: a dead chip
//! reads as 0x00 or 0xFF on MISO, and its `transceive` loop waits for an interrupt bit forever on 0x00.
//! So every poll first reads the version register (the same two-byte SPI transfer the driver's
//! `version()` makes); a reader that answers 0x00 or 0xFF is taken as gone, and the next poll probes it
//! again and, once it answers, re-initialises it from scratch (soft reset, timer, antenna).
//!
//! The driver's `init` consumes it and drops its bus on failure, so the reader keeps the SPI device in a
//! `RefCell` and lends the driver a [`SharedSpi`] handle it can always make again.

use core::cell::RefCell;

use embedded_hal::spi::{Operation, SpiDevice};
use mfrc522::comm::blocking::spi::{DummyDelay, SpiInterface};
use mfrc522::{Initialized, Mfrc522};
use protocol::link::{ReaderFault, Uid};

/// The MFRC522's version register address as the SPI read byte (register 0x37, MFRC522 §8.1.2.3).
const READ_VERSION: u8 = (0x37 << 1) | 0x80;

/// An `SpiDevice` that borrows the real one for each transaction.
#[derive(Debug)]
pub struct SharedSpi<'a, SPI>(&'a RefCell<SPI>);

impl<SPI> Clone for SharedSpi<'_, SPI> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<SPI> Copy for SharedSpi<'_, SPI> {}

impl<SPI: SpiDevice> embedded_hal::spi::ErrorType for SharedSpi<'_, SPI> {
    type Error = SPI::Error;
}

impl<SPI: SpiDevice> SpiDevice for SharedSpi<'_, SPI> {
    fn transaction(&mut self, operations: &mut [Operation<'_, u8>]) -> Result<(), Self::Error> {
        // Never re-entered: the reader is single-threaded and the driver makes one transaction at a time.
        self.0.borrow_mut().transaction(operations)
    }
}

type Driver<'a, SPI> = Mfrc522<SpiInterface<SharedSpi<'a, SPI>, DummyDelay>, Initialized>;

/// The reader: probed, initialised on demand, polled for a card.
pub struct Reader<'a, SPI: SpiDevice> {
    spi: &'a RefCell<SPI>,
    driver: Option<Driver<'a, SPI>>,
    inits: u32,
}

impl<SPI: SpiDevice> core::fmt::Debug for Reader<'_, SPI> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Reader")
            .field("up", &self.driver.is_some())
            .field("inits", &self.inits)
            .finish()
    }
}

impl<'a, SPI: SpiDevice> Reader<'a, SPI> {
    /// A reader on this SPI device; nothing is sent until the first [`Reader::poll`].
    pub fn new(spi: &'a RefCell<SPI>) -> Self {
        Self {
            spi,
            driver: None,
            inits: 0,
        }
    }

    /// How many times the chip was initialised (the first time and after each fault).
    pub fn inits(&self) -> u32 {
        self.inits
    }

    /// Reads the version register directly. 0x00 and 0xFF are what MISO reads with no chip behind it.
    fn probe(&mut self) -> Result<u8, ReaderFault> {
        let mut buf = [READ_VERSION, 0];
        SharedSpi(self.spi)
            .transfer_in_place(&mut buf)
            .map_err(|_| ReaderFault::Bus)?;
        match buf[1] {
            0x00 | 0xFF => Err(ReaderFault::NotResponding),
            version => Ok(version),
        }
    }

    /// Checks the reader, (re-)initialising it if needed, and asks for a card: `Ok(Some(uid))` if one
    /// answered, `Ok(None)` if none did, `Err` if the reader is not working (it is then re-initialised
    /// at a later poll, once it answers again).
    pub fn poll(&mut self) -> Result<Option<Uid>, ReaderFault> {
        if let Err(fault) = self.probe() {
            self.driver = None;
            return Err(fault);
        }
        let driver = match self.driver.as_mut() {
            Some(driver) => driver,
            None => {
                self.inits = self.inits.wrapping_add(1);
                let fresh = Mfrc522::new(SpiInterface::new(SharedSpi(self.spi)))
                    .init()
                    .map_err(|_| ReaderFault::Init)?;
                self.driver.insert(fresh)
            }
        };
        // WUPA, not REQA: a card we halted after reading answers WUPA again, so a held card keeps being
        // seen and stays one presentation (ISO/IEC 14443-3 §6.3: HALT state, woken by WUPA only).
        let Ok(atqa) = driver.wupa() else {
            return Ok(None);
        };
        let Ok(uid) = driver.select(&atqa) else {
            return Ok(None);
        };
        // The card's answer to HLTA is none; either way it is read.
        let _ = driver.hlta();
        Ok(Uid::new(uid.as_bytes()))
    }
}

/// Turns polls into presentations: a card is presented when first seen and stays the same presentation
/// while it is held; it counts as removed only after [`Presence::REMOVED_AFTER`] polls without it, so a
/// card at the edge of the field that misses a poll is not tapped twice.
#[derive(Debug, Default, Clone)]
pub struct Presence {
    current: Option<Uid>,
    misses: u8,
}

impl Presence {
    /// Consecutive polls without the card before it counts as removed (at 100 ms a poll: 0.3 s).
    pub const REMOVED_AFTER: u8 = 3;

    /// Takes one poll's result; returns the UID if this is a new presentation.
    pub fn observe(&mut self, seen: Option<Uid>) -> Option<Uid> {
        match seen {
            Some(uid) if self.current == Some(uid) => {
                self.misses = 0;
                None
            }
            Some(uid) => {
                self.current = Some(uid);
                self.misses = 0;
                Some(uid)
            }
            None => {
                if self.current.is_some() {
                    self.misses = self.misses.saturating_add(1);
                    if self.misses >= Self::REMOVED_AFTER {
                        self.current = None;
                        self.misses = 0;
                    }
                }
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::FakeMfrc522;
    use embedded_hal_mock::eh1::spi::{Mock, Transaction as T};

    fn uid(b: &[u8]) -> Uid {
        Uid::new(b).unwrap()
    }

    #[test]
    fn a_card_is_read_through_the_driver() {
        for bytes in [
            &[0x04, 0xA2, 0x2B, 0x1A][..],
            &[0x04, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66][..],
        ] {
            let spi = RefCell::new(FakeMfrc522::new());
            let mut reader = Reader::new(&spi);
            assert_eq!(reader.poll(), Ok(None));
            spi.borrow_mut().place_card(bytes);
            assert_eq!(reader.poll(), Ok(Some(uid(bytes))));
            assert_eq!(
                reader.poll(),
                Ok(Some(uid(bytes))),
                "a held, halted card answers WUPA"
            );
            assert_eq!(reader.inits(), 1);
        }
    }

    /// The exact SPI bytes of a poll on a reader that has stopped answering: one version read
    /// (MFRC522 §8.1.2.3: address byte `1 | 0x37 | 0` = 0xEE, then a dummy byte), MISO all zeros — and
    /// nothing else: no `transceive`, whose interrupt wait would never end on a dead chip.
    #[test]
    fn a_dead_reader_is_probed_with_one_version_read_and_nothing_more() {
        let mut mock = Mock::new(&[
            T::transaction_start(),
            T::transfer_in_place(vec![0xEE, 0x00], vec![0x00, 0x00]),
            T::transaction_end(),
            T::transaction_start(),
            T::transfer_in_place(vec![0xEE, 0x00], vec![0xFF, 0xFF]),
            T::transaction_end(),
        ]);
        let spi = RefCell::new(mock.clone());
        let mut reader = Reader::new(&spi);
        assert_eq!(reader.poll(), Err(ReaderFault::NotResponding));
        assert_eq!(reader.poll(), Err(ReaderFault::NotResponding));
        assert_eq!(reader.inits(), 0);
        mock.done();
    }

    /// The exact SPI transactions of a poll with no card on an initialised reader, as the mfrc522
    /// crate issues them for WUPA (its `transceive`): version probe, Idle, clear IRQs, flush FIFO,
    /// 0x52 into the FIFO, Transceive, StartSend with 7 bits, then the IRQ read that shows the timer.
    #[test]
    fn a_poll_without_a_card_is_one_wupa_that_times_out() {
        let write = |reg: u8, v: u8| {
            [
                T::transaction_start(),
                T::write_vec(vec![reg << 1, v]),
                T::transaction_end(),
            ]
        };
        let read = |reg: u8, v: u8| {
            [
                T::transaction_start(),
                T::transfer_in_place(vec![(reg << 1) | 0x80, 0], vec![0, v]),
                T::transaction_end(),
            ]
        };
        let mut expected = Vec::new();
        expected.extend(read(0x37, 0x92)); // VersionReg: an MFRC522 v2.0
        expected.extend(write(0x01, 0x00)); // CommandReg = Idle
        expected.extend(write(0x04, 0x7F)); // ComIrqReg: clear all
        expected.extend(write(0x0A, 0x80)); // FIFOLevelReg: flush
        expected.extend([
            T::transaction_start(),
            T::write_vec(vec![0x09 << 1]),
            T::write_vec(vec![0x52]), // FIFODataReg <- WUPA
            T::transaction_end(),
        ]);
        expected.extend(write(0x01, 0x0C)); // CommandReg = Transceive
        expected.extend(write(0x0D, 0x87)); // BitFramingReg: StartSend, 7 bits (a short frame)
        expected.extend(read(0x04, 0x01)); // ComIrqReg: TimerIRq, no card answered
        let mut mock = Mock::new(&expected);

        // Initialise on the fake, then swap the mock in: init is the driver's business, the poll ours.
        let fake = RefCell::new(crate::testing::Either::A(FakeMfrc522::new()));
        let mut reader = Reader::new(&fake);
        assert_eq!(reader.poll(), Ok(None));
        *fake.borrow_mut() = crate::testing::Either::B(mock.clone());
        assert_eq!(reader.poll(), Ok(None));
        mock.done();
    }

    #[test]
    fn a_reader_that_stops_answering_faults_then_is_reinitialised() {
        let spi = RefCell::new(FakeMfrc522::new());
        let mut reader = Reader::new(&spi);
        spi.borrow_mut().place_card(&[1, 2, 3, 4]);
        assert_eq!(reader.poll(), Ok(Some(uid(&[1, 2, 3, 4]))));
        spi.borrow_mut().set_alive(false);
        assert_eq!(reader.poll(), Err(ReaderFault::NotResponding));
        assert_eq!(reader.poll(), Err(ReaderFault::NotResponding));
        spi.borrow_mut().set_alive(true);
        let resets = spi.borrow().soft_resets();
        assert_eq!(reader.poll(), Ok(Some(uid(&[1, 2, 3, 4]))));
        assert_eq!(reader.inits(), 2);
        assert_eq!(
            spi.borrow().soft_resets(),
            resets + 1,
            "re-initialised with a soft reset"
        );
    }

    #[test]
    fn a_held_card_is_one_presentation_until_removed() {
        let a = uid(&[1, 2, 3, 4]);
        let b = uid(&[5, 6, 7, 8]);
        let mut p = Presence::default();
        assert_eq!(p.observe(Some(a)), Some(a));
        assert_eq!(p.observe(Some(a)), None);
        // A flicker shorter than REMOVED_AFTER polls is still the same presentation.
        assert_eq!(p.observe(None), None);
        assert_eq!(p.observe(None), None);
        assert_eq!(p.observe(Some(a)), None);
        for _ in 0..Presence::REMOVED_AFTER {
            assert_eq!(p.observe(None), None);
        }
        assert_eq!(p.observe(Some(a)), Some(a), "removed, then tapped again");
        assert_eq!(p.observe(Some(b)), Some(b), "another card swapped in");
    }
}
