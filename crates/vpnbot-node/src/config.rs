//! The agent's configuration: a TOML file (`--config node.toml`) with environment overrides under
//! `VBNODE_` (for example `VBNODE_API_KEY`), a prefix that cannot be mistaken for vpnbot's own
//! `VPNBOT_` keys. [`Config::load`] reports every problem at once; the binary exits 64 on any.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::Deserialize;

/// Environment prefix of the agent's overrides.
pub const ENV_PREFIX: &str = "VBNODE_";

/// Shortest API key accepted, bytes. 32 characters of a random token (for example
/// `openssl rand -hex 32` gives 64) leave no room for guessing over the network.
pub const MIN_API_KEY_LEN: usize = 32;

/// Which proxy core the agent drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CoreKind {
    /// Xray-core ≥ 24.11: `AlterInbound` plus `GetInboundUsers` to read users back.
    Xray,
    /// V2Ray 4.x (Debian's `v2ray` 4.34): `AlterInbound` only, no way to list users.
    V2ray,
}

impl CoreKind {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            CoreKind::Xray => "xray",
            CoreKind::V2ray => "v2ray",
        }
    }
}

/// The file as written, every key optional so that every missing one can be reported.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    listen: Option<String>,
    api_key: Option<String>,
    core: Option<String>,
    core_api: Option<String>,
    inbound_tag: Option<String>,
    state: Option<PathBuf>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    allow_plain_http: Option<bool>,
    core_timeout_ms: Option<u64>,
    probe_interval_ms: Option<u64>,
    user_level: Option<u32>,
}

/// A validated configuration.
#[derive(Clone)]
pub struct Config {
    /// Address the node API listens on.
    pub listen: SocketAddr,
    /// The key vpnbot sends in `x-api-key`. Never logged.
    pub api_key: String,
    /// The core flavour.
    pub core: CoreKind,
    /// The core's gRPC API address (`host:port`, plaintext, keep it on loopback).
    pub core_api: String,
    /// Tag of the VLESS inbound the users live on.
    pub inbound_tag: String,
    /// Path of the ledger file (redb).
    pub state: PathBuf,
    /// TLS certificate chain (PEM) and private key (PEM); both or neither.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Deadline of every gRPC call to the core. Default 2 s.
    pub core_timeout: Duration,
    /// Interval of the core probe that detects a down or restarted core. Default 2 s.
    pub probe_interval: Duration,
    /// VLESS user level given to added users. Default 0.
    pub user_level: u32,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("api_key", &"<redacted>")
            .field("core", &self.core)
            .field("core_api", &self.core_api)
            .field("inbound_tag", &self.inbound_tag)
            .field("state", &self.state)
            .field("tls", &self.tls)
            .field("core_timeout", &self.core_timeout)
            .field("probe_interval", &self.probe_interval)
            .field("user_level", &self.user_level)
            .finish()
    }
}

impl Config {
    /// Reads `path` (when given) and the `VBNODE_*` environment, and validates the result.
    ///
    /// # Errors
    /// Every problem found, one line each (unreadable file, unknown key, missing or invalid
    /// value). The API key's value never appears in a message.
    pub fn load(path: Option<&Path>) -> Result<Config, Vec<String>> {
        let mut fig = Figment::new();
        if let Some(p) = path {
            if !p.exists() {
                return Err(vec![format!("config file {} does not exist", p.display())]);
            }
            fig = fig.merge(Toml::file(p));
        }
        fig = fig.merge(Env::prefixed(ENV_PREFIX).lowercase(true));
        let raw: Raw = match fig.extract() {
            Ok(r) => r,
            Err(e) => {
                return Err(e
                    .into_iter()
                    .map(|e| {
                        // figment's message for a bad value quotes the value; never for api_key.
                        if e.path.iter().any(|p| p == "api_key") {
                            "api_key: invalid value (a string is expected)".to_owned()
                        } else {
                            e.to_string()
                        }
                    })
                    .collect());
            }
        };
        Self::validate(raw)
    }

