//! The pager path end to end with real Prometheus and Alertmanager (Debian packages): vpnbot's
//! observability server (the real one, real registry) is scraped every second with the real
//! rule files (`for:` shortened to test size), Alertmanager routes with the real
//! alerts/alertmanager.yml (group timings shortened; webhook and Telegram API pointed at local
//! receivers). The old freeze (a node call silent in its body phase past its deadline), then a
//! blocked worker, then a database lock (db_lock_wait, service_starved) must page within a bound, carry their culprit and runbook link, reach
//! Telegram, and resolve after recovery.
//!
//! The metrics are set the way the watchdog sets them (vpnbot_watchdog_episode_info with the
//! culprit labels, vpnbot_runtime_stalled); the owner's end-to-end test with the node simulator
//! and the real watchdog can reuse `Stack` below.
//!
//! Skipped with a message when prometheus/alertmanager are missing outside CI; fails in CI.

use crate::helpers;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use helpers::ops::{repo, tool, tool_any};
use serde_json::Value as Json;
use serde_yaml::Value as Yaml;

/// Bound on each page and each resolution. Scrape 1 s + `for` 2 s + evaluation 1 s +
/// group_wait 1 s is ~5 s; 45 s leaves room for a loaded machine and stays under the 60 s
/// target of the issue.
const PAGE_BOUND: Duration = Duration::from_secs(45);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Records every request body a local HTTP receiver gets (webhook, Telegram Bot API stub).
#[derive(Clone, Default)]
struct Inbox(Arc<Mutex<Vec<(String, Json)>>>);

impl Inbox {
    fn all(&self) -> Vec<(String, Json)> {
        self.0.lock().unwrap().clone()
    }
}

async fn start_receivers() -> (SocketAddr, Inbox, Inbox) {
    let webhook = Inbox::default();
    let telegram = Inbox::default();
    let (w, t) = (webhook.clone(), telegram.clone());
    let app = axum::Router::new()
        .route(
            "/alerts",
            axum::routing::post(move |body: axum::body::Bytes| {
                let w = w.clone();
                async move {
                    let v: Json = serde_json::from_slice(&body).unwrap_or(Json::Null);
                    w.0.lock().unwrap().push(("/alerts".into(), v));
                    "ok"
                }
            }),
        )
        .route(
            "/{*path}",
            axum::routing::post(
                move |axum::extract::Path(path): axum::extract::Path<String>,
                      body: axum::body::Bytes| {
                    let t = t.clone();
                    async move {
                        let v: Json = serde_json::from_slice(&body).unwrap_or_else(|_| {
                            Json::String(String::from_utf8_lossy(&body).into_owned())
                        });
                        // Never keep the token: keep only the method name.
                        let method = path.rsplit('/').next().unwrap_or("").to_string();
                        t.0.lock().unwrap().push((method, v));
                        axum::Json(serde_json::json!({
                            "ok": true,
                            "result": {"message_id": 1, "date": 0,
                                       "chat": {"id": -1001234567890_i64, "type": "supergroup"},
                                       "text": "ok"}
                        }))
                    }
                },
            ),
        );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(l, app).await;
    });
    (addr, webhook, telegram)
}

/// A started process, killed (and reaped) on drop; its output goes to a log file.
struct Proc {
    name: &'static str,
    child: tokio::process::Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &'static str, bin: &Path, args: &[String], dir: &Path) -> Proc {
        let log = dir.join(format!("{name}.log"));
        let f = std::fs::File::create(&log).unwrap();
        let child = tokio::process::Command::new(bin)
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        Proc { name, child, log }
    }

    fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "--- {} (last lines) ---\n{}",
            self.name,
            lines[lines.len().saturating_sub(15)..].join("\n")
        )
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        // Reap it so no zombie outlives the test.
        let _ = self.child.try_wait();
    }
}

/// Sets every `key` in the YAML tree to `value`.
fn set_all(v: &mut Yaml, key: &str, value: &str) {
    match v {
        Yaml::Mapping(m) => {
            for (k, child) in m.iter_mut() {
                if k.as_str() == Some(key) {
                    *child = Yaml::String(value.to_string());
                } else {
                    set_all(child, key, value);
                }
            }
        }
        Yaml::Sequence(s) => s.iter_mut().for_each(|c| set_all(c, key, value)),
        _ => {}
    }
}

