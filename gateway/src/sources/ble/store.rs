//! The paired-device store: the allow-list.
//!
//! Only devices paired through the gateway (`gateway pair`) are ever connected (DESIGN.md promise 8).
//! Each entry keeps what pairing learnt (Device Information) and the device's patient binding — one
//! pseudonymous patient id, or one per BLS user id for a cuff with several users. A second file keeps each
//! device's last session outcome so `gateway devices` can show it while the daemon runs.
//!
//! Both are small JSON files written atomically (temporary file, fsync, rename) with mode 0600 in a
//! directory of mode 0700.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The kind of device, from the service it advertises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceKind {
    /// Glucose Service 0x1808.
    Glucometer,
    /// Blood Pressure Service 0x1810.
    Cuff,
}

/// A device paired through the gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PairedDevice {
    /// Bluetooth address, `AA:BB:CC:DD:EE:FF`: the device's identity in reading ids.
    pub address: String,
    /// Glucometer or cuff.
    pub kind: DeviceKind,
    /// The advertised name at pairing.
    pub name: Option<String>,
    /// Model Number String (0x2A24): the quirk table's key.
    pub model: Option<String>,
    /// Manufacturer Name String (0x2A29).
    pub manufacturer: Option<String>,
    /// Serial Number String (0x2A25).
    pub serial: Option<String>,
    /// The patient every reading goes to (pseudonymous id), unless a user binding says otherwise.
    pub patient: Option<String>,
    /// Cuff users → patient (BLS User ID → pseudonymous id).
    #[serde(default)]
    pub users: BTreeMap<u8, String>,
    /// When it was paired (Unix seconds, UTC).
    pub paired_at: i64,
}

/// Where a session failed and why — shown by `gateway devices`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// `connect`, `discover`, `subscribe`, `racp write`, `transfer`, `pairing`, `deadline` …
    pub stage: String,
    /// The cause, in words.
    pub cause: String,
    /// The RSSI BlueZ last reported for the device, dBm.
    pub rssi: Option<i16>,
    /// When (Unix seconds, UTC).
    pub at: i64,
}

/// A device's battery level as last read (Battery Level 0x2A19), for the staff page and `gateway devices`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Battery {
    /// Remaining charge, 0..=100 %.
    pub percent: u8,
    /// When it was read (Unix seconds, UTC): a level from last week says little about today.
    pub at: i64,
}

/// At or below this level a device's battery is reported low (staff page, `gateway devices`, a WARN
/// line): a cuff's inflations drain the last fifth quickly, and a kiosk cuff that dies mid-clinic sends
/// the queue home unmeasured. The Battery Level characteristic itself defines no "low".
pub const LOW_BATTERY_PERCENT: u8 = 20;

impl Battery {
    /// Whether the level is at or below [`LOW_BATTERY_PERCENT`].
    pub fn is_low(&self) -> bool {
        self.percent <= LOW_BATTERY_PERCENT
    }
}

/// A device's session record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStatus {
    /// The last failure, if the last session failed.
    pub last_failure: Option<Failure>,
    /// The last session that completed (Unix seconds, UTC).
    pub last_success: Option<i64>,
    /// Failures in a row (drives the retry backoff).
    pub consecutive_failures: u32,
    /// The last battery level read; kept when a later read fails (its `at` shows its age). Absent in
    /// files written before batteries were read, and for devices without a Battery Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub battery: Option<Battery>,
}