    fn validate(raw: Raw) -> Result<Config, Vec<String>> {
        let mut errs = Vec::new();
        let listen = match raw.listen.as_deref() {
            None => {
                errs.push("listen: missing (e.g. \"0.0.0.0:8443\")".to_owned());
                None
            }
            Some(s) => match s.parse::<SocketAddr>() {
                Ok(a) => Some(a),
                Err(_) => {
                    errs.push(format!("listen: {s:?} is not an ip:port address"));
                    None
                }
            },
        };
        let api_key = match raw.api_key {
            None => {
                errs.push(format!(
                    "api_key: missing (or set {ENV_PREFIX}API_KEY; at least {MIN_API_KEY_LEN} characters)"
                ));
                None
            }
            Some(k) if k.trim().len() < MIN_API_KEY_LEN => {
                errs.push(format!(
                    "api_key: too short ({} characters, at least {MIN_API_KEY_LEN})",
                    k.trim().len()
                ));
                None
            }
            Some(k) if k.bytes().any(|b| !(0x21..=0x7e).contains(&b)) => {
                errs.push(
                    "api_key: must be printable ASCII without spaces (it travels in a header)"
                        .to_owned(),
                );
                None
            }
            Some(k) => Some(k),
        };
        let core = match raw.core.as_deref() {
            None => {
                errs.push("core: missing (\"xray\" or \"v2ray\")".to_owned());
                None
            }
            Some("xray") => Some(CoreKind::Xray),
            Some("v2ray") => Some(CoreKind::V2ray),
            Some(other) => {
                errs.push(format!("core: {other:?} is neither \"xray\" nor \"v2ray\""));
                None
            }
        };
        let core_api = match raw.core_api {
            None => {
                errs.push(
                    "core_api: missing (the core's gRPC API, e.g. \"127.0.0.1:10085\")".into(),
                );
                None
            }
            Some(s) if s.parse::<SocketAddr>().is_err() && !s.contains(':') => {
                errs.push(format!("core_api: {s:?} is not a host:port address"));
                None
            }
            Some(s) => Some(s),
        };
        let inbound_tag = match raw.inbound_tag {
            None => {
                errs.push("inbound_tag: missing (the tag of the core's VLESS inbound)".into());
                None
            }
            Some(t) if t.trim().is_empty() => {
                errs.push("inbound_tag: empty".into());
                None
            }
            Some(t) => Some(t),
        };
        let state = match raw.state {
            None => {
                errs.push("state: missing (path of the ledger file, e.g. /var/lib/vpnbot-node/ledger.redb)".into());
                None
            }
            Some(p) => {
                let parent = p.parent().filter(|d| !d.as_os_str().is_empty());
                if parent.is_some_and(|d| !d.is_dir()) {
                    errs.push(format!(
                        "state: directory {} does not exist",
                        parent.unwrap_or(Path::new(".")).display()
                    ));
                }
                Some(p)
            }
        };
        let tls = match (raw.tls_cert, raw.tls_key) {
            (Some(c), Some(k)) => {
                for (name, p) in [("tls_cert", &c), ("tls_key", &k)] {
                    if !p.is_file() {
                        errs.push(format!("{name}: {} is not a readable file", p.display()));
                    }
                }
                Some((c, k))
            }
            (None, None) => None,
            (Some(_), None) => {
                errs.push("tls_key: missing (tls_cert is set; both or neither)".into());
                None
            }
            (None, Some(_)) => {
                errs.push("tls_cert: missing (tls_key is set; both or neither)".into());
                None
            }
        };
        let allow_plain = raw.allow_plain_http.unwrap_or(false);
        if tls.is_none() && !allow_plain {
            errs.push(
                "tls_cert/tls_key: missing; plain HTTP needs allow_plain_http = true (only on \
                 loopback or behind a tunnel: the API key would travel in clear)"
                    .into(),
            );
        }
        let core_timeout = Duration::from_millis(raw.core_timeout_ms.unwrap_or(2000));
        if core_timeout.is_zero() || core_timeout > Duration::from_secs(60) {
            errs.push("core_timeout_ms: must be between 1 and 60000".into());
        }
        let probe_interval = Duration::from_millis(raw.probe_interval_ms.unwrap_or(2000));
        if probe_interval < Duration::from_millis(50) || probe_interval > Duration::from_secs(300) {
            errs.push("probe_interval_ms: must be between 50 and 300000".into());
        }
        if !errs.is_empty() {
            return Err(errs);
        }
        Ok(Config {
            listen: listen.expect("checked"),
            api_key: api_key.expect("checked"),
            core: core.expect("checked"),
            core_api: core_api.expect("checked"),
            inbound_tag: inbound_tag.expect("checked"),
            state: state.expect("checked"),
            tls,
            core_timeout,
            probe_interval,
            user_level: raw.user_level.unwrap_or(0),
        })
    }
}
