//! Delivery of alert notices from the durable outbox (see [`crate::store`]).
//!
//! Each sink has one deliverer task per instance. It claims due rows with a lease, delivers them one by
//! one, and marks each delivered — or failed, due again after a capped exponential backoff with jitter
//! (`initial × 2^attempts`, ±20 %, at most `max`). Nothing is removed before the receiver confirmed it
//! (HTTP 2xx; MQTT PUBACK), and nothing is lost across restarts: an unfinished row is claimed again
//! when its lease runs out. Delivery is therefore at least once; receivers de-duplicate on the event id
//! (`X-PHG-Event-Id`, and `event_id` in the body).
//!
//! # Webhook
//!
//! `POST {url}` with the notice as the JSON body and
//! `X-PHG-Signature-256: sha256=<hex HMAC-SHA256(secret, body)>` (the GitHub convention), so the CRM can
//! check that the notice comes from ingest and was not altered. Verify with [`verify_signature`].

use std::time::Duration;

use hmac::{Hmac, Mac};
use rand::Rng;
use rumqttc::{AsyncClient, Event, Outgoing, Packet, QoS};
use sha2::Sha256;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{MqttConfig, Secret, WebhookConfig};
use crate::evaluate::Sink;
use crate::now_ms;
use crate::store::{AnyStore, OutboxItem, Store};

/// The signature header.
pub const SIGNATURE_HEADER: &str = "X-PHG-Signature-256";
/// The event id header (the receiver's de-duplication key).
pub const EVENT_ID_HEADER: &str = "X-PHG-Event-Id";

/// `sha256=<hex>` of HMAC-SHA256(`secret`, `body`).
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    // HMAC accepts keys of any length: `new_from_slice` cannot fail for it.
    let mut mac = match <Hmac<Sha256> as Mac>::new_from_slice(secret) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(body);
    format!(
        "sha256={}",
        protocol::wire::to_hex(&mac.finalize().into_bytes())
    )
}

/// `true` when `header` is the signature of `body` under `secret` (constant-time comparison).
pub fn verify_signature(secret: &[u8], body: &[u8], header: &str) -> bool {
    let Some(hex) = header.strip_prefix("sha256=") else {
        return false;
    };
    let Some(tag) = from_hex(hex) else {
        return false;
    };
    let Ok(mut mac) = <Hmac<Sha256> as Mac>::new_from_slice(secret) else {
        return false;
    };
    mac.update(body);
    mac.verify_slice(&tag).is_ok()
}

fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The delay before attempt `attempts + 1`: `initial × 2^attempts`, capped at `max`, ±20 % jitter.
pub fn backoff(initial: Duration, max: Duration, attempts: i32) -> Duration {
    let exp = u32::try_from(attempts.clamp(0, 30)).unwrap_or(30);
    let base = initial.saturating_mul(2u32.saturating_pow(exp)).min(max);
    let jitter = rand::rng().random_range(0.8..1.2);
    base.mul_f64(jitter).min(max)
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

async fn pause(token: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = token.cancelled() => false,
        _ = tokio::time::sleep(d) => true,
    }
}

/// Claims and delivers `sink` rows until `token` is cancelled, with `deliver` doing one delivery.
#[allow(clippy::too_many_arguments)]
async fn deliver_loop<F, Fut>(
    store: AnyStore,
    sink: Sink,
    owner: String,
    lease: Duration,
    poll: Duration,
    retry: (Duration, Duration),
    token: CancellationToken,
    mut deliver: F,
) where
    F: FnMut(OutboxItem) -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    loop {
        if token.is_cancelled() {
            return;
        }
        let now = now_ms();
        let items = match store
            .claim(sink, &owner, now, now.saturating_add(ms(lease)), 16)
            .await
        {
            Ok(items) => items,
            Err(e) => {
                tracing::warn!(sink = sink.name(), error = %e, "outbox claim failed");
                if !pause(&token, poll.max(Duration::from_secs(1))).await {
                    return;
                }
                continue;
            }
        };
        if items.is_empty() {
            if !pause(&token, poll).await {
                return;
            }
            continue;
        }
        for item in items {
            if token.is_cancelled() {
                // Unfinished rows are claimed again when their lease runs out.
                return;
            }
            let (seq, attempts, event) = (item.seq, item.attempts, item.event_id.clone());
            match deliver(item).await {
                Ok(()) => match store.delivered(seq, &owner, now_ms()).await {
                    Ok(true) => tracing::debug!(sink = sink.name(), event, "alert delivered"),
                    Ok(false) => tracing::warn!(
                        sink = sink.name(),
                        event,
                        "alert delivered after its lease ran out (may be delivered twice)"
                    ),
                    Err(e) => {
                        tracing::warn!(sink = sink.name(), error = %e, "outbox update failed")
                    }
                },
                Err(error) => {
                    let delay = backoff(retry.0, retry.1, attempts);
                    tracing::info!(
                        sink = sink.name(),
                        event,
                        attempts = attempts + 1,
                        retry_in_ms = ms(delay),
                        error,
                        "alert delivery failed"
                    );
                    if let Err(e) = store
                        .failed(seq, &owner, now_ms().saturating_add(ms(delay)), &error)
                        .await
                    {
                        tracing::warn!(sink = sink.name(), error = %e, "outbox update failed");
                    }
                }
            }
        }
    }
}

