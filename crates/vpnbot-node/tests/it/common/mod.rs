//! Shared set-up of the agent tests: a config, the agent on loopback, an HTTP client of its
//! node API, metric lookup.
#![allow(dead_code, unreachable_pub)]

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use vpnbot_node::{Config, CoreKind, Running};

pub const KEY: &str = "test-key-0123456789abcdef0123456789";

pub fn config(core: CoreKind, core_api: &str, state: &Path) -> Config {
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        api_key: KEY.into(),
        core,
        core_api: core_api.into(),
        inbound_tag: "vless-in".into(),
        state: state.to_path_buf(),
        tls: None,
        core_timeout: Duration::from_millis(500),
        probe_interval: Duration::from_millis(100),
        user_level: 0,
    }
}

pub async fn start(cfg: &Config) -> Running {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    vpnbot_node::start(cfg, l).await.unwrap()
}

#[derive(Debug, Clone)]
pub struct Api {
    pub base: String,
    pub http: reqwest::Client,
}

pub struct Answer {
    pub status: u16,
    pub body: Value,
    pub took: Duration,
}

impl std::fmt::Debug for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} in {:?}", self.status, self.body, self.took)
    }
}

impl Api {
    pub fn new(r: &Running) -> Api {
        Api {
            base: format!("http://{}", r.addr),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
        }
    }

    pub async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Answer {
        let start = Instant::now();
        let mut req = self
            .http
            .request(method.parse().unwrap(), format!("{}{path}", self.base))
            .header("x-api-key", KEY);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.unwrap();
        let body = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
        Answer {
            status,
            body,
            took: start.elapsed(),
        }
    }

    pub async fn add(&self, id: uuid::Uuid, email: &str) -> Answer {
        self.call(
            "POST",
            "/v1/users",
            Some(serde_json::json!({"uuid": id, "email": email})),
        )
        .await
    }

    pub async fn update(&self, id: uuid::Uuid, email: &str) -> Answer {
        self.call(
            "PUT",
            &format!("/v1/users/{id}"),
            Some(serde_json::json!({"uuid": id, "email": email})),
        )
        .await
    }

    pub async fn remove(&self, id: uuid::Uuid) -> Answer {
        self.call("DELETE", &format!("/v1/users/{id}"), None).await
    }

    pub async fn list(&self) -> Vec<(String, String)> {
        let a = self.call("GET", "/v1/users", None).await;
        assert_eq!(a.status, 200, "{a:?}");
        a.body["users"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p[0].as_str().unwrap().to_owned(),
                    p[1].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    }

    pub async fn get_text(&self, path: &str) -> (u16, String) {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let (_, text) = self.get_text("/metrics").await;
        metric(&text, name, labels)
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&self, within: Duration) {
        let until = Instant::now() + within;
        while Instant::now() < until {
            if self.get_text("/readyz").await.0 == 200 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("agent not ready within {within:?}");
    }
}

/// Sum of the samples of `name` whose labels include every pair of `labels`.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.starts_with(name) && matches!(l.as_bytes().get(name.len()), Some(b'{') | Some(b' '))
        })
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
pub mod standin;