/// Real Prometheus and Alertmanager on loopback with test-sized timings.
struct Stack {
    prometheus: Proc,
    alertmanager: Proc,
    _dir: tempfile::TempDir,
}

impl Stack {
    async fn start(
        prometheus: &Path,
        alertmanager: &Path,
        target: SocketAddr,
        receivers: SocketAddr,
    ) -> Stack {
        let dir = tempfile::tempdir().unwrap();
        let (prom_port, am_port) = (free_port(), free_port());

        // Rules: the real file, `for:` shortened.
        let mut rules: Yaml = serde_yaml::from_str(
            &std::fs::read_to_string(repo().join("alerts/vpnbot.rules.yml")).unwrap(),
        )
        .unwrap();
        set_all(&mut rules, "for", "2s");
        // Test-sized windows: `increase(...[10m])` would keep a fired alert for 10 minutes.
        let mut text = serde_yaml::to_string(&rules).unwrap();
        for w in ["[10m]", "[15m]", "[5m]", "[1m]"] {
            text = text.replace(w, "[15s]");
        }
        let rules: Yaml = serde_yaml::from_str(&text).unwrap();
        std::fs::write(
            dir.path().join("rules.yml"),
            serde_yaml::to_string(&rules).unwrap(),
        )
        .unwrap();

        // Alertmanager: the real routing, group timings shortened, receivers local.
        let mut am: Yaml = serde_yaml::from_str(
            &std::fs::read_to_string(repo().join("alerts/alertmanager.yml")).unwrap(),
        )
        .unwrap();
        set_all(&mut am, "group_wait", "1s");
        set_all(&mut am, "group_interval", "1s");
        set_all(&mut am, "url", &format!("http://{receivers}/alerts"));
        set_all(&mut am, "api_url", &format!("http://{receivers}"));
        std::fs::write(
            dir.path().join("alertmanager.yml"),
            serde_yaml::to_string(&am).unwrap(),
        )
        .unwrap();

        let prom_cfg = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files: [rules.yml]\n\
             alerting:\n  alertmanagers:\n    - static_configs:\n        - targets: ['127.0.0.1:{am_port}']\n\
             scrape_configs:\n  - job_name: vpnbot\n    static_configs:\n      - targets: ['{target}']\n"
        );
        std::fs::write(dir.path().join("prometheus.yml"), prom_cfg).unwrap();

        let d = dir.path();
        let alertmanager = Proc::spawn(
            "alertmanager",
            alertmanager,
            &[
                format!("--config.file={}", d.join("alertmanager.yml").display()),
                format!("--storage.path={}", d.join("am").display()),
                format!("--web.listen-address=127.0.0.1:{am_port}"),
                "--cluster.listen-address=".into(),
            ],
            d,
        );
        let prometheus = Proc::spawn(
            "prometheus",
            prometheus,
            &[
                format!("--config.file={}", d.join("prometheus.yml").display()),
                format!("--storage.tsdb.path={}", d.join("tsdb").display()),
                format!("--web.listen-address=127.0.0.1:{prom_port}"),
                "--rules.alert.resend-delay=1s".into(),
            ],
            d,
        );
        let stack = Stack {
            prometheus,
            alertmanager,
            _dir: dir,
        };
        let http = reqwest::Client::new();
        for (name, url) in [
            (
                "alertmanager",
                format!("http://127.0.0.1:{am_port}/-/ready"),
            ),
            (
                "prometheus",
                format!("http://127.0.0.1:{prom_port}/-/ready"),
            ),
        ] {
            let ready = wait_for(Duration::from_secs(20), || {
                let http = http.clone();
                let url = url.clone();
                async move {
                    http.get(&url)
                        .timeout(Duration::from_secs(1))
                        .send()
                        .await
                        .is_ok_and(|r| r.status().is_success())
                }
            })
            .await;
            assert!(ready, "{name} not ready\n{}", stack.logs());
        }
        stack
    }

    fn logs(&self) -> String {
        format!("{}\n{}", self.prometheus.tail(), self.alertmanager.tail())
    }
}

