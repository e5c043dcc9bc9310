//! The home-monitoring health gateway.
//!
//! # Layout (follows the data)
//!
//! - [`decode`] — the `gateway decode` user tool: one characteristic value to JSON.
//! - [`sources`] — where characteristic values come from (the simulator; BLE later) and the profiles'
//!   collector roles that download them.
//! - [`pipeline`] — decode, validate, attribute to a patient, reading id, hand to the journal writer.
//! - [`journal`] — the durable outbox: a reading is *accepted* once it is here and fsynced.
#![warn(missing_docs)]

pub mod app;
pub mod broker;
pub mod config;
pub mod decode;
pub mod demo;
pub mod journal;
pub mod pipeline;
pub mod sources;
pub mod telemetry;
pub mod uplink;
