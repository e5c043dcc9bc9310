//! The journal writer: one thread that owns every append, so that appends from all device sessions are
//! group-committed — under load up to [`MAX_BATCH`] records share one write and one fdatasync; when idle
//! what was handed over is committed at once: one record, or the batch a session handed over together
//! ([`WriterHandle::submit_batch`]: a download's records, one write and one fdatasync for all).
//!
//! The `fdatasync` runs with the journal's lock released ([`Journal::begin_append`]): the uplink reads
//! and acks while a commit waits for the disk, and none of the commit's records is visible to it before
//! they are durable.
//!
//! A session hands records over through a bounded channel (backpressure reaches the device: a glucometer
//! keeps its records) and learns each record's outcome through a oneshot. Once a record of a session is refused
//! (journal full), every later record of that session is refused too, without trying: otherwise a later
//! record could be accepted and advance the device's cursor past the refused one, which would then never be
//! downloaded again (DESIGN.md promise 4).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};

use super::handoff::Handoff;
use crate::journal::{Journal, NewRecord, Record};

/// Records per group commit (the figure the storage measurements in TOOLCHAIN.md were taken at).
pub const MAX_BATCH: usize = 64;

/// What a submitter learns about its record.
pub type Outcome = Result<u64, Refusal>;

/// Why a record was not accepted. The device still has it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The journal is at its bound (or an earlier record of the same session was refused).
    #[error("journal full")]
    Full,
    /// The journal failed (I/O); the message says how. Nothing of this record was accepted.
    #[error("journal error: {0}")]
    Failed(String),
}

/// What a submitter hands over at once: committed together (unless the journal is full, below).
type Request = Vec<Item>;

struct Item {
    record: NewRecord,
    /// Set once a record of this session is refused.
    session_refused: Arc<AtomicBool>,
    reply: oneshot::Sender<Outcome>,
}

/// The submitting side, cloned into every session.
#[derive(Debug, Clone)]
pub struct WriterHandle {
    tx: mpsc::Sender<Request>,
}

impl std::fmt::Debug for Item {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Item")
            .field("reading_id", &self.record.reading_id)
            .finish_non_exhaustive()
    }
}

impl WriterHandle {
    /// Hands a record to the writer; the returned receiver yields its journal seq once it is fsynced.
    /// Waits while the writer's queue is full (backpressure).
    ///
    /// # Errors
    /// [`Refusal::Failed`] when the writer has stopped (shutdown).
    pub async fn submit(
        &self,
        record: NewRecord,
        session_refused: Arc<AtomicBool>,
    ) -> Result<oneshot::Receiver<Outcome>, Refusal> {
        let mut rx = self.submit_batch(vec![record], session_refused).await?;
        rx.pop()
            .ok_or_else(|| Refusal::Failed("no reply for the record".into()))
    }

    /// Hands records to the writer to be committed together, in this order (one write and one
    /// fdatasync, unless the journal is full: then each record that fits is accepted, up to the first a
    /// session had refused). One receiver per record, in the same order.
    ///
    /// # Errors
    /// [`Refusal::Failed`] when the writer has stopped (shutdown).
    pub async fn submit_batch(
        &self,
        records: Vec<NewRecord>,
        session_refused: Arc<AtomicBool>,
    ) -> Result<Vec<oneshot::Receiver<Outcome>>, Refusal> {
        let mut receivers = Vec::with_capacity(records.len());
        let items = records
            .into_iter()
            .map(|record| {
                let (reply, rx) = oneshot::channel();
                receivers.push(rx);
                Item {
                    record,
                    session_refused: session_refused.clone(),
                    reply,
                }
            })
            .collect::<Request>();
        if items.is_empty() {
            return Ok(receivers);
        }
        self.tx
            .send(items)
            .await
            .map_err(|_| Refusal::Failed("journal writer stopped".into()))?;
        Ok(receivers)
    }
}

/// Starts the writer thread. Every commit's records are offered to `handoff`, which wakes the uplink.
/// The thread ends when every [`WriterHandle`] is dropped.
///
/// # Errors
/// When the OS refuses a new thread.
pub fn spawn(
    journal: Arc<Mutex<Journal>>,
    handoff: Arc<Handoff>,
    queue: usize,
) -> std::io::Result<(WriterHandle, std::thread::JoinHandle<()>)> {
    spawn_with_heartbeat(journal, handoff, queue, None)
}

