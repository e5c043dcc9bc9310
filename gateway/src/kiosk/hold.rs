//! The unattributed hold: kiosk readings no patient could be given, kept for staff to assign or discard.
//!
//! Durable: a state file (`kiosk-hold.json` beside the journal directory, or `[kiosk] hold_file`) replaced
//! whole with [`crate::state_file::replace`] on every change, so it survives a restart, a SIGKILL and a
//! power cut as the old list or the new one. The journal is not the hold: it is a queue that empties as
//! the broker takes the `unattributed` events, while staff may come to a reading hours later.
//!
//! Ordering keeps "nothing disappears without an event" true at every crash point:
//! - a reading is written here **before** its `unattributed` event is journaled (the device's cursor moves
//!   only with the journal, so a crash in between re-delivers it; the hold keeps one entry per reading id);
//! - an assignment or a discard journals its records (and waits for the fsync) **before** the entry is
//!   removed here; a crash in between leaves the reading held, and doing it again publishes the same
//!   reading id (the CRM upserts on it).

use std::path::{Path, PathBuf};

use protocol::wire::{Kind, ReadingBody};
use serde::{Deserialize, Serialize};

use super::attribution::HoldReason;
use super::{HeldReading, MeasurementKind};

/// The file's schema: bump when its shape changes.
const HOLD_SCHEMA: &str = "phg.kiosk-hold/1";

/// One held reading.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeldEntry {
    /// Its deterministic reading id (kept when it is assigned).
    pub reading_id: String,
    /// Why it is held.
    pub reason: HoldReason,
    /// The reading as a reading message would carry it (without the patient).
    pub reading: ReadingBody,
}

#[derive(Debug, Serialize, Deserialize)]
struct HoldFile {
    schema: String,
    held: Vec<HeldEntry>,
}

/// The held readings, oldest first, and their file.
#[derive(Debug)]
pub struct Hold {
    path: PathBuf,
    held: Vec<HeldEntry>,
    /// At most this many held: the file is rewritten whole on each change.
    max: usize,
}

/// The file could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("kiosk hold file {path}: {what}")]
pub struct HoldError {
    /// The file.
    pub path: PathBuf,
    /// What went wrong.
    pub what: String,
}

