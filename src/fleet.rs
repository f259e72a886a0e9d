//! The configured VPN nodes: one [`NodeClient`] per `[nodes.NAME]`, sharing the node-API
//! metrics and the in-flight registry.

use std::collections::BTreeMap;
use std::sync::Arc;

use prometheus::Registry;

use crate::config::Config;
use crate::node::{InflightCalls, NodeApiMetrics, NodeClient, NodeError};
use crate::obs::health::BreakerView;

/// Every configured node's client, by name.
#[derive(Debug, Clone)]
pub struct Fleet {
    clients: Arc<BTreeMap<String, NodeClient>>,
    inflight: InflightCalls,
}

impl Fleet {
    /// Builds a client per configured node and registers the node-API metrics.
    ///
    /// # Errors
    /// The first node whose URL, key or settings the client refuses, named in the error.
    pub fn from_config(cfg: &Config, registry: &Registry) -> Result<Fleet, (String, NodeError)> {
        let metrics = NodeApiMetrics::register(registry);
        let inflight = InflightCalls::new();
        inflight.register_gauges(registry);
        let mut clients = BTreeMap::new();
        for (name, node) in &cfg.nodes {
            let url = url::Url::parse(&node.url)
                .map_err(|e| (name.clone(), NodeError::Config(format!("invalid url: {e}"))))?;
            let client = NodeClient::new(
                name,
                url,
                node.api_key.clone(),
                &cfg.node_client,
                metrics.clone(),
                inflight.clone(),
            )
            .map_err(|e| (name.clone(), e))?;
            clients.insert(name.clone(), client);
        }
        Ok(Fleet {
            clients: Arc::new(clients),
            inflight,
        })
    }

    /// The client of node `name`.
    pub fn get(&self, name: &str) -> Option<&NodeClient> {
        self.clients.get(name)
    }

    /// Node names in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.clients.keys().map(String::as_str)
    }

    /// Every client.
    pub fn clients(&self) -> impl Iterator<Item = &NodeClient> {
        self.clients.values()
    }

    /// In-flight node calls of every node.
    pub fn inflight(&self) -> &InflightCalls {
        &self.inflight
    }
}

impl BreakerView for Fleet {
    fn breaker_states(&self) -> Vec<(String, &'static str)> {
        self.clients
            .iter()
            .map(|(n, c)| (n.clone(), c.breaker_state().as_str()))
            .collect()
    }
}
