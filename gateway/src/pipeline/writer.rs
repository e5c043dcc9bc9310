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

use std::collections::HashMap;
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

/// What a submitter hands over at once.
enum Request {
    /// Records committed together (unless the journal is full, below).
    Records(Vec<Item>),
    /// A notice about the journal itself (`journal_full`): journaled into the journal's notice reserve,
    /// so that it fits when readings no longer do ([`Journal::append_notice`]), ahead of the records of
    /// the same commit. One that finds no room even there (a full file system) is kept by the writer and
    /// tried again at every later commit and, while idle, at every check-in: the CRM learns of the stop
    /// once there is room, instead of never.
    Notice(NewRecord),
}

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
            .collect::<Vec<Item>>();
        if items.is_empty() {
            return Ok(receivers);
        }
        self.tx
            .send(Request::Records(items))
            .await
            .map_err(|_| Refusal::Failed("journal writer stopped".into()))?;
        Ok(receivers)
    }

    /// Hands a notice about the journal itself to the writer (see [`Request::Notice`]); it is journaled
    /// into the notice reserve at the writer's next commit, or kept by the writer until there is room.
    /// The uplink is woken with it, as with any commit. Waits while the writer's queue is full.
    ///
    /// # Errors
    /// [`Refusal::Failed`] when the writer has stopped (shutdown).
    pub async fn submit_notice(&self, notice: NewRecord) -> Result<(), Refusal> {
        self.tx
            .send(Request::Notice(notice))
            .await
            .map_err(|_| Refusal::Failed("journal writer stopped".into()))
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
            let mut notices = Notices::default();
            loop {
                let first =
                    match next_request(&mut rx, heartbeat.as_ref(), runtime.as_ref(), &notices) {
                        Next::Request(r) => Some(r),
                        Next::RetryNotices => None,
                        Next::Closed => break,
                    };
                // A request is never split: a session's batch is one commit even past MAX_BATCH.
                let mut request = first;
                while let Some(r) = request.take() {
                    match r {
                        Request::Records(items) => batch.extend(items),
                        Request::Notice(n) => notices.add(n),
                    }
                    if batch.len() < MAX_BATCH {
                        request = rx.try_recv().ok();
                    }
                }
                // The notices first: they tell of a stop that came before the records now arriving.
                let mut committed = notices.journal(&journal);
                committed.extend(commit(&journal, &mut batch));
                // Outside the journal lock: the uplink may be waiting for it.
                handoff.push(committed);
            }
        })?;
    Ok((WriterHandle { tx }, thread))
}

/// What the writer thread does next.
enum Next {
    Request(Request),
    /// Idle, with notices waiting for room: try them again.
    RetryNotices,
    /// Every handle is dropped.
    Closed,
}

/// The next request. With a heartbeat the thread still wakes every check-in period while idle: a writer
/// stuck in an fdatasync (a dying SD card) stops checking in, and the watchdog restarts the gateway; and
/// notices waiting for room are tried again then.
fn next_request(
    rx: &mut mpsc::Receiver<Request>,
    heartbeat: Option<&crate::liveness::Heartbeat>,
    runtime: Option<&tokio::runtime::Handle>,
    notices: &Notices,
) -> Next {
    let (Some(hb), Some(rt)) = (heartbeat, runtime) else {
        return rx.blocking_recv().map_or(Next::Closed, Next::Request);
    };
    loop {
        hb.check_in();
        // The timer is made inside `block_on`: it needs the runtime's time driver.
        match rt.block_on(async { tokio::time::timeout(hb.every(), rx.recv()).await }) {
            Ok(r) => return r.map_or(Next::Closed, Next::Request),
            Err(_) if !notices.waiting.is_empty() => return Next::RetryNotices,
            Err(_) => {}
        }
    }
}

/// Notices about the journal itself that have not been journaled yet (see [`Request::Notice`]).
#[derive(Default)]
struct Notices {
    waiting: Vec<NewRecord>,
    /// How many of `waiting` have been reported as finding no room (each is reported once).
    reported: usize,
    /// Per device, the id of the notice journaled last. A notice's id names its device and minute; the
    /// journal itself refuses an id twice only while the first is pending, and once the uplink drains a
    /// full journal each new session fills it again within seconds. Without this the CRM got a
    /// `journal_full` per device and session, not per minute.
    journaled: HashMap<String, String>,
}

impl Notices {
    fn add(&mut self, notice: NewRecord) {
        if self.journaled.get(&notice.device) == Some(&notice.reading_id) {
            return;
        }
        // One per device, the newest: it says what the older said, with the journal's depth now. So what
        // waits stays bounded by the number of devices however long the journal stays full.
        match self.waiting.iter_mut().find(|n| n.device == notice.device) {
            Some(older) => *older = notice,
            None => self.waiting.push(notice),
        }
    }

    /// Journals the waiting notices into the notice reserve, one at a time (so that those that fit go in
    /// when the reserve has room for some only); returns those committed and keeps the rest for the next
    /// try. Rare (a journal at its bound), so each fdatasync runs under the lock.
    fn journal(&mut self, journal: &Mutex<Journal>) -> Vec<Record> {
        if self.waiting.is_empty() {
            return Vec::new();
        }
        let mut j = journal.lock().unwrap_or_else(|p| p.into_inner());
        let mut committed = Vec::new();
        let mut refusal = None;
        for notice in std::mem::take(&mut self.waiting) {
            match j.append_notice(std::slice::from_ref(&notice)) {
                Ok(seqs) => {
                    self.journaled
                        .insert(notice.device.clone(), notice.reading_id.clone());
                    committed.extend(seqs.first().map(|&seq| committed_record(notice, seq)));
                }
                Err(e) => {
                    refusal = Some(e);
                    self.waiting.push(notice);
                }
            }
        }
        // Those that went in are no longer among the reported.
        self.reported = self.reported.min(self.waiting.len());
        match refusal {
            None => self.reported = 0,
            Some(e) if self.waiting.len() > self.reported => {
                self.reported = self.waiting.len();
                tracing::error!(error = %e, notices = self.waiting.len(), "journal full: even its notice did not fit; it is journaled when there is room");
            }
            Some(e) => {
                tracing::debug!(error = %e, notices = self.waiting.len(), "journal notices still find no room");
            }
        }
        committed
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
