//! Notices about devices on the `…/events` topic (`device_error`, `unpaired_device`), journaled like
//! readings but best effort: every source reports through here (the BLE source, the kiosk's card reader).

use std::sync::Arc;

use crate::pipeline::Pipeline;
use crate::sources::collector::now_utc;

/// Journals a `device_error` event for the `…/events` topic (DESIGN.md promise 7: a dead adapter or an
/// unreadable device is reported, and the rest keeps working). `device` is a device address or an adapter
/// name; no payload values are in it. At most one event per device, stage and minute (its id), so a
/// device failing in a loop does not flood the CRM. Best effort: a full journal drops the notice, not a
/// reading.
pub async fn report_device_error(pipeline: &Pipeline, device: &str, stage: &str, cause: &str) {
    let now = now_utc();
    let event = protocol::wire::Event::DeviceError {
        device: device.to_owned(),
        stage: stage.to_owned(),
        cause: cause.to_owned(),
    };
    let id = format!("device-error:{device}:{stage}:{}", now.div_euclid(60));
    journal_notice(pipeline, device, event, id, now).await;
}

/// Journals a notice event about `device` under the id `id`. Best effort: a notice that the journal
/// refuses is logged, never retried in place of a reading.
pub(crate) async fn journal_notice(
    pipeline: &Pipeline,
    device: &str,
    event: protocol::wire::Event,
    id: String,
    now: i64,
) {
    let payload = match protocol::wire::EventMessage::new(&pipeline.gateway_id, now, event)
        .map_err(|e| e.to_string())
        .and_then(|m| serde_json::to_vec(&m).map_err(|e| e.to_string()))
    {
        Ok(p) => p,
        Err(e) => return tracing::error!(error = %e, id, "cannot build the event"),
    };
    let record = crate::journal::NewRecord {
        device: device.to_owned(),
        device_seq: None,
        reading_id: id,
        topic: pipeline.topics.events(),
        payload,
    };
    match pipeline
        .writer
        .submit(record, Arc::new(std::sync::atomic::AtomicBool::new(false)))
        .await
    {
        Ok(rx) => {
            if let Ok(Err(e)) = rx.await {
                tracing::warn!(device, error = ?e, "event not journaled");
            }
        }
        Err(e) => tracing::warn!(device, error = ?e, "event not journaled"),
    }
}
