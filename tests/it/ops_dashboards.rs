//! The dashboards stay true without a Grafana server: every file parses as a current-schema
//! dashboard with `datasource` and `node` variables, every panel has a query, every query parses
//! as PromQL and uses only families and labels of dashboards/metrics.txt; the provisioning
//! files point at the folder.

use crate::helpers;
use std::collections::BTreeSet;

use helpers::ops::{expand_grafana_vars, files, repo, KnownMetrics};
use serde_json::Value;

fn dashboards() -> Vec<(String, Value)> {
    let v: Vec<_> = files("dashboards", ".json")
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            let json: Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{}: not JSON: {e}", p.display()));
            (p.file_name().unwrap().to_string_lossy().into_owned(), json)
        })
        .collect();
    assert!(v.len() >= 6, "expected six dashboards, found {}", v.len());
    v
}

/// Panels, including those nested in collapsed rows.
fn panels(d: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        out.push(p);
        for inner in p["panels"].as_array().into_iter().flatten() {
            out.push(inner);
        }
    }
    out
}

#[test]
fn dashboards_have_current_schema_and_variables() {
    let mut uids = BTreeSet::new();
    for (file, d) in dashboards() {
        let uid = d["uid"].as_str().unwrap_or_else(|| panic!("{file}: uid"));
        assert!(uids.insert(uid.to_string()), "{file}: duplicate uid {uid}");
        assert!(
            d["title"].as_str().is_some_and(|t| !t.is_empty()),
            "{file}: title"
        );
        let schema = d["schemaVersion"].as_u64().unwrap_or(0);
        assert!(
            schema >= 39,
            "{file}: schemaVersion {schema} (< 39, Grafana 10.4)"
        );
        let vars = d["templating"]["list"].as_array().expect("templating");
        let ds = vars
            .iter()
            .find(|v| v["name"] == "datasource")
            .unwrap_or_else(|| panic!("{file}: no datasource variable"));
        assert_eq!(ds["type"], "datasource", "{file}");
        assert_eq!(ds["query"], "prometheus", "{file}");
        let node = vars
            .iter()
            .find(|v| v["name"] == "node")
            .unwrap_or_else(|| panic!("{file}: no node variable"));
        assert_eq!(node["type"], "query", "{file}");
        // Variable queries are label_values(<selector>, label): the selector must be valid too.
        let known = KnownMetrics::load();
        for v in vars.iter().filter(|v| v["type"] == "query") {
            let def = v["definition"].as_str().expect("definition");
            let inner = def
                .strip_prefix("label_values(")
                .and_then(|s| s.rsplit_once(','))
                .map(|(sel, _)| sel)
                .unwrap_or_else(|| panic!("{file}: variable query {def}"));
            known
                .check(&expand_grafana_vars(inner))
                .unwrap_or_else(|e| panic!("{file}: variable {}: {e}", v["name"]));
        }
    }
    for want in [
        "vpnbot-overview",
        "vpnbot-runtime",
        "vpnbot-node-api",
        "vpnbot-db-pool",
        "vpnbot-reconcile",
        "vpnbot-bot",
    ] {
        assert!(uids.contains(want), "missing dashboard {want}");
    }
}

