//! Device Information Service (DIS 1.1): the identity strings 0x2A24–0x2A29 and System ID (0x2A23).
//!
//! The strings are GATT `utf8s`: UTF-8 with no terminator and no length field (the attribute length is
//! the string length). Some devices pad them with NULs to a fixed size, so decoding strips trailing NULs
//! from the text but keeps the octets as received, and encoding re-sends exactly those octets. A value
//! that is not UTF-8 is [`Error::DecodeNotUtf8`]; an empty value is an empty string, which `utf8s` allows.
//!
//! One generic type, [`DisString`], serves all six characteristics; the const parameter is the UUID, so
//! each alias ([`ModelNumber`], [`SerialNumber`], …) implements [`Codec`] with its own UUID and a model
//! number cannot be passed where a serial number is expected.

use core::fmt;

use super::{Codec, Reader, Writer};
use crate::Error;

/// A Device Information string characteristic; `UUID` is 0x2A24..=0x2A29 (use the aliases below).
///
/// Holds the octets as received and the text with trailing NULs stripped. Two values with the same text
/// but different padding are different values: they encode differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DisString<'a, const UUID: u16> {
    /// The octets as received (or `text`'s octets for a value built with [`DisString::new`]).
    raw: &'a [u8],
    /// `raw` without its trailing NULs; valid UTF-8 by construction.
    text: &'a str,
}

/// Model Number String (0x2A24).
pub type ModelNumber<'a> = DisString<'a, 0x2A24>;
/// Serial Number String (0x2A25).
pub type SerialNumber<'a> = DisString<'a, 0x2A25>;
/// Firmware Revision String (0x2A26).
pub type FirmwareRevision<'a> = DisString<'a, 0x2A26>;
/// Hardware Revision String (0x2A27).
pub type HardwareRevision<'a> = DisString<'a, 0x2A27>;
/// Software Revision String (0x2A28).
pub type SoftwareRevision<'a> = DisString<'a, 0x2A28>;
/// Manufacturer Name String (0x2A29).
pub type ManufacturerName<'a> = DisString<'a, 0x2A29>;

impl<'a, const UUID: u16> DisString<'a, UUID> {
    /// Refuses, at compile time, a `DisString` for a UUID that is not a DIS string characteristic, so
    /// that `Codec::UUID` is always one of the six.
    const UUID_IS_A_DIS_STRING: () = assert!(
        UUID >= 0x2A24 && UUID <= 0x2A29,
        "DisString UUID must be 0x2A24..=0x2A29"
    );

    /// A value carrying `text` with no padding.
    pub fn new(text: &'a str) -> Self {
        let () = Self::UUID_IS_A_DIS_STRING;
        DisString {
            raw: text.as_bytes(),
            text,
        }
    }

    /// The text, trailing NUL padding removed.
    pub fn as_str(&self) -> &'a str {
        self.text
    }

    /// The octets as received, padding included: what [`Codec::emit`] writes.
    pub fn raw(&self) -> &'a [u8] {
        self.raw
    }

    /// The number of NUL octets after the text.
    pub fn nul_padding(&self) -> usize {
        self.raw.len().saturating_sub(self.text.len())
    }

    /// The characteristic's name as in the Bluetooth assigned numbers.
    pub fn characteristic_name() -> &'static str {
        match UUID {
            0x2A24 => "Model Number String",
            0x2A25 => "Serial Number String",
            0x2A26 => "Firmware Revision String",
            0x2A27 => "Hardware Revision String",
            0x2A28 => "Software Revision String",
            _ => "Manufacturer Name String",
        }
    }
}

/// The text, without padding.
impl<const UUID: u16> fmt::Display for DisString<'_, UUID> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.text)
    }
}

#[cfg(feature = "serde")]
impl<const UUID: u16> serde::Serialize for DisString<'_, UUID> {
    /// Serialises as the text (padding is a wire detail).
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.text)
    }
}

impl<'a, const UUID: u16> Codec<'a> for DisString<'a, UUID> {
    const UUID: u16 = UUID;

    /// Any length, including 0. Trailing NULs are padding; NULs inside the text are kept as characters.
    fn parse(bytes: &'a [u8]) -> Result<Self, Error> {
        let () = Self::UUID_IS_A_DIS_STRING;
        let mut unpadded = bytes;
        while let [rest @ .., 0] = unpadded {
            unpadded = rest;
        }
        // Stripping NULs cannot make valid UTF-8 invalid or the reverse (NUL is a one-octet character),
        // so checking the unpadded part decides for the whole value.
        let text = core::str::from_utf8(unpadded).map_err(|_| Error::DecodeNotUtf8)?;
        Ok(DisString { raw: bytes, text })
    }

    fn buffer_len(&self) -> usize {
        self.raw.len()
    }

    fn emit(&self, out: &mut [u8]) -> Result<usize, Error> {
        let mut w = Writer::new(out, self.raw.len())?;
        w.put(self.raw)?;
        Ok(w.written())
    }
}

