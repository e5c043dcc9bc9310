//! Which long-lived tasks are still turning: the registry behind systemd's watchdog.
//!
//! Every long-lived task (the journal writer, the uplink, each source supervisor, the edge-alert clock)
//! holds a [`Heartbeat`] and checks in from its own loop at least every [`Liveness::check_in_every`].
//! The pinger ([`Liveness::watchdog`]) sends `WATCHDOG=1` only while every registered task has checked in
//! within [`Liveness::stale_after`]: a task stuck in a blocking call or an `await` outside its loop stops
//! the pings, and systemd (`WatchdogSec=`) restarts the gateway. A watchdog fed by a timer of its own
//! would only prove that the timer runs.
//!
//! The same registry answers `gateway status` ([`Liveness::stale`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often tasks check in when systemd runs no watchdog (the status still reports stale tasks).
const DEFAULT_CHECK_IN: Duration = Duration::from_secs(10);

/// The registry; cheap to clone.
#[derive(Debug, Clone)]
pub struct Liveness {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    started: Instant,
    check_in_every: Duration,
    stale_after: Duration,
    tasks: Mutex<Vec<Arc<Slot>>>,
}

#[derive(Debug)]
struct Slot {
    name: String,
    /// Milliseconds after `started` of the last check-in.
    last_ms: AtomicU64,
}

/// One task's handle: [`check_in`](Heartbeat::check_in) from its loop.
#[derive(Debug, Clone)]
pub struct Heartbeat {
    slot: Arc<Slot>,
    started: Instant,
    every: Duration,
}

impl Liveness {
    /// A registry for a watchdog of `interval` (systemd's `WATCHDOG_USEC`): tasks check in four times
    /// per interval and are stale after a whole one without, and the pinger runs twice per interval (as
    /// sd_watchdog_enabled(3) advises). `None` (no watchdog): check-ins every 10 s, stale after 60 s.
    pub fn new(interval: Option<Duration>) -> Self {
        let (check_in_every, stale_after) = match interval {
            Some(i) => (i / 4, i),
            None => (DEFAULT_CHECK_IN, DEFAULT_CHECK_IN * 6),
        };
        Liveness {
            inner: Arc::new(Inner {
                started: Instant::now(),
                check_in_every: check_in_every.max(Duration::from_millis(10)),
                stale_after,
                tasks: Mutex::default(),
            }),
        }
    }

    /// Registers the task `name` (checked in now).
    pub fn register(&self, name: impl Into<String>) -> Heartbeat {
        let slot = Arc::new(Slot {
            name: name.into(),
            last_ms: AtomicU64::new(self.now_ms()),
        });
        self.tasks().push(slot.clone());
        Heartbeat {
            slot,
            started: self.inner.started,
            every: self.inner.check_in_every,
        }
    }

    /// How often a task must check in.
    pub fn check_in_every(&self) -> Duration {
        self.inner.check_in_every
    }

    /// How long without a check-in makes a task stale.
    pub fn stale_after(&self) -> Duration {
        self.inner.stale_after
    }

    /// The tasks that have not checked in within [`stale_after`](Self::stale_after), with how long ago
    /// they last did.
    pub fn stale(&self) -> Vec<(String, Duration)> {
        let now = self.now_ms();
        let limit = u64::try_from(self.inner.stale_after.as_millis()).unwrap_or(u64::MAX);
        self.tasks()
            .iter()
            .filter_map(|s| {
                let ago = now.saturating_sub(s.last_ms.load(Ordering::Relaxed));
                (ago > limit).then(|| (s.name.clone(), Duration::from_millis(ago)))
            })
            .collect()
    }

    /// The registered tasks' names.
    pub fn names(&self) -> Vec<String> {
        self.tasks().iter().map(|s| s.name.clone()).collect()
    }

    /// Feeds systemd's watchdog every `interval / 2` while no task is stale, until `stop`. Logs (once per
    /// change) which tasks hold the pings back.
    pub async fn watchdog(self, interval: Duration, stop: tokio_util::sync::CancellationToken) {
        let mut tick = tokio::time::interval(interval / 2);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut withheld: Vec<String> = Vec::new();
        loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            let stale: Vec<String> = self.stale().into_iter().map(|(n, _)| n).collect();
            if stale.is_empty() {
                if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]) {
                    tracing::warn!(error = %e, "cannot notify systemd (WATCHDOG=1)");
                }
            } else if stale != withheld {
                tracing::error!(tasks = ?stale, "tasks stopped checking in: withholding the watchdog ping, systemd will restart the gateway");
            }
            withheld = stale;
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.inner.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn tasks(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Slot>>> {
        self.inner
            .tasks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Heartbeat {
    /// The task is alive: call from its loop, at least every [`every`](Self::every).
    pub fn check_in(&self) {
        if test_hook::wedged(&self.slot.name) {
            return;
        }
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.slot.last_ms.store(ms, Ordering::Relaxed);
    }

    /// How often to check in.
    pub fn every(&self) -> Duration {
        self.every
    }

    /// An interval of [`every`](Self::every) for a task's `select!` loop (first tick after one period).
    pub fn ticker(&self) -> tokio::time::Interval {
        let mut t = tokio::time::interval_at(tokio::time::Instant::now() + self.every, self.every);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    }

    /// The task's name.
    pub fn name(&self) -> &str {
        &self.slot.name
    }
}

/// Lets tests wedge a task: in debug builds only (never in the package, which is a release build),
/// when the file named by `PHG_TEST_WEDGE_FILE` exists and one of its lines is a task's name, that task's
/// check-ins are ignored — to the watchdog it is stuck.
#[cfg(debug_assertions)]
mod test_hook {
    pub(super) fn wedged(task: &str) -> bool {
        let Some(path) = std::env::var_os("PHG_TEST_WEDGE_FILE") else {
            return false;
        };
        std::fs::read_to_string(path).is_ok_and(|s| s.lines().any(|l| l.trim() == task))
    }
}

#[cfg(not(debug_assertions))]
mod test_hook {
    pub(super) fn wedged(_task: &str) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_that_stops_checking_in_is_stale_and_one_that_checks_in_is_not() {
        let l = Liveness::new(Some(Duration::from_millis(200)));
        assert_eq!(l.check_in_every(), Duration::from_millis(50));
        let a = l.register("a");
        let _b = l.register("b");
        std::thread::sleep(Duration::from_millis(150));
        a.check_in();
        assert!(l.stale().is_empty(), "{:?}", l.stale());
        std::thread::sleep(Duration::from_millis(100));
        a.check_in();
        let stale = l.stale();
        assert_eq!(stale.len(), 1, "{stale:?}");
        assert_eq!(stale[0].0, "b");
        assert!(stale[0].1 >= Duration::from_millis(200));
    }
}
