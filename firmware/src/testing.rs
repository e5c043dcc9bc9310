//! A register-level fake MFRC522 behind `SpiDevice`, with a scripted ISO/IEC 14443-A card: enough of the
//! chip (FIFO, command register, CRC coprocessor, interrupt flags) for the `mfrc522` crate's `init`,
//! `version`, `wupa`/`reqa`, `select` (cascade levels 1–3) and `hlta` to run unchanged against it.
//!
//! It reads much better than ~70 scripted SPI transactions per tap (TOOLCHAIN.md); exact transactions are
//! asserted with embedded-hal-mock where the bytes themselves are the point (`reader` tests).

use embedded_hal::spi::{ErrorKind, ErrorType, Operation, SpiDevice};

const COMMAND: usize = 0x01;
const COM_IRQ: usize = 0x04;
const DIV_IRQ: usize = 0x05;
const FIFO_DATA: usize = 0x09;
const FIFO_LEVEL: usize = 0x0A;
const BIT_FRAMING: usize = 0x0D;
const CRC_HIGH: usize = 0x21;
const CRC_LOW: usize = 0x22;
const VERSION: usize = 0x37;

const CMD_IDLE: u8 = 0x00;
const CMD_CALC_CRC: u8 = 0x03;
const CMD_TRANSCEIVE: u8 = 0x0C;
const CMD_SOFT_RESET: u8 = 0x0F;

const TIMER_IRQ: u8 = 0x01;
const IDLE_IRQ: u8 = 0x10;
const RX_IRQ: u8 = 0x20;
const CRC_IRQ: u8 = 0x04;

/// ISO/IEC 14443-3 CRC_A (§6.2.4: CRC-16/ISO-IEC-14443-3-A, preset 0x6363), low byte first.
pub fn crc_a(data: &[u8]) -> [u8; 2] {
    let mut crc: u16 = 0x6363;
    for &b in data {
        let mut x = b ^ (crc as u8);
        x ^= x << 4;
        crc = (crc >> 8) ^ (u16::from(x) << 8) ^ (u16::from(x) << 3) ^ (u16::from(x) >> 4);
    }
    crc.to_le_bytes()
}

#[derive(Debug, Clone, Copy)]
struct Card {
    uid: [u8; 10],
    len: usize,
    halted: bool,
}

/// The fake reader.
#[derive(Debug, Clone)]
pub struct FakeMfrc522 {
    regs: [u8; 64],
    fifo: [u8; 64],
    fifo_len: usize,
    card: Option<Card>,
    alive: bool,
    soft_resets: u32,
    transactions: u32,
}

impl Default for FakeMfrc522 {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeMfrc522 {
    /// A working MFRC522 (version 0x92) with no card on it.
    pub fn new() -> Self {
        let mut regs = [0; 64];
        regs[VERSION] = 0x92;
        Self {
            regs,
            fifo: [0; 64],
            fifo_len: 0,
            card: None,
            alive: true,
            soft_resets: 0,
            transactions: 0,
        }
    }

    /// Puts a card with this UID (4, 7 or 10 bytes) on the reader.
    pub fn place_card(&mut self, uid: &[u8]) {
        let mut card = Card {
            uid: [0; 10],
            len: uid.len().min(10),
            halted: false,
        };
        card.uid[..card.len].copy_from_slice(&uid[..card.len]);
        self.card = Some(card);
    }

    /// Takes the card away.
    pub fn remove_card(&mut self) {
        self.card = None;
    }

    /// Whether the chip answers; a dead one reads 0x00 on MISO and ignores writes. Coming back alive is a
    /// power-on: every register at its reset value, the card's HALT state lost with the field.
    pub fn set_alive(&mut self, alive: bool) {
        if alive && !self.alive {
            *self = Self {
                card: self.card,
                soft_resets: self.soft_resets,
                ..Self::new()
            };
            if let Some(card) = self.card.as_mut() {
                card.halted = false;
            }
        }
        self.alive = alive;
    }

    /// How many soft resets the driver issued (one per `init`).
    pub fn soft_resets(&self) -> u32 {
        self.soft_resets
    }

    /// How many SPI transactions the chip saw.
    pub fn transactions(&self) -> u32 {
        self.transactions
    }

