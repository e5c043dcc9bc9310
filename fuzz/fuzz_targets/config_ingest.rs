//! Fuzzes ingest's configuration parser (`ingest::config::Config::parse`, what `ingest run`/`check`
//! runs on the TOML file): no input may panic. Inputs naming a file the parser would read are skipped
//! (fuzz targets stay off the filesystem).
#![no_main]

use libfuzzer_sys::fuzz_target;

// The body is in the library (`phg_fuzz::apps`), where `cargo test` also replays the committed corpus.
fuzz_target!(|data: &[u8]| phg_fuzz::apps::config_ingest(data));
