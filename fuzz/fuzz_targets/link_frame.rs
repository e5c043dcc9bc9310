//! Fuzzes the kiosk card-reader link's frame decoder (`protocol::link`), both directions, as a serial
//! line delivers bytes: no input may panic, and every frame it accepts must encode back to a frame that
//! decodes to the same sequence number and message (the wire format is one definition for both ends).
#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::link::{BoardMessage, Decoder, GatewayMessage, MAX_WIRE, Message, encode_frame};

fn round_trips<M: Message + PartialEq + core::fmt::Debug>(data: &[u8]) {
    let mut decoder = Decoder::default();
    for &byte in data {
        if let Some(Ok((seq, message))) = decoder.push::<M>(byte) {
            let mut wire = [0u8; MAX_WIRE];
            let n = encode_frame(seq, &message, &mut wire).expect("a decoded message encodes");
            let mut again = Decoder::default();
            let decoded: Vec<_> = wire[..n]
                .iter()
                .filter_map(|&b| again.push::<M>(b))
                .collect();
            assert_eq!(
                decoded,
                vec![Ok((seq, message))],
                "a decoded frame encodes to itself"
            );
        }
    }
}

fuzz_target!(|data: &[u8]| {
    round_trips::<BoardMessage>(data);
    round_trips::<GatewayMessage>(data);
});
