//! The kiosk's configuration: `[kiosk]` in the TOML file (errors name the key, never the secret), and the
//! CRM's `phg.config/2` card map (a `/1` message is still read; cards need `/2`; a later schema is
//! refused for what it is; a raw UID is refused).
#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed test

use std::path::Path;

use gateway::app::check_remote_config;
use gateway::config::{Config, ConfigError};

const TOKEN: &str = "a-staff-token-long-enough-0123456789";
const KEY: &str = "0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f";

fn config(kiosk: &str) -> String {
    format!(
        r#"
gateway_id = "gw-1"
[mqtt]
broker = "mqtt://127.0.0.1:1883"
[journal]
dir = "/tmp/phg-kiosk-config-test/journal"
{kiosk}
"#
    )
}

fn invalid(kiosk: &str) -> (String, String) {
    match Config::parse(&config(kiosk), Path::new("t.toml")) {
        Err(ConfigError::Invalid { key, reason, .. }) => (key, reason),
        other => panic!("expected an invalid key, got {other:?}"),
    }
}

#[test]
fn a_kiosk_section_with_defaults_is_taken() {
    let c = Config::parse(
        &config(&format!(
            "[kiosk]\ndevices = [\"cuff-1\"]\ncard_key = \"{KEY}\"\n[[kiosk.staff]]\nid = \"desk-1\"\ntoken = \"{TOKEN}\"\n"
        )),
        Path::new("t.toml"),
    )
    .unwrap();
    let k = c.raw.kiosk.as_ref().unwrap();
    assert_eq!(
        k.listen.to_string(),
        "127.0.0.1:8088",
        "loopback by default"
    );
    assert_eq!(k.idle_timeout_s, 180, "3 minutes by default");
    assert_eq!(k.max_held, 1000, "a bounded hold by default");
    let checked = c.kiosk.unwrap();
    assert_eq!(checked.staff[0].id.0, "desk-1");
    assert!(checked.card_key.is_some());
    // The secret's Debug does not show it.
    assert!(!format!("{checked:?}").contains(TOKEN));
    assert!(!format!("{checked:?}").contains(KEY));
}

#[test]
fn short_tokens_and_keys_are_refused_by_key_without_quoting_them() {
    let (key, reason) = invalid(
        "[kiosk]\ndevices = [\"cuff-1\"]\n[[kiosk.staff]]\nid = \"desk-1\"\ntoken = \"short-secret\"\n",
    );
    assert_eq!(key, "kiosk.staff[0].token");
    assert!(!reason.contains("short-secret"), "{reason}");
    let (key, reason) = invalid(&format!(
        "[kiosk]\ndevices = [\"cuff-1\"]\ncard_key = \"abcd\"\n[[kiosk.staff]]\nid = \"desk-1\"\ntoken = \"{TOKEN}\"\n"
    ));
    assert_eq!(key, "kiosk.card_key");
    assert!(!reason.contains("abcd"), "{reason}");
    let (key, _) = invalid(&format!(
        "[kiosk]\ndevices = [\"cuff-1\"]\nreader = \"/dev/ttyACM0\"\n[[kiosk.staff]]\nid = \"desk-1\"\ntoken = \"{TOKEN}\"\n"
    ));
    assert_eq!(key, "kiosk.reader", "a reader needs the card key");
    let (key, _) = invalid(&format!(
        "[kiosk]\ndevices = []\n[[kiosk.staff]]\nid = \"desk-1\"\ntoken = \"{TOKEN}\"\n"
    ));
    assert_eq!(key, "kiosk.devices");
    let (key, _) = invalid("[kiosk]\ndevices = [\"cuff-1\"]\n");
    assert_eq!(key, "kiosk.staff");
    for max in ["0", "10001"] {
        let (key, _) = invalid(&format!(
            "[kiosk]\ndevices = [\"cuff-1\"]\nmax_held = {max}\n[[kiosk.staff]]\nid = \"desk-1\"\ntoken = \"{TOKEN}\"\n"
        ));
        assert_eq!(key, "kiosk.max_held", "max_held = {max}");
    }
    let (key, _) = invalid(&format!(
        "[alerts]\nenabled = false\n[kiosk]\ndevices = [\"cuff-1\"]\n[[kiosk.staff]]\nid = \"desk-1\"\ntoken = \"{TOKEN}\"\n"
    ));
    assert_eq!(key, "kiosk");
}

