//! Configuration: the example file, error collection, redaction, exit codes.

use crate::helpers;
use std::collections::BTreeSet;
use std::process::Command;

use vpnbot::config::{Config, EXIT_CONFIG};

fn key_paths(v: &toml::Value, prefix: &str, out: &mut BTreeSet<String>) {
    if let toml::Value::Table(t) = v {
        for (k, child) in t {
            // Node tables are keyed by node name: compare their shape, not their names.
            let seg = if prefix == "nodes" { "*" } else { k.as_str() };
            let path = if prefix.is_empty() {
                seg.to_string()
            } else {
                format!("{prefix}.{seg}")
            };
            match child {
                toml::Value::Table(_) => key_paths(child, &path, out),
                _ => {
                    out.insert(path);
                }
            }
        }
    }
}

#[test]
fn example_config_matches_the_config_types() {
    let text = std::fs::read_to_string("vpnbot.example.toml").unwrap();
    let example: toml::Value = toml::from_str(&text).unwrap();
    let mut with_node = Config::default();
    with_node
        .nodes
        .insert("x".into(), vpnbot::config::NodeConfig::default());
    let real: toml::Value = toml::from_str(&with_node.to_redacted_toml()).unwrap();
    let (mut a, mut b) = (BTreeSet::new(), BTreeSet::new());
    key_paths(&example, "", &mut a);
    key_paths(&real, "", &mut b);
    assert_eq!(
        a.symmetric_difference(&b).collect::<Vec<_>>(),
        Vec::<&String>::new(),
        "vpnbot.example.toml and the config types differ"
    );
    // Every default in the example equals the real default (nodes and secrets aside).
    let ex = example.as_table().unwrap();
    let re = real.as_table().unwrap();
    for section in [
        "db",
        "leader",
        "observability",
        "runtime",
        "node_client",
        "outbox",
        "reconcile",
        "diagnostics",
        "bot",
    ] {
        for (k, v) in re[section].as_table().unwrap() {
            if k == "url" {
                continue;
            }
            assert_eq!(&ex[section][k], v, "default of {section}.{k} differs");
        }
    }
    // And the example itself loads (once the required values are filled in).
    let filled = text
        // Line-anchored: `public_url = ""` (webhook mode only) stays empty.
        .replace("\nurl = \"\"", "\nurl = \"postgres://u@localhost/db\"")
        .replace("api_key = \"\"", "api_key = \"k\"");
    Config::from_toml_str(&filled).expect("example config is valid");
}

#[test]
fn every_error_is_reported_at_once() {
    let bad = r#"
        [db]
        url = "mysql://nope"
        max_connections = "many"
        [leader]
        check_interval_seconds = -1.0
        [observability]
        log_format = "xml"
        listen = "everywhere"
        [nodes.a]
        url = "ftp://x"
        [tyop]
        x = 1
    "#;
    let errs = Config::from_toml_str(bad).unwrap_err().0;
    let all = errs.join("\n");
    for needle in [
        "max_connections",
        "check_interval_seconds",
        "log_format",
        "listen",
        "nodes.a.url",
        "nodes.a.api_key",
        "tyop",
    ] {
        assert!(
            all.contains(needle),
            "missing error about {needle} in:\n{all}"
        );
    }
}

#[test]
fn unknown_keys_are_errors() {
    let errs = Config::from_toml_str("[db]\nmax_conections = 3\nurl = \"postgres://x/y\"\n")
        .unwrap_err()
        .0;
    assert!(errs.join("\n").contains("max_conections"), "{errs:?}");
}

