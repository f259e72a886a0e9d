//! Helpers shared by the `ops_*` tests: external tools, the known-metrics list, PromQL checks.
#![allow(dead_code, unreachable_pub)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use promql_parser::parser::{self, Expr};
use promql_parser::util::{walk_expr, ExprVisitor};

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Finds an external tool on `PATH`. Missing: the test fails, unless `ALLOW_SKIP_TESTS=1` is
/// set (see [`super::missing`]); then it prints why and this returns `None`.
pub fn tool(name: &str) -> Option<PathBuf> {
    tool_any(&[name])
}

/// As [`tool`], accepting any of several names (e.g. Debian's `prometheus-alertmanager`).
pub fn tool_any(names: &[&str]) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .flat_map(|p| names.iter().map(move |n| p.join(n)))
            .find(|p| p.is_file())
    });
    let name = names.join(" or ");
    match found {
        Some(p) => Some(p),
        None => {
            super::missing(&format!(
                "`{name}` not found on PATH (install it with scripts/install-deps.sh)"
            ));
            None
        }
    }
}

/// Runs a tool, returning (success, stdout + stderr).
pub fn run(tool: &Path, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(tool)
        .args(args)
        .current_dir(repo())
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", tool.display()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Files in `dir` (relative to the repository root) whose name ends with `suffix`, sorted.
pub fn files(dir: &str, suffix: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(repo().join(dir))
        .unwrap_or_else(|e| panic!("reading {dir}: {e}"))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.to_string_lossy().ends_with(suffix))
        .collect();
    v.sort();
    v
}

/// One family of `dashboards/metrics.txt`.
#[derive(Debug, Clone)]
pub struct Family {
    pub kind: String,
    pub labels: BTreeSet<String>,
}

/// The contract list `dashboards/metrics.txt`.
#[derive(Debug)]
pub struct KnownMetrics {
    pub families: BTreeMap<String, Family>,
}

/// Series that Prometheus itself makes; any label allowed.
const PROMETHEUS_OWN: &[&str] = &["up", "ALERTS", "ALERTS_FOR_STATE"];

impl KnownMetrics {
    pub fn load() -> Self {
        let text = std::fs::read_to_string(repo().join("dashboards/metrics.txt"))
            .expect("dashboards/metrics.txt");
        let mut families = BTreeMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let parts: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(
                parts.len(),
                3,
                "metrics.txt line {}: `<name> <type> <labels|->`: {line}",
                i + 1
            );
            let (name, kind, labels) = (parts[0], parts[1], parts[2]);
            assert!(
                name.starts_with("vpnbot_"),
                "line {}: prefix vpnbot_",
                i + 1
            );
            assert!(
                matches!(kind, "counter" | "gauge" | "histogram"),
                "line {}: type {kind}",
                i + 1
            );
            if kind == "counter" {
                assert!(
                    name.ends_with("_total"),
                    "counter {name} must end in _total"
                );
            }
            let labels = if labels == "-" {
                BTreeSet::new()
            } else {
                labels.split(',').map(str::to_string).collect()
            };
            let prev = families.insert(
                name.to_string(),
                Family {
                    kind: kind.to_string(),
                    labels,
                },
            );
            assert!(prev.is_none(), "{name} listed twice");
        }
        Self { families }
    }

    /// The family a series name belongs to, allowing histogram suffixes.
    pub fn family_of(&self, series: &str) -> Option<(&str, &Family)> {
        if let Some((k, f)) = self.families.get_key_value(series) {
            return Some((k.as_str(), f));
        }
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = series.strip_suffix(suffix) {
                if let Some((k, f)) = self.families.get_key_value(base) {
                    if f.kind == "histogram" {
                        return Some((k.as_str(), f));
                    }
                }
            }
        }
        None
    }

    /// Parses `expr` and checks every selector: a known family (or Prometheus' own series)
    /// and only its labels (plus job, instance, and le on buckets). Returns the series names.
    pub fn check(&self, expr: &str) -> Result<BTreeSet<String>, String> {
        let ast = parser::parse(expr).map_err(|e| format!("does not parse: {e}"))?;
        let mut v = Selectors::default();
        walk_expr(&mut v, &ast).expect("infallible visitor");
        let mut problems = Vec::new();
        for (name, labels) in &v.found {
            let Some(name) = name else {
                problems.push("selector without a metric name".to_string());
                continue;
            };
            if PROMETHEUS_OWN.contains(&name.as_str()) {
                continue;
            }
            match self.family_of(name) {
                None => problems.push(format!("`{name}` is not in dashboards/metrics.txt")),
                Some((_, fam)) => {
                    for l in labels {
                        let ok = fam.labels.contains(l)
                            || l == "job"
                            || l == "instance"
                            || (l == "le" && name.ends_with("_bucket"));
                        if !ok {
                            problems.push(format!("`{name}` has no label `{l}`"));
                        }
                    }
                }
            }
        }
        if problems.is_empty() {
            Ok(v.found.into_iter().filter_map(|(n, _)| n).collect())
        } else {
            Err(problems.join("; "))
        }
    }
}

