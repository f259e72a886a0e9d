//! Current pool holders and waiters, by call-site label, readable from any thread (the watchdog
//! reads it while the runtime may be stalled). A plain mutex over a slab: critical sections are
//! a few instructions and never span an `.await`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Whether an entry waits for a connection or holds one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PoolUse {
    /// Waiting in `acquire`.
    Waiting,
    /// Holding a connection.
    Holding,
}

/// One waiter or holder as seen at snapshot time.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PoolEntry {
    /// The call-site label given to `acquire`.
    pub label: &'static str,
    /// Waiting or holding.
    pub state: PoolUse,
    /// Time since the wait or hold began.
    #[serde(serialize_with = "ser_secs")]
    pub age: Duration,
    /// Name of the tokio task that made the call, when it has one.
    pub task: Option<String>,
    /// Backend pid of the held connection (recorded when the connection was opened).
    pub pid: Option<i32>,
}

fn ser_secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

#[derive(Debug)]
struct Slot {
    label: &'static str,
    state: PoolUse,
    since: Instant,
    task: Option<String>,
    pid: Option<i32>,
}

#[derive(Debug, Default)]
struct Inner {
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    last_acquired: Option<Instant>,
}

/// Registry of current waiters and holders. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct PoolInflight {
    inner: Arc<Mutex<Inner>>,
}

impl PoolInflight {
    /// Records a new waiter; returns its slot.
    pub fn begin_wait(&self, label: &'static str) -> usize {
        let task = tokio::task::try_id().map(|id| id.to_string());
        let slot = Slot {
            label,
            state: PoolUse::Waiting,
            since: Instant::now(),
            task,
            pid: None,
        };
        let mut g = self.lock();
        match g.free.pop() {
            Some(i) => {
                g.slots[i] = Some(slot);
                i
            }
            None => {
                g.slots.push(Some(slot));
                g.slots.len() - 1
            }
        }
    }

    /// Turns a waiter into a holder of the connection to backend `pid`.
    pub fn acquired(&self, idx: usize, pid: Option<i32>) {
        let now = Instant::now();
        let mut g = self.lock();
        g.last_acquired = Some(now);
        if let Some(Some(s)) = g.slots.get_mut(idx) {
            s.state = PoolUse::Holding;
            s.since = now;
            s.pid = pid;
        }
    }

    /// Removes a waiter or holder.
    pub fn end(&self, idx: usize) {
        let mut g = self.lock();
        if let Some(s) = g.slots.get_mut(idx) {
            *s = None;
            g.free.push(idx);
        }
    }

    /// Every current waiter and holder, oldest first.
    pub fn snapshot(&self) -> Vec<PoolEntry> {
        let now = Instant::now();
        let g = self.lock();
        let mut out: Vec<PoolEntry> = g
            .slots
            .iter()
            .flatten()
            .map(|s| PoolEntry {
                label: s.label,
                state: s.state,
                age: now.saturating_duration_since(s.since),
                task: s.task.clone(),
                pid: s.pid,
            })
            .collect();
        out.sort_by_key(|e| std::cmp::Reverse(e.age));
        out
    }

    /// Time since the last successful acquire, `None` before the first one.
    pub fn since_last_acquire(&self) -> Option<Duration> {
        self.lock().last_acquired.map(|t| t.elapsed())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the slab inconsistent in a way that
        // matters for diagnostics, so recover from poisoning instead of propagating it.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}