#[test]
fn every_panel_has_a_query_and_every_query_uses_known_metrics() {
    let known = KnownMetrics::load();
    let mut problems = Vec::new();
    let mut used = BTreeSet::new();
    let mut queries = 0;
    for (file, d) in dashboards() {
        let mut ids = BTreeSet::new();
        for p in panels(&d) {
            let title = p["title"].as_str().unwrap_or("<untitled>");
            if p["type"] == "row" || p["type"] == "text" {
                continue;
            }
            if let Some(id) = p["id"].as_u64() {
                assert!(ids.insert(id), "{file}: duplicate panel id {id}");
            }
            assert_eq!(
                p["datasource"]["uid"], "${datasource}",
                "{file} / {title}: panel must use the datasource variable"
            );
            let targets = p["targets"].as_array().cloned().unwrap_or_default();
            if targets.is_empty() {
                problems.push(format!("{file} / {title}: no query"));
            }
            for t in targets {
                let expr = t["expr"].as_str().unwrap_or("");
                if expr.trim().is_empty() {
                    problems.push(format!("{file} / {title}: empty query"));
                    continue;
                }
                queries += 1;
                match known.check(&expand_grafana_vars(expr)) {
                    Ok(names) => used.extend(names),
                    Err(e) => problems.push(format!("{file} / {title}: {e}\n    {expr}")),
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert!(queries > 50, "only {queries} queries");
    // The headline families of every issue are on a dashboard.
    for must in [
        "vpnbot_runtime_stalled",
        "vpnbot_watchdog_episode_info",
        "vpnbot_runtime_scheduler_lag_seconds_bucket",
        "vpnbot_node_api_phase_duration_seconds_bucket",
        "vpnbot_node_api_inflight_requests",
        "vpnbot_node_api_circuit_state",
        "vpnbot_db_pool_acquire_wait_seconds_bucket",
        "vpnbot_db_pool_pending_acquires",
        "vpnbot_reconcile_runs_total",
        // Since issue 19 the age of a node's last ok run comes from the database (any
        // instance may have run it); the per-instance timestamp stays exported.
        "vpnbot_reconcile_node_last_reconciled_age_seconds",
        "vpnbot_reconcile_leases_held",
        "vpnbot_reconcile_node_unheld_seconds",
        "vpnbot_outbox_claimed_total",
        "vpnbot_bot_polling_last_success_timestamp_seconds",
        "vpnbot_bot_handler_duration_seconds_bucket",
        "vpnbot_leader",
        "up",
    ] {
        assert!(used.contains(must), "no panel shows {must}");
    }
}

/// The validator itself rejects what it must (so the test above cannot pass vacuously).
#[test]
fn validator_rejects_unknown_metrics_labels_and_bad_promql() {
    let known = KnownMetrics::load();
    assert!(known
        .check("rate(vpnbot_node_api_retries_total{node=\"a\"}[5m])")
        .is_ok());
    assert!(known
        .check(
            "histogram_quantile(0.99, sum by (le) (rate(vpnbot_db_pool_hold_seconds_bucket[5m])))"
        )
        .is_ok());
    let e = known.check("vpnbot_no_such_metric").unwrap_err();
    assert!(e.contains("not in dashboards/metrics.txt"), "{e}");
    let e = known
        .check("vpnbot_node_api_circuit_state{operation=\"x\"}")
        .unwrap_err();
    assert!(e.contains("no label `operation`"), "{e}");
    let e = known.check("vpnbot_leader_count").unwrap_err();
    assert!(e.contains("not in"), "{e}"); // _count only for histograms
    let e = known.check("sum(rate(vpnbot_leader[5m])").unwrap_err();
    assert!(e.contains("does not parse"), "{e}");
    assert_eq!(
        expand_grafana_vars("rate(x{node=~\"$node\", i=~\"${instance}\"}[$__rate_interval])"),
        "rate(x{node=~\".*\", i=~\".*\"}[5m])"
    );
}

#[test]
fn provisioning_points_at_the_dashboards() {
    let p: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(repo().join("dashboards/provisioning/dashboards.yml")).unwrap(),
    )
    .expect("dashboards.yml parses");
    assert_eq!(p["apiVersion"].as_u64(), Some(1));
    let prov = &p["providers"][0];
    assert_eq!(prov["type"].as_str(), Some("file"));
    assert!(prov["options"]["path"]
        .as_str()
        .is_some_and(|s| !s.is_empty()));
    let ds: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(repo().join("dashboards/provisioning/datasources.yml")).unwrap(),
    )
    .expect("datasources.yml parses");
    assert_eq!(ds["datasources"][0]["type"].as_str(), Some("prometheus"));
}
