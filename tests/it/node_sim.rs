//! The simulator's operator surface: `run_until` (behind `vpnbot-sim node`) with CLI-style
//! arguments, and the admin endpoint that flips faults at run time.

use clap::Parser;
use secrecy::SecretString;
use vpnbot::node::{InflightCalls, NodeApiMetrics, NodeClient, NodeClientSettings, NodeError};
use vpnbot_sim::node::SimNodeArgs;

#[derive(Debug, Parser)]
struct Cli {
    #[command(flatten)]
    args: SimNodeArgs,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_until_serves_seeded_users_and_admin_endpoint_flips_faults() {
    let cli = Cli::try_parse_from([
        "sim-node",
        "--users",
        "50",
        "--owned-share",
        "0.5",
        "--api-key",
        "k1",
        "--fault",
        "health=status:503",
    ])
    .unwrap();
    let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(vpnbot_sim::node::run_until(
        cli.args,
        move |addr| {
            let _ = addr_tx.send(addr);
        },
        async move {
            let _ = stop_rx.await;
        },
    ));
    let addr = addr_rx.await.unwrap();
    let settings = NodeClientSettings {
        retry_max_attempts: 1,
        ..Default::default()
    };
    let client = NodeClient::new(
        "sim",
        format!("http://{addr}/").parse().unwrap(),
        SecretString::from("k1"),
        &settings,
        NodeApiMetrics::register(&prometheus::Registry::new()),
        InflightCalls::new(),
    )
    .unwrap();
    assert!(matches!(
        client.health().await,
        Err(NodeError::Status { status: 503 })
    ));
    let users = client.list_users().await.unwrap();
    assert_eq!(users.len(), 50);
    assert!(users.iter().any(|u| u.is_owned()) && users.iter().any(|u| !u.is_owned()));

    let http = reqwest::Client::new();
    let admin = format!("http://{addr}/_sim/faults");
    let r = http
        .put(format!("{admin}/health"))
        .body("none")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    client.health().await.expect("fault cleared at run time");
    let r = http
        .put(format!("{admin}/list-users"))
        .body("explode")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let faults: serde_json::Value = http.get(&admin).send().await.unwrap().json().await.unwrap();
    assert_eq!(faults["health"], "none");
    assert_eq!(faults["list_users"], "none");

    stop_tx.send(()).unwrap();
    server.await.unwrap().unwrap();
}

#[test]
fn cli_rejects_unknown_fault_modes() {
    assert!(Cli::try_parse_from(["sim-node", "--fault", "health=explode"]).is_err());
    assert!(Cli::try_parse_from(["sim-node", "--fault", "nosuchop=reset"]).is_err());
}