/// [`spawn`], with the thread checking in to `heartbeat` (the watchdog's liveness registry) between
/// commits and while idle. Must be called within a tokio runtime when `heartbeat` is set: the idle
/// wait is a timed receive on the runtime's clock.
///
/// # Errors
/// When the OS refuses a new thread.
pub fn spawn_with_heartbeat(
    journal: Arc<Mutex<Journal>>,
    handoff: Arc<Handoff>,
    queue: usize,
    heartbeat: Option<crate::liveness::Heartbeat>,
) -> std::io::Result<(WriterHandle, std::thread::JoinHandle<()>)> {
    let (tx, mut rx) = mpsc::channel::<Request>(queue.max(1));
    let runtime = heartbeat
        .as_ref()
        .and_then(|_| tokio::runtime::Handle::try_current().ok());
    let thread = std::thread::Builder::new()
        .name("journal-writer".into())
        .spawn(move || {
            let mut batch: Vec<Item> = Vec::with_capacity(MAX_BATCH);
            while let Some(first) = next_request(&mut rx, heartbeat.as_ref(), runtime.as_ref()) {
                // A request is never split: a session's batch is one commit even past MAX_BATCH.
                batch.extend(first);
                while batch.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(r) => batch.extend(r),
                        Err(_) => break,
                    }
                }
                let committed = commit(&journal, &mut batch);
                // Outside the journal lock: the uplink may be waiting for it.
                handoff.push(committed);
            }
        })?;
    Ok((WriterHandle { tx }, thread))
}

/// The next request, `None` once every handle is dropped. With a heartbeat the thread still wakes every
/// check-in period while idle: a writer stuck in an fdatasync (a dying SD card) stops checking in, and
/// the watchdog restarts the gateway.
fn next_request(
    rx: &mut mpsc::Receiver<Request>,
    heartbeat: Option<&crate::liveness::Heartbeat>,
    runtime: Option<&tokio::runtime::Handle>,
) -> Option<Request> {
    let (Some(hb), Some(rt)) = (heartbeat, runtime) else {
        return rx.blocking_recv();
    };
    loop {
        hb.check_in();
        // The timer is made inside `block_on`: it needs the runtime's time driver.
        if let Ok(r) = rt.block_on(async { tokio::time::timeout(hb.every(), rx.recv()).await }) {
            return r;
        }
    }
}

/// Appends a batch: the records of sessions already refused are refused; the rest go in one append. If
/// the journal is full for the whole batch, records are tried one at a time so that those that fit are
/// accepted, and the first refusal of a session refuses the rest of it. Returns the records committed.
fn commit(journal: &Mutex<Journal>, batch: &mut Vec<Item>) -> Vec<Record> {
    // A poisoned lock means a thread panicked mid-append; the journal's own recovery rules (CRC framing)
    // keep the file consistent, so carrying on with the inner value is safe.
    let lock = || journal.lock().unwrap_or_else(|p| p.into_inner());
    let mut live: Vec<Item> = Vec::with_capacity(batch.len());
    for r in batch.drain(..) {
        if r.session_refused.load(Ordering::Acquire) {
            let _ = r.reply.send(Err(Refusal::Full));
        } else {
            live.push(r);
        }
    }
    let mut committed = Vec::new();
    if live.is_empty() {
        return committed;
    }
    // Moved out, not cloned: a group commit is up to 64 payloads.
    let (records, waiting): (Vec<NewRecord>, Vec<_>) = live
        .into_iter()
        .map(|r| (r.record, (r.session_refused, r.reply)))
        .unzip();
    // The write under the journal's lock, the fdatasync outside it — the uplink's reads and acks go on
    // meanwhile — and the records accepted under it again (`Journal::begin_append`).
    let begun = lock().begin_append(&records);
    let appended = begun.and_then(|written| {
        let synced = written.sync();
        lock().finish_append(&records, written, synced)
    });
    match appended {
        Ok(seqs) => {
            for ((record, (_, reply)), seq) in records.into_iter().zip(waiting).zip(seqs) {
                let _ = reply.send(Ok(seq));
                committed.push(committed_record(record, seq));
            }
        }
        Err(e) if e.is_full() => {
            let mut j = lock();
            for (record, (session_refused, reply)) in records.into_iter().zip(waiting) {
                if session_refused.load(Ordering::Acquire) {
                    let _ = reply.send(Err(Refusal::Full));
                    continue;
                }
                match j.append(std::slice::from_ref(&record)) {
                    Ok(seqs) => {
                        let seq = seqs.first().copied();
                        let _ = reply.send(seq.ok_or(Refusal::Failed("no seq".into())));
                        if let Some(seq) = seq {
                            committed.push(committed_record(record, seq));
                        }
                    }
                    Err(e) if e.is_full() => {
                        session_refused.store(true, Ordering::Release);
                        let _ = reply.send(Err(Refusal::Full));
                    }
                    Err(e) => {
                        session_refused.store(true, Ordering::Release);
                        let _ = reply.send(Err(Refusal::Failed(e.to_string())));
                    }
                }
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "journal append failed; the devices keep their records");
            for (session_refused, reply) in waiting {
                session_refused.store(true, Ordering::Release);
                let _ = reply.send(Err(Refusal::Failed(e.to_string())));
            }
        }
    }
    committed
}

fn committed_record(r: NewRecord, seq: u64) -> Record {
    // serde_json grows its buffer by doubling, so a reading's ~520-byte payload sits in a 1 KiB
    // allocation; the handoff keeps up to 512 committed records while the uplink catches up after a
    // burst. Shrinking gives the rest back in place (glibc splits the chunk; nothing is copied).
    let mut payload = r.payload;
    payload.shrink_to_fit();
    Record {
        seq,
        device: r.device,
        device_seq: r.device_seq,
        reading_id: r.reading_id,
        topic: r.topic,
        payload,
    }
}
