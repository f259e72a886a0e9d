//! Which node a new subscription goes to. `least_loaded` needs active subscriptions per node;
//! counting them is a scan of every active subscription (about 0.2 s of database CPU at a
//! million, more beside a reconcile pass), which per trial or purchase made a burst of 250
//! trials during a reconcile pass take 47 s in the bot benchmark. So the counts are loaded
//! once (at bot start, or by the first pick), kept current by counting this process's own
//! assignments, and reloaded in the background every [`NODE_LOAD_REFRESH`] so other writers
//! (expiry, other instances, operators) are caught up. No handler waits for a reload.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::PgConnection;

use crate::db::{DbError, DbPool};
use crate::tasks::Tasks;

/// How long per-node counts are used before a background reload.
pub const NODE_LOAD_REFRESH: Duration = Duration::from_secs(30);

/// Picks nodes by `bot.node_policy` over the configured node names. Shared by all handlers.
#[derive(Debug)]
pub struct NodePicker {
    nodes: Vec<String>,
    least_loaded: bool,
    pool: DbPool,
    refresh: Duration,
    cache: Arc<Mutex<Cache>>,
    /// Serialises the first load so concurrent first picks run one count, not one each.
    first_load: tokio::sync::Mutex<()>,
    /// Background reloads run as tracked tasks (`node_load_reload`): shutdown waits for them.
    tasks: Tasks,
}

/// Bound on one background reload of the node load (one pooled acquire and one count query,
/// each bounded by its own timeout; this is the backstop).
pub const RELOAD_BOUND: Duration = Duration::from_secs(30);

#[derive(Debug, Default)]
struct Cache {
    counts: HashMap<String, i64>,
    loaded: Option<Instant>,
    reloading: bool,
}

impl NodePicker {
    /// A picker over `nodes` (configured names; ties go to the first) with `policy`
    /// `least_loaded` or `first` (validated by the config); background reloads use `pool` and
    /// run as tasks of `tasks` (bounded by [`RELOAD_BOUND`], cancelled with its root token).
    pub fn new(nodes: Vec<String>, policy: &str, pool: DbPool, tasks: &Tasks) -> NodePicker {
        NodePicker {
            nodes,
            least_loaded: policy == "least_loaded",
            pool,
            refresh: NODE_LOAD_REFRESH,
            cache: Arc::default(),
            first_load: tokio::sync::Mutex::new(()),
            tasks: tasks.clone(),
        }
    }

    /// Replaces the reload period (tests).
    pub fn with_refresh(mut self, refresh: Duration) -> Self {
        self.refresh = refresh;
        self
    }

    /// True when `node` is a configured node.
    pub fn has(&self, node: &str) -> bool {
        self.nodes.iter().any(|n| n == node)
    }

    /// Loads the counts now (bot start), so that no user's first purchase pays for the scan.
    ///
    /// # Errors
    /// The pool's or the count query's error.
    pub async fn warm(&self) -> Result<(), DbError> {
        if !self.least_loaded || self.nodes.is_empty() {
            return Ok(());
        }
        reload(&self.pool, &self.nodes, &self.cache).await
    }

    /// The node for one new subscription, `None` when no node is configured. Counts on `c`
    /// (the caller's transaction) only when nothing is loaded yet; stale counts are used while
    /// a background reload runs.
    ///
    /// # Errors
    /// The first count query's error.
    pub async fn pick(&self, c: &mut PgConnection) -> Result<Option<String>, sqlx::Error> {
        if self.nodes.is_empty() {
            return Ok(None);
        }
        if !self.least_loaded {
            return Ok(self.nodes.first().cloned());
        }
        if self.lock().loaded.is_none() {
            let _one = self.first_load.lock().await;
            if self.lock().loaded.is_none() {
                let counts = count_active(c, &self.nodes).await?;
                store(&self.cache, counts);
            }
        }
        let mut g = self.lock();
        if g.loaded.is_some_and(|t| t.elapsed() >= self.refresh) && !g.reloading {
            g.reloading = true;
            let (pool, nodes, cache) = (self.pool.clone(), self.nodes.clone(), self.cache.clone());
            let root = self.tasks.root().clone();
            self.tasks.spawn_named("node_load_reload", async move {
                tokio::select! {
                    _ = root.cancelled() => {}
                    r = tokio::time::timeout(RELOAD_BOUND, reload(&pool, &nodes, &cache)) => match r {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => {
                            tracing::warn!(error = %e, "node load reload failed; using older counts")
                        }
                        Err(_) => tracing::warn!(
                            bound_s = RELOAD_BOUND.as_secs_f64(),
                            "node load reload did not finish within its bound; using older counts"
                        ),
                    },
                }
                cache.lock().unwrap_or_else(|e| e.into_inner()).reloading = false;
            });
        }
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

    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }
}

async fn reload(pool: &DbPool, nodes: &[String], cache: &Mutex<Cache>) -> Result<(), DbError> {
    let mut c = pool.acquire("bot_node_load").await?;
    let r = count_active(&mut c, nodes).await;
    store(cache, c.check(r)?);
    Ok(())
}

fn store(cache: &Mutex<Cache>, counts: Vec<(String, i64)>) {
    let mut g = cache.lock().unwrap_or_else(|e| e.into_inner());
    g.counts = counts.into_iter().collect();
    g.loaded = Some(Instant::now());
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
