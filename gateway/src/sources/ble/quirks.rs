//! Device quirks as data, keyed on the Device Information Model Number (0x2A24) or, before it has been
//! read, the advertised name (GATT.md "Real devices").
//!
//! A quirk is applied where it belongs: a value that deviates from the specification is rewritten into
//! the specification's layout by the link ([`Quirks::normalize`]) so the pipeline decodes every device the
//! same way; a timing quirk goes into the collector's configuration ([`Quirks::cccd_delay`]).

use std::time::Duration;

use protocol::gatt::Codec;
use protocol::gatt::bp::{BloodPressureMeasurement, BpQuirks};

use crate::sources::uuid;

/// What a device does differently. `Default` is a device that follows the specifications.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Quirks {
    /// Blood Pressure Measurement layout deviations (Beurer: pulse and status big-endian, User ID
    /// always present; derdilla PR #735).
    pub bp: BpQuirks,
    /// Wait this long before each CCCD write (Beurer BM85 ignores one issued right after discovery;
    /// 50–100 ms fixes it, derdilla PR #729).
    pub cccd_delay_ms: u16,
    /// Glucose Base Time is UTC and the Time Offset is the zone offset (Contour Next One: −420 min in
    /// PDT; LiamsGitHub README). That is GLS-conformant — user-facing time = Base Time + Time Offset =
    /// local time — so values are passed on unchanged and the offset measured against the meter's local
    /// clock corrects them to UTC; the flag records that the Base Time alone is already UTC (what a
    /// collector that ignores the Time Offset would get wrong).
    pub glucose_base_time_utc: bool,
    /// Sequence numbers count down from the newest (TaiDoc Diamond Mini DM30b fw 1.2.4: sequence 0 is
    /// the newest record, no Current Time, no context; xDrip asks for `01 05` only and synthesises a
    /// sequence from the time stamp). The "≥ last + 1" cursor cannot work on such a meter: its sessions
    /// read every record and keep the new ones by time
    /// ([`protocol::model::RecordNumbering::NewestFirst`]). Unlike xDrip's "last record only", that also
    /// collects the readings taken between two sessions.
    pub reversed_sequence_numbers: bool,
}

impl Quirks {
    /// The collector's CCCD delay.
    pub fn cccd_delay(&self) -> Duration {
        Duration::from_millis(u64::from(self.cccd_delay_ms))
    }

    /// Rewrites a value the device sent into the specification's layout. Values that do not decode under
    /// the quirks are passed on unchanged: the pipeline reports them as `decode_failed` with the octets
    /// as received.
    pub fn normalize(&self, characteristic: u16, value: Vec<u8>) -> Vec<u8> {
        match characteristic {
            uuid::BP_MEASUREMENT if self.bp != BpQuirks::NONE => {
                match BloodPressureMeasurement::parse_with_quirks(&value, self.bp) {
                    Ok(m) => m.to_vec(),
                    Err(_) => value,
                }
            }
            _ => value,
        }
    }
}

/// One row of the quirk table: which devices, and what they do.
#[derive(Debug, Clone, Copy)]
pub struct QuirkEntry {
    /// Matched against the start of the Model Number String or the advertised name, ignoring case.
    pub prefixes: &'static [&'static str],
    /// The quirks.
    pub quirks: Quirks,
    /// Where the quirk was reported.
    pub source: &'static str,
}

/// The table (GATT.md "Real devices: quirks users have reported").
pub const TABLE: &[QuirkEntry] = &[
    QuirkEntry {
        // The model list comes from Beurer's own app (derdilla PR #735).
        prefixes: &["BM48", "BM59", "BM85", "ELITE900", "Beurer BM"],
        quirks: Quirks {
            bp: BpQuirks {
                big_endian_pulse_and_status: true,
                user_id_always_present: true,
            },
            cccd_delay_ms: 100,
            glucose_base_time_utc: false,
            reversed_sequence_numbers: false,
        },
        source: "derdilla/blood-pressure-monitor-fl PR #735, PR #729",
    },
    QuirkEntry {
        prefixes: &["Contour", "CONTOUR"],
        quirks: Quirks {
            bp: BpQuirks::NONE,
            cccd_delay_ms: 0,
            glucose_base_time_utc: true,
            reversed_sequence_numbers: false,
        },
        source: "LiamsGitHub/GlucometerBluetoothToHealthKit README (Contour Next One)",
    },
    QuirkEntry {
        prefixes: &["TD-4", "DM30", "Diamond Mini", "TAIDOC"],
        quirks: Quirks {
            bp: BpQuirks::NONE,
            cccd_delay_ms: 0,
            glucose_base_time_utc: false,
            reversed_sequence_numbers: true,
        },
        source: "NightscoutFoundation/xDrip BluetoothGlucoseMeter.java (TaiDoc DM30b fw 1.2.4)",
    },
];