#[test]
fn a_token_file_is_read_and_a_missing_one_named() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, format!("{TOKEN}\n")).unwrap();
    let c = Config::parse(
        &config(&format!(
            "[kiosk]\ndevices = [\"cuff-1\"]\n[[kiosk.staff]]\nid = \"desk-1\"\ntoken_file = \"{}\"\n",
            file.display()
        )),
        Path::new("t.toml"),
    )
    .unwrap();
    assert_eq!(c.kiosk.unwrap().staff[0].token, TOKEN);
    let (key, _) = invalid(&format!(
        "[kiosk]\ndevices = [\"cuff-1\"]\n[[kiosk.staff]]\nid = \"desk-1\"\ntoken_file = \"{}\"\n",
        dir.path().join("absent").display()
    ));
    assert_eq!(key, "kiosk.staff[0].token_file");
}

const HASH: &str = "3f1c0e5a9b8d7c6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e";

fn remote(payload: &str) -> Result<usize, String> {
    check_remote_config(payload.as_bytes(), None, 1 << 20)
        .map(|m| m.map_or(0, |(msg, _)| msg.cards.len()))
        .map_err(|(_, reason)| reason)
}

#[test]
fn the_crm_config_schema_one_is_still_read_and_two_carries_cards() {
    assert_eq!(
        remote(r#"{"schema":"phg.config/1","version":1,"bindings":[]}"#),
        Ok(0)
    );
    assert_eq!(
        remote(&format!(
            r#"{{"schema":"phg.config/2","version":2,"cards":[{{"card":"{HASH}","patient":"p-kiosk-0042"}}]}}"#
        )),
        Ok(1)
    );
    let reason = remote(&format!(
        r#"{{"schema":"phg.config/1","version":2,"cards":[{{"card":"{HASH}","patient":"p-kiosk-0042"}}]}}"#
    ))
    .unwrap_err();
    assert!(reason.contains("phg.config/2"), "{reason}");
}

#[test]
fn a_later_schema_is_refused_for_what_it_is() {
    let reason = remote(r#"{"schema":"phg.config/3","version":3,"cards":[],"kiosks":[{"x":1}]}"#)
        .unwrap_err();
    assert!(
        reason.contains("not one this gateway reads"),
        "named the schema, not the unknown field: {reason}"
    );
}

#[test]
fn a_raw_uid_or_a_name_in_the_card_map_is_refused_without_quoting_it() {
    let reason = remote(
        r#"{"schema":"phg.config/2","version":2,"cards":[{"card":"045a3c217f6180","patient":"p-kiosk-0042"}]}"#,
    )
    .unwrap_err();
    assert!(reason.starts_with("cards[0].card"), "{reason}");
    assert!(!reason.contains("045a3c217f6180"), "{reason}");
    let reason = remote(&format!(
        r#"{{"schema":"phg.config/2","version":2,"cards":[{{"card":"{HASH}","patient":"Jane Doe"}}]}}"#
    ))
    .unwrap_err();
    assert!(reason.starts_with("cards[0].patient"), "{reason}");
    assert!(!reason.contains("Jane"), "{reason}");
    let reason = remote(&format!(
        r#"{{"schema":"phg.config/2","version":2,"cards":[{{"card":"{HASH}","patient":"p-1a"}},{{"card":"{HASH}","patient":"p-2b"}}]}}"#
    ))
    .unwrap_err();
    assert!(reason.contains("twice"), "{reason}");
}