    fn read(&mut self, reg: usize) -> u8 {
        if !self.alive {
            return 0x00;
        }
        match reg {
            FIFO_DATA => {
                if self.fifo_len == 0 {
                    return 0;
                }
                let b = self.fifo[0];
                self.fifo.copy_within(1..self.fifo_len, 0);
                self.fifo_len -= 1;
                b
            }
            FIFO_LEVEL => self.fifo_len as u8,
            _ => self.regs[reg & 0x3F],
        }
    }

    fn write(&mut self, reg: usize, value: u8) {
        if !self.alive {
            return;
        }
        match reg {
            COMMAND => self.command(value & 0x0F),
            // Set1 (bit 7) clear: the bits written as 1 are cleared (MFRC522 §9.3.1.5/6).
            COM_IRQ | DIV_IRQ if value & 0x80 == 0 => self.regs[reg] &= !value,
            COM_IRQ | DIV_IRQ => self.regs[reg] |= value & 0x7F,
            FIFO_DATA => {
                if self.fifo_len < self.fifo.len() {
                    self.fifo[self.fifo_len] = value;
                    self.fifo_len += 1;
                }
            }
            FIFO_LEVEL if value & 0x80 != 0 => self.fifo_len = 0,
            BIT_FRAMING => {
                self.regs[reg] = value & 0x7F;
                if value & 0x80 != 0 && self.regs[COMMAND] == CMD_TRANSCEIVE {
                    self.transceive();
                }
            }
            _ => self.regs[reg & 0x3F] = value,
        }
    }

    fn command(&mut self, cmd: u8) {
        match cmd {
            CMD_SOFT_RESET => {
                self.soft_resets += 1;
                let version = self.regs[VERSION];
                self.regs = [0; 64];
                self.regs[VERSION] = version;
                self.fifo_len = 0;
                self.regs[COMMAND] = CMD_IDLE;
            }
            CMD_CALC_CRC => {
                let [lo, hi] = crc_a(&self.fifo[..self.fifo_len]);
                self.regs[CRC_LOW] = lo;
                self.regs[CRC_HIGH] = hi;
                self.regs[DIV_IRQ] |= CRC_IRQ;
                self.regs[COMMAND] = CMD_CALC_CRC;
            }
            other => self.regs[COMMAND] = other,
        }
    }

