//! Record Access Control Point (0x2A52, GLS v1.0 §3.4): the collector writes a request, the sensor answers
//! with records (0x2A18 / 0x2A34 notifications) and one indication on this characteristic.
//!
//! Both directions are modelled by one type, [`Racp`], so that the gateway (a collector) and a simulated
//! sensor in tests speak the same codec:
//!
//! | value | direction | variant |
//! |---|---|---|
//! | `<op code> <operator> [<filter type> <value> [<value>]]` | collector → sensor | [`Racp::Request`] |
//! | `05 00 <count>` (1, 2 or 4 octets) | sensor → collector | [`Racp::NumberOfRecords`] |
//! | `06 00 <request op code> <response code>` | sensor → collector | [`Racp::ResponseCode`] |
//!
//! # Malformed requests parse
//!
//! A sensor must *answer* a malformed request with a response code (GLS.TS GLS/SEN/SPE/BI-01…06: op code
//! not supported, invalid operator, operator not supported, invalid operand, operand not supported), so a
//! request decodes whenever it has an op code and an operator: an operand that does not fit its operator or
//! filter type is kept as [`Operand::Raw`], and [`Racp::check_request`] names the response code GLS calls
//! for. Everything round-trips byte for byte. Only these are errors:
//!
//! - an empty value ([`Error::DecodeEmpty`]) or an op code without an operator ([`Error::DecodeTruncated`]);
//! - a response (op codes 5 and 6) with an operator other than null
//!   ([`Error::DecodeBadResponseOperator`]), a count of 0 or 3 or more than 4 octets
//!   ([`Error::DecodeTruncated`], [`Error::DecodeBadCountSize`]), or a response code shorter than two
//!   octets ([`Error::DecodeTruncated`]): a collector cannot act on a response it cannot read, and it
//!   treats the procedure as failed.
//!
//! Octets after a response code's two are tolerated like those after any fixed-size value (GLP.TS
//! GLP/COL/GLF/BI-04) and reported through [`Codec::defined_len`]; the count of a number-of-records
//! response has no fixed size (its length *is* its size), so there nothing can trail.

use super::time::DateTime;
use super::{Codec, Reader, Writer, open_enum};
use crate::Error;

open_enum! {
    /// RACP op code (GLS v1.0 §3.4.1; 7 and 8 from the GATT Specification Supplement's RACP table).
    pub struct OpCode(u8) {
        /// Report stored records (records are notified, then a Response Code is indicated).
        REPORT_STORED_RECORDS = 1, "report stored records";
        /// Delete stored records.
        DELETE_STORED_RECORDS = 2, "delete stored records";
        /// Abort the procedure in progress.
        ABORT_OPERATION = 3, "abort operation";
        /// Report the number of stored records (answered by op code 5).
        REPORT_NUMBER_OF_STORED_RECORDS = 4, "report number of stored records";
        /// Number of stored records response.
        NUMBER_OF_STORED_RECORDS_RESPONSE = 5, "number of stored records response";
        /// Response code.
        RESPONSE_CODE = 6, "response code";
        /// Combined report (newer GSS; not in GLS v1.0).
        COMBINED_REPORT = 7, "combined report";
        /// Combined report response (newer GSS; not in GLS v1.0).
        COMBINED_REPORT_RESPONSE = 8, "combined report response";
    }
}

open_enum! {
    /// RACP operator (GLS v1.0 §3.4.2).
    pub struct Operator(u8) {
        /// Null: the only operator of abort and of the responses.
        NULL = 0, "null";
        /// All records.
        ALL_RECORDS = 1, "all records";
        /// Less than or equal to the operand's value.
        LESS_THAN_OR_EQUAL = 2, "less than or equal to";
        /// Greater than or equal to the operand's value.
        GREATER_THAN_OR_EQUAL = 3, "greater than or equal to";
        /// Within the operand's range, both bounds included.
        WITHIN_RANGE = 4, "within range of (inclusive)";
        /// First record (the oldest).
        FIRST_RECORD = 5, "first record";
        /// Last record (the most recent).
        LAST_RECORD = 6, "last record";
    }
}

open_enum! {
    /// RACP filter type, the first operand octet (GLS v1.0 §3.4.3). CGMS defines filter 1 as Time Offset;
    /// the names here are GLS's.
    pub struct FilterType(u8) {
        /// Sequence number, u16.
        SEQUENCE_NUMBER = 1, "sequence number";
        /// User-facing time (Base Time + Time Offset), a 7-octet Date Time.
        USER_FACING_TIME = 2, "user facing time";
    }
}

open_enum! {
    /// RACP response code value (GLS v1.0 §3.4.4; 0x0A from the newer GSS RACP table).
    pub struct ResponseCode(u8) {
        /// Normal completion.
        SUCCESS = 1, "success";
        /// The op code is not supported.
        OP_CODE_NOT_SUPPORTED = 2, "op code not supported";
        /// The operator is invalid for the op code.
        INVALID_OPERATOR = 3, "invalid operator";
        /// The operator is not supported.
        OPERATOR_NOT_SUPPORTED = 4, "operator not supported";
        /// The operand is invalid.
        INVALID_OPERAND = 5, "invalid operand";
        /// No record matched the request.
        NO_RECORDS_FOUND = 6, "no records found";
        /// The abort could not be completed.
        ABORT_UNSUCCESSFUL = 7, "abort unsuccessful";
        /// The procedure could not be completed.
        PROCEDURE_NOT_COMPLETED = 8, "procedure not completed";
        /// The operand (filter type) is not supported.
        OPERAND_NOT_SUPPORTED = 9, "operand not supported";
        /// The server is busy (newer GSS; reserved in GLS v1.0).
        SERVER_BUSY = 10, "server busy";
    }
}

