//! What the fuzz targets share: the bodies of the program targets ([`apps`]) and keeping the
//! configuration targets off the filesystem.
//!
//! The configuration parsers read the files some keys name (a password, a rule file, TLS material).
//! A fuzz target must not touch the filesystem, so an input that names a file is skipped before the
//! real parser sees it. The check parses the text as TOML first, so a key written with escapes or
//! quotes is still recognised: what the parser would read, this sees.

/// The bodies of the targets that run the two programs' parsers (config_gateway, config_ingest,
/// crm_config, ingest_payload): the fuzz binaries call them, and the test below replays every committed
/// seed and regression input through them in a plain `cargo test` (CI's check of those corpora; libFuzzer's
/// few seconds per target in a smoke run only got through the seeds anyway).
#[cfg(feature = "apps")]
pub mod apps {
    use std::sync::OnceLock;

    use ingest::store::{Channel, Inbound, Prepared, prepare};
    use protocol::rules::{Engine, RuleSet};

    /// The keys whose value the gateway's `Config::parse` opens as a file.
    const GATEWAY_FILE_KEYS: &[&str] =
        &["password_file", "rules_file", "card_key_file", "token_file"];

    /// The keys whose value ingest's `Config::parse` opens as a file: `database.ca_file`,
    /// `mqtt.tls.{ca, client_cert, client_key}`, `rules.file`, `webhook.secret_file`, `api.token_file`.
    const INGEST_FILE_KEYS: &[&str] = &[
        "ca_file",
        "ca",
        "client_cert",
        "client_key",
        "file",
        "secret_file",
        "token_file",
    ];

    /// The input as configuration text, unless it is not UTF-8 or names a file among `keys`.
    fn config_text<'a>(data: &'a [u8], keys: &[&str]) -> Option<&'a str> {
        let text = std::str::from_utf8(data).ok()?;
        (!super::names_a_file(text, keys)).then_some(text)
    }

    /// `gateway::config::Config::parse` (what `gateway run -c` runs on the TOML file): no input may
    /// panic. Inputs naming a file the parser would read are skipped.
    pub fn config_gateway(data: &[u8]) {
        if let Some(text) = config_text(data, GATEWAY_FILE_KEYS) {
            let _ = gateway::config::Config::parse(text, std::path::Path::new("fuzz.toml"));
        }
    }

    /// `ingest::config::Config::parse`: no input may panic. Inputs naming a file are skipped.
    pub fn config_ingest(data: &[u8]) {
        if let Some(text) = config_text(data, INGEST_FILE_KEYS) {
            let _ = ingest::config::Config::parse(text, std::path::Path::new("fuzz.toml"));
        }
    }

    fn rules() -> &'static RuleSet {
        static RULES: OnceLock<RuleSet> = OnceLock::new();
        RULES.get_or_init(|| RuleSet::default_rules().expect("the built-in rules load"))
    }

    /// The gateway's default `[mqtt] max_config_bytes`: larger inputs are refused before parsing.
    const MAX_CONFIG: usize = gateway::config::DEFAULT_MAX_CONFIG_BYTES as usize;

    /// The CRM's `…/config` message as the gateway checks it (`gateway::app::check_remote_config`), then
    /// each patient set on an engine with the default rules, as the edge alerts apply it. An accepted
    /// message, again as the version in force, is ignored (not rejected).
    pub fn crm_config(data: &[u8]) {
        let Ok(Some((msg, _bindings))) = gateway::app::check_remote_config(data, None, MAX_CONFIG)
        else {
            return;
        };
        assert!(
            matches!(
                gateway::app::check_remote_config(data, Some(msg.version), MAX_CONFIG),
                Ok(None)
            ),
            "the version in force, again, is ignored"
        );
        let mut engine = Engine::new(rules().clone(), Vec::new()).expect("no overrides to refuse");
        for p in msg.patients {
            let _ = engine.set_patient(p);
        }
    }

    /// `ingest::store::prepare` on a payload as a `…/readings`, `…/events` and `…/symptoms` message (what
    /// ingest runs on every MQTT payload): whatever is taken as a reading or report names a
    /// pseudonymous patient.
    pub fn ingest_payload(data: &[u8]) {
        for (topic, channel) in [
            ("phg/v1/gw-fuzz/readings", Channel::Readings),
            ("phg/v1/gw-fuzz/events", Channel::Events),
            ("phg/v1/gw-fuzz/symptoms", Channel::Symptoms),
        ] {
            let inbound = Inbound {
                topic: topic.to_owned(),
                channel,
                payload: data.to_vec(),
                // As ingest runs: a payload over the default limit is recorded as too large.
                max_len: Some(ingest::config::DEFAULT_MAX_MESSAGE_SIZE),
            };
            match prepare(&inbound) {
                Prepared::Reading { msg, .. } => assert!(
                    protocol::wire::is_valid_pseudonym(&msg.patient),
                    "a stored reading names a pseudonymous patient"
                ),
                Prepared::Symptoms { msg, .. } => assert!(
                    protocol::wire::is_valid_pseudonym(&msg.patient),
                    "a stored symptom report names a pseudonymous patient"
                ),
                _ => {}
            }
        }
    }
}

