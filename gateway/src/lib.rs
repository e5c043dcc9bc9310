//! The home-monitoring health gateway.
//!
//! # Layout (follows the data)
//!
//! ```text
//! device ──GATT bytes──▶ sources ──▶ pipeline ──▶ journal (fsync) ──▶ uplink ──QoS 1──▶ broker
//! ```
//!
//! - [`sources`] — where characteristic values come from (BLE through btleplug on BlueZ, the simulator)
//!   and the profiles' collector roles (GLP, BLP) that download them and keep the RACP rules.
//! - [`pipeline`] — decode, validate, attribute to a patient, reading id, and the journal writer that
//!   group-commits appends from every session.
//! - [`journal`] — the durable outbox: a reading is *accepted* once it is here and fsynced, and leaves only
//!   after the broker's PUBACK.
//! - [`uplink`] — the one task that drives the MQTT client: publishes in journal order, acks on PUBACK,
//!   reconnects with backoff, keeps the retained status and last will.
//!
//! - [`kiosk`] — the clinic kiosk: check-in sessions, attribution of kiosk readings, the unattributed hold,
//!   the patient and staff pages.
//! - [`alerts`] — the edge alert engine: evaluates each accepted reading, journals the alerts for the
//!   `…/alerts` topic.
//!
//! Beside them: [`app`] assembles a gateway and shuts it down in order; [`config`] is `run`'s TOML;
//! [`telemetry`] logs and metrics; `broker` the embedded MQTT broker for `demo` (cargo feature
//! `embedded-broker`, on by default, left out of the packages); [`decode`] the `gateway decode` user tool.
#![warn(missing_docs)]

pub mod sources;

pub mod pipeline;

pub mod alerts;

pub mod journal;

pub mod kiosk;

pub mod uplink;

pub mod app;
#[cfg(feature = "embedded-broker")]
pub mod broker;
pub mod config;
pub mod decode;
#[cfg(feature = "embedded-broker")]
pub mod demo;
pub mod liveness;
pub mod state_file;
pub mod status;
pub mod telemetry;
