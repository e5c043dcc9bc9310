//! Bluetooth characteristic codecs: decode *and* encode, one module per service.
//!
//! # The contract every codec keeps
//!
//! - `parse` is **total**: for any byte slice it returns a value or an [`Error`]; it never panics and
//!   never indexes blindly. It first computes the length the flags call for and checks it
//!   ([`Error::DecodeTruncated`] names both numbers), then reads fields through [`Reader`].
//! - **Tolerant as GLP.TS requires** (GLP/COL/GLF/BI-01…11): reserved flag bits, reserved status bits and
//!   reserved enum values are kept as received (open code sets are newtypes over the raw integer, so unknown
//!   codes round-trip), and octets after the defined fields are tolerated: the measurements keep them in
//!   `trailing`, the fixed-size values ignore them, and [`Codec::defined_len`] tells every caller where the
//!   defined fields end, whichever the codec does.
//! - `emit` writes exactly [`Codec::buffer_len`] octets; `emit(parse(x)) == x` for every `x` that parses,
//!   except where the wire allows several encodings of one value (noted on the type).
//! - Values stay in the units transmitted (kg/L, mol/L, mmHg, kPa); unit conversion is [`crate::model`]'s.
//!
//! The views borrow the input (`trailing` and the Device Information strings point into it): zero-copy, and
//! no allocation on the Cortex-M build.

pub mod battery;
pub mod bp;
pub mod device_info;
pub mod glucose;
pub mod racp;
pub mod time;

use crate::Error;
use crate::ieee11073::{Float, SFloat};

/// A characteristic value codec.
pub trait Codec<'a>: Sized {
    /// The characteristic's 16-bit UUID.
    const UUID: u16;

    /// Decodes one characteristic value.
    ///
    /// # Errors
    /// When the value is shorter than its flags require, or a field is outside its defined range.
    fn parse(bytes: &'a [u8]) -> Result<Self, Error>;

    /// The number of octets [`Codec::emit`] writes.
    fn buffer_len(&self) -> usize;

    /// The octets of the defined fields `parse` read: a value parsed from `bytes` was followed by
    /// `bytes.len() - defined_len()` trailing octets (tolerated, GLP.TS GLP/COL/GLF/BI-04). The default
    /// is [`Codec::buffer_len`], right for every codec that does not keep its trailing octets; a codec
    /// that keeps them (in a `trailing` field, re-emitted) leaves them out here.
    fn defined_len(&self) -> usize {
        self.buffer_len()
    }

    /// Encodes into `out`, returning the number of octets written.
    ///
    /// # Errors
    /// [`Error::EncodeBufferFull`] when `out` is shorter than [`Codec::buffer_len`].
    fn emit(&self, out: &mut [u8]) -> Result<usize, Error>;

    /// Encodes into a new vector.
    #[cfg(feature = "alloc")]
    fn to_vec(&self) -> alloc::vec::Vec<u8> {
        let mut v = alloc::vec![0u8; self.buffer_len()];
        // `v` has exactly `buffer_len` octets, which is all `emit` may ask for.
        let n = self.emit(&mut v).unwrap_or(0);
        v.truncate(n);
        v
    }
}

/// A bounds-checked little-endian reader over a characteristic value.
///
/// Each read returns [`Error::DecodeTruncated`] rather than panicking; codecs check the full length up
/// front so that the error names what the flags needed, and the reader's own checks are the backstop.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// A reader at the start of `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    /// Fails with [`Error::DecodeTruncated`] unless at least `need` octets are present in total.
    ///
    /// # Errors
    /// When `buf` is shorter than `need`.
    pub fn require(&self, need: usize) -> Result<(), Error> {
        if self.buf.len() < need {
            Err(Error::DecodeTruncated {
                need,
                got: self.buf.len(),
            })
        } else {
            Ok(())
        }
    }

    /// The next `n` octets.
    ///
    /// # Errors
    /// When fewer than `n` remain.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], Error> {
        let end = self.pos.checked_add(n).ok_or(Error::DecodeTruncated {
            need: usize::MAX,
            got: self.buf.len(),
        })?;
        let s = self.buf.get(self.pos..end).ok_or(Error::DecodeTruncated {
            need: end,
            got: self.buf.len(),
        })?;
        self.pos = end;
        Ok(s)
    }

    /// The next `N` octets as an array.
    ///
    /// # Errors
    /// When fewer than `N` remain.
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], Error> {
        let s = self.take(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    /// One octet.
    ///
    /// # Errors
    /// At the end of the value.
    pub fn u8(&mut self) -> Result<u8, Error> {
        Ok(self.array::<1>()?[0])
    }

    /// A little-endian `u16`.
    ///
    /// # Errors
    /// When fewer than 2 octets remain.
    pub fn u16(&mut self) -> Result<u16, Error> {
        self.array().map(u16::from_le_bytes)
    }

    /// A little-endian `i16`.
    ///
    /// # Errors
    /// When fewer than 2 octets remain.
    pub fn i16(&mut self) -> Result<i16, Error> {
        self.array().map(i16::from_le_bytes)
    }

    /// A little-endian `u32`.
    ///
    /// # Errors
    /// When fewer than 4 octets remain.
    pub fn u32(&mut self) -> Result<u32, Error> {
        self.array().map(u32::from_le_bytes)
    }

    /// An SFLOAT.
    ///
    /// # Errors
    /// When fewer than 2 octets remain.
    pub fn sfloat(&mut self) -> Result<SFloat, Error> {
        self.array().map(SFloat::from_le_bytes)
    }

    /// A FLOAT.
    ///
    /// # Errors
    /// When fewer than 4 octets remain.
    pub fn float(&mut self) -> Result<Float, Error> {
        self.array().map(Float::from_le_bytes)
    }

    /// Everything not yet read (the trailing octets once all defined fields are read).
    pub fn rest(self) -> &'a [u8] {
        self.buf.get(self.pos..).unwrap_or(&[])
    }

    /// Octets not yet read.
    pub fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }
}

