//! Fuzzes what ingest runs on every MQTT payload (`ingest::store::prepare`), as a reading
//! (`…/readings`), as a gateway event (`…/events`) and as a symptom report (`…/symptoms`): no input may
//! panic, and a payload taken as a reading or a report names a pseudonymous patient (anything else must
//! end in `bad_messages`).
#![no_main]

use ingest::store::{Channel, Inbound, Prepared, prepare};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
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
});
