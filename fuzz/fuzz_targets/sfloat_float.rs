//! Fuzzes the IEEE 11073 SFLOAT and FLOAT decoders: every word decodes, and re-encodes to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::ieee11073::{Float, SFloat};

fuzz_target!(|data: &[u8]| {
    if let Some(b) = data.get(..2) {
        let s = SFloat::from_le_bytes([b[0], b[1]]);
        assert_eq!(s.to_le_bytes(), [b[0], b[1]]);
        let _ = s.value();
    }
    if let Some(b) = data.get(..4) {
        let f = Float::from_le_bytes([b[0], b[1], b[2], b[3]]);
        assert_eq!(f.to_le_bytes(), [b[0], b[1], b[2], b[3]]);
        let _ = f.value();
    }
});
