//! `/debug/dump?now=1` without a way to stall the process: the dump is built on a thread of its
//! own (never on the observability server's runtime, which keeps answering `/metrics` and
//! `/healthz`), one at a time (concurrent requests share the dump being built), and at most one
//! per [`MIN_INTERVAL`] (a request inside it gets the last dump, marked by its age).
//!
//! Stack capture inside the dump is bounded separately
//! ([`crate::diagnostics::stack::capture_bounded`]).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::{BoxFuture, FutureExt, Shared};

use super::health::DiagnosticsView;

/// Shortest time between two on-demand dumps; requests inside it get the cached one.
pub const MIN_INTERVAL: Duration = Duration::from_secs(2);

type Building = Shared<BoxFuture<'static, Result<Arc<str>, DumpError>>>;

/// Why an on-demand dump could not be built (cloneable: concurrent requests share it).
#[derive(Debug, Clone, thiserror::Error)]
pub enum DumpError {
    /// The `vpnbot-dump` thread could not be started.
    #[error("cannot start the dump thread: {0}")]
    ThreadStart(Arc<std::io::Error>),
    /// The dump thread ended without a dump (it panicked).
    #[error("dump thread died")]
    ThreadDied,
}

#[derive(Default)]
struct State {
    last: Option<(Instant, Arc<str>)>,
    building: Option<Building>,
    builds: u64,
}

/// Single-flight, rate-limited on-demand dumps (one per process, in
/// [`super::health::HealthState`]).
#[derive(Default, Clone)]
pub struct OnDemandDumps {
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for OnDemandDumps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnDemandDumps")
            .field("builds", &self.builds())
            .finish()
    }
}

impl OnDemandDumps {
    /// Dumps built so far (requests served from the cache or joined to a build in flight are
    /// not counted).
    pub fn builds(&self) -> u64 {
        self.lock().builds
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The dump as JSON: the cached one when younger than `min_interval`, else the one being
    /// built, else a new one built on a new thread named `vpnbot-dump`. Dropping the returned
    /// future (client gone) does not cancel the build: the next request gets its result.
    ///
    /// # Errors
    /// [`DumpError`]: the dump thread could not start or died.
    pub async fn get(
        &self,
        view: Arc<dyn DiagnosticsView>,
        min_interval: Duration,
    ) -> Result<Arc<str>, DumpError> {
        let fut = {
            let mut st = self.lock();
            if let Some((at, body)) = &st.last {
                if at.elapsed() < min_interval {
                    return Ok(body.clone());
                }
            }
            match &st.building {
                Some(b) => b.clone(),
                None => {
                    let b = self.start(view);
                    st.building = Some(b.clone());
                    st.builds += 1;
                    b
                }
            }
        };
        fut.await
    }

    fn start(&self, view: Arc<dyn DiagnosticsView>) -> Building {
        let (tx, rx) = tokio::sync::oneshot::channel::<Arc<str>>();
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("vpnbot-dump".into())
            .spawn(move || {
                let body: Arc<str> = view.dump_now_json().into();
                {
                    let mut st = me.lock();
                    st.last = Some((Instant::now(), body.clone()));
                    st.building = None;
                }
                let _ = tx.send(body);
            });
        let me = self.clone();
        let fut: BoxFuture<'static, Result<Arc<str>, DumpError>> = match spawned {
            Ok(_) => async move {
                let r = rx.await.map_err(|_| DumpError::ThreadDied);
                if r.is_err() {
                    me.lock().building = None;
                }
                r
            }
            .boxed(),
            Err(e) => {
                let err = DumpError::ThreadStart(Arc::new(e));
                async move {
                    me.lock().building = None;
                    Err(err)
                }
                .boxed()
            }
        };
        fut.shared()
    }
}
