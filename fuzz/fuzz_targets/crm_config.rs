//! Fuzzes the CRM configuration message (`…/config` payload → checked configuration,
//! `gateway::app::check_remote_config`) and the patients' alert settings it carries, checked against
//! the default rules as the gateway's edge alerts do when applying it (`Engine::set_patient`). No input
//! may panic; a message accepted once is "the version in force" when it arrives again (the retained
//! message after a reconnect) and is then ignored, not rejected.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use protocol::rules::{Engine, RuleSet};

fn rules() -> &'static RuleSet {
    static RULES: OnceLock<RuleSet> = OnceLock::new();
    RULES.get_or_init(|| RuleSet::default_rules().expect("the built-in rules load"))
}

/// The gateway's default `[mqtt] max_config_bytes`: larger inputs are refused before parsing.
const MAX: usize = gateway::config::DEFAULT_MAX_CONFIG_BYTES as usize;

fuzz_target!(|data: &[u8]| {
    let Ok(Some((msg, _bindings))) = gateway::app::check_remote_config(data, None, MAX) else {
        return;
    };
    assert!(
        matches!(
            gateway::app::check_remote_config(data, Some(msg.version), MAX),
            Ok(None)
        ),
        "the version in force, again, is ignored"
    );
    let mut engine = Engine::new(rules().clone(), Vec::new()).expect("no overrides to refuse");
    for p in msg.patients {
        let _ = engine.set_patient(p);
    }
});