/// Delivers webhook rows until `token` is cancelled.
pub async fn run_webhook(
    store: AnyStore,
    cfg: WebhookConfig,
    owner: String,
    lease: Duration,
    poll: Duration,
    token: CancellationToken,
) {
    let http = match reqwest::Client::builder().timeout(cfg.timeout).build() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "webhook client could not be built; webhook delivery is off");
            return;
        }
    };
    let url = cfg.url.clone();
    let secret: Secret = cfg.secret.clone();
    let retry = (cfg.initial_backoff, cfg.max_backoff);
    deliver_loop(
        store,
        Sink::Webhook,
        owner,
        lease,
        poll,
        retry,
        token,
        |item: OutboxItem| {
            let req = http
                .post(&url)
                .header("content-type", "application/json")
                .header(
                    SIGNATURE_HEADER,
                    sign(secret.expose(), item.payload.as_bytes()),
                )
                .header(EVENT_ID_HEADER, &item.event_id)
                .body(item.payload);
            async move {
                let resp = req.send().await.map_err(|e| e.to_string())?;
                if resp.status().is_success() {
                    Ok(())
                } else {
                    Err(format!("HTTP {}", resp.status()))
                }
            }
        },
    )
    .await;
}

/// Publishes MQTT rows on the alerts topic (QoS 1) until `token` is cancelled; a row is delivered when
/// the broker's PUBACK for it arrived.
pub async fn run_mqtt(
    store: AnyStore,
    mqtt: MqttConfig,
    owner: String,
    lease: Duration,
    poll: Duration,
    token: CancellationToken,
) {
    let opts = mqtt.options(format!("{}-alerts", mqtt.client_id));
    let (client, mut eventloop) = AsyncClient::new(opts, 16);
    // The event loop reports each PUBACK's packet id; rumqttc's `publish` does not return the packet id,
    // so it is learnt from `Outgoing::Publish` (one publish in flight at a time).
    let (tx, mut rx) = mpsc::unbounded_channel::<(bool, u16)>();
    let loop_token = token.clone();
    let event_task = tokio::spawn(async move {
        let mut failures = 0i32;
        loop {
            let ev = tokio::select! {
                _ = loop_token.cancelled() => return,
                ev = eventloop.poll() => ev,
            };
            match ev {
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                    let _ = tx.send((false, pkid));
                }
                Ok(Event::Incoming(Packet::PubAck(a))) => {
                    let _ = tx.send((true, a.pkid));
                }
                Ok(Event::Incoming(Packet::ConnAck(_))) => failures = 0,
                Ok(_) => {}
                Err(e) => {
                    failures += 1;
                    let d = backoff(
                        Duration::from_millis(200),
                        Duration::from_secs(10),
                        failures,
                    );
                    tracing::warn!(error = %e, retry_in_ms = ms(d), "alerts MQTT connection failed");
                    if !pause(&loop_token, d).await {
                        return;
                    }
                }
            }
        }
    });
    let topic = mqtt.alerts_topic.clone();
    let rx = &tokio::sync::Mutex::new(&mut rx);
    let client = &client;
    let topic = &topic;
    deliver_loop(
        store,
        Sink::Mqtt,
        owner,
        lease,
        poll,
        (Duration::from_millis(500), Duration::from_secs(60)),
        token,
        |item: OutboxItem| async move {
            let mut rx = rx.lock().await;
            // Drop stale reports from an earlier, timed-out publish.
            while rx.try_recv().is_ok() {}
            client
                .publish(topic.as_str(), QoS::AtLeastOnce, false, item.payload)
                .await
                .map_err(|e| e.to_string())?;
            let wait = async {
                let mut sent: Option<u16> = None;
                while let Some((ack, pkid)) = rx.recv().await {
                    match (ack, sent) {
                        (false, None) => sent = Some(pkid),
                        (true, Some(p)) if p == pkid => return Ok(()),
                        _ => {}
                    }
                }
                Err("alerts MQTT connection task ended".to_owned())
            };
            tokio::time::timeout(Duration::from_secs(10), wait)
                .await
                .map_err(|_| "no PUBACK within 10 s".to_owned())?
        },
    )
    .await;
    let _ = client.try_disconnect();
    event_task.abort();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 4231 test case 2 (HMAC-SHA-256, key "Jefe").
    #[test]
    fn signature_known_answer() {
        let s = sign(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(
            s,
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert!(verify_signature(
            b"Jefe",
            b"what do ya want for nothing?",
            &s
        ));
        assert!(!verify_signature(
            b"Jefe",
            b"what do ya want for nothing!",
            &s
        ));
        assert!(!verify_signature(
            b"jefe",
            b"what do ya want for nothing?",
            &s
        ));
        assert!(!verify_signature(b"Jefe", b"x", "sha256=zz"));
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let (i, m) = (Duration::from_millis(100), Duration::from_secs(5));
        let d0 = backoff(i, m, 0);
        assert!(
            d0 >= Duration::from_millis(80) && d0 <= Duration::from_millis(120),
            "{d0:?}"
        );
        let d3 = backoff(i, m, 3);
        assert!(
            d3 >= Duration::from_millis(640) && d3 <= Duration::from_millis(960),
            "{d3:?}"
        );
        assert!(backoff(i, m, 30) <= m);
        assert!(backoff(i, m, i32::MAX) <= m);
    }
}
