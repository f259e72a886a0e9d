//! `vpnbot reconcile --once` as an operator runs it: JSON and table output, exit codes.

use crate::helpers;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use uuid::Uuid;
use vpnbot::node::NodeUser;
use vpnbot_sim::node::{SimNode, SimNodeOptions};

fn vpnbot(url: &str, node_url: &str) -> tokio::process::Command {
    let mut c = tokio::process::Command::from(helpers::vpnbot());
    c.env("DATABASE_URL", url)
        .env("VPNBOT_NODES__A__URL", node_url)
        .env("VPNBOT_NODES__A__API_KEY", "sim-key")
        .env("RUST_LOG", "warn");
    c
}

#[sqlx::test(migrations = false)]
async fn reconcile_once_prints_json_and_table(_p: PgPoolOptions, opts: PgConnectOptions) {
    let url = helpers::url_for(&opts);
    let registry = vpnbot::metrics::new_registry();
    let cfg = helpers::test_config(&opts);
    let pool = vpnbot::db::DbPool::connect(&cfg.db, &registry).unwrap();
    vpnbot::db::migrate(&pool).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sim = SimNode::start(listener, SimNodeOptions::default());
    let orphan = Uuid::new_v4();
    sim.insert_user(NodeUser::owned(orphan));
    let node_url = sim.base_url().to_string();

    let out = vpnbot(&url, &node_url)
        .args(["reconcile", "--once", "--dry-run", "--json"])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // One owned user and an empty database side: the guard trips (exit 3), nothing removed.
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert_eq!(v["nodes"][0]["node"], "a");
    assert_eq!(v["nodes"][0]["outcome"], "guarded");
    assert_eq!(v["nodes"][0]["guard"]["reason"], "db_empty");
    assert_eq!(v["nodes"][0]["blocked_removals"], 1);

    // With a live subscription elsewhere on the node the orphan is planned (dry run: table).
    let live = Uuid::new_v4();
    {
        let mut c = pool.acquire("test").await.unwrap();
        sqlx::query("INSERT INTO bot_users (telegram_id) VALUES (1)")
            .execute(&mut *c)
            .await
            .unwrap();
        sqlx::query(
            "INSERT INTO subscriptions (owner_id, node, vless_uuid, plan, expires_at, created_at, \
             updated_at) VALUES (1, 'a', $1, 'month', now() + interval '1 day', \
             now() - interval '1 day', now() - interval '1 day')",
        )
        .bind(live)
        .execute(&mut *c)
        .await
        .unwrap();
    }
    sim.insert_user(NodeUser::owned(live));
    let out = vpnbot(&url, &node_url)
        .args(["reconcile", "--once", "--dry-run", "--node", "a"])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("a: would remove {orphan}")),
        "{stdout}"
    );
    assert!(stdout.contains("dry_run"), "{stdout}");
    assert_eq!(sim.user_count(), 2, "dry run touched nothing");

    let out = vpnbot(&url, &node_url)
        .args(["reconcile", "--once", "--node", "nope"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("\"nope\" is not configured"));
}
