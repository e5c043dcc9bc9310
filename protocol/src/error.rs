//! The one error type of the codec layer.

use core::fmt;

/// Why a characteristic value could not be decoded or encoded.
///
/// Every variant leaves nothing behind: decoding is a pure function of the input bytes, so the caller keeps
/// the bytes and may report or re-request them (GLP: re-request a record that failed to decode).
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// The value was empty.
    DecodeEmpty,
    /// The value is shorter than its flags require.
    DecodeTruncated {
        /// Octets the flags call for.
        need: usize,
        /// Octets present.
        got: usize,
    },
    /// A field holds a value outside its defined range (`field` names it).
    DecodeOutOfRange {
        /// The field's name as in the `decode` contract.
        field: &'static str,
        /// The value received.
        value: u32,
    },
    /// A RACP operand does not fit its op code, operator or filter type.
    DecodeBadOperand,
    /// A RACP response carried an operator other than 0x00 (null).
    DecodeBadResponseOperator(u8),
    /// A RACP count response carried a count of a size no service defines (1, 2 or 4 octets are accepted).
    DecodeBadCountSize(usize),
    /// A text characteristic is not UTF-8.
    DecodeNotUtf8,
    /// The output buffer is too small.
    EncodeBufferFull {
        /// Octets needed.
        need: usize,
    },
    /// The value cannot be represented on the wire (e.g. a number outside SFLOAT's range).
    EncodeUnrepresentable,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Error::DecodeEmpty => f.write_str("empty value"),
            Error::DecodeTruncated { need, got } => {
                write!(f, "too short ({got} bytes, need {need})")
            }
            Error::DecodeOutOfRange { field, value } => write!(f, "{field} {value} out of range"),
            Error::DecodeBadOperand => {
                f.write_str("operand does not fit the op code, operator or filter type")
            }
            Error::DecodeBadResponseOperator(op) => {
                write!(f, "response operator must be 0x00 (null), got 0x{op:02X}")
            }
            Error::DecodeBadCountSize(n) => write!(f, "unsupported count size ({n} bytes)"),
            Error::DecodeNotUtf8 => f.write_str("text is not UTF-8"),
            Error::EncodeBufferFull { need } => {
                write!(f, "output buffer too small (need {need} bytes)")
            }
            Error::EncodeUnrepresentable => f.write_str("value cannot be represented on the wire"),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for Error {}