#[derive(Default)]
struct Selectors {
    found: Vec<(Option<String>, Vec<String>)>,
}

impl Selectors {
    fn add(&mut self, vs: &parser::VectorSelector) {
        let mut name = vs.name.clone();
        let mut labels = Vec::new();
        let or = vs.matchers.or_matchers.iter().flatten();
        for m in vs.matchers.matchers.iter().chain(or) {
            if m.name == "__name__" {
                name.get_or_insert_with(|| m.value.clone());
            } else {
                labels.push(m.name.clone());
            }
        }
        self.found.push((name, labels));
    }
}

impl ExprVisitor for Selectors {
    type Error = std::convert::Infallible;
    fn pre_visit(&mut self, e: &Expr) -> Result<bool, Self::Error> {
        match e {
            Expr::VectorSelector(vs) => self.add(vs),
            Expr::MatrixSelector(ms) => self.add(&ms.vs),
            _ => {}
        }
        Ok(true)
    }
}

/// Replaces Grafana variables with values PromQL accepts: `$__rate_interval` and friends with
/// a duration, `$var` / `${var}` (inside regex matchers) with `.*`.
pub fn expand_grafana_vars(expr: &str) -> String {
    let mut out = String::with_capacity(expr.len());
    let b = expr.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'$' {
            let braced = b.get(i + 1) == Some(&b'{');
            let start = if braced { i + 2 } else { i + 1 };
            let mut j = start;
            while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_') {
                j += 1;
            }
            let name = &expr[start..j];
            if braced {
                // Skip a format suffix like ${var:regex} and the closing brace.
                while j < b.len() && b[j] != b'}' {
                    j += 1;
                }
                j += 1;
            }
            if name.starts_with("__") {
                out.push_str("5m");
            } else {
                out.push_str(".*");
            }
            i = j;
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

/// Problems of a Prometheus text exposition against the contract (row O2 of FAULTS.md): every
/// family has non-empty HELP and the `vpnbot_` prefix, and no label value looks like a user
/// id, chat id, UUID, URL or secret. For the owner's running-instance contract test too.
pub fn exposition_problems(text: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let mut help: BTreeMap<String, String> = BTreeMap::new();
    let mut typed = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, h) = rest.split_once(' ').unwrap_or((rest, ""));
            help.insert(name.to_string(), h.trim().to_string());
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            typed.insert(rest.split(' ').next().unwrap_or("").to_string());
        } else if !line.starts_with('#') && !line.trim().is_empty() {
            let Some(open) = line.find('{') else { continue };
            let close = line.rfind('}').unwrap_or(line.len());
            for pair in split_labels(&line[open + 1..close]) {
                let Some((k, v)) = pair.split_once('=') else {
                    continue;
                };
                // Bucket bounds are numbers by design.
                if k == "le" || k == "quantile" {
                    continue;
                }
                let v = v.trim_matches('"');
                if let Some(why) = suspicious_label_value(v) {
                    problems.push(format!(
                        "{}: label {k}=\"{v}\" looks like {why}",
                        &line[..open]
                    ));
                }
            }
        }
    }
    for name in typed {
        if !name.starts_with("vpnbot_") {
            problems.push(format!("{name}: family without the vpnbot_ prefix"));
        }
        if help.get(&name).is_none_or(|h| h.is_empty()) {
            problems.push(format!("{name}: no HELP text"));
        }
    }
    problems
}

/// Families of `known` that the exposition lacks.
pub fn missing_families(text: &str, known: &KnownMetrics) -> Vec<String> {
    known
        .families
        .keys()
        .filter(|name| !text.contains(&format!("# TYPE {name} ")))
        .cloned()
        .collect()
}

fn split_labels(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_quotes = false;
    let mut escaped = false;
    for c in s.chars() {
        match c {
            '\\' if in_quotes && !escaped => {
                escaped = true;
                cur.push(c);
                continue;
            }
            '"' if !escaped => in_quotes = !in_quotes,
            ',' if !in_quotes => {
                out.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        escaped = false;
        cur.push(c);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Why a label value is not allowed, if it is not.
pub fn suspicious_label_value(v: &str) -> Option<&'static str> {
    let hex_or_dash = |c: char| c.is_ascii_hexdigit() || c == '-';
    if v.len() == 36 && v.chars().all(hex_or_dash) && v.matches('-').count() == 4 {
        return Some("a UUID");
    }
    if v.contains("://") || v.starts_with("www.") {
        return Some("a URL");
    }
    let digits = v.trim_start_matches('-');
    if digits.len() >= 6 && digits.chars().all(|c| c.is_ascii_digit()) {
        return Some("a user or chat id");
    }
    // Telegram bot tokens: <digits>:<35 url-safe chars>.
    if let Some((id, rest)) = v.split_once(':') {
        if id.len() >= 6 && id.chars().all(|c| c.is_ascii_digit()) && rest.len() >= 30 {
            return Some("a bot token");
        }
    }
    if v.len() >= 32
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || "+/=_-".contains(c))
    {
        return Some("a secret or key");
    }
    None
}