async fn wait_for<F, Fut>(bound: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < bound {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

/// The first webhook alert with this name and status, if any.
fn webhook_alert(inbox: &Inbox, alertname: &str, status: &str) -> Option<Json> {
    inbox
        .all()
        .into_iter()
        .flat_map(|(_, v)| v["alerts"].as_array().cloned().unwrap_or_default())
        .find(|a| a["labels"]["alertname"] == alertname && a["status"] == status)
}

async fn expect_page(
    stack: &Stack,
    webhook: &Inbox,
    alertname: &str,
    status: &str,
    since: Instant,
) -> (Json, Duration) {
    let ok = wait_for(PAGE_BOUND, || async {
        webhook_alert(webhook, alertname, status).is_some()
    })
    .await;
    assert!(
        ok,
        "{alertname} {status} did not reach the webhook within {PAGE_BOUND:?}; got {:?}\n{}",
        webhook
            .all()
            .iter()
            .flat_map(|(_, v)| v["alerts"].as_array().cloned().unwrap_or_default())
            .map(|a| format!("{} {}", a["labels"]["alertname"], a["status"]))
            .collect::<Vec<_>>(),
        stack.logs()
    );
    (
        webhook_alert(webhook, alertname, status).unwrap(),
        since.elapsed(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freeze_and_blocked_worker_page_with_culprit_and_runbook_then_resolve() {
    let (Some(prometheus), Some(alertmanager)) = (
        tool("prometheus"),
        tool_any(&["prometheus-alertmanager", "alertmanager"]),
    ) else {
        return;
    };
    tokio::time::timeout(
        Duration::from_secs(240),
        scenario(&prometheus, &alertmanager),
    )
    .await
    .expect("pager scenario exceeded 240 s");
}

async fn scenario(prometheus: &Path, alertmanager: &Path) {
    // vpnbot's real observability server and registry, with the watchdog's families.
    let registry = vpnbot::metrics::new_registry();
    let stalled = vpnbot::metrics::int_gauge(
        &registry,
        "vpnbot_runtime_stalled",
        "1 while the main runtime is stalled or a worker is blocked.",
    );
    let episode = vpnbot::metrics::int_gauge_vec(
        &registry,
        "vpnbot_watchdog_episode_info",
        "1 while a stall episode is open; labels name the culprit.",
        &["kind", "task", "node", "operation", "phase", "label"],
    );
    let leader = vpnbot::metrics::int_gauge(&registry, "vpnbot_leader", "1 while leading.");
    leader.set(1);
    let obs = vpnbot::obs::server::ObsServer::start(
        "127.0.0.1:0".parse().unwrap(),
        vpnbot::obs::server::ObsState {
            registry: registry.clone(),
            health: Arc::new(vpnbot::obs::health::HealthState::default()),
        },
    )
    .expect("observability server");

    let (receivers, webhook, telegram) = start_receivers().await;
    let stack = Stack::start(prometheus, alertmanager, obs.addr(), receivers).await;

    // Healthy for a few scrapes: nothing pages.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        webhook.all().is_empty(),
        "pages while healthy: {:?}",
        webhook.all()
    );

    // 1. The old freeze: list-users headers then silence, past the call's deadline.
    let freeze = [
        "operation_overdue",
        "reconcile",
        "a",
        "list_users",
        "body",
        "",
    ];
    let t = Instant::now();
    episode.with_label_values(&freeze).set(1);
    let (page, took) = expect_page(&stack, &webhook, "VpnbotNodeCallStuck", "firing", t).await;
    eprintln!("freeze paged in {took:?}");
    assert_eq!(page["labels"]["severity"], "critical");
    assert_eq!(page["labels"]["node"], "a");
    assert_eq!(page["labels"]["operation"], "list_users");
    assert_eq!(page["labels"]["phase"], "body");
    assert_eq!(page["labels"]["task"], "reconcile");
    assert_eq!(
        page["annotations"]["runbook_url"],
        "docs/runbooks.md#vpnbotnodecallstuck"
    );
    assert!(page["annotations"]["summary"]
        .as_str()
        .unwrap()
        .contains("node a list_users stuck in phase body"));

    // 2. A blocked worker.
    let blocked = ["blocked_worker", "reconcile", "", "", "", ""];
    let t = Instant::now();
    episode.with_label_values(&blocked).set(1);
    stalled.set(1);
    let (page, took) = expect_page(&stack, &webhook, "VpnbotWorkerBlocked", "firing", t).await;
    eprintln!("blocked worker paged in {took:?}");
    assert_eq!(page["labels"]["task"], "reconcile");
    assert_eq!(page["labels"]["kind"], "blocked_worker");
    assert_eq!(
        page["annotations"]["runbook_url"],
        "docs/runbooks.md#vpnbotworkerblocked"
    );
    assert!(
        webhook_alert(&webhook, "VpnbotRuntimeStalled", "firing").is_none(),
        "a blocked worker is not a whole-runtime stall"
    );

    // Critical pages also went through Alertmanager's Telegram receiver, with the runbook.
    let sent = wait_for(Duration::from_secs(20), || async {
        telegram.all().iter().any(|(m, v)| {
            m == "sendMessage"
                && v.to_string().contains("VpnbotWorkerBlocked")
                && v.to_string()
                    .contains("docs/runbooks.md#vpnbotworkerblocked")
        })
    })
    .await;
    assert!(
        sent,
        "no Telegram sendMessage for the page: {:?}\n{}",
        telegram.all(),
        stack.logs()
    );

    // 3. Recovery: both episodes end; both alerts resolve.
    let t = Instant::now();
    stalled.set(0);
    episode.remove_label_values(&blocked).unwrap();
    episode.remove_label_values(&freeze).unwrap();
    let (_, took) = expect_page(&stack, &webhook, "VpnbotWorkerBlocked", "resolved", t).await;
    eprintln!("blocked worker resolved in {took:?}");
    let (_, took) = expect_page(&stack, &webhook, "VpnbotNodeCallStuck", "resolved", t).await;
    eprintln!("freeze resolved in {took:?}");

    // 4. A lock held on subscriptions by another session (issue 15): the database monitor's
    //    db_lock_wait and the service-level service_starved episodes page, then resolve.
    let lock = [
        "db_lock_wait",
        "",
        "",
        "Lock",
        "subscriptions",
        "bot_subscription",
    ];
    let starved = [
        "service_starved",
        "bot_handler",
        "",
        "Lock",
        "subscriptions",
        "bot_subscription",
    ];
    let t = Instant::now();
    episode.with_label_values(&lock).set(1);
    episode.with_label_values(&starved).set(1);
    let (page, took) = expect_page(&stack, &webhook, "VpnbotDbLockWait", "firing", t).await;
    eprintln!("lock wait paged in {took:?}");
    assert_eq!(page["labels"]["phase"], "subscriptions");
    assert_eq!(
        page["annotations"]["runbook_url"],
        "docs/runbooks.md#vpnbotdblockwait"
    );
    let (page, took) = expect_page(&stack, &webhook, "VpnbotServiceStarved", "firing", t).await;
    eprintln!("service starved paged in {took:?}");
    assert!(page["annotations"]["summary"]
        .as_str()
        .unwrap()
        .contains("handlers wait on Lock subscriptions"));
    let t = Instant::now();
    episode.remove_label_values(&lock).unwrap();
    episode.remove_label_values(&starved).unwrap();
    expect_page(&stack, &webhook, "VpnbotDbLockWait", "resolved", t).await;
    expect_page(&stack, &webhook, "VpnbotServiceStarved", "resolved", t).await;

    drop(stack);
    tokio::task::spawn_blocking(move || obs.stop())
        .await
        .unwrap();
}

/// The pager path with nothing simulated on vpnbot's side: the real App on a runtime with the
/// diagnostics' poll hooks, the real watchdog, the real node client against the node simulator
/// (old freeze: `list-users` headers then silence), a real blocked worker; Prometheus scrapes the
/// real observability server with the real rules, Alertmanager routes with the real config.
#[test]
fn real_freeze_and_blocked_worker_page_with_runbook_then_resolve() {
    let (Some(prometheus), Some(alertmanager)) = (
        tool("prometheus"),
        tool_any(&["prometheus-alertmanager", "alertmanager"]),
    ) else {
        return;
    };
    let Ok(_) = std::env::var("DATABASE_URL") else {
        helpers::missing("DATABASE_URL is not set (scripts/test.sh starts PostgreSQL and sets it)");
        return;
    };
    let mut cfg = vpnbot::config::Config::default();
    cfg.observability.listen = "127.0.0.1:0".parse().unwrap();
    cfg.diagnostics.stall_threshold_seconds = Duration::from_millis(300);
    cfg.diagnostics.dump_dir =
        std::env::temp_dir().join(format!("vpnbot-pager-{}", std::process::id()));
    cfg.reconcile.enabled = false;
    cfg.node_client.connect_timeout_seconds = Duration::from_millis(500);
    cfg.node_client.headers_timeout_seconds = Duration::from_secs(1);
    cfg.node_client.body_idle_timeout_seconds = Duration::from_secs(1);
    cfg.node_client.total_deadline_seconds = Duration::from_secs(2);
    let instruments = vpnbot::app::Instruments::bare(&cfg);
    let rt = vpnbot::runtime::build_main_runtime(Some(2), &instruments.diagnostics).unwrap();
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(240), async {
            let url = helpers::fresh_database("pager").await;
            cfg.db.url = secrecy::SecretString::from(url);
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let sim = vpnbot_sim::node::SimNode::start(l, Default::default());
            cfg.nodes.insert(
                "a".into(),
                vpnbot::config::NodeConfig::new(&sim.base_url(), sim.api_key(), "a.example"),
            );
            let app = vpnbot::app::App::start_with(cfg, &instruments)
                .await
                .unwrap();
            let (receivers, webhook, _telegram) = start_receivers().await;
            let stack = Stack::start(&prometheus, &alertmanager, app.obs_addr(), receivers).await;
            tokio::time::sleep(Duration::from_secs(4)).await;
            assert!(
                webhook.all().is_empty(),
                "pages while healthy: {:?}",
                webhook.all()
            );

            // 1. The old freeze, for real: the reconcile's list-users gets headers, then silence.
            sim.set_fault(
                vpnbot::node::Operation::ListUsers,
                vpnbot_sim::node::Fault::HeadersThenSilence,
            );
            let t = Instant::now();
            let rep = app
                .reconciler
                .reconcile_once(&vpnbot::reconcile::RunOptions::default())
                .await
                .unwrap();
            assert!(matches!(
                rep.node("a").unwrap().outcome,
                vpnbot::reconcile::Outcome::Failed
            ));
            let (page, took) =
                expect_page(&stack, &webhook, "VpnbotNodeDeadlineExceeded", "firing", t).await;
            eprintln!("real freeze paged in {took:?}");
            assert_eq!(page["labels"]["node"], "a");
            assert_eq!(page["labels"]["operation"], "list_users");
            assert_eq!(
                page["annotations"]["runbook_url"],
                "docs/runbooks.md#vpnbotnodedeadlineexceeded"
            );
            sim.set_fault(
                vpnbot::node::Operation::ListUsers,
                vpnbot_sim::node::Fault::None,
            );

            // 2. A real blocked worker: sync sleep inside a named task for 8 s.
            let t = Instant::now();
            app.tasks.spawn_named("reconcile", async {
                std::thread::sleep(Duration::from_secs(8));
            });
            let (page, took) =
                expect_page(&stack, &webhook, "VpnbotWorkerBlocked", "firing", t).await;
            eprintln!("real blocked worker paged in {took:?}");
            assert_eq!(page["labels"]["kind"], "blocked_worker");
            assert_eq!(page["labels"]["task"], "reconcile");
            assert_eq!(
                page["annotations"]["runbook_url"],
                "docs/runbooks.md#vpnbotworkerblocked"
            );

            // 3. Recovery: the worker is released and the node answers; both alerts resolve.
            let t = Instant::now();
            let (_, took) =
                expect_page(&stack, &webhook, "VpnbotWorkerBlocked", "resolved", t).await;
            eprintln!("real blocked worker resolved in {took:?}");
            let (_, took) = expect_page(
                &stack,
                &webhook,
                "VpnbotNodeDeadlineExceeded",
                "resolved",
                t,
            )
            .await;
            eprintln!("real freeze resolved in {took:?}");
            drop(stack);
            app.shutdown().await;
            drop(sim);
        })
        .await
        .expect("real pager scenario exceeded 240 s");
    });
}
