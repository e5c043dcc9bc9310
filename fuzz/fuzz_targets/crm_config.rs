//! Fuzzes the CRM configuration message (`…/config` payload → checked configuration,
//! `gateway::app::check_remote_config`) and the patients' alert settings it carries, checked against
//! the default rules as the gateway's edge alerts do when applying it (`Engine::set_patient`). No input
//! may panic; a message accepted once is "the version in force" when it arrives again (the retained
//! message after a reconnect) and is then ignored, not rejected.
#![no_main]

use libfuzzer_sys::fuzz_target;

// The body is in the library (`phg_fuzz::apps`), where `cargo test` also replays the committed corpus.
fuzz_target!(|data: &[u8]| phg_fuzz::apps::crm_config(data));