/// The quirks of a device with this model number (or advertised name); none when nothing matches.
pub fn lookup(model_or_name: &str) -> Quirks {
    let m = model_or_name.trim().to_ascii_lowercase();
    TABLE
        .iter()
        .find(|e| {
            e.prefixes
                .iter()
                .any(|p| m.starts_with(&p.to_ascii_lowercase()))
        })
        .map(|e| e.quirks)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("test hex"))
            .collect()
    }

    /// A Beurer BM85 measurement (derdilla PR #735 layout: pulse 72 sent `00 48`, User ID 1 without flag
    /// b3, status irregular pulse `00 04`) is rewritten into the specification's layout, which the
    /// pipeline's plain parse reads as 124/86 mmHg, pulse 72, user 1.
    #[test]
    fn beurer_bm85_measurement_is_normalized() {
        let q = lookup("BM85");
        assert!(q.bp.big_endian_pulse_and_status && q.bp.user_id_always_present);
        assert_eq!(q.cccd_delay(), Duration::from_millis(100));
        let captured = hex("567C0056000000E807060F11111B0048010004");
        let out = q.normalize(uuid::BP_MEASUREMENT, captured.clone());
        let m = BloodPressureMeasurement::parse(&out).expect("normalized value decodes");
        assert_eq!(m.systolic.value(), Some(124.0));
        assert_eq!(m.diastolic.value(), Some(86.0));
        assert_eq!(m.pulse_rate.and_then(|p| p.value()), Some(72.0));
        assert_eq!(m.user_id, Some(1));
        // Without the quirk the same octets decode to a nonsense pulse and no user.
        let plain = BloodPressureMeasurement::parse(&captured).expect("decodes");
        assert_ne!(plain.pulse_rate.and_then(|p| p.value()), Some(72.0));
        assert_eq!(plain.user_id, None);
    }

    /// Contour Next One capture (vector `133100E2070A060F2F325CFE7EB0FA`): Base Time 2018-10-06 15:47:50
    /// is UTC and the Time Offset −420 min is the zone (PDT). The value passes unchanged; the meter's clock
    /// reads local time, so the offset measured at the connection is −7 h, and the corrected time the
    /// pipeline derives is the UTC instant 15:47:50 — not 08:47:50, and not 22:47:50.
    #[test]
    fn contour_base_time_is_utc() {
        use protocol::gatt::glucose::GlucoseMeasurement;
        use protocol::model::{GlucoseRecord, Measurement};
        use protocol::validate::{Reception, validate};
        let q = lookup("Contour Next One");
        assert!(q.glucose_base_time_utc);
        let captured = hex("133100E2070A060F2F325CFE7EB0FA");
        assert_eq!(
            q.normalize(uuid::GLUCOSE_MEASUREMENT, captured.clone()),
            captured
        );
        let g = GlucoseMeasurement::parse(&captured).expect("decodes");
        assert_eq!(g.time_offset_min, Some(-420));
        let base_utc = g.base_time.to_epoch_seconds().expect("a full date");
        let m = Measurement::Glucose(GlucoseRecord::from_gatt(&g));
        let rx = Reception {
            received_utc: base_utc + 60,
            clock_offset_s: Some(-420 * 60),
        };
        let v = validate(&m, &rx);
        assert_eq!(v.time.corrected_utc, Some(base_utc));
    }

    /// TaiDoc DM30b: reversed sequence numbers, by model number or by advertised name.
    #[test]
    fn taidoc_reversed_sequence_numbers() {
        let q = lookup("TD-4277");
        assert!(q.reversed_sequence_numbers);
        assert_eq!(lookup("Diamond Mini DM30b"), q);
    }

    /// A device not in the table gets no quirks, and its values pass through byte for byte.
    #[test]
    fn unknown_devices_are_left_alone() {
        let q = lookup("SimGluco 100");
        assert_eq!(q, Quirks::default());
        let v = hex("133100E2070A060F2F325CFE7EB0FA");
        assert_eq!(q.normalize(uuid::GLUCOSE_MEASUREMENT, v.clone()), v);
    }
}
