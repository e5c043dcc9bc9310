//! Fuzzes ingest's configuration parser (`ingest::config::Config::parse`, what `ingest run`/`check`
//! runs on the TOML file): no input may panic. Inputs naming a file the parser would read are skipped
//! (fuzz targets stay off the filesystem).
#![no_main]

use libfuzzer_sys::fuzz_target;

/// The keys whose value `Config::parse` opens as a file: `database.ca_file`, `mqtt.tls.{ca,
/// client_cert, client_key}`, `rules.file`, `webhook.secret_file`, `api.token_file`.
const FILE_KEYS: &[&str] = &[
    "ca_file",
    "ca",
    "client_cert",
    "client_key",
    "file",
    "secret_file",
    "token_file",
];

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if phg_fuzz::names_a_file(text, FILE_KEYS) {
        return;
    }
    let _ = ingest::config::Config::parse(text, std::path::Path::new("fuzz.toml"));
});
