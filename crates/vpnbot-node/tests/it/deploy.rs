//! The node deployment files under `deploy/node/`: the core config is accepted by `v2ray -test`
//! and has the shape the agent needs; the example agent config has only known keys; the
//! systemd units pass `systemd-analyze verify` (apart from the binaries not being installed).

use std::path::PathBuf;
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn core_config_is_accepted_by_v2ray_and_has_the_vless_and_api_inbounds() {
    let path = repo().join("deploy/node/v2ray-config.json");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let inbounds = v["inbounds"].as_array().unwrap();
    let vless = inbounds.iter().find(|i| i["tag"] == "vless-in").unwrap();
    assert_eq!(vless["protocol"], "vless");
    assert_eq!(vless["settings"]["decryption"], "none");
    let api = inbounds.iter().find(|i| i["tag"] == "api").unwrap();
    assert_eq!(api["listen"], "127.0.0.1", "the core API stays on loopback");
    assert!(v["api"]["services"]
        .as_array()
        .unwrap()
        .contains(&"HandlerService".into()));
    assert_eq!(v["routing"]["rules"][0]["outboundTag"], "api");
    let Some(bin) = vpnbot_node::testkit::v2ray_binary() else {
        return;
    };
    let out = Command::new(bin)
        .args(["-test", "-config"])
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("Configuration OK"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn example_agent_config_has_only_known_keys() {
    let path = repo().join("deploy/node/node.example.toml");
    // Only the host-specific files may be missing here (state directory, TLS files).
    std::env::set_var("VBNODE_API_KEY", "0123456789abcdef0123456789abcdef");
    let problems = vpnbot_node::Config::load(Some(&path))
        .err()
        .unwrap_or_default();
    for p in &problems {
        assert!(
            p.starts_with("state: directory")
                || p.starts_with("tls_cert:")
                || p.starts_with("tls_key:"),
            "{p}"
        );
    }
}

#[test]
fn systemd_units_verify() {
    let Ok(out) = Command::new("systemd-analyze")
        .arg("verify")
        .arg(repo().join("deploy/node/vpnbot-node.service"))
        .arg(repo().join("deploy/node/vpnbot-core.service"))
        .output()
    else {
        assert!(
            std::env::var("ALLOW_SKIP_TESTS").as_deref() == Ok("1"),
            "systemd-analyze missing: run scripts/install-deps.sh (or ALLOW_SKIP_TESTS=1)"
        );
        return;
    };
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    let problems: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter(|l| !l.contains("is not executable: No such file or directory"))
        .collect();
    assert!(problems.is_empty(), "{problems:#?}");
}
