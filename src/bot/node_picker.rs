//! Which node a new subscription goes to. `least_loaded` needs active subscriptions per node;
//! counting them is a scan of every active subscription (about 0.2 s of database CPU at a
//! million), which per trial or purchase made a burst of 250 trials during a reconcile pass
//! take 47 s in the bot benchmark. So the counts are read at most once per
//! [`NODE_LOAD_REFRESH`] and kept current in between by counting this process's own
//! assignments; other writers (expiry, other instances) are caught up at the next refresh.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sqlx::PgConnection;

/// How long per-node counts are reused before the next count query.
pub const NODE_LOAD_REFRESH: Duration = Duration::from_secs(30);

/// Picks nodes by `bot.node_policy` over the configured node names. Shared by all handlers.
#[derive(Debug)]
pub struct NodePicker {
    nodes: Vec<String>,
    least_loaded: bool,
    cache: Mutex<Cache>,
}

#[derive(Debug, Default)]
struct Cache {
    counts: HashMap<String, i64>,
    refreshed: Option<Instant>,
    refreshing: bool,
}

impl NodePicker {
    /// A picker over `nodes` (configured names; ties go to the first) with `policy` `least_loaded`
    /// or `first` (validated by the config).
    pub fn new(nodes: Vec<String>, policy: &str) -> NodePicker {
        NodePicker {
            nodes,
            least_loaded: policy == "least_loaded",
            cache: Mutex::new(Cache::default()),
        }
    }

    /// True when `node` is a configured node.
    pub fn has(&self, node: &str) -> bool {
        self.nodes.iter().any(|n| n == node)
    }

    /// The node for one new subscription, `None` when no node is configured. Runs the count
    /// query on `c` (the caller's transaction) only when the counts are older than
    /// [`NODE_LOAD_REFRESH`] and no other handler is refreshing them already.
    ///
    /// # Errors
    /// The count query's error.
    pub async fn pick(&self, c: &mut PgConnection) -> Result<Option<String>, sqlx::Error> {
        if self.nodes.is_empty() {
            return Ok(None);
        }
        if !self.least_loaded {
            return Ok(self.nodes.first().cloned());
        }
        let refresh = {
            let mut g = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            let stale = g.refreshed.is_none_or(|t| t.elapsed() >= NODE_LOAD_REFRESH);
            // With some counts already known, one handler refreshes and the others use them.
            let go = stale && (g.refreshed.is_none() || !g.refreshing);
            if go {
                g.refreshing = true;
            }
            go
        };
        if refresh {
            // Cleared on drop too: a handler cancelled mid-query must not block refreshes.
            let _flag = RefreshFlag(&self.cache);
            let counts = count_active(c, &self.nodes).await?;
            let mut g = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            g.counts = counts.into_iter().collect();
            g.refreshed = Some(Instant::now());
        }
        let mut g = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let node = self
            .nodes
            .iter()
            .min_by_key(|n| (g.counts.get(*n).copied().unwrap_or(0), (*n).clone()))
            .cloned();
        if let Some(n) = &node {
            *g.counts.entry(n.clone()).or_default() += 1;
        }
        Ok(node)
    }
}

struct RefreshFlag<'a>(&'a Mutex<Cache>);

impl Drop for RefreshFlag<'_> {
    fn drop(&mut self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).refreshing = false;
    }
}

async fn count_active(
    c: &mut PgConnection,
    nodes: &[String],
) -> Result<Vec<(String, i64)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT node, count(*) FROM subscriptions WHERE status = 'active' AND node = ANY($1) \
         GROUP BY node",
    )
    .bind(nodes)
    .fetch_all(c)
    .await
}