/// The operand of a request: `<filter type> <value>` or `<filter type> <min> <max>`, or nothing.
///
/// For [`Operator::LESS_THAN_OR_EQUAL`] the single value is the upper bound, for
/// [`Operator::GREATER_THAN_OR_EQUAL`] the lower bound. Both bounds are inclusive (GLS v1.0 §3.4.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum Operand<'a> {
    /// No operand octets.
    None,
    /// Filter type 1 and one sequence number.
    Sequence(u16),
    /// Filter type 1 and a range of sequence numbers.
    SequenceRange {
        /// Lower bound.
        min: u16,
        /// Upper bound.
        max: u16,
    },
    /// Filter type 2 and one user-facing time.
    Time(DateTime),
    /// Filter type 2 and a range of user-facing times.
    TimeRange {
        /// Lower bound.
        min: DateTime,
        /// Upper bound.
        max: DateTime,
    },
    /// The operand octets as received, filter type included, when they do not form one of the above for
    /// this op code and operator: a reserved filter type, a wrong length, an out-of-range Date Time, an
    /// operand after an operator that takes none, or any operand of an op code this codec does not
    /// interpret. Never empty when produced by [`Codec::parse`].
    Raw(&'a [u8]),
}

impl Operand<'_> {
    /// The filter type, if the operand has one.
    pub fn filter_type(&self) -> Option<FilterType> {
        match self {
            Operand::None => None,
            Operand::Sequence(_) | Operand::SequenceRange { .. } => {
                Some(FilterType::SEQUENCE_NUMBER)
            }
            Operand::Time(_) | Operand::TimeRange { .. } => Some(FilterType::USER_FACING_TIME),
            Operand::Raw(b) => b.first().copied().map(FilterType),
        }
    }

    /// The encoded size.
    pub fn len(&self) -> usize {
        match self {
            Operand::None => 0,
            Operand::Sequence(_) => 3,
            Operand::SequenceRange { .. } => 5,
            Operand::Time(_) => 1 + DateTime::LEN,
            Operand::TimeRange { .. } => 1 + 2 * DateTime::LEN,
            Operand::Raw(b) => b.len(),
        }
    }

    /// `true` when the operand has no octets.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Decodes the operand of a record-selecting op code (1, 2, 4, 7) under `operator`.
    fn parse_filter(operator: Operator, b: &[u8]) -> Operand<'_> {
        if b.is_empty() {
            return Operand::None;
        }
        let structured = match (operator, b) {
            (Operator::LESS_THAN_OR_EQUAL | Operator::GREATER_THAN_OR_EQUAL, &[1, lo, hi]) => {
                Some(Operand::Sequence(u16::from_le_bytes([lo, hi])))
            }
            (Operator::WITHIN_RANGE, &[1, a, b, c, d]) => Some(Operand::SequenceRange {
                min: u16::from_le_bytes([a, b]),
                max: u16::from_le_bytes([c, d]),
            }),
            (
                Operator::LESS_THAN_OR_EQUAL | Operator::GREATER_THAN_OR_EQUAL,
                &[2, ref rest @ ..],
            ) if rest.len() == DateTime::LEN => {
                // An out-of-range Date Time is an invalid operand for the sensor to answer, not a decode
                // failure: fall back to Raw.
                DateTime::read(&mut Reader::new(rest))
                    .ok()
                    .map(Operand::Time)
            }
            (Operator::WITHIN_RANGE, &[2, ref rest @ ..]) if rest.len() == 2 * DateTime::LEN => {
                let mut r = Reader::new(rest);
                match (DateTime::read(&mut r), DateTime::read(&mut r)) {
                    (Ok(min), Ok(max)) => Some(Operand::TimeRange { min, max }),
                    _ => None,
                }
            }
            _ => None,
        };
        structured.unwrap_or(Operand::Raw(b))
    }

    fn write(&self, w: &mut Writer<'_>) -> Result<(), Error> {
        match self {
            Operand::None => Ok(()),
            Operand::Sequence(v) => {
                w.u8(FilterType::SEQUENCE_NUMBER.0)?;
                w.u16(*v)
            }
            Operand::SequenceRange { min, max } => {
                w.u8(FilterType::SEQUENCE_NUMBER.0)?;
                w.u16(*min)?;
                w.u16(*max)
            }
            Operand::Time(t) => {
                w.u8(FilterType::USER_FACING_TIME.0)?;
                t.write(w)
            }
            Operand::TimeRange { min, max } => {
                w.u8(FilterType::USER_FACING_TIME.0)?;
                min.write(w)?;
                max.write(w)
            }
            Operand::Raw(b) => w.put(b),
        }
    }
}

/// A Record Access Control Point value, either direction (see the module doc for the three forms and what
/// is an error).
///
/// `emit(parse(x)) == x` for every value that parses. A value built by hand with op code 5 or 6 in a
/// [`Racp::Request`] encodes as written but decodes as the response variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum Racp<'a> {
    /// Anything but op codes 5 and 6: a request from the collector, or a reserved / newer op code.
    Request {
        /// The op code.
        op_code: OpCode,
        /// The operator.
        operator: Operator,
        /// The operand; see [`Operand`] for when it is kept raw.
        #[cfg_attr(feature = "serde", serde(borrow))]
        operand: Operand<'a>,
    },
    /// `05 00 <count>`: the answer to "report number of stored records". GLS v1.0 defines a u16 count;
    /// 1- and 4-octet counts are accepted as other services (and Nordic's parser) use them.
    NumberOfRecords {
        /// The number of matching records.
        count: u32,
        /// The count's size on the wire: 1, 2 or 4 octets.
        size: u8,
    },
    /// `06 00 <request op code> <response code>`: the end of a procedure, or its refusal.
    ResponseCode {
        /// The op code of the request this answers (kept as sent, reserved values included).
        request_op_code: OpCode,
        /// The outcome.
        response: ResponseCode,
    },
}

