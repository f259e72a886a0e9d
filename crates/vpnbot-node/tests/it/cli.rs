//! The binary: a bad configuration exits 64 listing every problem (never the key); a good one
//! serves, with TLS when configured or plain HTTP only when explicitly allowed; `VBNODE_`
//! environment overrides.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_vpnbot-node");

fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let mut c = Command::new(BIN);
    c.args(args).env_clear().stdin(Stdio::null());
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_config_exits_64_listing_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.toml");
    std::fs::write(
        &path,
        "listen = \"nowhere\"\napi_key = \"short-secret\"\ncore = \"xrai\"\nstate = \"/no/such/dir/l.redb\"\ntls_cert = \"/etc/hostname\"\n",
    )
    .unwrap();
    let (code, err) = run(&["--config", path.to_str().unwrap()], &[]);
    assert_eq!(code, 64, "{err}");
    for needle in [
        "listen:",
        "api_key: too short",
        "core: \"xrai\"",
        "core_api: missing",
        "inbound_tag: missing",
        "state: directory /no/such/dir does not exist",
        "tls_key: missing",
    ] {
        assert!(err.contains(needle), "{needle:?} missing from:\n{err}");
    }
    assert!(!err.contains("short-secret"), "the key is never printed");

    // Unknown keys are problems too; so is plain HTTP without the explicit opt-in.
    std::fs::write(&path, "listn = \"127.0.0.1:1\"\n").unwrap();
    let (code, err) = run(&["--config", path.to_str().unwrap()], &[]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("listn"), "{err}");

    let (code, err) = run(
        &[],
        &[
            ("VBNODE_LISTEN", "127.0.0.1:0"),
            ("VBNODE_API_KEY", "0123456789abcdef0123456789abcdef"),
            ("VBNODE_CORE", "v2ray"),
            ("VBNODE_CORE_API", "127.0.0.1:1"),
            ("VBNODE_INBOUND_TAG", "vless-in"),
            ("VBNODE_STATE", dir.path().join("l.redb").to_str().unwrap()),
        ],
    );
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("allow_plain_http"), "{err}");
}

#[test]
fn env_overrides_serve_plain_http_when_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let port = vpnbot_node::testkit::free_port();
    let mut child = Command::new(BIN)
        .env_clear()
        .env("VBNODE_LISTEN", format!("127.0.0.1:{port}"))
        .env("VBNODE_API_KEY", "0123456789abcdef0123456789abcdef")
        .env("VBNODE_CORE", "v2ray")
        .env("VBNODE_CORE_API", "127.0.0.1:1")
        .env("VBNODE_INBOUND_TAG", "vless-in")
        .env("VBNODE_STATE", dir.path().join("l.redb"))
        .env("VBNODE_ALLOW_PLAIN_HTTP", "true")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let ok = vpnbot_node::testkit::wait_listening(port, Duration::from_secs(10));
    let start = Instant::now();
    let healthz = std::net::TcpStream::connect(("127.0.0.1", port)).and_then(|mut s| {
        use std::io::{Read, Write};
        s.write_all(b"GET /healthz HTTP/1.0\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    });
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(ok, "{log}");
    assert!(healthz.unwrap().starts_with("HTTP/1.0 200"), "{log}");
    assert!(start.elapsed() < Duration::from_secs(5));
    assert!(
        !log.contains("0123456789abcdef0123456789abcdef"),
        "key logged: {log}"
    );
}

/// With `tls_cert`/`tls_key` the node API is HTTPS (rustls): a client trusting the certificate
/// gets answers, plain HTTP on the same port gets none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_https_with_the_configured_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    let cfg = vpnbot_node::Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        api_key: "0123456789abcdef0123456789abcdef".into(),
        core: vpnbot_node::CoreKind::V2ray,
        core_api: format!("127.0.0.1:{}", vpnbot_node::testkit::free_port()),
        inbound_tag: "vless-in".into(),
        state: dir.path().join("l.redb"),
        tls: Some((cert, key)),
        core_timeout: Duration::from_millis(300),
        probe_interval: Duration::from_millis(100),
        user_level: 0,
    };
    let running = vpnbot_node::start(&cfg, std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .await
        .unwrap();
    let port = running.addr.port();
    let http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ck.cert.pem().as_bytes()).unwrap())
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let r = http
        .get(format!("https://localhost:{port}/v1/users"))
        .header("x-api-key", "0123456789abcdef0123456789abcdef")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "{\"users\":[]}");
    let r = http
        .get(format!("https://localhost:{port}/v1/users"))
        .header("x-api-key", "wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let plain = reqwest::Client::new()
        .get(format!("http://localhost:{port}/healthz"))
        .timeout(Duration::from_secs(2))
        .send()
        .await;
    assert!(
        plain.map(|r| !r.status().is_success()).unwrap_or(true),
        "plain HTTP is not served"
    );
    running.stop().await;
}
