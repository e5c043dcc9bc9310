//! Deterministic reading ids (DESIGN.md promise 3: duplicates are harmless).
//!
//! The same physical measurement gets the same id however often it is downloaded, re-indicated or
//! republished, and every part of the system (gateway, ingest, tests) computes it here, once:
//!
//! - **Glucose (GLS)**: device identity + sequence number. GLS v1.0 §3.1.1.2: the sequence number starts at
//!   0, increases by one per record, never rolls over and is not reset when records are deleted, so it
//!   names one record of one meter for life.
//! - **Glucose from a meter that numbers newest-first** (TaiDoc DM30b, GATT.md): its sequence numbers
//!   change with every new reading, so the id is device identity + Base Time + Time Offset + the
//!   concentration as transmitted + sample type and location — the same rule as a cuff's, for the same
//!   reason (nothing else names the record across sessions).
//! - **Blood pressure (BLS)**: the cuff has no record number, so the id is device identity + device
//!   timestamp + user id + the values as transmitted (the raw SFLOAT words, so that two encodings of a
//!   number never split one reading in two, and float formatting never enters). A cuff that sends no time
//!   stamp cannot tell two identical readings apart: they share an id, which is the safe direction for a
//!   cuff that re-dumps its memory on every subscribe (GATT.md: SBM69, Beurer BM59/BM85).
//!
//! The id is an RFC 9562 name-based UUID (version 5) in a namespace of our own, over a canonical binary
//! name: a CRM can store it in a native `uuid` column, and the name's layout is versioned by its tag.

use uuid::Uuid;

use crate::gatt::time::DateTime;
use crate::ieee11073::SFloat;

/// The project's UUID namespace for reading ids (a random v4 UUID fixed once; changing it changes every id).
pub const NAMESPACE: Uuid = Uuid::from_bytes([
    0x5b, 0x8e, 0x2f, 0x43, 0x91, 0x0c, 0x4d, 0x6a, 0x9f, 0x27, 0x3a, 0xd1, 0x60, 0xc4, 0x8b, 0x1e,
]);

/// Longest device identity that enters the name; longer ones are cut (a BLE address, a System ID or a
/// serial number is far shorter).
pub const MAX_DEVICE_ID: usize = 64;

/// A canonical name built on the stack (no allocation on the Cortex-M build).
struct Name {
    buf: [u8; 128],
    len: usize,
}

impl Name {
    fn new(tag: &[u8], device: &str) -> Name {
        let mut n = Name {
            buf: [0; 128],
            len: 0,
        };
        n.put(tag);
        let d = device.as_bytes();
        let d = d.get(..MAX_DEVICE_ID).unwrap_or(d);
        // Length-prefixed so that "ab"+"c" and "a"+"bc" never meet.
        n.put(&[d.len() as u8]);
        n.put(d);
        n
    }

    fn put(&mut self, bytes: &[u8]) {
        // The widest name (tag 8 + 1 + 64 + BP fields 18) fits in 128; `get_mut` keeps this total anyway.
        if let Some(dst) = self.buf.get_mut(self.len..self.len + bytes.len()) {
            dst.copy_from_slice(bytes);
            self.len += bytes.len();
        }
    }

    fn uuid(&self) -> Uuid {
        Uuid::new_v5(&NAMESPACE, self.buf.get(..self.len).unwrap_or(&[]))
    }
}

/// The id of a glucose record: device identity + GLS sequence number.
pub fn glucose(device: &str, sequence_number: u16) -> Uuid {
    let mut n = Name::new(b"glu.v1\0", device);
    n.put(&sequence_number.to_le_bytes());
    n.uuid()
}

/// The values that identify one glucose record of a meter whose sequence numbers name nothing across
/// sessions ([`crate::model::RecordNumbering::NewestFirst`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GlucoseTimeIdentity {
    /// Base Time as the meter sent it.
    pub base_time: DateTime,
    /// Time Offset in minutes, if sent.
    pub time_offset_min: Option<i16>,
    /// The concentration as transmitted, if sent.
    pub concentration: Option<SFloat>,
    /// `true` for mol/L (flag b2).
    pub mol_per_l: bool,
    /// Sample type and location nibbles as one octet (type low, location high), if sent.
    pub type_and_location: Option<u8>,
}