/// System ID (0x2A23): a 40-bit manufacturer-defined identifier and a 24-bit organizationally unique
/// identifier (OUI), sent as one little-endian 64-bit value (identifier in octets 0–4, OUI in 5–7).
///
/// Octets after the eight defined ones are tolerated and ignored (no flags could give them a meaning), so
/// `emit(parse(x))` is `x`'s first eight octets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct SystemId {
    /// Manufacturer-defined identifier, 40 bits (0..=[`SystemId::MANUFACTURER_ID_MAX`]).
    pub manufacturer_id: u64,
    /// Organizationally unique identifier, 24 bits (0..=[`SystemId::OUI_MAX`]).
    pub oui: u32,
}

impl SystemId {
    /// The encoded size.
    pub const LEN: usize = 8;
    /// The largest 40-bit manufacturer identifier.
    pub const MANUFACTURER_ID_MAX: u64 = (1 << 40) - 1;
    /// The largest 24-bit OUI.
    pub const OUI_MAX: u32 = (1 << 24) - 1;

    /// A System ID, if both parts fit their widths.
    ///
    /// # Errors
    /// [`Error::EncodeUnrepresentable`] when `manufacturer_id` exceeds 40 bits or `oui` 24 bits.
    pub fn new(manufacturer_id: u64, oui: u32) -> Result<SystemId, Error> {
        let id = SystemId {
            manufacturer_id,
            oui,
        };
        id.to_u64().map(|_| id)
    }

    /// The 64-bit value as sent, or an error when a field is wider than its width (only possible for a
    /// value built field by field).
    fn to_u64(self) -> Result<u64, Error> {
        if self.manufacturer_id > Self::MANUFACTURER_ID_MAX || self.oui > Self::OUI_MAX {
            return Err(Error::EncodeUnrepresentable);
        }
        Ok(self.manufacturer_id | (u64::from(self.oui) << 40))
    }
}

impl<'a> Codec<'a> for SystemId {
    const UUID: u16 = 0x2A23;

    /// Empty input is [`Error::DecodeEmpty`]; 1–7 octets are [`Error::DecodeTruncated`] (need 8).
    fn parse(bytes: &'a [u8]) -> Result<Self, Error> {
        if bytes.is_empty() {
            return Err(Error::DecodeEmpty);
        }
        let mut r = Reader::new(bytes);
        r.require(Self::LEN)?;
        let v = u64::from_le_bytes(r.array()?);
        Ok(SystemId {
            manufacturer_id: v & Self::MANUFACTURER_ID_MAX,
            // Lossless: 24 bits remain after the shift.
            oui: (v >> 40) as u32,
        })
    }

    fn buffer_len(&self) -> usize {
        Self::LEN
    }

