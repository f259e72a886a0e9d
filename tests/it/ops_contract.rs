//! Row O2 of FAULTS.md for what this branch exports: the exposition has HELP on every family,
//! the vpnbot_ prefix, no identifying or secret label values, and passes `promtool check
//! metrics`; every family it exports is in dashboards/metrics.txt. The owner's contract test
//! runs the same checks (`helpers::ops::exposition_problems`, `missing_families`) against a
//! running vpnbot after it has done some work.

use crate::helpers;
use std::io::Write;
use std::process::Stdio;

use helpers::ops::{exposition_problems, suspicious_label_value, tool, KnownMetrics};
use vpnbot::config::ObservabilityConfig;
use vpnbot::otel::{otel_layer_with, OtelSettings};

fn exposition() -> String {
    let registry = vpnbot::metrics::new_registry();
    // The OTLP export families (to a closed port; nothing is exported).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = ObservabilityConfig {
        otlp_endpoint: format!("http://127.0.0.1:{port}/v1/traces").into(),
        ..Default::default()
    };
    let (_layer, guard) = otel_layer_with(&cfg, &registry, OtelSettings::default()).unwrap();
    let text = vpnbot::metrics::render(&registry);
    drop(guard);
    text
}

#[test]
fn exported_families_have_help_and_clean_labels_and_are_listed() {
    let text = exposition();
    let problems = exposition_problems(&text);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    let known = KnownMetrics::load();
    for line in text.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
        let name = line.split(' ').next().unwrap();
        assert!(
            known.families.contains_key(name),
            "{name} is exported but not listed in dashboards/metrics.txt"
        );
    }
    assert!(text.contains("# TYPE vpnbot_otel_spans_dropped_total counter"));
}

#[test]
fn label_checks_catch_identifying_values() {
    assert_eq!(
        suspicious_label_value("0b6e3f0e-1c2d-4e5f-8a9b-0c1d2e3f4a5b"),
        Some("a UUID")
    );
    assert_eq!(
        suspicious_label_value("http://10.0.0.5:8080/"),
        Some("a URL")
    );
    assert_eq!(
        suspicious_label_value("123456789"),
        Some("a user or chat id")
    );
    assert_eq!(
        suspicious_label_value("-1001234567890"),
        Some("a user or chat id")
    );
    assert_eq!(
        suspicious_label_value("123456789:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw"),
        Some("a bot token")
    );
    for fine in [
        "list_users",
        "body",
        "a",
        "reconcile_fetch_db",
        "0.1.0",
        "2",
        "http_5xx",
    ] {
        assert_eq!(suspicious_label_value(fine), None, "{fine}");
    }
    let bad = "# HELP vpnbot_x x\n# TYPE vpnbot_x counter\nvpnbot_x{user=\"123456789\"} 1\n\
               # TYPE vpnbot_y gauge\nvpnbot_y 1\n";
    let p = exposition_problems(bad);
    assert!(p.iter().any(|s| s.contains("user or chat id")), "{p:?}");
    assert!(p.iter().any(|s| s.contains("vpnbot_y: no HELP")), "{p:?}");
}

#[test]
fn promtool_check_metrics_accepts_the_exposition() {
    let Some(promtool) = tool("promtool") else {
        return;
    };
    let mut child = std::process::Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(exposition().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
