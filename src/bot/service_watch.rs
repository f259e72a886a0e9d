//! Service-level progress of the bot, for the watchdog: updates waiting for a handler slot and
//! handler completions. When the oldest update has waited for a slot longer than
//! `bot.starved_after_seconds`, or handlers are busy and none has completed for that long, the
//! watchdog opens a `service_starved` episode; its verdict adds what the busy handlers wait on
//! (a database lock, a pool label, a node call), `/readyz` reports it and an alert pages.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::diagnostics::{InflightEntry, InflightSource, SourceEpisode, StallKind};

#[derive(Debug)]
struct State {
    /// When each update still waiting for a slot was queued (FIFO per lane, so the oldest is
    /// the minimum of the fronts; lanes are few and kept together).
    queued: VecDeque<Instant>,
    busy: usize,
    /// Last handler that completed (not cut off), or when handlers became busy from idle.
    progress: Instant,
    /// Last time the service was found starved, and the statement then: the episode stays
    /// open until it has not been starved for the bound (no flicker as slots free in bursts).
    last_starved: Option<(Instant, String)>,
}

/// Shared progress counters of the bot's lanes and handlers. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ServiceProgress {
    state: Arc<Mutex<State>>,
    after: Duration,
}

impl ServiceProgress {
    /// Progress tracking that reports starvation after `after`.
    pub fn new(after: Duration) -> Self {
        Self {
            state: Arc::new(Mutex::new(State {
                queued: VecDeque::new(),
                busy: 0,
                progress: Instant::now(),
                last_starved: None,
            })),
            after,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An update was queued for a slot at `at`.
    pub(crate) fn queued(&self, at: Instant) {
        let mut g = self.lock();
        // Lanes interleave; keep the deque ordered so the front is the oldest.
        let pos = g.queued.partition_point(|t| *t <= at);
        g.queued.insert(pos, at);
    }

    /// The update queued at `at` got a slot (or was dropped).
    pub(crate) fn dequeued(&self, at: Instant) {
        let mut g = self.lock();
        if let Some(i) = g.queued.iter().position(|t| *t == at) {
            g.queued.remove(i);
        }
    }

    /// A handler started.
    pub(crate) fn started(&self) {
        let mut g = self.lock();
        if g.busy == 0 {
            g.progress = Instant::now();
        }
        g.busy += 1;
    }

    /// A handler ended; `completed` is false when it was cut off or panicked.
    pub(crate) fn ended(&self, completed: bool) {
        let mut g = self.lock();
        g.busy = g.busy.saturating_sub(1);
        if completed {
            g.progress = Instant::now();
        }
    }

    /// The starvation statement, when the service is starved now or was within the bound.
    pub fn starved(&self) -> Option<String> {
        let mut g = self.lock();
        let oldest = g.queued.front().map(|t| t.elapsed());
        let stalled = (g.busy > 0).then(|| g.progress.elapsed());
        let waiting = oldest.filter(|a| *a >= self.after);
        let idle = stalled.filter(|a| *a >= self.after);
        if waiting.is_none() && idle.is_none() {
            return match &g.last_starved {
                Some((at, s)) if at.elapsed() < self.after && !g.queued.is_empty() => {
                    Some(s.clone())
                }
                _ => {
                    g.last_starved = None;
                    None
                }
            };
        }
        let mut s = format!(
            "{} update{} waiting for a handler slot",
            g.queued.len(),
            if g.queued.len() == 1 { "" } else { "s" }
        );
        if let Some(a) = oldest {
            s.push_str(&format!(" (oldest {:.1} s)", a.as_secs_f64()));
        }
        s.push_str(&format!(
            ", {} handler{} busy, none completed for {:.1} s",
            g.busy,
            if g.busy == 1 { "" } else { "s" },
            g.progress.elapsed().as_secs_f64()
        ));
        g.last_starved = Some((Instant::now(), s.clone()));
        Some(s)
    }
}

impl InflightSource for ServiceProgress {
    fn section(&self) -> &'static str {
        "bot_service"
    }

    fn entries(&self) -> Vec<InflightEntry> {
        Vec::new()
    }

    fn episode(&self) -> Option<SourceEpisode> {
        self.starved().map(|verdict| SourceEpisode {
            kind: StallKind::ServiceStarved,
            culprit: diagnostics::Culprit::task("bot_handler"),
            verdict,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starved_when_the_oldest_queued_update_waits_past_the_bound() {
        let p = ServiceProgress::new(Duration::from_millis(50));
        let t = Instant::now();
        p.queued(t);
        assert!(p.starved().is_none());
        std::thread::sleep(Duration::from_millis(60));
        let s = p.starved().expect("starved");
        assert!(s.starts_with("1 update waiting for a handler slot"), "{s}");
        p.dequeued(t);
        assert!(p.starved().is_none());
        p.started();
        std::thread::sleep(Duration::from_millis(60));
        assert!(p.starved().is_some(), "busy and nothing completed");
        p.ended(true);
        assert!(p.starved().is_none());
    }
}