/// The id of a glucose record by its time and value (for meters whose sequence numbers are not stable).
pub fn glucose_by_time(device: &str, r: &GlucoseTimeIdentity) -> Uuid {
    let mut n = Name::new(b"glu.t1\0", device);
    let t = r.base_time;
    n.put(&t.year.to_le_bytes());
    n.put(&[t.month, t.day, t.hours, t.minutes, t.seconds]);
    n.put(&[u8::from(r.time_offset_min.is_some())]);
    n.put(&r.time_offset_min.unwrap_or(0).to_le_bytes());
    n.put(&normalised(r.concentration));
    n.put(&[
        u8::from(r.mol_per_l),
        u8::from(r.type_and_location.is_some()),
        r.type_and_location.unwrap_or(0),
    ]);
    n.uuid()
}

/// The values that identify one blood-pressure reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BpIdentity {
    /// The device's time stamp, if it sends one.
    pub timestamp: Option<DateTime>,
    /// BLS user id (255 = unknown user), if present.
    pub user_id: Option<u8>,
    /// `true` for kPa.
    pub kpa: bool,
    /// Systolic as transmitted.
    pub systolic: SFloat,
    /// Diastolic as transmitted.
    pub diastolic: SFloat,
    /// Mean arterial pressure as transmitted.
    pub mean_arterial_pressure: SFloat,
    /// Pulse rate as transmitted, if present.
    pub pulse_rate: Option<SFloat>,
}

/// The id of a blood-pressure reading: device identity + time stamp + user + values.
pub fn blood_pressure(device: &str, r: &BpIdentity) -> Uuid {
    let mut n = Name::new(b"bp.v1\0", device);
    match r.timestamp {
        Some(t) => {
            n.put(&[1]);
            n.put(&t.year.to_le_bytes());
            n.put(&[t.month, t.day, t.hours, t.minutes, t.seconds]);
        }
        None => n.put(&[0]),
    }
    n.put(&[
        u8::from(r.user_id.is_some()),
        r.user_id.unwrap_or(0),
        u8::from(r.kpa),
    ]);
    // Values are normalised before hashing so that 1200×10^-1 and 120×10^0 are one reading.
    for v in [
        Some(r.systolic),
        Some(r.diastolic),
        Some(r.mean_arterial_pressure),
        r.pulse_rate,
    ] {
        n.put(&normalised(v));
    }
    n.uuid()
}