/// Why the store could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The file system refused.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not what the gateway wrote.
    #[error("{path}: {message}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// No such device in the store.
    #[error("no paired device {0}")]
    Unknown(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The allow-list and the status board, in `dir`.
#[derive(Debug, Clone)]
pub struct DeviceStore {
    dir: PathBuf,
    /// Serialises this process's read-modify-write of the files (concurrent sessions record their
    /// status at the same moment). A std mutex: held for one small file write, never across `.await`.
    write: std::sync::Arc<std::sync::Mutex<()>>,
}

impl DeviceStore {
    /// The store in `dir` (created 0700 on the first write).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        DeviceStore {
            dir: dir.into(),
            write: Default::default(),
        }
    }

    fn devices_path(&self) -> PathBuf {
        self.dir.join("devices.json")
    }

    fn status_path(&self) -> PathBuf {
        self.dir.join("device-status.json")
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.write
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The paired devices, by address. An absent file is an empty list.
    ///
    /// # Errors
    /// [`StoreError`] when the file cannot be read or parsed.
    pub fn devices(&self) -> Result<BTreeMap<String, PairedDevice>, StoreError> {
        read_json(&self.devices_path())
    }

    /// One paired device.
    ///
    /// # Errors
    /// As [`Self::devices`].
    pub fn device(&self, address: &str) -> Result<Option<PairedDevice>, StoreError> {
        Ok(self.devices()?.remove(&normalize_address(address)))
    }

    /// Adds or replaces a device.
    ///
    /// # Errors
    /// [`StoreError`] when the file cannot be read or written.
    pub fn put(&self, device: PairedDevice) -> Result<(), StoreError> {
        let _guard = self.lock();
        let mut all = self.devices()?;
        all.insert(normalize_address(&device.address), device);
        write_json(&self.dir, &self.devices_path(), &all)
    }

    /// Removes a device (unpair); `Ok(false)` if it was not there.
    ///
    /// # Errors
    /// [`StoreError`] when the file cannot be read or written.
    pub fn remove(&self, address: &str) -> Result<bool, StoreError> {
        let _guard = self.lock();
        let mut all = self.devices()?;
        let had = all.remove(&normalize_address(address)).is_some();
        if had {
            write_json(&self.dir, &self.devices_path(), &all)?;
        }
        Ok(had)
    }

    /// Rebinds a device (or one cuff user) to `patient`.
    ///
    /// # Errors
    /// [`StoreError::Unknown`] when the device is not paired; I/O errors.
    pub fn rebind(&self, address: &str, user: Option<u8>, patient: &str) -> Result<(), StoreError> {
        let key = normalize_address(address);
        let _guard = self.lock();
        let mut all = self.devices()?;
        let d = all
            .get_mut(&key)
            .ok_or_else(|| StoreError::Unknown(key.clone()))?;
        match user {
            Some(u) => {
                d.users.insert(u, patient.to_owned());
            }
            None => d.patient = Some(patient.to_owned()),
        }
        write_json(&self.dir, &self.devices_path(), &all)
    }

    /// Every device's last session outcome.
    ///
    /// # Errors
    /// As [`Self::devices`].
    pub fn statuses(&self) -> Result<BTreeMap<String, DeviceStatus>, StoreError> {
        read_json(&self.status_path())
    }

    /// Records a device's session outcome.
    ///
    /// # Errors
    /// I/O errors.
    pub fn put_status(&self, address: &str, status: &DeviceStatus) -> Result<(), StoreError> {
        let _guard = self.lock();
        let mut all = self.statuses().unwrap_or_default();
        all.insert(normalize_address(address), status.clone());
        write_json(&self.dir, &self.status_path(), &all)
    }
}

/// `aa-bb-cc…` / `aa:bb:…` → `AA:BB:…`.
pub fn normalize_address(a: &str) -> String {
    a.trim().replace(['-', '_'], ":").to_ascii_uppercase()
}

fn read_json<T: for<'de> Deserialize<'de> + Default>(path: &Path) -> Result<T, StoreError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
            path: path.to_owned(),
            message: e.to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
        Err(e) => Err(io(path)(e)),
    }
}

fn write_json<T: Serialize>(dir: &Path, path: &Path, value: &T) -> Result<(), StoreError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(dir))?;
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| StoreError::Corrupt {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    crate::state_file::replace(path, &bytes).map_err(io(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_round_trips_and_rebinds() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = DeviceStore::new(dir.path().join("ble"));
        assert!(store.devices().expect("empty").is_empty());
        store
            .put(PairedDevice {
                address: "aa:bb:cc:dd:ee:01".into(),
                kind: DeviceKind::Cuff,
                name: Some("BM85".into()),
                model: Some("BM85".into()),
                manufacturer: None,
                serial: None,
                patient: Some("p-1".into()),
                users: BTreeMap::new(),
                paired_at: 1,
            })
            .expect("put");
        store
            .rebind("AA-BB-CC-DD-EE-01", Some(2), "p-2")
            .expect("rebind");
        let d = store
            .device("AA:BB:CC:DD:EE:01")
            .expect("read")
            .expect("present");
        assert_eq!(d.users.get(&2).map(String::as_str), Some("p-2"));
        assert!(matches!(
            store.rebind("AA:BB:CC:DD:EE:02", None, "p"),
            Err(StoreError::Unknown(_))
        ));
        assert!(store.remove("aa:bb:cc:dd:ee:01").expect("remove"));
        assert!(store.devices().expect("read").is_empty());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("ble/devices.json"))
            .expect("file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