#[test]
fn check_config_redacts_secrets_and_exits_0() {
    let out = helpers::vpnbot()
        .arg("check-config")
        .env("VPNBOT_DB__URL", "postgres://bot:pw-s3cret@db:5432/vpn")
        .env("VPNBOT_TELEGRAM__TOKEN", "123:tok-s3cret")
        .env("VPNBOT_NODES__A__URL", "http://10.0.0.1:8080/")
        .env("VPNBOT_NODES__A__API_KEY", "key-s3cret")
        .env("VPNBOT_DB__MAX_CONNECTIONS", "20")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        !stdout.contains("s3cret") && !stderr.contains("s3cret"),
        "{stdout}"
    );
    assert!(
        stdout.contains("max_connections = 20"),
        "env override applied: {stdout}"
    );
    assert!(stdout.contains("[REDACTED]"));
}

#[test]
fn bad_config_exits_64_listing_every_error() {
    let out = helpers::vpnbot()
        .arg("check-config")
        .env("VPNBOT_DB__URL", "postgres://bot:pw-s3cret@db/vpn")
        .env("VPNBOT_DB__MAX_CONNECTIONS", "zero")
        .env("VPNBOT_OBSERVABILITY__LOG_FORMAT", "xml")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(EXIT_CONFIG));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("max_connections") && stderr.contains("log_format"),
        "{stderr}"
    );
    assert!(!stderr.contains("s3cret"), "{stderr}");
}

#[test]
fn missing_config_file_exits_64() {
    let out = helpers::vpnbot()
        .args(["--config", "/nonexistent/vpnbot.toml", "check-config"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(EXIT_CONFIG));
}

// ---- secrets in unusual shapes (found by a tester; each failed before its fix) ----

/// A secret that happens to be all digits (a numeric node API key, a PIN-like token) is parsed
/// by the `VPNBOT_*` overlay as an integer; the resulting type error quotes the value verbatim
/// on stderr ("found unsigned int `8472919283`").
#[test]
fn numeric_secret_is_not_echoed_by_a_type_error() {
    let out = helpers::vpnbot()
        .arg("check-config")
        .env("VPNBOT_DB__URL", "postgres://bot:pw@db/vpn")
        .env("VPNBOT_TELEGRAM__TOKEN", "123:tok")
        .env("VPNBOT_NODES__A__URL", "http://10.0.0.1:8080/")
        .env("VPNBOT_NODES__A__API_KEY", "8472919283")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stdout.contains("8472919283") && !stderr.contains("8472919283"),
        "numeric API key echoed:\n{stdout}\n{stderr}"
    );
}

/// The node client refuses a base URL with a query or fragment (so tokens cannot ride in it),
/// but check-config accepts it, exits 0 and prints the token in clear.
#[test]
fn check_config_does_not_print_a_token_in_the_node_url() {
    let out = helpers::vpnbot()
        .arg("check-config")
        .env("VPNBOT_DB__URL", "postgres://bot:pw@db/vpn")
        .env("VPNBOT_TELEGRAM__TOKEN", "123:tok")
        .env(
            "VPNBOT_NODES__A__URL",
            "http://10.0.0.1:8080/api?token=tok-s3cret",
        )
        .env("VPNBOT_NODES__A__API_KEY", "key")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stdout.contains("s3cret") && !stderr.contains("s3cret"),
        "token in node url printed (exit {:?}):\n{stdout}",
        out.status.code()
    );
    assert_eq!(
        out.status.code(),
        Some(EXIT_CONFIG),
        "check-config accepts a node URL that `run` refuses"
    );
}

/// otel.rs redacts credentials from the OTLP endpoint before logging it, but check-config
/// prints `otlp_endpoint` (and a `sslpassword` in the DB URL) verbatim.
#[test]
fn check_config_redacts_otlp_credentials_and_sslpassword() {
    let out = helpers::vpnbot()
        .arg("check-config")
        .env(
            "VPNBOT_DB__URL",
            "postgres://bot@db/vpn?sslmode=require&sslpassword=ssl-s3cret",
        )
        .env("VPNBOT_TELEGRAM__TOKEN", "123:tok")
        .env(
            "VPNBOT_OBSERVABILITY__OTLP_ENDPOINT",
            "https://user:otlp-s3cret@collector.example/v1/traces",
        )
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    let leaks: Vec<&str> = stdout.lines().filter(|l| l.contains("s3cret")).collect();
    assert!(
        leaks.is_empty(),
        "secrets printed by check-config: {leaks:?}"
    );
}