#[cfg(feature = "apps")]
/// Whether `text` is TOML in which a table at any depth has one of `keys`. Text that is not TOML
/// names no file (the real parser refuses it before reading anything).
pub fn names_a_file(text: &str, keys: &[&str]) -> bool {
    match text.parse::<toml::Table>() {
        Ok(table) => table_names(&table, keys),
        Err(_) => false,
    }
}

#[cfg(feature = "apps")]
fn table_names(table: &toml::Table, keys: &[&str]) -> bool {
    table
        .iter()
        .any(|(k, v)| keys.contains(&k.as_str()) || value_names(v, keys))
}

#[cfg(feature = "apps")]
fn value_names(value: &toml::Value, keys: &[&str]) -> bool {
    match value {
        toml::Value::Table(t) => table_names(t, keys),
        toml::Value::Array(a) => a.iter().any(|v| value_names(v, keys)),
        _ => false,
    }
}

#[cfg(all(test, feature = "apps"))]
mod tests {
    use std::path::Path;

    use super::{apps, names_a_file};

    /// Every committed seed and regression input of each program target, through the target's body:
    /// none may panic (an assertion of a target is a panic too).
    #[test]
    fn every_seed_and_regression_of_the_program_targets_runs_clean() {
        /// A target's name and body.
        type Target = (&'static str, fn(&[u8]));
        let targets: [Target; 4] = [
            ("config_gateway", apps::config_gateway),
            ("config_ingest", apps::config_ingest),
            ("crm_config", apps::crm_config),
            ("ingest_payload", apps::ingest_payload),
        ];
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        for (name, run) in targets {
            let mut inputs = 0;
            for dir in ["seeds", "regressions"] {
                let Ok(entries) = std::fs::read_dir(root.join(dir).join(name)) else {
                    continue;
                };
                for entry in entries {
                    let path = entry.expect("a directory entry").path();
                    let data = std::fs::read(&path).expect("a committed input is readable");
                    let done = std::panic::catch_unwind(|| run(&data));
                    assert!(done.is_ok(), "{name}: {} panicked", path.display());
                    inputs += 1;
                }
            }
            println!("{name}: {inputs} inputs replayed");
            assert!(inputs > 0, "{name}: no seed corpus");
        }
    }

    #[test]
    fn finds_file_keys_at_any_depth_and_through_quoting() {
        let keys = &["password_file", "rules_file"];
        assert!(names_a_file("[mqtt]\npassword_file = \"/etc/x\"\n", keys));
        assert!(names_a_file(
            "[alerts]\n\"rules\\u005ffile\" = \"/x\"\n",
            keys
        ));
        assert!(names_a_file("a = [{ rules_file = 1 }]\n", keys));
        assert!(!names_a_file("[mqtt]\nbroker = \"mqtt://h\"\n", keys));
        assert!(!names_a_file("not = = toml", keys));
    }
}
