//! The alert rules, their unit tests, the runbooks and the Alertmanager example stay true:
//! `promtool check rules`, `promtool test rules` (every alert tested firing and not firing),
//! every alert has severity, summary, a description with values and a runbook section, every
//! metric it uses is in dashboards/metrics.txt, and `amtool` accepts and routes the config.

use crate::helpers;
use std::collections::{BTreeMap, BTreeSet};

use helpers::ops::{files, repo, run, tool, KnownMetrics};
use serde_yaml::Value;

#[derive(Debug)]
struct Alert {
    name: String,
    expr: String,
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
}

fn str_map(v: &Value) -> BTreeMap<String, String> {
    v.as_mapping()
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    (
                        k.as_str().expect("string key").to_string(),
                        v.as_str().map(str::to_string).unwrap_or_default(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn alerts() -> Vec<Alert> {
    let mut out = Vec::new();
    for f in files("alerts", ".rules.yml") {
        let doc: Value = serde_yaml::from_str(&std::fs::read_to_string(&f).unwrap()).unwrap();
        for g in doc["groups"].as_sequence().expect("groups") {
            for r in g["rules"].as_sequence().expect("rules") {
                let Some(name) = r["alert"].as_str() else {
                    continue;
                };
                out.push(Alert {
                    name: name.to_string(),
                    expr: r["expr"].as_str().expect("expr").to_string(),
                    labels: str_map(&r["labels"]),
                    annotations: str_map(&r["annotations"]),
                });
            }
        }
    }
    assert!(!out.is_empty(), "no alerts found under alerts/");
    out
}

/// GitHub's heading anchors: lower case, spaces to dashes, punctuation dropped.
fn anchors(markdown: &str) -> BTreeSet<String> {
    markdown
        .lines()
        .filter_map(|l| l.strip_prefix("## "))
        .map(|h| {
            h.trim()
                .to_lowercase()
                .chars()
                .filter_map(|c| match c {
                    ' ' => Some('-'),
                    c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                    _ => None,
                })
                .collect()
        })
        .collect()
}

#[test]
fn promtool_check_rules() {
    let Some(promtool) = tool("promtool") else {
        return;
    };
    let rule_files: Vec<String> = files("alerts", ".rules.yml")
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let mut args = vec!["check", "rules"];
    args.extend(rule_files.iter().map(String::as_str));
    let (ok, out) = run(&promtool, &args);
    assert!(ok, "promtool check rules failed:\n{out}");
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn promtool_unit_tests_pass() {
    let Some(promtool) = tool("promtool") else {
        return;
    };
    let tests: Vec<String> = files("alerts/tests", ".yml")
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    assert!(!tests.is_empty(), "no alerts/tests/*.yml");
    let mut args = vec!["test", "rules"];
    args.extend(tests.iter().map(String::as_str));
    let (ok, out) = run(&promtool, &args);
    assert!(ok, "promtool test rules failed:\n{out}");
    assert!(!out.contains("FAILED"), "{out}");
}

/// Every alert has at least one unit test where it fires and one where it does not, and every
/// tested alert name exists (a renamed alert cannot leave a vacuous `exp_alerts: []` behind).
#[test]
fn every_alert_is_tested_firing_and_not_firing() {
    let names: BTreeSet<String> = alerts().into_iter().map(|a| a.name).collect();
    let mut firing = BTreeSet::new();
    let mut silent = BTreeSet::new();
    for f in files("alerts/tests", ".yml") {
        let doc: Value = serde_yaml::from_str(&std::fs::read_to_string(&f).unwrap()).unwrap();
        for t in doc["tests"].as_sequence().expect("tests") {
            for a in t["alert_rule_test"].as_sequence().into_iter().flatten() {
                let name = a["alertname"].as_str().expect("alertname").to_string();
                assert!(
                    names.contains(&name),
                    "{} tests unknown alert {name}",
                    f.display()
                );
                let exp = a["exp_alerts"].as_sequence().map(Vec::len).unwrap_or(0);
                if exp > 0 {
                    firing.insert(name);
                } else {
                    silent.insert(name);
                }
            }
        }
    }
    let no_fire: Vec<_> = names.difference(&firing).collect();
    let no_silent: Vec<_> = names.difference(&silent).collect();
    assert!(
        no_fire.is_empty(),
        "alerts never tested firing: {no_fire:?}"
    );
    assert!(
        no_silent.is_empty(),
        "alerts never tested not firing: {no_silent:?}"
    );
}

#[test]
fn every_alert_has_severity_summary_description_and_runbook() {
    let runbooks = std::fs::read_to_string(repo().join("docs/runbooks.md")).expect("runbooks");
    let sections = anchors(&runbooks);
    let mut used = BTreeSet::new();
    for a in alerts() {
        let sev = a.labels.get("severity").map(String::as_str);
        assert!(
            matches!(sev, Some("critical" | "warning")),
            "{}: severity must be critical or warning, is {sev:?}",
            a.name
        );
        for key in ["summary", "description", "runbook_url"] {
            assert!(
                a.annotations.get(key).is_some_and(|v| !v.trim().is_empty()),
                "{}: annotation {key} missing",
                a.name
            );
        }
        let desc = &a.annotations["description"];
        assert!(
            desc.contains("$value") || desc.contains("$labels"),
            "{}: the description must carry values ($value or $labels)",
            a.name
        );
        let url = &a.annotations["runbook_url"];
        let anchor = url
            .strip_prefix("docs/runbooks.md#")
            .unwrap_or_else(|| panic!("{}: runbook_url {url} not into docs/runbooks.md", a.name));
        assert_eq!(anchor, a.name.to_lowercase(), "{}: anchor", a.name);
        assert!(
            sections.contains(anchor),
            "{}: docs/runbooks.md has no section `## {}`",
            a.name,
            a.name
        );
        used.insert(anchor.to_string());
    }
    let orphans: Vec<_> = sections.difference(&used).collect();
    assert!(
        orphans.is_empty(),
        "runbook sections without an alert: {orphans:?}"
    );
    for s in &used {
        let start = runbooks
            .find(&format!("\n## {}", runbook_heading(&runbooks, s)))
            .expect("section");
        let body = &runbooks[start + 4..];
        let body = &body[..body.find("\n## ").unwrap_or(body.len())];
        for part in ["**Means.**", "**Confirm.**", "**Do.**"] {
            assert!(body.contains(part), "runbook section {s} lacks {part}");
        }
    }
}

fn runbook_heading(md: &str, anchor: &str) -> String {
    md.lines()
        .filter_map(|l| l.strip_prefix("## "))
        .find(|h| h.trim().to_lowercase() == anchor)
        .expect("heading")
        .trim()
        .to_string()
}

/// Stall alerts carry the culprit labels of vpnbot_watchdog_episode_info into the page.
#[test]
fn stall_alerts_carry_the_culprit() {
    for a in alerts() {
        if matches!(
            a.name.as_str(),
            "VpnbotRuntimeStalled"
                | "VpnbotWorkerBlocked"
                | "VpnbotNodeCallStuck"
                | "VpnbotDbPoolStarved"
                | "VpnbotWorkerOverdue"
        ) {
            assert!(
                a.expr.contains("vpnbot_watchdog_episode_info"),
                "{} must read the culprit from vpnbot_watchdog_episode_info",
                a.name
            );
            let text = format!(
                "{} {}",
                a.annotations["summary"], a.annotations["description"]
            );
            assert!(
                text.contains("$labels.task") || text.contains("$labels.node"),
                "{} must name the culprit in its page",
                a.name
            );
        }
    }
}

#[test]
fn alert_expressions_parse_and_use_known_metrics() {
    let known = KnownMetrics::load();
    let mut problems = Vec::new();
    for a in alerts() {
        if let Err(e) = known.check(&a.expr) {
            problems.push(format!("{}: {e}", a.name));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn amtool_accepts_the_example_config() {
    let Some(amtool) = tool("amtool") else {
        return;
    };
    let (ok, out) = run(&amtool, &["check-config", "alerts/alertmanager.yml"]);
    assert!(ok, "amtool check-config failed:\n{out}");
    assert!(out.contains("SUCCESS"), "{out}");
}

/// Routing by severity: critical pages on Telegram, warning goes to the ops chat, both and
/// everything else reach the webhook.
#[test]
fn alertmanager_routes_by_severity() {
    let Some(amtool) = tool("amtool") else {
        return;
    };
    for (labels, want) in [
        (
            vec!["alertname=VpnbotRuntimeStalled", "severity=critical"],
            "telegram-oncall,webhook",
        ),
        (
            vec!["alertname=VpnbotNodeBreakerOpen", "severity=warning"],
            "telegram-ops,webhook",
        ),
        (vec!["alertname=Other", "severity=info"], "webhook"),
    ] {
        let mut args = vec![
            "config",
            "routes",
            "test",
            "--config.file=alerts/alertmanager.yml",
        ];
        args.extend(labels.iter().copied());
        let out = std::process::Command::new(&amtool)
            .args(&args)
            .current_dir(repo())
            .output()
            .expect("run amtool");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "amtool config routes test {labels:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(stdout.trim(), want, "route for {labels:?}");
    }
}
