//! The shared language of the home-monitoring health gateway.
//!
//! Everything two parts of the system must agree on lives here once. The crate is pure: no I/O, no clock
//! (time is passed in), and no allocation unless the `alloc` feature is on. It builds `no_std` for
//! Cortex-M targets.
//!
//! # Layout (follows the data, bottom up)
//!
//! - [`ieee11073`] — the SFLOAT and FLOAT number types, with all five special values kept distinct.
//! - [`gatt`] — one checked codec per Bluetooth characteristic (decode *and* encode): Glucose
//!   Measurement, Context, Feature, Record Access Control Point, Blood Pressure Measurement, Intermediate
//!   Cuff Pressure, Blood Pressure Feature, Date Time, Current Time, Battery Level, Device Information.
//!   Every decoder is total: any input yields a value or an [`Error`], never a panic. Reserved bits,
//!   reserved enum values and trailing octets are kept, as the SIG test suites require.
//! - [`model`] — the domain [`model::Measurement`]: device-native value and unit kept, the other unit
//!   derived with one conversion constant each.
//! - [`validate`] — CLINICAL.md §3 plausibility and device-status checks; the verdict says *why*.
//! - [`reading_id`] — deterministic reading ids (DESIGN.md promise 3).
//! - `rules` (feature `alloc`; TOML rule files with `serde`) — the alert rule engine: rules as data with
//!   guideline sources, patient overrides, confirmation, episodes, window rules (issue 5 part 1).
//! - `link` (feature `link`) — the kiosk card-reader serial link: messages, frames (postcard, CRC-16,
//!   COBS) and the stop-and-wait delivery both ends run.
//! - `wire` (features `alloc` + `serde`) — the MQTT contract v1: topics and the JSON payload types.
//! - `engine_input` (features `alloc` + `serde`) — a reading message back to the rule engine's input
//!   (ingest's evaluation, the gateway's edge-alert replay).
#![cfg_attr(not(any(test, feature = "std")), no_std)]
#![deny(unsafe_code)]
#![warn(missing_docs)]

#[cfg(feature = "alloc")]
extern crate alloc;

pub mod error;
pub mod gatt;
pub mod ieee11073;
#[cfg(feature = "link")]
pub mod link;
pub mod model;
pub mod reading_id;
#[cfg(feature = "alloc")]
pub mod rules;
pub mod validate;
#[cfg(all(feature = "alloc", feature = "serde"))]
pub mod wire;

#[cfg(all(feature = "alloc", feature = "serde"))]
pub mod engine_input;

pub use error::Error;
