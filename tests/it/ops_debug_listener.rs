//! Issue 18, "the operational surface is safe to expose": `/debug/*` (task names, spawn
//! locations, native frames, span fields) is served on its own listener or behind a bearer
//! token, never open on a non-loopback scrape listener; `/metrics`, `/healthz`, `/readyz` stay
//! on the scrape listener. `observability.otlp_endpoint` is a secret.

use crate::helpers;
use secrecy::SecretString;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use vpnbot::app::App;
use vpnbot::config::Config;

async fn get(url: String, token: Option<&str>) -> u16 {
    let mut req = reqwest::Client::new().get(url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    req.send().await.unwrap().status().as_u16()
}

#[sqlx::test(migrations = false)]
async fn debug_endpoints_move_to_their_own_listener(_p: PgPoolOptions, opts: PgConnectOptions) {
    let mut cfg = helpers::test_config(&opts);
    cfg.observability.debug_listen = Some("127.0.0.1:0".parse().unwrap());
    let app = App::start(cfg).await.unwrap();
    let scrape = app.obs_addr();
    let debug = app.debug_addr().expect("debug listener");
    assert_ne!(scrape, debug);
    assert_eq!(get(format!("http://{scrape}/metrics"), None).await, 200);
    assert_eq!(get(format!("http://{scrape}/healthz"), None).await, 200);
    assert_eq!(
        get(format!("http://{scrape}/debug/dump?now=1"), None).await,
        404
    );
    assert_eq!(
        get(format!("http://{debug}/debug/dump?now=1"), None).await,
        200
    );
    assert_eq!(get(format!("http://{debug}/metrics"), None).await, 404);
    app.shutdown().await;
}

#[sqlx::test(migrations = false)]
async fn debug_endpoints_need_the_bearer_token_when_one_is_set(
    _p: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let mut cfg = helpers::test_config(&opts);
    // Non-loopback scrape listener (all addresses), reached here over loopback.
    cfg.observability.listen = "0.0.0.0:0".parse().unwrap();
    cfg.observability.debug_token = SecretString::from("t0ken-s3cret".to_string());
    let app = App::start(cfg).await.unwrap();
    let port = app.obs_addr().port();
    let dump = format!("http://127.0.0.1:{port}/debug/dump?now=1");
    assert_eq!(get(dump.clone(), None).await, 401);
    assert_eq!(get(dump.clone(), Some("wrong")).await, 401);
    assert_eq!(get(dump.clone(), Some("t0ken-s3cret")).await, 200);
    // Probes and the scraper need no token.
    assert_eq!(
        get(format!("http://127.0.0.1:{port}/metrics"), None).await,
        200
    );
    assert_eq!(
        get(format!("http://127.0.0.1:{port}/readyz"), None).await,
        200
    );
    app.shutdown().await;
}

#[sqlx::test(migrations = false)]
async fn a_non_loopback_scrape_listener_without_a_token_serves_no_debug_endpoints(
    _p: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let mut cfg = helpers::test_config(&opts);
    cfg.observability.listen = "0.0.0.0:0".parse().unwrap();
    let app = App::start(cfg).await.unwrap();
    let port = app.obs_addr().port();
    assert!(app.debug_addr().is_none());
    assert_eq!(
        get(format!("http://127.0.0.1:{port}/debug/dump?now=1"), None).await,
        404
    );
    assert_eq!(
        get(format!("http://127.0.0.1:{port}/metrics"), None).await,
        200
    );
    app.shutdown().await;
}

#[test]
fn a_non_loopback_debug_listener_needs_a_token_and_secrets_stay_out_of_debug_output() {
    let mut cfg = Config::default();
    cfg.db.url = SecretString::from("postgres://bot@db/vpn".to_string());
    cfg.observability.debug_listen = Some("0.0.0.0:9188".parse().unwrap());
    let errors = cfg.validate();
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("observability.debug_listen") && e.contains("debug_token")),
        "{errors:?}"
    );
    cfg.observability.debug_token = SecretString::from("t0ken-s3cret".to_string());
    cfg.observability.otlp_endpoint = SecretString::from(
        "https://user:otlp-s3cret@collector.example/v1/traces?token=q-s3cret".to_string(),
    );
    assert!(cfg.validate().is_empty(), "{:?}", cfg.validate());
    let debug = format!("{cfg:?}");
    let printed = cfg.to_redacted_toml();
    for out in [&debug, &printed] {
        assert!(!out.contains("s3cret"), "{out}");
    }
    assert!(printed.contains("collector.example"), "{printed}");
}