    /// # Errors
    /// [`Error::EncodeUnrepresentable`] when a field is wider than its width;
    /// [`Error::EncodeBufferFull`] when `out` is shorter than 8 octets.
    fn emit(&self, out: &mut [u8]) -> Result<usize, Error> {
        let v = self.to_u64()?;
        let mut w = Writer::new(out, Self::LEN)?;
        w.put(&v.to_le_bytes())?;
        Ok(w.written())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// DIS 1.1 §3.2: a Manufacturer Name String as sent, no terminator.
    #[test]
    fn string_known_answer() {
        let bytes = b"Beurer";
        let m = ManufacturerName::parse(bytes).unwrap();
        assert_eq!(m.as_str(), "Beurer");
        assert_eq!(m.nul_padding(), 0);
        assert_eq!(m.to_string(), "Beurer");
        assert_eq!(m.to_vec(), bytes);
        assert_eq!(m, ManufacturerName::new("Beurer"));
    }

    /// Some devices NUL-pad to a fixed size: the text drops the padding, the encoding keeps it.
    #[test]
    fn string_nul_padding_stripped_but_re_sent() {
        let bytes = b"BM85\0\0\0\0";
        let m = ModelNumber::parse(bytes).unwrap();
        assert_eq!(m.as_str(), "BM85");
        assert_eq!(m.nul_padding(), 4);
        assert_eq!(m.raw(), bytes);
        assert_eq!(m.to_vec(), bytes);
        assert_ne!(m, ModelNumber::new("BM85"));
        // All padding: an empty text.
        let z = SerialNumber::parse(&[0, 0]).unwrap();
        assert_eq!(z.as_str(), "");
        assert_eq!(z.to_vec(), [0, 0]);
    }

    /// NULs inside the text are characters, not padding.
    #[test]
    fn string_inner_nul_kept() {
        let m = FirmwareRevision::parse(b"1.0\0b\0").unwrap();
        assert_eq!(m.as_str(), "1.0\0b");
        assert_eq!(m.nul_padding(), 1);
    }

    /// GATT utf8s: multi-octet UTF-8 is text; anything else is [`Error::DecodeNotUtf8`].
    #[test]
    fn string_utf8_and_not() {
        let m = HardwareRevision::parse("Rev. Ä".as_bytes()).unwrap();
        assert_eq!(m.as_str(), "Rev. Ä");
        assert_eq!(
            SoftwareRevision::parse(&[0x41, 0xFF, 0x00]),
            Err(Error::DecodeNotUtf8)
        );
        // A truncated multi-octet sequence (a Read cut at the MTU would do this).
        assert_eq!(
            ManufacturerName::parse(&[0x52, 0xC3]),
            Err(Error::DecodeNotUtf8)
        );
    }

    /// utf8s has no minimum length: an empty value is an empty string.
    #[test]
    fn string_empty_is_empty_text() {
        let m = ModelNumber::parse(&[]).unwrap();
        assert_eq!(m.as_str(), "");
        assert!(m.to_vec().is_empty());
    }

    /// Each alias carries its own UUID (Bluetooth assigned numbers, DIS).
    #[test]
    fn string_uuids_and_names() {
        assert_eq!(<ModelNumber<'_> as Codec<'_>>::UUID, 0x2A24);
        assert_eq!(<SerialNumber<'_> as Codec<'_>>::UUID, 0x2A25);
        assert_eq!(<FirmwareRevision<'_> as Codec<'_>>::UUID, 0x2A26);
        assert_eq!(<HardwareRevision<'_> as Codec<'_>>::UUID, 0x2A27);
        assert_eq!(<SoftwareRevision<'_> as Codec<'_>>::UUID, 0x2A28);
        assert_eq!(<ManufacturerName<'_> as Codec<'_>>::UUID, 0x2A29);
        assert_eq!(ModelNumber::characteristic_name(), "Model Number String");
        assert_eq!(
            ManufacturerName::characteristic_name(),
            "Manufacturer Name String"
        );
    }

    /// DIS 1.1 §3.1 System ID: identifier 0x0504030201 in octets 0–4, OUI 0x080706 in octets 5–7, LE.
    #[test]
    fn system_id_known_answer() {
        let bytes = [0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08];
        let id = SystemId::parse(&bytes).unwrap();
        assert_eq!(
            id,
            SystemId {
                manufacturer_id: 0x05_0403_0201,
                oui: 0x08_0706
            }
        );
        assert_eq!(id.to_vec(), bytes);
        let mut buf = [0xA5u8; 10];
        assert_eq!(id.emit(&mut buf), Ok(8));
        assert_eq!(buf[8..], [0xA5, 0xA5]);
    }

    /// Short values are errors; octets past the eighth are ignored.
    #[test]
    fn system_id_lengths() {
        assert_eq!(SystemId::parse(&[]), Err(Error::DecodeEmpty));
        assert_eq!(
            SystemId::parse(&[0; 7]),
            Err(Error::DecodeTruncated { need: 8, got: 7 })
        );
        let id = SystemId::parse(&[0xFF; 9]).unwrap();
        assert_eq!(
            id,
            SystemId {
                manufacturer_id: SystemId::MANUFACTURER_ID_MAX,
                oui: SystemId::OUI_MAX
            }
        );
        assert_eq!(id.to_vec(), [0xFF; 8]);
    }

    /// A field wider than its width cannot be sent.
    #[test]
    fn system_id_refuses_wide_fields() {
        assert_eq!(SystemId::new(1 << 40, 0), Err(Error::EncodeUnrepresentable));
        assert_eq!(SystemId::new(0, 1 << 24), Err(Error::EncodeUnrepresentable));
        let wide = SystemId {
            manufacturer_id: 0,
            oui: 1 << 24,
        };
        assert_eq!(wide.emit(&mut [0u8; 8]), Err(Error::EncodeUnrepresentable));
        assert!(SystemId::new(SystemId::MANUFACTURER_ID_MAX, SystemId::OUI_MAX).is_ok());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Total decoding, and every accepted string re-encodes to exactly its octets.
        #[test]
        fn string_parse_total_and_exact(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(s) = ModelNumber::parse(&bytes) {
                prop_assert_eq!(s.to_vec(), bytes.clone());
                prop_assert!(!s.as_str().ends_with('\0'));
            }
            let _ = ManufacturerName::parse(&bytes);
        }

        /// Generated text with generated padding survives encode → decode.
        #[test]
        fn string_round_trip(text in "[^\\x00]{0,20}", pad in 0usize..4) {
            let mut bytes = text.clone().into_bytes();
            bytes.extend(core::iter::repeat_n(0u8, pad));
            let s = SerialNumber::parse(&bytes).unwrap();
            prop_assert_eq!(s.as_str(), text.as_str());
            prop_assert_eq!(s.nul_padding(), pad);
            let encoded = s.to_vec();
            prop_assert_eq!(SerialNumber::parse(&encoded), Ok(s));
            let fresh = SerialNumber::new(&text);
            let encoded = fresh.to_vec();
            prop_assert_eq!(SerialNumber::parse(&encoded), Ok(fresh));
        }

        #[test]
        fn system_id_parse_total(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(id) = SystemId::parse(&bytes) {
                prop_assert_eq!(&id.to_vec()[..], &bytes[..8]);
            }
        }

        #[test]
        fn system_id_round_trip(m in 0..=SystemId::MANUFACTURER_ID_MAX, o in 0..=SystemId::OUI_MAX) {
            let id = SystemId::new(m, o).unwrap();
            prop_assert_eq!(SystemId::parse(&id.to_vec()), Ok(id));
        }
    }
}