impl Racp<'_> {
    /// A request with no operand.
    const fn request(op_code: OpCode, operator: Operator) -> Self {
        Racp::Request {
            op_code,
            operator,
            operand: Operand::None,
        }
    }

    /// `01 01`: report all stored records.
    pub const fn report_all() -> Self {
        Self::request(OpCode::REPORT_STORED_RECORDS, Operator::ALL_RECORDS)
    }

    /// `01 05`: report the first (oldest) record.
    pub const fn report_first() -> Self {
        Self::request(OpCode::REPORT_STORED_RECORDS, Operator::FIRST_RECORD)
    }

    /// `01 06`: report the last (most recent) record.
    pub const fn report_last() -> Self {
        Self::request(OpCode::REPORT_STORED_RECORDS, Operator::LAST_RECORD)
    }

    /// `01 03 01 <seq>`: report records with sequence number ≥ `seq` (inclusive: pass last seen + 1 for an
    /// incremental download).
    pub const fn report_from(seq: u16) -> Self {
        Racp::Request {
            op_code: OpCode::REPORT_STORED_RECORDS,
            operator: Operator::GREATER_THAN_OR_EQUAL,
            operand: Operand::Sequence(seq),
        }
    }

    /// `01 03 02 <date time>`: report records whose user-facing time is ≥ `time`.
    pub const fn report_from_time(time: DateTime) -> Self {
        Racp::Request {
            op_code: OpCode::REPORT_STORED_RECORDS,
            operator: Operator::GREATER_THAN_OR_EQUAL,
            operand: Operand::Time(time),
        }
    }

    /// `01 04 01 <min> <max>`: report records with sequence numbers in `min..=max`; with `min == max`, the
    /// GLP way to re-request one record that failed to decode.
    pub const fn report_range(min: u16, max: u16) -> Self {
        Racp::Request {
            op_code: OpCode::REPORT_STORED_RECORDS,
            operator: Operator::WITHIN_RANGE,
            operand: Operand::SequenceRange { min, max },
        }
    }

    /// `02 01`: delete all stored records.
    pub const fn delete_all() -> Self {
        Self::request(OpCode::DELETE_STORED_RECORDS, Operator::ALL_RECORDS)
    }

    /// `03 00`: abort the procedure in progress.
    pub const fn abort() -> Self {
        Self::request(OpCode::ABORT_OPERATION, Operator::NULL)
    }

    /// `04 01`: report the number of all stored records.
    pub const fn report_number_all() -> Self {
        Self::request(
            OpCode::REPORT_NUMBER_OF_STORED_RECORDS,
            Operator::ALL_RECORDS,
        )
    }

    /// `04 03 01 <seq>`: report the number of records with sequence number ≥ `seq`.
    pub const fn report_number_from(seq: u16) -> Self {
        Racp::Request {
            op_code: OpCode::REPORT_NUMBER_OF_STORED_RECORDS,
            operator: Operator::GREATER_THAN_OR_EQUAL,
            operand: Operand::Sequence(seq),
        }
    }

    /// `05 00 <u16>`: the GLS number-of-records response.
    pub const fn number_of_records(count: u16) -> Self {
        Racp::NumberOfRecords {
            count: count as u32,
            size: 2,
        }
    }

    /// `06 00 <request> <response>`.
    pub const fn response(request_op_code: OpCode, response: ResponseCode) -> Self {
        Racp::ResponseCode {
            request_op_code,
            response,
        }
    }

    /// `06 00 <request> 01`: the procedure for `request_op_code` succeeded.
    pub const fn success(request_op_code: OpCode) -> Self {
        Self::response(request_op_code, ResponseCode::SUCCESS)
    }

    /// The op code (5 and 6 for the responses).
    pub fn op_code(&self) -> OpCode {
        match self {
            Racp::Request { op_code, .. } => *op_code,
            Racp::NumberOfRecords { .. } => OpCode::NUMBER_OF_STORED_RECORDS_RESPONSE,
            Racp::ResponseCode { .. } => OpCode::RESPONSE_CODE,
        }
    }

    /// The operator (null for the responses).
    pub fn operator(&self) -> Operator {
        match self {
            Racp::Request { operator, .. } => *operator,
            _ => Operator::NULL,
        }
    }

    /// `true` for the two sensor → collector forms.
    pub fn is_response(&self) -> bool {
        !matches!(self, Racp::Request { .. })
    }

    /// What a GLS sensor answers to this value written by a collector (GLS v1.0 §3.4.4, GLS.TS
    /// GLS/SEN/SPE/BI-01…06): `Ok(())` when the request is well formed.
    ///
    /// This is the syntactic verdict only. A sensor that supports a subset (no "within range", no
    /// user-facing-time filter, no delete) refines an `Ok` with [`ResponseCode::OPERATOR_NOT_SUPPORTED`],
    /// [`ResponseCode::OPERAND_NOT_SUPPORTED`] or [`ResponseCode::OP_CODE_NOT_SUPPORTED`]; "abort
    /// unsuccessful" and "procedure already in progress" (ATT 0x80) depend on its state.
    ///
    /// # Errors
    /// The response code to indicate. Where GLS leaves the choice open, the mapping follows Nordic's GLS
    /// sample sensor (nRF5 SDK `ble_gls.c`, `is_request_to_be_executed`):
    ///
    /// - a reserved op code, or a response op code (5, 6, 8) written as a request: op code not supported;
    /// - abort with an operator other than null, or a record op code with null: invalid operator;
    /// - a reserved operator (7–255): operator not supported;
    /// - an operand after abort, all, first or last; a missing operand, filter type 0, a wrong length or an
    ///   out-of-range Date Time after ≤, ≥ or range; a range whose minimum exceeds its maximum (this
    ///   codec's choice: such a range is a malformed request, not an empty selection): invalid operand;
    /// - a reserved filter type (3–255): operand not supported.
    pub fn check_request(&self) -> Result<(), ResponseCode> {
        let Racp::Request {
            op_code,
            operator,
            operand,
        } = self
        else {
            return Err(ResponseCode::OP_CODE_NOT_SUPPORTED);
        };
        match *op_code {
            OpCode::ABORT_OPERATION => {
                if *operator != Operator::NULL {
                    Err(ResponseCode::INVALID_OPERATOR)
                } else if !operand.is_empty() {
                    Err(ResponseCode::INVALID_OPERAND)
                } else {
                    Ok(())
                }
            }
            OpCode::REPORT_STORED_RECORDS
            | OpCode::DELETE_STORED_RECORDS
            | OpCode::REPORT_NUMBER_OF_STORED_RECORDS
            | OpCode::COMBINED_REPORT => check_filter(*operator, operand),
            _ => Err(ResponseCode::OP_CODE_NOT_SUPPORTED),
        }
    }
}