/// A canonical 3-octet form of an optional SFLOAT: tag + mantissa/exponent with trailing zeros moved
/// into the exponent (so every encoding of one value maps to one form); specials keep their raw word.
fn normalised(v: Option<SFloat>) -> [u8; 3] {
    use crate::ieee11073::Number;
    match v {
        None => [0, 0, 0],
        Some(SFloat(Number::Finite {
            mut mantissa,
            mut exponent,
        })) => {
            if mantissa == 0 {
                exponent = 0;
            }
            while mantissa != 0 && mantissa % 10 == 0 && exponent < 7 {
                mantissa /= 10;
                exponent += 1;
            }
            let raw = ((exponent as u16 & 0xF) << 12) | (mantissa as u16 & 0x0FFF);
            let [a, b] = raw.to_le_bytes();
            [1, a, b]
        }
        Some(special) => {
            let [a, b] = special.to_le_bytes();
            [2, a, b]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bp() -> BpIdentity {
        BpIdentity {
            timestamp: Some(DateTime {
                year: 2024,
                month: 6,
                day: 15,
                hours: 17,
                minutes: 17,
                seconds: 27,
            }),
            user_id: Some(1),
            kpa: false,
            systolic: SFloat::new(124, 0).unwrap(),
            diastolic: SFloat::new(86, 0).unwrap(),
            mean_arterial_pressure: SFloat::new(97, 0).unwrap(),
            pulse_rate: Some(SFloat::new(51, 0).unwrap()),
        }
    }

    #[test]
    fn glucose_id_is_stable_and_version_5() {
        let a = glucose("meter-1", 42);
        assert_eq!(a, glucose("meter-1", 42));
        assert_eq!(a.get_version_num(), 5);
        assert_ne!(a, glucose("meter-1", 43));
        assert_ne!(a, glucose("meter-2", 42));
    }

    fn by_time() -> GlucoseTimeIdentity {
        GlucoseTimeIdentity {
            base_time: bp().timestamp.unwrap(),
            time_offset_min: Some(0),
            concentration: Some(SFloat::new(112, -5).unwrap()),
            mol_per_l: false,
            type_and_location: Some(0x11),
        }
    }

    /// A newest-first meter's record keeps its id when renumbered (the id has no sequence number in it),
    /// and two readings that differ in time, value, unit or sample type do not share one.
    #[test]
    fn glucose_by_time_names_the_measurement_not_its_number() {
        let a = by_time();
        assert_eq!(glucose_by_time("m", &a), glucose_by_time("m", &a));
        let mut other_encoding = a;
        other_encoding.concentration = Some(SFloat::new(1120, -6).unwrap());
        assert_eq!(
            glucose_by_time("m", &a),
            glucose_by_time("m", &other_encoding)
        );
        let mut later = a;
        later.base_time.seconds += 1;
        let mut higher = a;
        higher.concentration = Some(SFloat::new(113, -5).unwrap());
        let mut mol = a;
        mol.mol_per_l = true;
        let mut venous = a;
        venous.type_and_location = Some(0x13);
        let mut no_offset = a;
        no_offset.time_offset_min = None;
        for b in [later, higher, mol, venous, no_offset] {
            assert_ne!(glucose_by_time("m", &a), glucose_by_time("m", &b), "{b:?}");
        }
        assert_ne!(glucose_by_time("m", &a), glucose_by_time("n", &a));
        assert_ne!(glucose_by_time("m", &a), glucose("m", 0));
    }

    #[test]
    fn device_boundaries_do_not_collide() {
        // "meter-1" seq 0x3231 must differ from "meter-112" seq ... : the length prefix separates them.
        assert_ne!(glucose("ab", 0x6363), glucose("abcc", 0));
    }

    #[test]
    fn bp_id_ignores_encoding_but_not_values() {
        let a = bp();
        let mut b = a;
        b.systolic = SFloat::new(1240, -1).unwrap(); // same 124 mmHg, other encoding
        assert_eq!(blood_pressure("cuff", &a), blood_pressure("cuff", &b));
        let mut c = a;
        c.diastolic = SFloat::new(87, 0).unwrap();
        assert_ne!(blood_pressure("cuff", &a), blood_pressure("cuff", &c));
        let mut d = a;
        d.user_id = Some(2);
        assert_ne!(blood_pressure("cuff", &a), blood_pressure("cuff", &d));
        let mut e = a;
        e.timestamp = None;
        assert_ne!(blood_pressure("cuff", &a), blood_pressure("cuff", &e));
        assert_ne!(blood_pressure("cuff", &a), blood_pressure("cuff2", &a));
    }

    /// The ids are part of the MQTT contract: pin one so an accidental change of the name layout fails.
    #[test]
    fn glucose_id_known_answer() {
        let pinned = glucose("00:11:22:33:44:55", 7).to_string();
        assert_eq!(pinned.len(), 36);
        assert_eq!(pinned, PINNED_GLUCOSE_ID);
    }

    /// Computed independently: `uuid.UUID(bytes=sha1(NAMESPACE + b"glu.v1\0" + len + device + seq_le)[:16], version=5)`
    /// in Python's standard library.
    const PINNED_GLUCOSE_ID: &str = "20178b84-9cc1-5407-9253-b99b9ffbffec";
}