    /// Runs the PICC command in the FIFO against the card and leaves its answer in the FIFO.
    fn transceive(&mut self) {
        let mut tx = [0u8; 64];
        let n = self.fifo_len;
        tx[..n].copy_from_slice(&self.fifo[..n]);
        self.fifo_len = 0;
        let mut rx = [0u8; 8];
        let answer = self
            .card
            .as_mut()
            .and_then(|card| picc(card, &tx[..n], &mut rx));
        match answer {
            Some(len) => {
                self.fifo[..len].copy_from_slice(&rx[..len]);
                self.fifo_len = len;
                self.regs[COM_IRQ] |= RX_IRQ | IDLE_IRQ;
            }
            None => self.regs[COM_IRQ] |= TIMER_IRQ,
        }
    }
}

/// A card's answer to one frame (ISO/IEC 14443-3 §6.4), or `None` for silence.
fn picc(card: &mut Card, tx: &[u8], rx: &mut [u8; 8]) -> Option<usize> {
    // The UID part sent at each cascade level (§6.5.4): a cascade tag 0x88 and 3 bytes while more follow.
    let level_part = |level: usize| -> Option<[u8; 4]> {
        let levels = match card.len {
            4 => 1,
            7 => 2,
            _ => 3,
        };
        if level >= levels {
            return None;
        }
        let mut part = [0x88, 0, 0, 0];
        if level + 1 == levels {
            part.copy_from_slice(&card.uid[level * 3..level * 3 + 4]);
        } else {
            part[1..].copy_from_slice(&card.uid[level * 3..level * 3 + 3]);
        }
        Some(part)
    };
    match tx {
        [0x26] | [0x52] => {
            if tx[0] == 0x26 && card.halted {
                return None;
            }
            card.halted = false;
            // ATQA: UID size in bits 7-6, bit-frame anticollision (one bit of 0..4 set).
            rx[0] = match card.len {
                4 => 0x04,
                7 => 0x44,
                _ => 0x84,
            };
            rx[1] = 0x00;
            Some(2)
        }
        [sel @ (0x93 | 0x95 | 0x97), 0x20] => {
            let part = level_part(usize::from((sel - 0x93) / 2))?;
            rx[..4].copy_from_slice(&part);
            rx[4] = part[0] ^ part[1] ^ part[2] ^ part[3];
            Some(5)
        }
        [sel @ (0x93 | 0x95 | 0x97), 0x70, a, b, c, d, _bcc, _, _] => {
            let level = usize::from((sel - 0x93) / 2);
            if level_part(level)? != [*a, *b, *c, *d] {
                return None;
            }
            let more = level_part(level + 1).is_some();
            rx[0] = if more { 0x04 } else { 0x08 };
            let crc = crc_a(&rx[..1]);
            rx[1..3].copy_from_slice(&crc);
            Some(3)
        }
        [0x50, 0x00, _, _] => {
            card.halted = true;
            None
        }
        _ => None,
    }
}

impl ErrorType for FakeMfrc522 {
    type Error = ErrorKind;
}

impl SpiDevice for FakeMfrc522 {
    /// MFRC522 SPI (§8.1.2): the first byte is the address (bit 7 read, bits 6-1 the register); on a
    /// read, the byte clocked in with each later byte is the register the previous byte addressed; on a
    /// write, every later byte is written to the one register.
    fn transaction(&mut self, operations: &mut [Operation<'_, u8>]) -> Result<(), Self::Error> {
        self.transactions += 1;
        let mut first = true;
        let mut write_reg: Option<usize> = None;
        let mut pending_read: Option<usize> = None;
        let mut clock = |fake: &mut Self, out: u8| -> u8 {
            let reg = usize::from((out >> 1) & 0x3F);
            if first {
                first = false;
                if out & 0x80 != 0 {
                    pending_read = Some(reg);
                } else {
                    write_reg = Some(reg);
                }
                return 0;
            }
            if let Some(reg) = write_reg {
                fake.write(reg, out);
                return 0;
            }
            let value = pending_read.map_or(0, |r| fake.read(r));
            pending_read = (out & 0x80 != 0).then_some(reg);
            value
        };
        for op in operations {
            match op {
                Operation::Write(bytes) => {
                    for &b in bytes.iter() {
                        clock(self, b);
                    }
                }
                Operation::Read(buf) => {
                    for b in buf.iter_mut() {
                        *b = clock(self, 0);
                    }
                }
                Operation::Transfer(read, write) => {
                    for i in 0..read.len().max(write.len()) {
                        let v = clock(self, write.get(i).copied().unwrap_or(0));
                        if let Some(r) = read.get_mut(i) {
                            *r = v;
                        }
                    }
                }
                Operation::TransferInPlace(buf) => {
                    for b in buf.iter_mut() {
                        *b = clock(self, *b);
                    }
                }
                Operation::DelayNs(_) => {}
            }
        }
        Ok(())
    }
}

/// One of two SPI devices, switchable at run time (a test can swap an exact-transaction mock in).
#[derive(Debug)]
pub enum Either<A, B> {
    /// The first.
    A(A),
    /// The second.
    B(B),
}

impl<A: SpiDevice, B: SpiDevice> ErrorType for Either<A, B> {
    type Error = ErrorKind;
}

impl<A: SpiDevice, B: SpiDevice> SpiDevice for Either<A, B> {
    fn transaction(&mut self, operations: &mut [Operation<'_, u8>]) -> Result<(), Self::Error> {
        use embedded_hal::spi::Error as _;
        match self {
            Self::A(a) => a.transaction(operations).map_err(|e| e.kind()),
            Self::B(b) => b.transaction(operations).map_err(|e| e.kind()),
        }
    }
}

/// A pin that remembers its level (shared through a `Cell`, so a test can watch it after moving it in).
#[derive(Debug, Clone, Copy)]
pub struct FakePin<'a>(pub &'a core::cell::Cell<bool>);

impl embedded_hal::digital::ErrorType for FakePin<'_> {
    type Error = core::convert::Infallible;
}

impl embedded_hal::digital::OutputPin for FakePin<'_> {
    fn set_low(&mut self) -> Result<(), Self::Error> {
        self.0.set(false);
        Ok(())
    }
    fn set_high(&mut self) -> Result<(), Self::Error> {
        self.0.set(true);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::crc_a;

    /// ISO/IEC 14443-3 Annex B example: the CRC_A of 0x00 0x00 is 0xA0 0x1E; of 0x12 0x34, 0x26 0xCF.
    #[test]
    fn crc_a_matches_the_standard_examples() {
        assert_eq!(crc_a(&[0x00, 0x00]), [0xA0, 0x1E]);
        assert_eq!(crc_a(&[0x12, 0x34]), [0x26, 0xCF]);
    }
}