/// The operator / operand verdict for a record-selecting op code (see [`Racp::check_request`]).
fn check_filter(operator: Operator, operand: &Operand<'_>) -> Result<(), ResponseCode> {
    match operator {
        Operator::NULL => Err(ResponseCode::INVALID_OPERATOR),
        Operator::ALL_RECORDS | Operator::FIRST_RECORD | Operator::LAST_RECORD => {
            if operand.is_empty() {
                Ok(())
            } else {
                Err(ResponseCode::INVALID_OPERAND)
            }
        }
        Operator::LESS_THAN_OR_EQUAL | Operator::GREATER_THAN_OR_EQUAL | Operator::WITHIN_RANGE => {
            match operand {
                Operand::Sequence(_) | Operand::Time(_) => Ok(()),
                Operand::SequenceRange { min, max } if min <= max => Ok(()),
                // Fields are most significant first, so the derived order is chronological.
                Operand::TimeRange { min, max } if min <= max => Ok(()),
                Operand::SequenceRange { .. } | Operand::TimeRange { .. } | Operand::None => {
                    Err(ResponseCode::INVALID_OPERAND)
                }
                Operand::Raw(b) => match b.first() {
                    Some(&t) if FilterType(t).is_reserved() && t != 0 => {
                        Err(ResponseCode::OPERAND_NOT_SUPPORTED)
                    }
                    _ => Err(ResponseCode::INVALID_OPERAND),
                },
            }
        }
        _ => Err(ResponseCode::OPERATOR_NOT_SUPPORTED),
    }
}

