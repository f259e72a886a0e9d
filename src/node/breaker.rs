//! Per-node circuit breaker: closed → open after a run of failed calls → half-open probe after
//! a cooldown → closed on success. A plain `std::sync::Mutex`, never held across an `.await`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::{IntCounter, IntGauge};

/// State of a node's circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls pass.
    Closed,
    /// One probe call may pass; others fail fast.
    HalfOpen,
    /// Calls fail fast until the cooldown ends.
    Open,
}

impl BreakerState {
    /// Value of `vpnbot_node_api_circuit_state`: 0 closed, 1 half-open, 2 open.
    pub fn as_metric(self) -> i64 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::HalfOpen => 1,
            BreakerState::Open => 2,
        }
    }

    /// Label/log value.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::HalfOpen => "half_open",
            BreakerState::Open => "open",
        }
    }
}

#[derive(Debug)]
struct Inner {
    state: BreakerState,
    failures: u32,
    open_until: Instant,
    probe_in_flight: bool,
}

#[derive(Debug)]
pub(crate) struct Breaker {
    node: Arc<str>,
    threshold: u32,
    cooldown: Duration,
    inner: Mutex<Inner>,
    gauge: IntGauge,
    /// Transition counters indexed by the state entered (closed, half-open, open).
    transitions: [IntCounter; 3],
}

/// Permission to make one call; report its outcome with [`Breaker::record`]. Dropped without a
/// verdict (the caller was cancelled), a half-open probe slot is released.
#[derive(Debug)]
pub(crate) struct Permit<'a> {
    breaker: &'a Breaker,
    probe: bool,
    done: bool,
}

impl Breaker {
    pub(crate) fn new(
        node: Arc<str>,
        threshold: u32,
        cooldown: Duration,
        gauge: IntGauge,
        transitions: [IntCounter; 3],
    ) -> Self {
        gauge.set(0);
        Self {
            node,
            threshold: threshold.max(1),
            cooldown,
            inner: Mutex::new(Inner {
                state: BreakerState::Closed,
                failures: 0,
                open_until: Instant::now(),
                probe_in_flight: false,
            }),
            gauge,
            transitions,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Current state; an open breaker whose cooldown has ended reads as half-open.
    pub(crate) fn state(&self) -> BreakerState {
        let s = self.lock();
        match s.state {
            BreakerState::Open if Instant::now() >= s.open_until => BreakerState::HalfOpen,
            st => st,
        }
    }

    fn transition(&self, s: &mut Inner, to: BreakerState, why: &str) {
        if s.state == to {
            return;
        }
        let from = s.state;
        s.state = to;
        self.gauge.set(to.as_metric());
        self.transitions[to.as_metric() as usize].inc();
        match to {
            BreakerState::Open => tracing::warn!(
                node = %self.node, from = from.as_str(), to = to.as_str(),
                failures = s.failures, cooldown_s = self.cooldown.as_secs_f64(),
                "node circuit breaker opened: {why}"
            ),
            _ => tracing::info!(
                node = %self.node, from = from.as_str(), to = to.as_str(),
                "node circuit breaker state change: {why}"
            ),
        }
    }

    /// Lets a call through or fails fast with the time until the next probe.
    pub(crate) fn acquire(&self) -> Result<Permit<'_>, Duration> {
        let now = Instant::now();
        let mut s = self.lock();
        match s.state {
            BreakerState::Closed => Ok(Permit {
                breaker: self,
                probe: false,
                done: false,
            }),
            BreakerState::Open if now < s.open_until => Err(s.open_until - now),
            BreakerState::Open | BreakerState::HalfOpen => {
                if s.probe_in_flight {
                    return Err(Duration::ZERO);
                }
                self.transition(&mut s, BreakerState::HalfOpen, "cooldown over, probing");
                s.probe_in_flight = true;
                Ok(Permit {
                    breaker: self,
                    probe: true,
                    done: false,
                })
            }
        }
    }

    /// Records a call's outcome: `true` for a node failure (an unknown outcome counts).
    pub(crate) fn record(&self, mut permit: Permit<'_>, failure: bool) {
        permit.done = true;
        let mut s = self.lock();
        if permit.probe {
            s.probe_in_flight = false;
        }
        if failure {
            s.failures = s.failures.saturating_add(1);
            let reopen = permit.probe || s.state == BreakerState::HalfOpen;
            if reopen || (s.state == BreakerState::Closed && s.failures >= self.threshold) {
                s.open_until = Instant::now() + self.cooldown;
                let why = if reopen {
                    "half-open probe failed"
                } else {
                    "failure threshold reached"
                };
                self.transition(&mut s, BreakerState::Open, why);
            }
        } else {
            s.failures = 0;
            if s.state != BreakerState::Closed
                && (permit.probe || s.state == BreakerState::HalfOpen)
            {
                self.transition(&mut s, BreakerState::Closed, "probe succeeded");
            }
        }
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if !self.done && self.probe {
            self.breaker.lock().probe_in_flight = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(threshold: u32, cooldown: Duration) -> Breaker {
        let g = IntGauge::new("g", "g").unwrap();
        let t = [0, 1, 2].map(|i| IntCounter::new(format!("t{i}"), "t").unwrap());
        Breaker::new("n".into(), threshold, cooldown, g, t)
    }

    #[test]
    fn opens_after_threshold_probes_after_cooldown_and_closes_on_success() {
        let b = breaker(2, Duration::from_millis(30));
        b.record(b.acquire().unwrap(), true);
        assert_eq!(b.state(), BreakerState::Closed);
        b.record(b.acquire().unwrap(), true);
        assert_eq!(b.state(), BreakerState::Open);
        assert!(b.acquire().is_err());
        std::thread::sleep(Duration::from_millis(40));
        let probe = b.acquire().unwrap();
        assert!(b.acquire().is_err(), "only one probe at a time");
        b.record(probe, false);
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.gauge.get(), 0);
    }

    #[test]
    fn failed_probe_reopens_and_cancelled_probe_frees_the_slot() {
        let b = breaker(1, Duration::from_millis(10));
        b.record(b.acquire().unwrap(), true);
        std::thread::sleep(Duration::from_millis(15));
        drop(b.acquire().unwrap());
        let probe = b.acquire().expect("slot freed by the dropped probe");
        b.record(probe, true);
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.gauge.get(), 2);
    }
}
