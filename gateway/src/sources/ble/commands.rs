//! What `gateway pair` and `gateway devices` do, as library functions (the CLI adds the prompts).

use std::collections::BTreeMap;
use std::time::Duration;

use btleplug::api::{Central, Peripheral as _, ScanFilter};
use serde::Serialize;

use super::link::{BleLink, short_uuid};
use super::pairing::{PairError, Pairing, PasskeyProvider};
use super::store::{DeviceKind, DeviceStore, PairedDevice, StoreError, normalize_address};
use super::{BleConfig, BleError, SelectedAdapter, read_string};
use crate::sources::collector::now_utc;
use crate::sources::{BLOOD_PRESSURE_SERVICE, GLUCOSE_SERVICE, uuid};

/// A device found by a pairing scan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Candidate {
    /// `AA:BB:CC:DD:EE:FF`.
    pub address: String,
    /// The advertised name.
    pub name: Option<String>,
    /// Signal strength, dBm.
    pub rssi: Option<i16>,
    /// Glucometer or cuff, from the advertised service.
    pub kind: DeviceKind,
    /// Already paired through this gateway.
    pub paired_here: bool,
}

/// Why pairing a device failed.
#[derive(Debug, thiserror::Error)]
pub enum PairFlowError {
    /// The radio.
    #[error(transparent)]
    Ble(#[from] BleError),
    /// BlueZ refused or timed out.
    #[error(transparent)]
    Pair(#[from] PairError),
    /// The store.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The device was not seen advertising a Glucose or Blood Pressure service.
    #[error(
        "{0} is not a glucometer or cuff in range (run the scan again with the device in pairing mode)"
    )]
    NotFound(String),
    /// Reading Device Information after pairing failed.
    #[error("paired, but reading Device Information failed: {0}")]
    DeviceInfo(String),
}

fn kind_of(services: &[::uuid::Uuid]) -> Option<DeviceKind> {
    services
        .iter()
        .filter_map(short_uuid)
        .find_map(|s| match s {
            GLUCOSE_SERVICE => Some(DeviceKind::Glucometer),
            BLOOD_PRESSURE_SERVICE => Some(DeviceKind::Cuff),
            _ => None,
        })
}

/// Scans for `window` and lists the glucometers and cuffs in range, strongest first.
///
/// # Errors
/// [`BleError::Scan`].
pub async fn scan_candidates(
    adapter: &SelectedAdapter,
    store: &DeviceStore,
    window: Duration,
) -> Result<Vec<Candidate>, BleError> {
    let a = &adapter.adapter;
    a.start_scan(ScanFilter {
        services: vec![
            btleplug::api::bleuuid::uuid_from_u16(GLUCOSE_SERVICE),
            btleplug::api::bleuuid::uuid_from_u16(BLOOD_PRESSURE_SERVICE),
        ],
    })
    .await
    .map_err(|e| BleError::Scan(e.to_string()))?;
    tokio::time::sleep(window).await;
    let _ = a.stop_scan().await;
    let paired = store.devices().unwrap_or_default();
    let mut out = Vec::new();
    for p in a
        .peripherals()
        .await
        .map_err(|e| BleError::Scan(e.to_string()))?
    {
        let Ok(Some(props)) = p.properties().await else {
            continue;
        };
        let Some(kind) = kind_of(&props.services) else {
            continue;
        };
        let address = props.address.to_string().to_ascii_uppercase();
        out.push(Candidate {
            paired_here: paired.contains_key(&address),
            address,
            name: props.local_name,
            rssi: props.rssi,
            kind,
        });
    }
    out.sort_by_key(|c| std::cmp::Reverse(c.rssi.unwrap_or(i16::MIN)));
    Ok(out)
}

/// What to pair and whom it belongs to.
#[derive(Debug, Clone, Default)]
pub struct PairRequest {
    /// The device.
    pub address: String,
    /// The patient (pseudonymous id) for every reading of the device.
    pub patient: Option<String>,
    /// Cuff users → patient.
    pub users: BTreeMap<u8, String>,
}

/// Pairs a device (BlueZ `Device1.Pair`, passkey through the agent), marks it trusted, reads its Device
/// Information over a btleplug connection, and stores it with its patient binding in the allow-list.
///
/// # Errors
/// [`PairFlowError`]; nothing is stored unless every step succeeded.
pub async fn pair_and_store(
    cfg: &BleConfig,
    adapter: &SelectedAdapter,
    store: &DeviceStore,
    req: &PairRequest,
    passkey: Option<PasskeyProvider>,
) -> Result<PairedDevice, PairFlowError> {
    let address = normalize_address(&req.address);
    let mut found = None;
    for p in adapter
        .adapter
        .peripherals()
        .await
        .map_err(|e| BleError::Scan(e.to_string()))?
    {
        if let Ok(Some(props)) = p.properties().await
            && props.address.to_string().eq_ignore_ascii_case(&address)
        {
            found = kind_of(&props.services).map(|k| (p, props, k));
            break;
        }
    }
    let Some((peripheral, props, kind)) = found else {
        return Err(PairFlowError::NotFound(address));
    };
    let pairing = Pairing::connect().await?;
    pairing
        .pair(&adapter.name, &address, passkey, Duration::from_secs(60))
        .await?;
    let mut link = BleLink::open(adapter, peripheral, cfg.op_timeout, cfg.connect_timeout)
        .await
        .map_err(|e| PairFlowError::DeviceInfo(e.to_string()))?;
    let model = read_string(&mut link, uuid::MODEL_NUMBER).await;
    let manufacturer = read_string(&mut link, uuid::MANUFACTURER_NAME).await;
    let serial = read_string(&mut link, uuid::SERIAL_NUMBER).await;
    crate::sources::GattLink::disconnect(&mut link).await;
    let device = PairedDevice {
        address,
        kind,
        name: props.local_name,
        model,
        manufacturer,
        serial,
        patient: req.patient.clone(),
        users: req.users.clone(),
        paired_at: now_utc(),
    };
    store.put(device.clone())?;
    tracing::info!(device = %device.address, model = ?device.model, "paired and added to the allow-list");
    Ok(device)
}

/// Unpairs: removes the device from the allow-list and asks BlueZ to forget the bond. The allow-list
/// entry goes even if BlueZ cannot be reached (the gateway stops connecting at once).
///
/// # Errors
/// [`StoreError::Unknown`] when it was not paired here; other store errors.
pub async fn unpair(
    adapter_name: &str,
    store: &DeviceStore,
    address: &str,
) -> Result<Option<PairError>, StoreError> {
    let address = normalize_address(address);
    if !store.remove(&address)? {
        return Err(StoreError::Unknown(address));
    }
    let bluez = match Pairing::connect().await {
        Ok(p) => p.remove(adapter_name, &address).await.err(),
        Err(e) => Some(e),
    };
    Ok(bluez)
}