// ---- issue 11, items 9 and 10: the environment namespace, every problem in one run ----

/// Values a valid run of the example file needs (it leaves the secrets empty).
fn with_example_secrets(c: &mut Command) -> &mut Command {
    c.env("DATABASE_URL", "postgres://bot@db/vpn")
        .env("VPNBOT_NODES__A__API_KEY", "key")
}

/// `--help` advertises `VPNBOT_CONFIG` as the environment form of `--config`; it used to be
/// read as a config section too (exit 64, "unknown section `config`").
#[test]
fn vpnbot_config_names_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("vpnbot.toml");
    std::fs::write(
        &file,
        "[db]\nurl = \"postgres://bot@db/vpn\"\nmax_connections = 7\n",
    )
    .unwrap();
    let out = helpers::vpnbot()
        .arg("check-config")
        .env("VPNBOT_CONFIG", &file)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains("max_connections = 7"),
        "file not read: {stdout}"
    );
}

/// The test scripts' and the simulator's variables, exported as the README suggests, are not
/// configuration and must not break a command that loads it.
#[test]
fn test_and_simulator_variables_are_not_configuration() {
    let out = with_example_secrets(&mut helpers::vpnbot())
        .args(["check-config", "--config", "vpnbot.example.toml"])
        .env("VPNBOT_TEST_PGPORT", "1")
        .env("VPNBOT_TEST_PGDATA", "/tmp/nowhere")
        .env("VPNBOT_SIM_API_KEY", "x")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A configuration variable that is wrong is named in the error, with the fix when it is a
/// near miss; its value is never echoed.
#[test]
fn a_bad_configuration_variable_is_named() {
    let out = with_example_secrets(&mut helpers::vpnbot())
        .args(["check-config", "--config", "vpnbot.example.toml"])
        .env("VPNBOT_DB__MAX_CONECTIONS", "3")
        .env("VPNBOT_DB__MIN_CONNECTIONS", "pw-s3cret")
        .env("VPNBOT_DB_STATEMENT_TIMEOUT_SECONDS", "5")
        .env("VPNBOT_TELEGRAMM__TOKEN", "tok-s3cret")
        .env("VPNBOT_OBSERVABILITY__LOG_FORMAT", "xml")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(EXIT_CONFIG));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "VPNBOT_DB__MAX_CONECTIONS (db.max_conections): unknown key; did you mean \
         VPNBOT_DB__MAX_CONNECTIONS?",
        "VPNBOT_DB__MIN_CONNECTIONS (db.min_connections): invalid type",
        "VPNBOT_DB_STATEMENT_TIMEOUT_SECONDS: not a configuration variable",
        "did you mean VPNBOT_DB__STATEMENT_TIMEOUT_SECONDS?",
        "VPNBOT_TELEGRAMM__TOKEN: unknown section telegramm; did you mean VPNBOT_TELEGRAM__TOKEN?",
        "VPNBOT_OBSERVABILITY__LOG_FORMAT (observability.log_format): unknown variant, \
         expected one of: human, json",
        "invalid configuration (5 problems)",
    ] {
        assert!(stderr.contains(needle), "no {needle:?} in:\n{stderr}");
    }
    assert!(!stderr.contains("s3cret"), "{stderr}");
}

/// A file with a key typo, a wrong type and a negative timeout used to report only the typo.
#[test]
fn check_config_reports_a_typo_a_wrong_type_and_a_negative_timeout_in_one_run() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("vpnbot.toml");
    std::fs::write(
        &file,
        "[db]\nurl = \"postgres://bot@db/vpn\"\nmax_conections = 20\n\
         min_connections = \"two\"\nacquire_timeout_seconds = -1.0\n",
    )
    .unwrap();
    let out = helpers::vpnbot()
        .arg("check-config")
        .arg("--config")
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(EXIT_CONFIG));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr,
        "invalid configuration (3 problems):\n  \
         - db.acquire_timeout_seconds: invalid value: found a number, expected a number of \
         seconds from 0 to 1e9\n  \
         - db.max_conections: unknown key; did you mean db.max_connections?\n  \
         - db.min_connections: invalid type: found a string, expected u32\n"
    );
}

