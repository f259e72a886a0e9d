//! End to end with real traffic: vpnbot (real PostgreSQL, the Bot API stand-in, the bot's
//! receive loop, the expiry worker and the outbox) drives `vpnbot-node`, which drives a real
//! V2Ray 4.34 core; a second `v2ray` runs as a client with the issued `vless://` key and fetches
//! a page from a local HTTP server through it. Expiry removes the user (a new connection is
//! refused); a core restart is repaired by the agent alone. FAILS when `v2ray` is missing
//! unless `ALLOW_SKIP_TESTS=1`.

mod bot_common;
mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bot_common::env_with;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use vpnbot::sim::botapi::SimUser;
use vpnbot_node::testkit::{self, V2ray, ORIGIN_BODY};

const T: Duration = Duration::from_secs(5);
const AGENT_KEY: &str = "e2e-agent-key-0123456789abcdef01234";

#[sqlx::test(migrations = false)]
async fn trial_key_carries_real_traffic_until_expiry_and_survives_a_core_restart(
    _p: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let Some(bin) = testkit::v2ray_binary() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (vless, api) = (testkit::free_port(), testkit::free_port());
    let server_cfg = testkit::server_config(vless, api);
    let mut core = V2ray::start(&bin, dir.path(), "server", &server_cfg, api);
    assert!(testkit::wait_listening(vless, T));
    let (origin, _o) = testkit::origin().await;

    let agent_cfg = vpnbot_node::Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        api_key: AGENT_KEY.into(),
        core: vpnbot_node::CoreKind::V2ray,
        core_api: format!("127.0.0.1:{api}"),
        inbound_tag: "vless-in".into(),
        state: dir.path().join("ledger.redb"),
        tls: None,
        core_timeout: Duration::from_millis(500),
        probe_interval: Duration::from_millis(100),
        user_level: 0,
    };
    let agent = vpnbot_node::start(
        &agent_cfg,
        std::net::TcpListener::bind("127.0.0.1:0").unwrap(),
    )
    .await
    .unwrap();
    let agent_url = format!("http://{}/", agent.addr);
    wait_ready(&agent_url).await;

    // vpnbot with node "a" pointing at the agent, clients told to connect to the core.
    let e = env_with(&opts, |cfg| {
        let a = cfg.nodes.get_mut("a").unwrap();
        a.url = agent_url.clone();
        a.api_key = secrecy::SecretString::from(AGENT_KEY.to_string());
        a.public_host = "127.0.0.1".into();
        a.public_port = vless;
    })
    .await;

    // A user takes the trial through the Bot API stand-in and receives a vless:// key.
    let u = SimUser::new(4401, "en");
    let photo = e.say(&u, "/trial", |m| m.method == "sendPhoto").await;
    let link = photo
        .text
        .split_whitespace()
        .find(|w| w.starts_with("vless://"))
        .unwrap_or_else(|| panic!("no vless:// link in {:?}", photo.text))
        .to_owned();
    let url = url::Url::parse(&link).unwrap();
    let id: uuid::Uuid = url.username().parse().unwrap();
    let server: SocketAddr = format!("{}:{}", url.host_str().unwrap(), url.port().unwrap())
        .parse()
        .unwrap();
    assert_eq!(server.port(), vless);

    // A second v2ray as the user's client, with exactly the issued key.
    let socks = testkit::free_port();
    let _client = V2ray::start(
        &bin,
        dir.path(),
        "client",
        &testkit::client_config(socks, server, &id.to_string()),
        socks,
    );
    assert_eq!(
        testkit::socks_get(socks, origin, T).await.unwrap(),
        ORIGIN_BODY,
        "the issued key carries traffic"
    );

    // Core restart: the core forgets every run-time user; the agent re-applies its ledger,
    // vpnbot does nothing.
    let before = e.scalar_i64("SELECT count(*) FROM pending_node_ops").await;
    core.kill();
    drop(core);
    let core = V2ray::start(&bin, dir.path(), "server", &server_cfg, api);
    let until = Instant::now() + T;
    while agent.agent.metrics().resyncs.get() < 2 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        agent.agent.metrics().resyncs.get() >= 2,
        "the agent noticed the restart (start + core restart)"
    );
    assert_eq!(
        testkit::socks_get(socks, origin, T).await.unwrap(),
        ORIGIN_BODY,
        "the agent restored the key"
    );
    assert_eq!(
        e.scalar_i64("SELECT count(*) FROM pending_node_ops").await,
        before,
        "vpnbot did nothing"
    );

    // Expiry: the worker queues the removal, the outbox delivers it to the agent, and a new
    // client connection is refused.
    e.exec(
        "UPDATE subscriptions SET expires_at = now() - interval '1 minute' WHERE owner_id = 4401",
    )
    .await;
    let p = e.expiry.run_once().await.unwrap();
    assert_eq!(p.expired, 1, "{p:?}");
    let pass = e.outbox.process_once().await.unwrap();
    assert!(pass.due >= 1, "{pass:?}");
    assert_eq!(
        e.scalar_i64("SELECT count(*) FROM pending_node_ops WHERE done_at IS NULL")
            .await,
        0,
        "the removal was confirmed by the agent"
    );
    assert!(
        testkit::socks_get(socks, origin, T).await.is_err(),
        "expired: a new connection is refused"
    );
    drop(core);
    agent.stop().await;
}

async fn wait_ready(base: &str) {
    let http = reqwest::Client::new();
    let until = Instant::now() + T;
    while Instant::now() < until {
        if let Ok(r) = http.get(format!("{base}readyz")).send().await {
            if r.status().is_success() {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("agent not ready");
}
