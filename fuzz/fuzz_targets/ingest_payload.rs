//! Fuzzes what ingest runs on every MQTT payload (`ingest::store::prepare`), as a reading
//! (`…/readings`), as a gateway event (`…/events`) and as a symptom report (`…/symptoms`): no input may
//! panic, and a payload taken as a reading or a report names a pseudonymous patient (anything else must
//! end in `bad_messages`).
#![no_main]

use libfuzzer_sys::fuzz_target;

// The body is in the library (`phg_fuzz::apps`), where `cargo test` also replays the committed corpus.
fuzz_target!(|data: &[u8]| phg_fuzz::apps::ingest_payload(data));
