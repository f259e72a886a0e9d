//! The deployment files under deploy/ (issue 18), checked with what this machine has: no
//! Docker engine, no Kubernetes, no Grafana. So: every file parses; every file the compose
//! stack mounts and every `COPY` source of the Dockerfile exists; Prometheus' config passes
//! `promtool check config` on the layout the compose mounts produce; Alertmanager's passes
//! `amtool check-config`; the Grafana provisioning names the mounted dashboards; the vpnbot
//! configs of compose and Kubernetes pass `vpnbot check-config` with their environment; the
//! Kubernetes probes, grace period and scrape settings match the service; the PrometheusRule
//! equals alerts/vpnbot.rules.yml and passes `promtool check rules`; the systemd unit passes
//! `systemd-analyze verify`.

use crate::helpers;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use helpers::ops::{repo, run, tool, tool_any};
use serde_yaml::Value;

fn yaml(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn yaml_docs(path: &Path) -> Vec<Value> {
    use serde::Deserialize;
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .filter(|v| !v.is_null())
        .collect()
}

fn compose() -> Value {
    yaml(&repo().join("deploy/compose.yaml"))
}

/// `(host source, container target)` of a service's bind mounts (sources starting with `.`),
/// sources resolved against deploy/.
fn bind_mounts(service: &Value) -> Vec<(PathBuf, String)> {
    service["volumes"]
        .as_sequence()
        .map(|v| v.as_slice())
        .unwrap_or_default()
        .iter()
        .filter_map(|v| v.as_str())
        .filter(|v| v.starts_with('.'))
        .map(|v| {
            let mut parts = v.split(':');
            let src = repo().join("deploy").join(parts.next().unwrap());
            let dst = parts.next().expect("target").to_string();
            (src, dst)
        })
        .collect()
}

/// Copies a service's bind mounts into `root` at their container paths.
fn materialize(service: &Value, root: &Path) {
    for (src, dst) in bind_mounts(service) {
        let to = root.join(dst.trim_start_matches('/'));
        copy_tree(&src, &to);
    }
}

fn copy_tree(src: &Path, dst: &Path) {
    if src.is_dir() {
        std::fs::create_dir_all(dst).unwrap();
        for e in std::fs::read_dir(src).unwrap() {
            let e = e.unwrap();
            copy_tree(&e.path(), &dst.join(e.file_name()));
        }
    } else {
        std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
        std::fs::copy(src, dst).unwrap_or_else(|e| panic!("{}: {e}", src.display()));
    }
}

fn env_map(v: &Value) -> BTreeMap<String, String> {
    v.as_mapping()
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    let s = match v {
                        Value::String(s) => s.clone(),
                        Value::Null => String::new(),
                        other => serde_yaml::to_string(other).unwrap().trim().to_string(),
                    };
                    (k.as_str().unwrap().to_string(), s)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `${VAR:-default}` as compose would expand it with VAR unset.
fn compose_default(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find("${") {
        out.push_str(&rest[..i]);
        let end = rest[i..].find('}').expect("closing brace") + i;
        let inner = &rest[i + 2..end];
        out.push_str(inner.split_once(":-").map(|(_, d)| d).unwrap_or(""));
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

/// Runs `vpnbot check-config` with only `env` (plus PATH) and the config file `config`.
fn check_config(config: &Path, env: &BTreeMap<String, String>) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_vpnbot"))
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(env)
        .env("VPNBOT_CONFIG", config)
        .arg("check-config")
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn compose_parses_and_every_mounted_and_built_file_exists() {
    let c = compose();
    let services = c["services"].as_mapping().expect("services");
    for name in [
        "postgres",
        "vpnbot",
        "node-a",
        "prometheus",
        "alertmanager",
        "grafana",
    ] {
        assert!(
            services.contains_key(Value::from(name)),
            "compose lacks service {name}"
        );
    }
    let mut mounts = 0;
    for (name, s) in services {
        for (src, dst) in bind_mounts(s) {
            assert!(
                src.exists(),
                "{name:?}: mounted {} (at {dst}) does not exist",
                src.display()
            );
            mounts += 1;
        }
        if let Some(b) = s.get("build") {
            let ctx = repo().join("deploy").join(b["context"].as_str().unwrap());
            let dockerfile = ctx.join(b["dockerfile"].as_str().unwrap());
            assert!(dockerfile.is_file(), "{name:?}: {}", dockerfile.display());
        }
    }
    assert!(mounts >= 6, "{mounts}");
    // Named volumes used by services are declared.
    let declared = c["volumes"].as_mapping().expect("volumes");
    for (name, s) in services {
        for v in s["volumes"]
            .as_sequence()
            .map(|v| v.as_slice())
            .unwrap_or_default()
        {
            let v = v.as_str().unwrap();
            if !v.starts_with('.') && !v.starts_with('/') {
                let vol = v.split(':').next().unwrap();
                assert!(
                    declared.contains_key(Value::from(vol)),
                    "{name:?}: volume {vol} undeclared"
                );
            }
        }
    }
}

#[test]
fn compose_vpnbot_splits_the_listeners_and_its_config_passes_check_config() {
    let c = compose();
    let s = &c["services"]["vpnbot"];
    let mut env: BTreeMap<String, String> = env_map(&s["environment"])
        .into_iter()
        .map(|(k, v)| (k, compose_default(&v)))
        .collect();
    assert_eq!(env["VPNBOT_OBSERVABILITY__LISTEN"], "0.0.0.0:9187");
    assert!(env["VPNBOT_OBSERVABILITY__DEBUG_LISTEN"].starts_with("127.0.0.1:"));
    // The config file as mounted.
    let dir = tempfile::tempdir().unwrap();
    materialize(s, dir.path());
    let config = dir
        .path()
        .join(env.remove("VPNBOT_CONFIG").unwrap().trim_start_matches('/'));
    let (ok, out) = check_config(&config, &env);
    assert!(ok, "{out}");
    assert!(out.contains("url = \"http://node-a:8081/\""), "{out}");
    // The node simulator listens where the config points.
    let node = &c["services"]["node-a"]["command"];
    assert!(serde_yaml::to_string(node)
        .unwrap()
        .contains("0.0.0.0:8081"));
    // The scrape target is the scrape listener.
    let prom = yaml(&repo().join("deploy/compose/prometheus.yml"));
    let job = prom["scrape_configs"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|j| j["job_name"] == "vpnbot")
        .expect("job vpnbot (the alerts select job=\"vpnbot\")");
    assert_eq!(job["static_configs"][0]["targets"][0], "vpnbot:9187");
}

#[test]
fn compose_prometheus_config_passes_promtool_with_the_mounted_rules() {
    let Some(promtool) = tool("promtool") else {
        return;
    };
    let c = compose();
    let dir = tempfile::tempdir().unwrap();
    materialize(&c["services"]["prometheus"], dir.path());
    let cfg = dir.path().join("etc/prometheus/prometheus.yml");
    let (ok, out) = run(&promtool, &["check", "config", cfg.to_str().unwrap()]);
    assert!(ok, "promtool check config:\n{out}");
    assert!(out.contains("1 rule files found"), "{out}");
}

#[test]
fn compose_alertmanager_config_passes_amtool() {
    let Some(amtool) = tool("amtool") else {
        return;
    };
    let c = compose();
    let dir = tempfile::tempdir().unwrap();
    materialize(&c["services"]["alertmanager"], dir.path());
    let cfg = dir.path().join("etc/alertmanager/alertmanager.yml");
    let (ok, out) = run(&amtool, &["check-config", cfg.to_str().unwrap()]);
    assert!(ok, "amtool check-config:\n{out}");
    // Prometheus sends to this Alertmanager.
    let prom = yaml(&repo().join("deploy/compose/prometheus.yml"));
    assert_eq!(
        prom["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"][0],
        "alertmanager:9093"
    );
}

#[test]
fn compose_grafana_provisioning_names_the_mounted_dashboards_and_prometheus() {
    let c = compose();
    let g = &c["services"]["grafana"];
    let dir = tempfile::tempdir().unwrap();
    materialize(g, dir.path());
    let prov = dir.path().join("etc/grafana/provisioning/dashboards");
    let mut dashboards = 0;
    for f in std::fs::read_dir(&prov).unwrap() {
        let doc = yaml(&f.unwrap().path());
        for p in doc["providers"].as_sequence().expect("providers") {
            let path = p["options"]["path"].as_str().expect("options.path");
            let d = dir.path().join(path.trim_start_matches('/'));
            assert!(
                d.is_dir(),
                "provisioned dashboard path {path} is not mounted"
            );
            for e in std::fs::read_dir(&d).unwrap() {
                let e = e.unwrap().path();
                if e.extension().is_some_and(|x| x == "json") {
                    let v: serde_json::Value =
                        serde_json::from_str(&std::fs::read_to_string(&e).unwrap()).unwrap();
                    assert!(v["panels"].is_array(), "{}", e.display());
                    dashboards += 1;
                }
            }
        }
    }
    assert!(dashboards >= 6, "{dashboards} dashboards provisioned");
    let ds = dir.path().join("etc/grafana/provisioning/datasources");
    let mut urls = Vec::new();
    for f in std::fs::read_dir(&ds).unwrap() {
        let doc = yaml(&f.unwrap().path());
        for d in doc["datasources"].as_sequence().expect("datasources") {
            assert_eq!(d["type"], "prometheus");
            urls.push(d["url"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(urls, ["http://prometheus:9090"]);
    // Same uid as the repository's datasource file.
    let repo_ds = yaml(&repo().join("dashboards/provisioning/datasources.yml"));
    let compose_ds = yaml(&repo().join("deploy/compose/grafana-datasources.yml"));
    assert_eq!(
        repo_ds["datasources"][0]["uid"],
        compose_ds["datasources"][0]["uid"]
    );
}

#[test]
fn dockerfile_copies_existing_sources_runs_non_root_and_has_a_healthcheck() {
    let path = repo().join("deploy/docker/Dockerfile");
    let text = std::fs::read_to_string(&path).unwrap();
    // Join continuation lines.
    let joined = text.replace("\\\n", " ");
    let instrs: Vec<&str> = joined
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let froms: Vec<&&str> = instrs.iter().filter(|l| l.starts_with("FROM ")).collect();
    assert!(froms.len() >= 2, "multi-stage: {froms:?}");
    let mut copies = 0;
    for l in instrs.iter().filter(|l| l.starts_with("COPY ")) {
        let args: Vec<&str> = l.split_whitespace().skip(1).collect();
        if args.iter().any(|a| a.starts_with("--from=")) {
            continue;
        }
        let (srcs, _dst) = args.split_at(args.len() - 1);
        for s in srcs {
            assert!(
                repo().join(s).exists(),
                "COPY source {s} does not exist in the build context"
            );
            copies += 1;
        }
    }
    assert!(copies >= 5, "{copies}");
    let final_stage = &instrs[instrs.iter().rposition(|l| l.starts_with("FROM ")).unwrap()..];
    let user = final_stage
        .iter()
        .rfind(|l| l.starts_with("USER "))
        .expect("USER in the final stage");
    assert!(!user.contains(" root") && !user.ends_with(" 0"), "{user}");
    let hc = final_stage
        .iter()
        .find(|l| l.starts_with("HEALTHCHECK "))
        .expect("HEALTHCHECK");
    assert!(hc.contains("/healthz"), "{hc}");
    assert!(
        final_stage.iter().any(|l| l.contains("libdw1")),
        "runtime stage installs libdw1"
    );
    assert!(
        !instrs.iter().any(|l| l.contains("RUSTFLAGS")),
        "RUSTFLAGS would replace --cfg tokio_unstable from .cargo/config.toml"
    );
    assert!(instrs.iter().any(|l| l.starts_with("COPY .cargo")));
    let ignore =
        std::fs::read_to_string(repo().join("deploy/docker/Dockerfile.dockerignore")).unwrap();
    assert!(ignore.lines().any(|l| l.trim() == "target"));
    // The image's environment splits the listeners like compose and Kubernetes.
    assert!(joined.contains("VPNBOT_OBSERVABILITY__DEBUG_LISTEN=127.0.0.1:9188"));
}

fn k8s_docs() -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(repo().join("deploy/k8s")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "yaml") {
            for d in yaml_docs(&p) {
                out.push((p.file_name().unwrap().to_string_lossy().into_owned(), d));
            }
        }
    }
    out
}

fn kind<'a>(docs: &'a [(String, Value)], kind: &str) -> &'a Value {
    &docs
        .iter()
        .find(|(_, d)| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in deploy/k8s"))
        .1
}

#[test]
fn k8s_deployment_probes_grace_and_scrape_settings_match_the_service() {
    let docs = k8s_docs();
    for (f, d) in &docs {
        assert!(d["apiVersion"].is_string() && d["kind"].is_string(), "{f}");
        assert!(
            d["kind"] == "Kustomization" || d["metadata"]["name"].is_string(),
            "{f}"
        );
    }
    // kustomization lists existing files.
    let k = yaml(&repo().join("deploy/k8s/kustomization.yaml"));
    for r in k["resources"].as_sequence().unwrap() {
        assert!(
            repo()
                .join("deploy/k8s")
                .join(r.as_str().unwrap())
                .is_file(),
            "{r:?}"
        );
    }
    let dep = kind(&docs, "Deployment");
    let pod = &dep["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let env: BTreeMap<String, String> = c["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap().to_string(),
                e["value"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    let listen = &env["VPNBOT_OBSERVABILITY__LISTEN"];
    let port: u64 = listen.rsplit(':').next().unwrap().parse().unwrap();
    assert!(env["VPNBOT_OBSERVABILITY__DEBUG_LISTEN"].starts_with("127.0.0.1:"));
    let ports = c["ports"].as_sequence().unwrap();
    assert_eq!(ports.len(), 1, "only the scrape port is exposed");
    assert_eq!(ports[0]["containerPort"].as_u64(), Some(port));
    let port_name = ports[0]["name"].as_str().unwrap();
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    for p in ["livenessProbe", "readinessProbe", "startupProbe"] {
        assert_eq!(c[p]["httpGet"]["port"], port_name, "{p}");
    }
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);

    // The config map's vpnbot.toml passes check-config; the grace period covers its drain
    // plus the 5 s pool close.
    let cm = kind(&docs, "ConfigMap");
    let toml_text = cm["data"]["vpnbot.toml"].as_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg_path = dir.path().join("vpnbot.toml");
    std::fs::write(&cfg_path, toml_text).unwrap();
    let mut env_all = env.clone();
    env_all.remove("VPNBOT_CONFIG");
    let secret = kind(&docs, "Secret");
    for (k, v) in env_map(&secret["stringData"]) {
        env_all.insert(k, v);
    }
    let (ok, out) = check_config(&cfg_path, &env_all);
    assert!(ok, "{out}");
    let drain: f64 = toml_text
        .parse::<toml::Table>()
        .unwrap()
        .get("runtime")
        .and_then(|r| r.get("shutdown_drain_seconds"))
        .and_then(|v| v.as_float())
        .unwrap_or(10.0);
    let grace = pod["terminationGracePeriodSeconds"].as_f64().unwrap();
    assert!(grace >= drain + 5.0, "grace {grace} < drain {drain} + 5");
    assert!(
        grace <= drain + 30.0,
        "grace {grace} far beyond the drain {drain}"
    );

    // Scrape: annotations on the pod and Service name the port; the ServiceMonitor picks the
    // Service's port by name.
    let ann = &dep["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(ann["prometheus.io/scrape"], "true");
    assert_eq!(ann["prometheus.io/port"], port.to_string().as_str());
    let svc = kind(&docs, "Service");
    let sp = &svc["spec"]["ports"][0];
    assert_eq!(sp["targetPort"], port_name);
    let sm = kind(&docs, "ServiceMonitor");
    assert_eq!(sm["spec"]["endpoints"][0]["port"], sp["name"]);
    assert_eq!(sm["spec"]["endpoints"][0]["path"], "/metrics");
    assert_eq!(
        sm["spec"]["selector"]["matchLabels"],
        svc["metadata"]["labels"]
    );
}

#[test]
fn k8s_prometheusrule_equals_the_rules_file_and_passes_promtool() {
    let docs = k8s_docs();
    let rule = kind(&docs, "PrometheusRule");
    let source = yaml(&repo().join("alerts/vpnbot.rules.yml"));
    assert!(
        rule["spec"] == source,
        "deploy/k8s/prometheusrule.yaml is out of sync with alerts/vpnbot.rules.yml: run \
         deploy/k8s/generate-prometheusrule.sh"
    );
    let Some(promtool) = tool("promtool") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("embedded.rules.yml");
    std::fs::write(&f, serde_yaml::to_string(&rule["spec"]).unwrap()).unwrap();
    let (ok, out) = run(&promtool, &["check", "rules", f.to_str().unwrap()]);
    assert!(ok, "promtool check rules on the PrometheusRule:\n{out}");
}

#[test]
fn systemd_unit_passes_systemd_analyze_verify_and_fits_the_watchdog_and_drain() {
    let unit_path = repo().join("deploy/systemd/vpnbot.service");
    let text = std::fs::read_to_string(&unit_path).unwrap();
    let keys: BTreeMap<&str, &str> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .collect();
    assert_eq!(keys["Type"], "notify");
    assert_eq!(keys["Restart"], "on-failure");
    assert_eq!(keys["NoNewPrivileges"], "yes");
    assert_eq!(keys["ProtectSystem"], "strict");
    assert!(
        keys["SystemCallFilter"].contains("ptrace"),
        "native stacks need ptrace"
    );
    let secs = |k: &str| keys[k].trim_end_matches('s').parse::<f64>().unwrap();
    let d = vpnbot::diagnostics::DiagnosticsSettings::default();
    let needed = d.min_service_watchdog().as_secs_f64();
    assert!(secs("WatchdogSec") >= needed, "WatchdogSec < {needed}");
    let drain = vpnbot::config::defaults::SHUTDOWN_DRAIN_SECONDS.as_secs_f64();
    assert!(secs("TimeoutStopSec") >= drain + 5.0);

    let Some(analyze) = tool_any(&["systemd-analyze"]) else {
        return;
    };
    // Verify a copy whose ExecStart is the binary built here (verify checks it exists) and
    // whose EnvironmentFile may be absent.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("vpnbot.service");
    std::fs::write(
        &copy,
        text.replace("/usr/local/bin/vpnbot", env!("CARGO_BIN_EXE_vpnbot"))
            .replace("EnvironmentFile=/", "EnvironmentFile=-/"),
    )
    .unwrap();
    let (ok, out) = run(&analyze, &["verify", "--man=no", copy.to_str().unwrap()]);
    // verify exits 0 on unknown or malformed settings and only prints them: fail on output.
    assert!(
        ok && out.trim().is_empty(),
        "systemd-analyze verify:\n{out}"
    );
}
