//! Fuzzes what ingest runs on every MQTT payload (`ingest::store::prepare`), as a reading
//! (`…/readings`) and as a gateway event (`…/events`): no input may panic, and a payload taken as a
//! reading names a pseudonymous patient (anything else must end in `bad_messages`).
#![no_main]

use ingest::store::{Channel, Inbound, Prepared, prepare};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for (topic, channel) in [
        ("phg/v1/gw-fuzz/readings", Channel::Readings),
        ("phg/v1/gw-fuzz/events", Channel::Events),
    ] {
        let inbound = Inbound {
            topic: topic.to_owned(),
            channel,
            payload: data.to_vec(),
            // As ingest runs: a payload over the default limit is recorded as too large.
            max_len: Some(ingest::config::DEFAULT_MAX_MESSAGE_SIZE),
        };
        if let Prepared::Reading { msg, .. } = prepare(&inbound) {
            assert!(
                protocol::wire::is_valid_pseudonym(&msg.patient),
                "a stored reading names a pseudonymous patient"
            );
        }
    }
});
