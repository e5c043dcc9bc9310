//! Sources: where characteristic values come from.
//!
//! Every source — the simulator here, the btleplug (BlueZ) source, a kiosk — gives the same thing: a
//! [`GattLink`] to one connected device, over which a collector ([`collector`]) runs the Glucose or Blood
//! Pressure profile's collector role (subscribe, read the clock, RACP, receive notifications). The
//! collector only moves bytes and keeps the profile's timing rules; decoding and everything after it is
//! the pipeline's.

pub mod ble;
pub mod card_reader;
pub mod collector;
pub mod notice;
pub mod simulator;

use std::future::Future;

/// Glucose Service.
pub const GLUCOSE_SERVICE: u16 = 0x1808;
/// Blood Pressure Service.
pub const BLOOD_PRESSURE_SERVICE: u16 = 0x1810;
/// Battery Service (BAS): optional on the devices; read for the staff page, never required.
pub const BATTERY_SERVICE: u16 = 0x180F;

/// Characteristic UUIDs the collectors use.
pub mod uuid {
    /// Glucose Measurement.
    pub const GLUCOSE_MEASUREMENT: u16 = 0x2A18;
    /// Glucose Measurement Context.
    pub const GLUCOSE_CONTEXT: u16 = 0x2A34;
    /// Glucose Feature.
    pub const GLUCOSE_FEATURE: u16 = 0x2A51;
    /// Record Access Control Point.
    pub const RACP: u16 = 0x2A52;
    /// Blood Pressure Measurement.
    pub const BP_MEASUREMENT: u16 = 0x2A35;
    /// Intermediate Cuff Pressure.
    pub const INTERMEDIATE_CUFF_PRESSURE: u16 = 0x2A36;
    /// Blood Pressure Feature.
    pub const BP_FEATURE: u16 = 0x2A49;
    /// Current Time.
    pub const CURRENT_TIME: u16 = 0x2A2B;
    /// Date Time (some meters keep their clock here instead of Current Time).
    pub const DATE_TIME: u16 = 0x2A08;
    /// Model Number String.
    pub const MODEL_NUMBER: u16 = 0x2A24;
    /// Serial Number String.
    pub const SERIAL_NUMBER: u16 = 0x2A25;
    /// Manufacturer Name String.
    pub const MANUFACTURER_NAME: u16 = 0x2A29;
    /// Battery Level (in the Battery Service).
    pub const BATTERY_LEVEL: u16 = 0x2A19;
}

/// ATT error codes a collector must tell apart (Core Spec Vol 3 Part F §3.4.1.1; GLS/CSS application errors).
pub mod att {
    /// Insufficient Authentication: the link is not bonded/encrypted (GLS.TS SPE/BI-09).
    pub const INSUFFICIENT_AUTHENTICATION: u8 = 0x05;
    /// Insufficient Encryption.
    pub const INSUFFICIENT_ENCRYPTION: u8 = 0x0F;
    /// GLS: a RACP procedure is already in progress.
    pub const PROCEDURE_ALREADY_IN_PROGRESS: u8 = 0x80;
    /// GLS: Client Characteristic Configuration Descriptor improperly configured.
    pub const CCCD_IMPROPERLY_CONFIGURED: u8 = 0x81;
}

/// A value a device pushed: a notification or an indication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    /// The characteristic.
    pub uuid: u16,
    /// The value as transmitted.
    pub value: Vec<u8>,
}

/// Why a GATT operation failed. Each leaves the link as it was, except `Disconnected`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    /// The device answered with an ATT error code (see [`att`]). Recoverable: the collector may fix the
    /// cause (subscribe, pair) and retry.
    #[error("ATT error 0x{0:02X}")]
    Att(u8),
    /// The device does not have this characteristic.
    #[error("characteristic 0x{0:04X} not present")]
    Missing(u16),
    /// The link is gone. Not recoverable within this session; the device keeps its records.
    #[error("disconnected")]
    Disconnected,
    /// The operation did not complete in time (a wedged stack must not hang the gateway).
    #[error("timed out")]
    Timeout,
}

/// One connected device, as a collector sees it.
///
/// Implementations: the simulator's in-process link; the btleplug link (BlueZ over D-Bus).
pub trait GattLink: Send {
    /// Whether the device exposes this characteristic (after service discovery).
    fn has(&self, uuid: u16) -> bool;

    /// Reads a characteristic value.
    fn read(&mut self, uuid: u16) -> impl Future<Output = Result<Vec<u8>, LinkError>> + Send;

    /// Writes a characteristic value (with response).
    fn write(
        &mut self,
        uuid: u16,
        value: &[u8],
    ) -> impl Future<Output = Result<(), LinkError>> + Send;

    /// Enables notifications or indications (writes the CCCD).
    fn subscribe(&mut self, uuid: u16) -> impl Future<Output = Result<(), LinkError>> + Send;

    /// The next notification or indication, or `None` once the link is gone.
    fn next_notification(&mut self) -> impl Future<Output = Option<Notification>> + Send;

    /// Closes the link.
    fn disconnect(&mut self) -> impl Future<Output = ()> + Send;
}
