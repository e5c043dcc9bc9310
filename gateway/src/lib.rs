//! The home-monitoring health gateway.
//!
//! # Layout (follows the data)
//!
//! - [`decode`] — the `gateway decode` user tool: one characteristic value to JSON.
//! - [`journal`] — the durable outbox: a reading is *accepted* once it is here and fsynced.
#![warn(missing_docs)]

pub mod decode;
pub mod journal;