/// A file that does not parse is one line naming the file and the position; the parser's
/// excerpt of the line (here an unterminated token) is not echoed.
#[test]
fn a_file_that_does_not_parse_is_named_without_its_content() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("vpnbot.toml");
    std::fs::write(&file, "[telegram]\ntoken = \"123:tok-s3cret\n").unwrap();
    let out = helpers::vpnbot()
        .arg("check-config")
        .arg("--config")
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(EXIT_CONFIG));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("s3cret"), "{stderr}");
    assert!(
        stderr.contains(&format!("{}: TOML parse error at line 2", file.display())),
        "{stderr}"
    );
}

/// Durations are parsed once and checked once: `1e30`, a negative value, NaN or infinity is
/// refused by `check-config` naming each key (sections with `Duration` fields while parsing,
/// the others by the range check over every `*_seconds` key), and `run` refuses the same
/// configuration with 64 before starting anything instead of panicking in `Duration`
/// arithmetic later.
#[test]
fn out_of_range_durations_are_refused_naming_each_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("vpnbot.toml");
    std::fs::write(
        &file,
        "[runtime]\nshutdown_drain_seconds = nan\n[leader]\ncheck_timeout_seconds = inf\n",
    )
    .unwrap();
    let keys = [
        (
            "VPNBOT_DB__ACQUIRE_TIMEOUT_SECONDS",
            "1e30",
            "db.acquire_timeout_seconds",
        ),
        (
            "VPNBOT_DIAGNOSTICS__STALL_THRESHOLD_SECONDS",
            "1e30",
            "diagnostics.stall_threshold_seconds",
        ),
        (
            "VPNBOT_BOT__HANDLER_TIMEOUT_SECONDS",
            "1e30",
            "bot.handler_timeout_seconds",
        ),
        (
            "VPNBOT_OUTBOX__INTERVAL_SECONDS",
            "1e30",
            "outbox.interval_seconds",
        ),
        (
            "VPNBOT_RECONCILE__GRACE_SECONDS",
            "-1",
            "reconcile.grace_seconds",
        ),
    ];
    for command in ["check-config", "run"] {
        let mut c = helpers::vpnbot();
        c.arg(command)
            .arg("--config")
            .arg(&file)
            .env("VPNBOT_DB__URL", "postgres://bot@127.0.0.1:1/vpn");
        for (var, value, _) in keys {
            c.env(var, value);
        }
        let out = c.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(EXIT_CONFIG), "{command}: {stderr}");
        for key in keys.iter().map(|k| k.2).chain([
            "runtime.shutdown_drain_seconds",
            "leader.check_timeout_seconds",
        ]) {
            assert!(stderr.contains(key), "{command}: no {key} in:\n{stderr}");
        }
        assert!(!stderr.contains("panicked"), "{command}: {stderr}");
    }
}

#[test]
fn durations_keep_their_seconds_form_in_toml() {
    let cfg = Config::from_toml_str(
        "[db]\nurl = \"postgres://u@h/d\"\n[outbox]\ninterval_seconds = 2\n\
         [reconcile]\ngrace_seconds = 0.25\n",
    )
    .unwrap();
    assert_eq!(
        cfg.outbox.interval_seconds,
        std::time::Duration::from_secs(2)
    );
    assert_eq!(
        cfg.reconcile.grace_seconds,
        std::time::Duration::from_millis(250)
    );
    let printed = cfg.to_redacted_toml();
    assert!(printed.contains("interval_seconds = 2.0"), "{printed}");
    assert!(printed.contains("grace_seconds = 0.25"), "{printed}");
}
