//! Kiosk companion board firmware.
//!
//! Nothing is implemented yet: this crate exists so that the workspace has its final shape and so that
//! `.ci/run` proves the `protocol` crate links into a `no_std` Cortex-M library.
#![no_std]
#![deny(unsafe_code)]

pub use protocol;