/// A bounds-checked little-endian writer.
#[derive(Debug)]
pub struct Writer<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl<'a> Writer<'a> {
    /// A writer that fails unless `buf` holds at least `need` octets, so that a codec either writes all
    /// of its value or nothing.
    ///
    /// # Errors
    /// [`Error::EncodeBufferFull`] when `buf` is shorter than `need`.
    pub fn new(buf: &'a mut [u8], need: usize) -> Result<Self, Error> {
        if buf.len() < need {
            return Err(Error::EncodeBufferFull { need });
        }
        Ok(Writer { buf, pos: 0 })
    }

    /// Appends octets.
    ///
    /// # Errors
    /// [`Error::EncodeBufferFull`] past the end of the buffer.
    pub fn put(&mut self, bytes: &[u8]) -> Result<(), Error> {
        let end = self
            .pos
            .checked_add(bytes.len())
            .ok_or(Error::EncodeBufferFull { need: usize::MAX })?;
        let dst = self
            .buf
            .get_mut(self.pos..end)
            .ok_or(Error::EncodeBufferFull { need: end })?;
        dst.copy_from_slice(bytes);
        self.pos = end;
        Ok(())
    }

    /// Appends one octet.
    ///
    /// # Errors
    /// Past the end of the buffer.
    pub fn u8(&mut self, v: u8) -> Result<(), Error> {
        self.put(&[v])
    }

    /// Appends a little-endian `u16`.
    ///
    /// # Errors
    /// Past the end of the buffer.
    pub fn u16(&mut self, v: u16) -> Result<(), Error> {
        self.put(&v.to_le_bytes())
    }

    /// Appends a little-endian `i16`.
    ///
    /// # Errors
    /// Past the end of the buffer.
    pub fn i16(&mut self, v: i16) -> Result<(), Error> {
        self.put(&v.to_le_bytes())
    }

    /// Appends a little-endian `u32`.
    ///
    /// # Errors
    /// Past the end of the buffer.
    pub fn u32(&mut self, v: u32) -> Result<(), Error> {
        self.put(&v.to_le_bytes())
    }

    /// Appends an SFLOAT.
    ///
    /// # Errors
    /// Past the end of the buffer.
    pub fn sfloat(&mut self, v: SFloat) -> Result<(), Error> {
        self.put(&v.to_le_bytes())
    }

    /// Appends a FLOAT.
    ///
    /// # Errors
    /// Past the end of the buffer.
    pub fn float(&mut self, v: Float) -> Result<(), Error> {
        self.put(&v.to_le_bytes())
    }

    /// Octets written so far.
    pub fn written(&self) -> usize {
        self.pos
    }
}

/// Declares an open code set: a newtype over the raw integer with named constants, so that reserved and
/// unknown values are representable and round-trip (STYLE.md practice 4).
macro_rules! open_enum {
    (
        $(#[$meta:meta])*
        pub struct $name:ident($ty:ty) {
            $( $(#[$vmeta:meta])* $variant:ident = $value:expr, $label:expr; )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
        pub struct $name(pub $ty);

        impl $name {
            $( $(#[$vmeta])* pub const $variant: $name = $name($value); )*

            /// The specification's name for this value, or `None` for a reserved / unknown value.
            pub fn name(&self) -> Option<&'static str> {
                match self.0 {
                    $( $value => Some($label), )*
                    _ => None,
                }
            }

            /// `true` when the value is not defined by the specification (reserved for future use).
            pub fn is_reserved(&self) -> bool {
                self.name().is_none()
            }
        }
    };
}
pub(crate) use open_enum;
