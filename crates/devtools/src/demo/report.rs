//! The demo's report: one row per injected fault and what was seen.

use std::time::Duration;

/// What one scenario step injected and what vpnbot showed for it.
#[derive(Debug, Clone, Default)]
pub struct StepReport {
    /// Step name, e.g. `old_freeze`.
    pub step: &'static str,
    /// The fault injected, in words.
    pub fault: String,
    /// Whether vpnbot detected it.
    pub detected: bool,
    /// From injection to detection.
    pub detection_latency: Option<Duration>,
    /// The watchdog's verdict line (or the decisive evidence line for bounded faults).
    pub verdict: String,
    /// The culprit the step expected to be named, e.g. `kind=blocked_worker task=...`.
    pub expected_culprit: String,
    /// Whether the verdict/labels named that culprit.
    pub culprit_named: bool,
    /// What users (and operators) experienced meanwhile.
    pub users: String,
    /// Further expectations of the step, each with its outcome.
    pub checks: Vec<(String, bool)>,
    /// No fault is injected: the step checks that nothing is detected.
    pub no_fault: bool,
}

impl StepReport {
    /// A step that injects no fault and expects `expected` (e.g. no episode open).
    pub fn without_fault(
        step: &'static str,
        what: impl Into<String>,
        expected: impl Into<String>,
    ) -> Self {
        Self {
            no_fault: true,
            ..Self::new(step, what, expected)
        }
    }

    /// A step with nothing seen yet.
    pub fn new(step: &'static str, fault: impl Into<String>, expected: impl Into<String>) -> Self {
        Self {
            step,
            fault: fault.into(),
            expected_culprit: expected.into(),
            ..Default::default()
        }
    }

    /// Records one expectation.
    pub fn check(&mut self, what: impl Into<String>, ok: bool) {
        self.checks.push((what.into(), ok));
    }

    /// Whether every expectation of the step held.
    pub fn ok(&self) -> bool {
        self.detected && self.culprit_named && self.checks.iter().all(|(_, ok)| *ok)
    }

    /// Prints the step as a few indented lines.
    pub fn print(&self) {
        println!(
            "[{}] {}: {}",
            if self.ok() { "ok" } else { "FAILED" },
            self.step,
            self.fault
        );
        if self.no_fault {
            println!(
                "    expected: {} -> {}",
                self.expected_culprit,
                if self.culprit_named { "yes" } else { "NO" }
            );
            if !self.verdict.is_empty() {
                println!("    verdict:  {}", self.verdict);
            }
        } else {
            println!(
                "    detected: {}{}",
                if self.detected { "yes" } else { "NO" },
                self.detection_latency
                    .map(|d| format!(" after {:.2} s", d.as_secs_f64()))
                    .unwrap_or_default()
            );
            if !self.verdict.is_empty() {
                println!("    verdict:  {}", self.verdict);
            }
            println!(
                "    culprit:  expected {} -> {}",
                self.expected_culprit,
                if self.culprit_named {
                    "named"
                } else {
                    "NOT named"
                }
            );
        }
        if !self.users.is_empty() {
            println!("    users:    {}", self.users);
        }
        for (what, ok) in &self.checks {
            println!("    [{}] {what}", if *ok { "ok" } else { "FAILED" });
        }
    }
}
