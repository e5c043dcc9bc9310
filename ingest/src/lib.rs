//! The CRM-side ingest service (DESIGN.md "ingest"; issue 5 part 3).
//!
//! # Layout
//!
//! The modules follow the data:
//!
//! - [`service`] — the MQTT consumer: a shared subscription (`$share/{group}/{root}/+/readings`,
//!   `…/events` and `…/symptoms`), QoS 1, **manual acknowledgements**: a message is PUBACKed only after
//!   the transaction that stores it has committed. Messages are stored in batches (whatever has arrived,
//!   up to a cap).
//! - [`convert`] — a wire [`protocol::wire::ReadingMessage`] back into the engine's exact input.
//! - [`evaluate`] — protocol's rule engine, run per patient with the patient's settings and its state
//!   loaded from the database in the storing transaction (ingest is authoritative).
//! - [`store`] — one [`store::Store`] trait; SQLite (embedded, default) and PostgreSQL (by URL).
//!   Idempotent by reading id; alerts with deterministic ids; a durable, leased outbox.
//! - [`outbox`] — delivery of alert notices from the outbox: an MQTT topic and an HMAC-SHA256-signed HTTP
//!   webhook, retried with capped exponential backoff.
//! - [`api`] — the HTTP API (axum): a patient's readings and alerts, acknowledging an alert, a reading
//!   as a FHIR Observation.
//! - [`fhir`] — a stored reading as a FHIR R4 Observation (HL7 PHD IG).
//! - [`config`] — the TOML configuration, checked into [`config::Config`].
//! - [`testing`] — a throw-away PostgreSQL server for tests and benches.
//!
//! Several instances share one stream through the broker (shared subscription) and one database; see
//! [`store`] for why that creates no double reading and no double alert.

pub mod api;
pub mod config;
pub mod convert;
pub mod evaluate;
pub mod fhir;
pub mod outbox;
pub mod service;
pub mod store;
pub mod testing;

/// Milliseconds since the Unix epoch (0 if the clock is before 1970).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
