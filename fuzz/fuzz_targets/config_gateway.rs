//! Fuzzes the gateway's configuration parser (`gateway::config::Config::parse`, what `gateway run -c`
//! runs on the TOML file): no input may panic. Inputs naming a file the parser would read are skipped
//! (fuzz targets stay off the filesystem).
#![no_main]

use libfuzzer_sys::fuzz_target;

/// The keys whose value `Config::parse` opens as a file.
const FILE_KEYS: &[&str] = &["password_file", "rules_file", "card_key_file", "token_file"];

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if phg_fuzz::names_a_file(text, FILE_KEYS) {
        return;
    }
    let _ = gateway::config::Config::parse(text, std::path::Path::new("fuzz.toml"));
});
