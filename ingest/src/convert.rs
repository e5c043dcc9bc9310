//! From the wire back to the engine's input: [`protocol::engine_input`], where it lives so that the
//! gateway's edge-alert replay rebuilds a reading exactly as ingest does.

pub use protocol::engine_input::{ConvertError, EngineReading, engine_reading, parse_rfc3339_utc};
