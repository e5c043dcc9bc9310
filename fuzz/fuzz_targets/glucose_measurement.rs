//! Fuzzes the Glucose Measurement (2A18) decoder: no input may panic, and a value that decodes must encode and decode to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::gatt::Codec;

fuzz_target!(|data: &[u8]| {
    if let Ok(value) = protocol::gatt::glucose::GlucoseMeasurement::parse(data) {
        let bytes = value.to_vec();
        let again = protocol::gatt::glucose::GlucoseMeasurement::parse(&bytes)
            .expect("an encoded value decodes");
        assert_eq!(again.to_vec(), bytes, "encoding is stable");
    }
});