impl Hold {
    /// Opens the hold kept at `path` (empty when there is no file yet), holding at most `max` readings.
    /// A file holding more (written with a larger `max`) is kept whole: nothing is dropped, new readings
    /// wait until staff bring it under `max`.
    ///
    /// # Errors
    /// The file exists but cannot be read or is not a hold file: the gateway must not start and forget
    /// what staff still have to see.
    pub fn open(path: &Path, max: usize) -> Result<Hold, HoldError> {
        let err = |what: String| HoldError {
            path: path.to_owned(),
            what,
        };
        let held = match std::fs::read(path) {
            Ok(bytes) => {
                let file: HoldFile =
                    serde_json::from_slice(&bytes).map_err(|e| err(e.to_string()))?;
                if file.schema != HOLD_SCHEMA {
                    return Err(err(format!("schema is not {HOLD_SCHEMA}")));
                }
                file.held
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(err(e.to_string())),
        };
        Ok(Hold {
            path: path.to_owned(),
            held,
            max,
        })
    }

    /// Holds `entry` (durably). `Ok(false)`: a reading with that id is held already (a re-delivery).
    ///
    /// # Errors
    /// It could not be written, or the hold is full (`max` readings); nothing changed. The caller does
    /// not accept the reading, so the device keeps it, as with a full journal: nothing is dropped to make
    /// room, since every held reading waits for a staff decision.
    pub fn insert(&mut self, entry: HeldEntry) -> Result<bool, HoldError> {
        if self.get(&entry.reading_id).is_some() {
            return Ok(false);
        }
        if self.held.len() >= self.max {
            return Err(HoldError {
                path: self.path.clone(),
                what: format!(
                    "full: {} readings held (kiosk.max_held {}); staff must assign or discard some",
                    self.held.len(),
                    self.max
                ),
            });
        }
        self.held.push(entry);
        if let Err(e) = self.save() {
            self.held.pop();
            return Err(e);
        }
        Ok(true)
    }

    /// The held reading with this id.
    pub fn get(&self, reading_id: &str) -> Option<&HeldEntry> {
        self.held.iter().find(|e| e.reading_id == reading_id)
    }

    /// Removes a held reading (durably); `Ok(None)` when none has that id.
    ///
    /// # Errors
    /// It could not be written; nothing changed.
    pub fn remove(&mut self, reading_id: &str) -> Result<Option<HeldEntry>, HoldError> {
        let Some(i) = self.held.iter().position(|e| e.reading_id == reading_id) else {
            return Ok(None);
        };
        let entry = self.held.remove(i);
        if let Err(e) = self.save() {
            self.held.insert(i, entry);
            return Err(e);
        }
        Ok(Some(entry))
    }

    /// The held readings, oldest first.
    pub fn entries(&self) -> &[HeldEntry] {
        &self.held
    }

    /// The held readings as the staff page shows them.
    pub fn view(&self) -> Vec<HeldReading> {
        self.held.iter().map(HeldEntry::view).collect()
    }

    fn save(&self) -> Result<(), HoldError> {
        let file = HoldFile {
            schema: HOLD_SCHEMA.to_owned(),
            held: self.held.clone(),
        };
        let bytes = serde_json::to_vec_pretty(&file).map_err(|e| HoldError {
            path: self.path.clone(),
            what: e.to_string(),
        })?;
        crate::state_file::replace(&self.path, &bytes).map_err(|e| HoldError {
            path: self.path.clone(),
            what: e.to_string(),
        })
    }
}

impl HeldEntry {
    /// As the staff page shows it.
    pub fn view(&self) -> HeldReading {
        let shown = Shown::of(&self.reading);
        HeldReading {
            reading_id: self.reading_id.clone(),
            device: self.reading.device.id.clone(),
            kind: shown.kind,
            value: shown.value,
            unit: shown.unit,
            measured_utc: self.reading.time.corrected.clone(),
            received_utc: self.reading.time.received.clone(),
            reason: self.reason.name().to_owned(),
        }
    }
}

/// A reading as the pages show it: in the unit the device displayed (CLINICAL.md §3.4: mmol/L with one
/// decimal, mg/dL and mmHg whole).
#[derive(Debug, Clone, PartialEq)]
pub struct Shown {
    /// Glucose or blood pressure.
    pub kind: MeasurementKind,
    /// `"7.7"`, `"138/88"`, `"LO"`.
    pub value: String,
    /// `"mmol/L"`, `"mg/dL"`, `"mmHg"`, `"kPa"`.
    pub unit: String,
    /// Pulse, when measured.
    pub pulse_bpm: Option<u16>,
}

impl Shown {
    /// How `body` is shown.
    pub fn of(body: &ReadingBody) -> Shown {
        match body.kind {
            Kind::Glucose => {
                let g = body.glucose;
                let unit = g.and_then(|g| g.unit).map_or("", |u| u.symbol()).to_owned();
                let value = match g {
                    Some(g) if g.censored.is_some() => {
                        match g.censored {
                            Some(protocol::validate::Censor::Low) => "LO",
                            _ => "HI",
                        }
                    }
                    .to_owned(),
                    Some(g) => match (g.value, unit.as_str()) {
                        (Some(v), "mmol/L") => format!("{v:.1}"),
                        (Some(v), _) => format!("{v:.0}"),
                        (None, _) => "?".to_owned(),
                    },
                    None => "?".to_owned(),
                };
                Shown {
                    kind: MeasurementKind::Glucose,
                    value,
                    unit,
                    pulse_bpm: None,
                }
            }
            Kind::BloodPressure => {
                let (value, unit, pulse) = match body.blood_pressure {
                    Some(b) => {
                        let unit = b.unit.symbol();
                        let value = if unit == "kPa" {
                            format!("{:.1}/{:.1}", b.systolic, b.diastolic)
                        } else {
                            format!("{:.0}/{:.0}", b.systolic, b.diastolic)
                        };
                        (value, unit.to_owned(), b.pulse_bpm)
                    }
                    None => ("?".to_owned(), String::new(), None),
                };
                Shown {
                    kind: MeasurementKind::BloodPressure,
                    value,
                    unit,
                    // A pulse is a small whole number; anything else is not shown.
                    pulse_bpm: pulse
                        .filter(|p| p.is_finite() && (0.0..=400.0).contains(p))
                        .map(|p| p.round() as u16),
                }
            }
        }
    }
}
