//! Kiosk companion board firmware: a patient taps a clinic card on an MFRC522 reader, the board tells the
//! gateway over the serial link (`protocol::link`), and shows what the gateway says with two LEDs and a
//! buzzer (DESIGN.md, "firmware"; docs/card-reader.md for the board, wiring and flashing).
//!
//! # Layout
//!
//! - [`reader`] — the MFRC522 through the `mfrc522` crate: probe, (re-)initialise, poll for a card; and
//!   [`reader::Presence`], which turns polls into presentations (a held card is one presentation until
//!   it is removed).
//! - [`indicator`] — the LED and buzzer pattern of each [`protocol::link::Indication`].
//! - [`board`] — the loop that joins them to the link: bytes in, messages out, time passed in.
//! - `image` (bare-metal targets only) — the STM32F4 board around it all; `src/bin/` has its entry points.
//! - [`testing`] (feature `testing`, and in this crate's tests) — a register-level fake MFRC522.
//!
//! All logic is generic over embedded-hal 1.0 (`SpiDevice`, `OutputPin`, `DelayNs`) and embedded-io
//! (the serial port), so the same code runs in `image` on the board and on the host in tests.
#![cfg_attr(not(test), no_std)]
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod board;
#[cfg(all(
    target_os = "none",
    any(feature = "black-pill", feature = "netduinoplus2")
))]
pub mod image;
pub mod indicator;
pub mod reader;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use protocol;

/// This firmware's version, as `Hello` reports it.
pub const VERSION: protocol::link::FirmwareVersion = protocol::link::FirmwareVersion {
    major: parse_u8(env!("CARGO_PKG_VERSION_MAJOR")),
    minor: parse_u8(env!("CARGO_PKG_VERSION_MINOR")),
    patch: parse_u8(env!("CARGO_PKG_VERSION_PATCH")),
};

/// A decimal `u8` at compile time (a version component above 255 saturates).
const fn parse_u8(s: &str) -> u8 {
    let bytes = s.as_bytes();
    let mut value: u32 = 0;
    let mut i = 0;
    while i < bytes.len() {
        value = value * 10 + (bytes[i] - b'0') as u32;
        i += 1;
    }
    if value > 255 { 255 } else { value as u8 }
}
