//! Battery Service (BAS 1.0): Battery Level (0x2A19).
//!
//! One `uint8` percentage, 0..=100 (GSS `battery_level.yaml`: values 101–255 are reserved for future
//! use). A reserved value is rejected rather than clamped: a gateway that shows "255 %" or silently "100 %"
//! would hide a misbehaving device. Battery Level has no flags, so octets after the first can mean nothing;
//! they are accepted and ignored, and `emit(parse(x))` is `x`'s first octet.

use super::{Codec, Reader, Writer};
use crate::Error;

/// Battery Level (0x2A19): the remaining charge in percent, 0..=100.
///
/// The field is private so that every value is in range: build one with [`BatteryLevel::new`] or
/// [`Codec::parse`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct BatteryLevel(u8);

impl BatteryLevel {
    /// The encoded size.
    pub const LEN: usize = 1;
    /// The largest defined value: 100 %.
    pub const MAX: u8 = 100;

    /// A battery level of `percent`.
    ///
    /// # Errors
    /// [`Error::EncodeUnrepresentable`] above 100.
    pub fn new(percent: u8) -> Result<BatteryLevel, Error> {
        if percent > Self::MAX {
            Err(Error::EncodeUnrepresentable)
        } else {
            Ok(BatteryLevel(percent))
        }
    }

    /// The level in percent, 0..=100.
    pub fn percent(self) -> u8 {
        self.0
    }
}

impl<'a> Codec<'a> for BatteryLevel {
    const UUID: u16 = 0x2A19;

    /// Empty input is [`Error::DecodeEmpty`]; a first octet above 100 is
    /// `DecodeOutOfRange { field: "battery_level", value }`; further octets are ignored.
    fn parse(bytes: &'a [u8]) -> Result<Self, Error> {
        if bytes.is_empty() {
            return Err(Error::DecodeEmpty);
        }
        let percent = Reader::new(bytes).u8()?;
        if percent > Self::MAX {
            return Err(Error::DecodeOutOfRange {
                field: "battery_level",
                value: percent.into(),
            });
        }
        Ok(BatteryLevel(percent))
    }

    fn buffer_len(&self) -> usize {
        Self::LEN
    }

    fn emit(&self, out: &mut [u8]) -> Result<usize, Error> {
        let mut w = Writer::new(out, Self::LEN)?;
        w.u8(self.0)?;
        Ok(w.written())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// GSS Battery Level: 0x4B is 75 %; the bounds 0 and 100 are valid.
    #[test]
    fn known_answer_and_bounds() {
        let b = BatteryLevel::parse(&[0x4B]).unwrap();
        assert_eq!(b.percent(), 75);
        assert_eq!(b.to_vec(), [0x4B]);
        assert_eq!(BatteryLevel::parse(&[0]).unwrap().percent(), 0);
        assert_eq!(BatteryLevel::parse(&[100]).unwrap().to_vec(), [100]);
        let mut buf = [0xA5u8; 2];
        assert_eq!(b.emit(&mut buf), Ok(1));
        assert_eq!(buf, [0x4B, 0xA5]);
        assert_eq!(b.emit(&mut []), Err(Error::EncodeBufferFull { need: 1 }));
    }

    /// GSS: 101–255 are reserved; they are an error naming the field and the value.
    #[test]
    fn above_100_is_out_of_range() {
        assert_eq!(
            BatteryLevel::parse(&[101]),
            Err(Error::DecodeOutOfRange {
                field: "battery_level",
                value: 101
            })
        );
        assert_eq!(
            BatteryLevel::parse(&[0xFF]),
            Err(Error::DecodeOutOfRange {
                field: "battery_level",
                value: 255
            })
        );
        assert_eq!(BatteryLevel::new(101), Err(Error::EncodeUnrepresentable));
    }

    /// No flags, so extra octets mean nothing: accepted and ignored. Empty is an error.
    #[test]
    fn trailing_ignored_empty_rejected() {
        let b = BatteryLevel::parse(&[50, 0xAA, 0xBB]).unwrap();
        assert_eq!(b.percent(), 50);
        assert_eq!(b.to_vec(), [50]);
        assert_eq!(BatteryLevel::parse(&[]), Err(Error::DecodeEmpty));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn parse_total(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            match BatteryLevel::parse(&bytes) {
                Ok(b) => prop_assert_eq!(&b.to_vec()[..], &bytes[..1]),
                Err(e) => prop_assert!(bytes.is_empty() || bytes[0] > 100, "{e:?}"),
            }
        }

        #[test]
        fn round_trip(p in 0u8..=100) {
            let b = BatteryLevel::new(p).unwrap();
            prop_assert_eq!(BatteryLevel::parse(&b.to_vec()), Ok(b));
        }
    }
}
