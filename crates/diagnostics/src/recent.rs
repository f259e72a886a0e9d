//! Recent history and standing findings in a dump: what failed lately (node calls per node and
//! operation, the last reconcile outcome per node) and what the sources judge now without an
//! episode (e.g. "database time dominates"). A dump taken *between* two attempts of a repeating
//! fault still explains it; a healthy dump's verdict names them.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;

use super::InflightSource;

/// One remembered event, as a dump shows it. Label-like fields come from bounded sets (node
/// names from config, operations, phases and error types from code); `detail` is an error's
/// own text, which never carries a URL or a secret.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RecentEvent {
    /// `node_call_failed` or `reconcile`.
    pub what: &'static str,
    /// Node name from config.
    pub node: Option<String>,
    /// Operation (`list_users`, ...).
    pub operation: Option<String>,
    /// Phase the failure happened in (`connect`, `headers`, `body`, `decode`, ...).
    pub phase: Option<String>,
    /// Error type (`body_timeout`, `deadline_exceeded`, ...) or reconcile outcome (`ok`,
    /// `failed`, ...).
    pub outcome: String,
    /// Body bytes received by the failed attempt.
    pub bytes_received: Option<u64>,
    /// Time from the last body byte to the failure, seconds (`None`: no byte came).
    pub since_last_byte_seconds: Option<f64>,
    /// Attempts the call made.
    pub attempts: Option<u32>,
    /// How long the call or run took, seconds.
    pub took_seconds: Option<f64>,
    /// Time since the event, seconds.
    pub age_seconds: f64,
    /// How many such events (same node, operation) the ring holds, this one included.
    pub count: u32,
    /// The error's text (bounded to [`super::MAX_DETAIL_LEN`]).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

impl RecentEvent {
    /// One phrase: `node "a" list_users deadline_exceeded in phase body after 14 bytes, last
    /// byte 0.1 s before, 1.5 s into the call, 2.3 s ago (3 recent)`.
    pub fn describe(&self) -> String {
        let mut s = String::new();
        if let Some(n) = &self.node {
            s.push_str(&format!("node \"{n}\" "));
        }
        match self.what {
            "reconcile" => s.push_str(&format!("reconcile {}", self.outcome)),
            _ => {
                if let Some(o) = &self.operation {
                    s.push_str(o);
                    s.push(' ');
                }
                s.push_str(&self.outcome);
            }
        }
        if let Some(p) = &self.phase {
            s.push_str(&format!(" in phase {p}"));
        }
        if let Some(b) = self.bytes_received {
            s.push_str(&format!(" after {b} body bytes"));
        }
        if let Some(l) = self.since_last_byte_seconds {
            s.push_str(&format!(", last byte {l:.1} s before"));
        }
        match (self.took_seconds, self.what) {
            (Some(t), "reconcile") => s.push_str(&format!(", the run took {t:.1} s")),
            (Some(t), _) => s.push_str(&format!(", {t:.1} s into the call")),
            (None, _) => {}
        }
        s.push_str(&format!(", {:.1} s ago", self.age_seconds));
        if self.count > 1 {
            s.push_str(&format!(" ({} recent)", self.count));
        }
        s
    }
}

/// Every source's recent events, by section.
pub(crate) fn collect(sources: &[Arc<dyn InflightSource>]) -> BTreeMap<String, Vec<RecentEvent>> {
    let mut out: BTreeMap<String, Vec<RecentEvent>> = BTreeMap::new();
    for s in sources {
        let r = s.recent();
        if !r.is_empty() {
            out.entry(s.section().to_owned()).or_default().extend(r);
        }
    }
    out
}

/// What a healthy dump's verdict adds: every source's standing finding, then the most recent
/// node failure. Empty when there is nothing to add.
pub(crate) fn verdict_suffix(
    sources: &[Arc<dyn InflightSource>],
    recent: &BTreeMap<String, Vec<RecentEvent>>,
) -> String {
    let mut s = String::new();
    for o in sources.iter().filter_map(|s| s.observation()) {
        s.push_str("; ");
        s.push_str(&o);
    }
    if let Some(e) = recent
        .values()
        .flatten()
        .filter(|e| e.what == "node_call_failed")
        .min_by(|a, b| a.age_seconds.total_cmp(&b.age_seconds))
    {
        s.push_str("; last node failure: ");
        s.push_str(&e.describe());
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_reads_as_one_phrase() {
        let e = RecentEvent {
            what: "node_call_failed",
            node: Some("a".into()),
            operation: Some("list_users".into()),
            phase: Some("body".into()),
            outcome: "deadline_exceeded".into(),
            bytes_received: Some(14),
            since_last_byte_seconds: Some(0.1),
            attempts: Some(1),
            took_seconds: Some(1.5),
            age_seconds: 2.34,
            count: 3,
            detail: String::new(),
        };
        assert_eq!(
            e.describe(),
            "node \"a\" list_users deadline_exceeded in phase body after 14 body bytes, last \
             byte 0.1 s before, 1.5 s into the call, 2.3 s ago (3 recent)"
        );
    }
}