impl<'a> Codec<'a> for Racp<'a> {
    const UUID: u16 = 0x2A52;

    fn parse(bytes: &'a [u8]) -> Result<Self, Error> {
        if bytes.is_empty() {
            return Err(Error::DecodeEmpty);
        }
        let mut r = Reader::new(bytes);
        r.require(2)?;
        let op_code = OpCode(r.u8()?);
        let operator = Operator(r.u8()?);
        let rest = r.rest();
        match op_code {
            OpCode::NUMBER_OF_STORED_RECORDS_RESPONSE => {
                if operator != Operator::NULL {
                    return Err(Error::DecodeBadResponseOperator(operator.0));
                }
                let (count, size) = match *rest {
                    // No count at all: shorter than the shortest accepted form.
                    [] => {
                        return Err(Error::DecodeTruncated {
                            need: 3,
                            got: bytes.len(),
                        });
                    }
                    [a] => (u32::from(a), 1),
                    [a, b] => (u32::from(u16::from_le_bytes([a, b])), 2),
                    [a, b, c, d] => (u32::from_le_bytes([a, b, c, d]), 4),
                    _ => return Err(Error::DecodeBadCountSize(rest.len())),
                };
                Ok(Racp::NumberOfRecords { count, size })
            }
            OpCode::RESPONSE_CODE => {
                if operator != Operator::NULL {
                    return Err(Error::DecodeBadResponseOperator(operator.0));
                }
                match *rest {
                    // Anything after the two is trailing (`defined_len` says where it starts).
                    [req, code, ..] => Ok(Racp::ResponseCode {
                        request_op_code: OpCode(req),
                        response: ResponseCode(code),
                    }),
                    [] | [_] => Err(Error::DecodeTruncated {
                        need: 4,
                        got: bytes.len(),
                    }),
                }
            }
            OpCode::REPORT_STORED_RECORDS
            | OpCode::DELETE_STORED_RECORDS
            | OpCode::REPORT_NUMBER_OF_STORED_RECORDS
            | OpCode::COMBINED_REPORT => Ok(Racp::Request {
                op_code,
                operator,
                operand: Operand::parse_filter(operator, rest),
            }),
            // Abort takes no operand; op code 8 and reserved op codes have no operand GLS defines.
            _ => {
                let operand = if rest.is_empty() {
                    Operand::None
                } else {
                    Operand::Raw(rest)
                };
                Ok(Racp::Request {
                    op_code,
                    operator,
                    operand,
                })
            }
        }
    }

    fn buffer_len(&self) -> usize {
        let operand = match self {
            Racp::Request { operand, .. } => operand.len(),
            Racp::NumberOfRecords { size, .. } => usize::from(*size),
            Racp::ResponseCode { .. } => 2,
        };
        operand.saturating_add(2)
    }

    /// # Errors
    /// Also [`Error::EncodeUnrepresentable`] for a [`Racp::NumberOfRecords`] whose `size` is not 1, 2 or 4
    /// or whose `count` does not fit it.
    fn emit(&self, out: &mut [u8]) -> Result<usize, Error> {
        let mut w = Writer::new(out, self.buffer_len())?;
        w.u8(self.op_code().0)?;
        w.u8(self.operator().0)?;
        match self {
            Racp::Request { operand, .. } => operand.write(&mut w)?,
            Racp::NumberOfRecords { count, size } => match size {
                1 => w.u8(u8::try_from(*count).map_err(|_| Error::EncodeUnrepresentable)?)?,
                2 => w.u16(u16::try_from(*count).map_err(|_| Error::EncodeUnrepresentable)?)?,
                4 => w.u32(*count)?,
                _ => return Err(Error::EncodeUnrepresentable),
            },
            Racp::ResponseCode {
                request_op_code,
                response,
            } => w.put(&[request_op_code.0, response.0])?,
        }
        Ok(w.written())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The octets of `s`, leaked so that decoded views may borrow them for the whole test.
    fn hex(s: &str) -> &'static [u8] {
        let v: Vec<u8> = (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect();
        Box::leak(v.into_boxed_slice())
    }

    fn dt(year: u16, month: u8, day: u8, hours: u8, minutes: u8, seconds: u8) -> DateTime {
        DateTime {
            year,
            month,
            day,
            hours,
            minutes,
            seconds,
        }
    }

    /// Decodes `h`, checks it equals `expected`, and that both the decoded and the expected value encode
    /// back to `h` (into a buffer pre-filled with 0xA5, smoltcp-style).
    fn known_answer(h: &str, expected: Racp<'_>) {
        let bytes = hex(h);
        let v = Racp::parse(bytes).unwrap();
        assert_eq!(v, expected, "{h}");
        assert_eq!(v.to_vec(), bytes, "{h}");
        let mut buf = vec![0xA5; bytes.len() + 3];
        let n = expected.emit(&mut buf).unwrap();
        assert_eq!(n, expected.buffer_len());
        assert_eq!(&buf[..n], bytes, "{h}");
        assert!(buf[n..].iter().all(|&b| b == 0xA5));
    }

    // ----- Responses (sensor → collector) -------------------------------------------------------------

    /// GLS v1.0 §3.4.4: `06 00 <request op code> <response code>` (Nordic
    /// RecordAccessControlPointDataCallbackTest).
    #[test]
    fn response_codes() {
        known_answer("06000101", Racp::success(OpCode::REPORT_STORED_RECORDS));
        known_answer(
            "06000C02",
            Racp::response(OpCode(0x0C), ResponseCode::OP_CODE_NOT_SUPPORTED),
        );
        known_answer(
            "06000103",
            Racp::response(OpCode(1), ResponseCode::INVALID_OPERATOR),
        );
        known_answer(
            "06000105",
            Racp::response(OpCode(1), ResponseCode::INVALID_OPERAND),
        );
        known_answer(
            "06000106",
            Racp::response(OpCode(1), ResponseCode::NO_RECORDS_FOUND),
        );
        known_answer(
            "06000307",
            Racp::response(OpCode::ABORT_OPERATION, ResponseCode::ABORT_UNSUCCESSFUL),
        );
        known_answer(
            "06000209",
            Racp::response(
                OpCode::DELETE_STORED_RECORDS,
                ResponseCode::OPERAND_NOT_SUPPORTED,
            ),
        );
        let v = Racp::parse(hex("06000C02")).unwrap();
        assert_eq!(v.op_code().name(), Some("response code"));
        assert_eq!(v.operator(), Operator::NULL);
        assert!(v.is_response());
        let Racp::ResponseCode {
            request_op_code,
            response,
        } = v
        else {
            panic!("{v:?}")
        };
        assert!(request_op_code.is_reserved());
        assert_eq!(response.name(), Some("op code not supported"));
    }

    /// Nordic onRecordAccessOperationError_unknownErrorCode: 0x0A, "server busy" in the newer GSS table.
    #[test]
    fn response_server_busy() {
        known_answer(
            "0600010A",
            Racp::response(OpCode::REPORT_STORED_RECORDS, ResponseCode::SERVER_BUSY),
        );
        assert_eq!(ResponseCode::SERVER_BUSY.name(), Some("server busy"));
        // A code beyond the table still decodes.
        known_answer("060001FE", Racp::response(OpCode(1), ResponseCode(0xFE)));
    }

    /// GLS v1.0 §3.4.1 number of stored records: u16 in GLS; Nordic also accepts 1 and 4 octets.
    #[test]
    fn number_of_records_sizes() {
        known_answer("050001", Racp::NumberOfRecords { count: 1, size: 1 });
        known_answer("05002A00", Racp::number_of_records(42));
        known_answer(
            "050004030201",
            Racp::NumberOfRecords {
                count: 16_909_060,
                size: 4,
            },
        );
    }

    /// Nordic onNumberOfRecordsReceived_unsupportedLength.
    #[test]
    fn number_of_records_three_octets_is_an_error() {
        assert_eq!(
            Racp::parse(hex("0500030201")),
            Err(Error::DecodeBadCountSize(3))
        );
        assert_eq!(
            Racp::parse(hex("05000102030405")),
            Err(Error::DecodeBadCountSize(5))
        );
        assert_eq!(
            Racp::parse(hex("0500")),
            Err(Error::DecodeTruncated { need: 3, got: 2 })
        );
    }

    /// Nordic onInvalidDataReceived_invalidOperator: a response's operator must be null.
    #[test]
    fn response_operator_must_be_null() {
        assert_eq!(
            Racp::parse(hex("060101")),
            Err(Error::DecodeBadResponseOperator(1))
        );
        assert_eq!(
            Racp::parse(hex("05FF0100")),
            Err(Error::DecodeBadResponseOperator(0xFF))
        );
    }

    #[test]
    fn response_code_length_errors() {
        assert_eq!(
            Racp::parse(hex("0600")),
            Err(Error::DecodeTruncated { need: 4, got: 2 })
        );
        assert_eq!(
            Racp::parse(hex("060001")),
            Err(Error::DecodeTruncated { need: 4, got: 3 })
        );
        // Octets after the response code trail it: tolerated, and `defined_len` says where they start.
        let trailed = Racp::parse(hex("06000101ABCD")).unwrap();
        assert_eq!(trailed, Racp::parse(hex("06000101")).unwrap());
        assert_eq!(trailed.defined_len(), 4);
    }

    #[test]
    fn empty_and_one_octet() {
        assert_eq!(Racp::parse(&[]), Err(Error::DecodeEmpty));
        assert_eq!(
            Racp::parse(&[1]),
            Err(Error::DecodeTruncated { need: 2, got: 1 })
        );
    }

    #[test]
    fn encode_count_that_does_not_fit_its_size() {
        let mut buf = [0u8; 8];
        assert_eq!(
            Racp::NumberOfRecords {
                count: 256,
                size: 1
            }
            .emit(&mut buf),
            Err(Error::EncodeUnrepresentable)
        );
        assert_eq!(
            Racp::NumberOfRecords { count: 1, size: 3 }.emit(&mut buf),
            Err(Error::EncodeUnrepresentable)
        );
        assert_eq!(
            Racp::report_all().emit(&mut buf[..1]),
            Err(Error::EncodeBufferFull { need: 2 })
        );
    }

    // ----- Requests (collector → sensor) --------------------------------------------------------------

    /// GLP/COL SPR/BV-01 report all (xDrip getAllRecords), SPN/BV-01 count all, SPR/BV-07 last record
    /// (Contour Next One capture), SPA/BV-01 abort.
    #[test]
    fn requests_without_operand() {
        known_answer("0101", Racp::report_all());
        known_answer("0401", Racp::report_number_all());
        known_answer("0106", Racp::report_last());
        known_answer("0105", Racp::report_first());
        known_answer("0201", Racp::delete_all());
        known_answer("0300", Racp::abort());
        let v = Racp::parse(hex("0106")).unwrap();
        assert_eq!(v.operator().name(), Some("last record"));
        assert!(!v.is_response());
        for v in [
            Racp::report_all(),
            Racp::report_last(),
            Racp::abort(),
            Racp::delete_all(),
        ] {
            assert_eq!(v.check_request(), Ok(()));
        }
    }

    /// GLP/COL SPR/BV-03 (≥ sequence number): Contour Next One "from record 45".
    #[test]
    fn request_greater_or_equal_sequence() {
        known_answer("0103012D00", Racp::report_from(45));
        let v = Racp::parse(hex("0103012D00")).unwrap();
        let Racp::Request { operand, .. } = v else {
            panic!("{v:?}")
        };
        assert_eq!(operand.filter_type(), Some(FilterType::SEQUENCE_NUMBER));
        assert_eq!(
            operand.filter_type().unwrap().name(),
            Some("sequence number")
        );
        assert_eq!(v.check_request(), Ok(()));
        known_answer("0403012D00", Racp::report_number_from(45));
    }

    /// GLP/COL SPD/BV-02 (delete range): AndroidBLEParser composeFunctionTestDeleteRecords.
    #[test]
    fn request_delete_range() {
        known_answer(
            "0204010C002200",
            Racp::Request {
                op_code: OpCode::DELETE_STORED_RECORDS,
                operator: Operator::WITHIN_RANGE,
                operand: Operand::SequenceRange { min: 12, max: 34 },
            },
        );
        // GLP: re-request one record as a range of one.
        known_answer("01040107000700", Racp::report_range(7, 7));
    }

    /// GLS v1.0 §3.4.3 user-facing-time operand (GLP/COL SPR/BV-04): AndroidBLEParser
    /// composeFunctionTestReportRecords.
    #[test]
    fn request_greater_or_equal_time() {
        let t = dt(2018, 11, 12, 1, 2, 3);
        known_answer("010302E2070B0C010203", Racp::report_from_time(t));
        let Racp::Request { operand, .. } = Racp::parse(hex("010302E2070B0C010203")).unwrap()
        else {
            panic!()
        };
        assert_eq!(operand, Operand::Time(t));
        assert_eq!(operand.filter_type(), Some(FilterType::USER_FACING_TIME));
    }

    /// AndroidBLEParser composeReportNumberOfRecordsUnitDoubleBoundFilteringOnBluetoothDateTime.
    #[test]
    fn request_count_time_range() {
        let v = Racp::Request {
            op_code: OpCode::REPORT_NUMBER_OF_STORED_RECORDS,
            operator: Operator::WITHIN_RANGE,
            operand: Operand::TimeRange {
                min: dt(2019, 11, 12, 1, 2, 3),
                max: dt(2019, 11, 12, 1, 2, 4),
            },
        };
        known_answer("040402E3070B0C010203E3070B0C010204", v);
        assert_eq!(v.check_request(), Ok(()));
    }

    /// ≤ takes one value, the upper bound.
    #[test]
    fn request_less_or_equal() {
        known_answer(
            "0102010A00",
            Racp::Request {
                op_code: OpCode::REPORT_STORED_RECORDS,
                operator: Operator::LESS_THAN_OR_EQUAL,
                operand: Operand::Sequence(10),
            },
        );
    }

    // ----- Collector side of GLP.TS 1.0.7 SPE/BI: decode the sensor's refusal ------------------------

    /// GLP/COL/SPE/BI-01-I: the sensor answers a request with "op code not supported"; the collector
    /// decodes it and can tell which request was refused.
    #[test]
    fn spe_bi_01_unsupported_op_code() {
        let request = Racp::delete_all();
        assert_eq!(request.to_vec(), [0x02, 0x01]);
        let answer = Racp::parse(hex("06000202")).unwrap();
        assert_eq!(
            answer,
            Racp::ResponseCode {
                request_op_code: OpCode::DELETE_STORED_RECORDS,
                response: ResponseCode::OP_CODE_NOT_SUPPORTED
            }
        );
        assert_eq!(answer.to_vec(), hex("06000202"));
    }

    /// GLP/COL/SPE/BI-02-I: "invalid operator" (and "operator not supported") decode as such.
    #[test]
    fn spe_bi_02_invalid_operator() {
        let request = Racp::report_range(1, 3);
        assert_eq!(request.to_vec(), hex("01040101000300"));
        for (h, code) in [
            ("06000103", ResponseCode::INVALID_OPERATOR),
            ("06000104", ResponseCode::OPERATOR_NOT_SUPPORTED),
        ] {
            let answer = Racp::parse(hex(h)).unwrap();
            assert_eq!(answer, Racp::response(OpCode::REPORT_STORED_RECORDS, code));
            assert_eq!(answer.to_vec(), hex(h));
        }
    }

    /// GLP/COL/SPE/BI-03-I: "operand not supported", e.g. after a user-facing-time filter.
    #[test]
    fn spe_bi_03_unsupported_operand() {
        let request = Racp::report_from_time(dt(2024, 1, 1, 0, 0, 0));
        assert_eq!(request.to_vec(), hex("010302E8070101000000"));
        let answer = Racp::parse(hex("06000109")).unwrap();
        assert_eq!(
            answer,
            Racp::response(
                OpCode::REPORT_STORED_RECORDS,
                ResponseCode::OPERAND_NOT_SUPPORTED
            )
        );
        assert_eq!(answer.to_vec(), hex("06000109"));
    }

    // ----- Sensor side of GLS.TS 1.0.9 SPE/BI: malformed requests parse and get a verdict -------------

    /// Decodes a request that must parse, checks it round-trips, and returns the sensor's verdict.
    fn verdict(h: &str) -> Result<(), ResponseCode> {
        let bytes = hex(h);
        let v = Racp::parse(bytes).unwrap();
        assert!(!v.is_response());
        assert_eq!(v.to_vec(), bytes, "{h}");
        v.check_request()
    }

    /// GLS/SEN/SPE/BI-01-C: a reserved op code, and response op codes written as requests.
    #[test]
    fn sen_spe_bi_01_unsupported_op_code() {
        for h in ["0001", "0901", "FF00", "0801"] {
            assert_eq!(verdict(h), Err(ResponseCode::OP_CODE_NOT_SUPPORTED), "{h}");
        }
        // A reserved op code with an operand keeps it raw.
        assert_eq!(
            Racp::parse(hex("0C01AB")).unwrap(),
            Racp::Request {
                op_code: OpCode(0x0C),
                operator: Operator(1),
                operand: Operand::Raw(&[0xAB])
            }
        );
        // The response the sensor sends back.
        let reply = Racp::response(OpCode(0x09), ResponseCode::OP_CODE_NOT_SUPPORTED);
        assert_eq!(reply.to_vec(), hex("06000902"));
        assert_eq!(
            Racp::number_of_records(0).check_request(),
            Err(ResponseCode::OP_CODE_NOT_SUPPORTED)
        );
    }

    /// GLS/SEN/SPE/BI-02-C: null operator on a record op code, non-null operator on abort.
    #[test]
    fn sen_spe_bi_02_invalid_operator() {
        assert_eq!(verdict("0100"), Err(ResponseCode::INVALID_OPERATOR));
        assert_eq!(verdict("0400"), Err(ResponseCode::INVALID_OPERATOR));
        assert_eq!(verdict("0301"), Err(ResponseCode::INVALID_OPERATOR));
    }

    /// GLS/SEN/SPE/BI-03-C: a reserved operator is one no sensor supports.
    #[test]
    fn sen_spe_bi_03_unsupported_operator() {
        assert_eq!(verdict("0107"), Err(ResponseCode::OPERATOR_NOT_SUPPORTED));
        assert_eq!(
            verdict("01FF012D00"),
            Err(ResponseCode::OPERATOR_NOT_SUPPORTED)
        );
        let Racp::Request { operand, .. } = Racp::parse(hex("01FF012D00")).unwrap() else {
            panic!()
        };
        assert_eq!(operand, Operand::Raw(&[0x01, 0x2D, 0x00]));
    }

    /// GLS/SEN/SPE/BI-04-C and BI-05-C: operands that do not fit — a 1-octet sequence number (`01 03 01 2D`),
    /// a missing operand, an operand after "all", filter type 0, a short or out-of-range Date Time, a
    /// range with min > max, an operand after abort. All parse (kept raw) and get "invalid operand".
    #[test]
    fn sen_spe_bi_04_05_invalid_operand() {
        let Racp::Request { operand, .. } = Racp::parse(hex("0103012D")).unwrap() else {
            panic!()
        };
        assert_eq!(operand, Operand::Raw(&[0x01, 0x2D]));
        for h in [
            "0103012D",
            "0103",
            "01040101000200FF",
            "010101",
            "0105012D00",
            "0103002D00",
            "010302E2070B0C0102",
            "010302E2070D0C010203",
            "01040122000C00",
            "040402E3070B0C010204E3070B0C010203",
            "030001",
        ] {
            assert_eq!(verdict(h), Err(ResponseCode::INVALID_OPERAND), "{h}");
        }
    }

    /// GLS/SEN/SPE/BI-06-C: a reserved filter type.
    #[test]
    fn sen_spe_bi_06_unsupported_operand() {
        assert_eq!(
            verdict("0103032D00"),
            Err(ResponseCode::OPERAND_NOT_SUPPORTED)
        );
        assert_eq!(verdict("0204FF"), Err(ResponseCode::OPERAND_NOT_SUPPORTED));
        let Racp::Request { operand, .. } = Racp::parse(hex("0103032D00")).unwrap() else {
            panic!()
        };
        assert_eq!(operand.filter_type(), Some(FilterType(3)));
        assert!(operand.filter_type().unwrap().is_reserved());
    }

    // ----- Properties ---------------------------------------------------------------------------------

    fn arb_datetime() -> impl Strategy<Value = DateTime> {
        (
            prop_oneof![Just(0u16), 1582u16..=9999],
            0u8..=12,
            0u8..=31,
            0u8..=23,
            0u8..=59,
            0u8..=59,
        )
            .prop_map(|(year, month, day, hours, minutes, seconds)| DateTime {
                year,
                month,
                day,
                hours,
                minutes,
                seconds,
            })
    }

    const RAW: [u8; 8] = [0x03, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70];

    /// Values in the form `parse` produces (a structured operand wherever one fits).
    fn arb_racp() -> impl Strategy<Value = Racp<'static>> {
        let record_op = prop_oneof![Just(1u8), Just(2), Just(4), Just(7)].prop_map(OpCode);
        let filtered = (
            record_op.clone(),
            prop_oneof![
                prop_oneof![Just(0u8), Just(1), Just(5), Just(6)]
                    .prop_map(|o| (Operator(o), Operand::None)),
                (prop_oneof![Just(2u8), Just(3)], any::<u16>())
                    .prop_map(|(o, v)| (Operator(o), Operand::Sequence(v))),
                (prop_oneof![Just(2u8), Just(3)], arb_datetime())
                    .prop_map(|(o, t)| (Operator(o), Operand::Time(t))),
                (any::<u16>(), any::<u16>()).prop_map(|(min, max)| (
                    Operator::WITHIN_RANGE,
                    Operand::SequenceRange { min, max }
                )),
                (arb_datetime(), arb_datetime()).prop_map(|(min, max)| (
                    Operator::WITHIN_RANGE,
                    Operand::TimeRange { min, max }
                )),
                // Reserved filter type 3 never forms a structured operand.
                (2u8..=4, 1usize..=RAW.len())
                    .prop_map(|(o, n)| (Operator(o), Operand::Raw(RAW.get(..n).unwrap_or(&RAW)))),
                (7u8..=255, 0usize..=RAW.len()).prop_map(|(o, n)| {
                    let operand = if n == 0 {
                        Operand::None
                    } else {
                        Operand::Raw(RAW.get(..n).unwrap_or(&RAW))
                    };
                    (Operator(o), operand)
                }),
            ],
        )
            .prop_map(|(op_code, (operator, operand))| Racp::Request {
                op_code,
                operator,
                operand,
            });
        let other = (
            prop_oneof![Just(0u8), Just(3), Just(8), 9u8..=255],
            any::<u8>(),
            0usize..=RAW.len(),
        )
            .prop_map(|(op, operator, n)| Racp::Request {
                op_code: OpCode(op),
                operator: Operator(operator),
                operand: if n == 0 {
                    Operand::None
                } else {
                    Operand::Raw(RAW.get(..n).unwrap_or(&RAW))
                },
            });
        let count = prop_oneof![
            any::<u8>().prop_map(|c| Racp::NumberOfRecords {
                count: c.into(),
                size: 1
            }),
            any::<u16>().prop_map(Racp::number_of_records),
            any::<u32>().prop_map(|count| Racp::NumberOfRecords { count, size: 4 }),
        ];
        let response = (any::<u8>(), any::<u8>())
            .prop_map(|(r, c)| Racp::response(OpCode(r), ResponseCode(c)));
        prop_oneof![filtered, other, count, response]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(v) = Racp::parse(&bytes) {
                let _ = v.check_request();
            }
        }

        /// emit(parse(x)) == x for every x that parses, but for the octets trailing a response code.
        #[test]
        fn bytes_round_trip(bytes in proptest::collection::vec(any::<u8>(), 0..24)) {
            if let Ok(v) = Racp::parse(&bytes) {
                if !matches!(v, Racp::ResponseCode { .. }) {
                    prop_assert_eq!(v.defined_len(), bytes.len());
                }
                prop_assert_eq!(v.to_vec(), &bytes[..v.defined_len()]);
            }
        }

        /// Record requests with a well-formed operand, so the structured paths are hit often.
        #[test]
        fn structured_requests_round_trip(
            op in prop_oneof![Just(1u8), Just(2), Just(4)],
            operator in 0u8..=8,
            filter in 0u8..=3,
            tail in proptest::collection::vec(any::<u8>(), 0..16),
        ) {
            let bytes = [&[op, operator, filter][..], &tail].concat();
            let v = Racp::parse(&bytes).unwrap();
            prop_assert_eq!(v.to_vec(), bytes);
        }

        #[test]
        fn value_round_trip(v in arb_racp()) {
            let bytes = v.to_vec();
            prop_assert_eq!(bytes.len(), v.buffer_len());
            prop_assert_eq!(Racp::parse(&bytes), Ok(v));
        }
    }
}
