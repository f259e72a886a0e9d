//! The agent's semantics: the node API operations on the ledger and the core, the resync that
//! re-applies the ledger, and the probe that notices a core that is down or restarted.
//!
//! Order of every mutation: ledger first (the desired state, durable), core second. A core
//! that is down or hung leaves the ledger as desired and answers `503`; the next resync applies
//! it. A core that refuses the user (a definitive answer) rolls the ledger back, so the ledger
//! never holds a user the core will not take. Mutations and resyncs are serialized by one async
//! lock (waited for at most [`Agent::lock_wait`]), so the ledger and the core are told in the
//! same order.
//!
//! Restart detection: the agent keeps a sentinel user on the inbound (email
//! [`SENTINEL_EMAIL`], a random UUID generated at each start, never logged or shared). Each probe
//! adds it: `already exists` means the core still holds the agent's users; success means the
//! core forgot them (it restarted), so the ledger is re-applied.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use node_api::wire::MutationResult;
use tokio::sync::{Mutex, MutexGuard};
use uuid::Uuid;

use crate::core::{Core, CoreError};
use crate::ledger::{email_key, Ledger, LedgerError, PutOutcome};
use crate::metrics::Metrics;

/// Email of the agent's sentinel user on the inbound. User emails equal to it (ignoring ASCII
/// case) are refused.
pub const SENTINEL_EMAIL: &str = "vbnode.sentinel";

/// Longest email accepted, bytes.
pub const MAX_EMAIL_LEN: usize = 256;

/// Core calls in flight during a resync. V2Ray 4.34 takes about 0.4 ms per add on one
/// connection (measured sequentially); a few concurrent calls on the HTTP/2 channel overlap the
/// round trips without flooding the core.
const RESYNC_CONCURRENCY: usize = 32;

/// A failed operation, typed; [`AgentError::status`] and [`AgentError::code`] are its answer.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Malformed request (`code` says what).
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    /// `add-user`: the UUID is present with another email, or the email belongs to another UUID.
    #[error("conflict: {0}")]
    Conflict(&'static str),
    /// `update-user` of an absent UUID.
    #[error("no such user")]
    NotFound,
    /// The core refused the user (for example a UUID it cannot parse); the ledger was rolled back.
    #[error("the core rejected the user")]
    CoreRejected,
    /// The inbound tag is wrong or not a VLESS inbound: the node is misconfigured.
    #[error("the core's inbound is misconfigured")]
    CoreInbound,
    /// The core is down; the ledger keeps the desired state and the next resync applies it.
    #[error("the core is unreachable")]
    CoreUnavailable,
    /// The core did not answer within the deadline.
    #[error("the core did not answer in time")]
    CoreTimeout,
    /// Another mutation or a resync held the lock for longer than the wait allowed.
    #[error("busy (a resync is running)")]
    Busy,
    /// Any other core answer.
    #[error("unexpected core error")]
    Core,
    /// The ledger failed (disk).
    #[error("{0}")]
    Ledger(#[from] LedgerError),
}

impl AgentError {
    /// HTTP status of the answer.
    pub fn status(&self) -> u16 {
        match self {
            AgentError::BadRequest(_) | AgentError::CoreRejected => 400,
            AgentError::Conflict(_) => 409,
            AgentError::NotFound => 404,
            AgentError::CoreUnavailable | AgentError::CoreTimeout | AgentError::Busy => 503,
            AgentError::CoreInbound | AgentError::Core | AgentError::Ledger(_) => 500,
        }
    }

    /// The machine-readable `error` of the body.
    pub fn code(&self) -> &'static str {
        match self {
            AgentError::BadRequest(c) | AgentError::Conflict(c) => c,
            AgentError::NotFound => "not_found",
            AgentError::CoreRejected => "core_rejected_user",
            AgentError::CoreInbound => "core_inbound_misconfigured",
            AgentError::CoreUnavailable => "core_unavailable",
            AgentError::CoreTimeout => "core_timeout",
            AgentError::Busy => "busy",
            AgentError::Core => "core_error",
            AgentError::Ledger(_) => "ledger_failure",
        }
    }

    fn from_core(e: &CoreError) -> AgentError {
        match e {
            CoreError::Rejected(_) => AgentError::CoreRejected,
            CoreError::Inbound(_) => AgentError::CoreInbound,
            CoreError::Unavailable(_) => AgentError::CoreUnavailable,
            CoreError::Timeout(_) => AgentError::CoreTimeout,
            CoreError::AlreadyExists | CoreError::NotFound | CoreError::Other(_) => {
                AgentError::Core
            }
        }
    }
}

/// Counts of one resync.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResyncReport {
    /// Users the core did not have and now has.
    pub added: u64,
    /// Users the core already had.
    pub present: u64,
    /// Users the core refused (left in the ledger, logged, counted in the metric's `rejected`).
    pub rejected: u64,
    /// Pending removals applied.
    pub removed: u64,
}

/// The agent.
#[derive(Debug)]
pub struct Agent {
    ledger: Arc<Ledger>,
    core: Core,
    metrics: Metrics,
    lock: Mutex<()>,
    lock_wait: Duration,
    core_up: AtomicBool,
    synced: AtomicBool,
    sentinel: Uuid,
}

fn validate_email(email: &str) -> Result<(), AgentError> {
    if email.trim().is_empty() {
        // V2Ray cannot remove a user with an empty email: never add one.
        return Err(AgentError::BadRequest("empty_email"));
    }
    if email.len() > MAX_EMAIL_LEN {
        return Err(AgentError::BadRequest("email_too_long"));
    }
    if email.chars().any(char::is_control) {
        return Err(AgentError::BadRequest("email_control_characters"));
    }
    if email_key(email) == SENTINEL_EMAIL {
        return Err(AgentError::BadRequest("reserved_email"));
    }
    Ok(())
}

impl Agent {
    /// An agent over `ledger` and `core`. Call [`Agent::start`] to resync and probe.
    pub fn new(ledger: Ledger, core: Core, metrics: Metrics, lock_wait: Duration) -> Agent {
        Agent {
            ledger: Arc::new(ledger),
            core,
            metrics,
            lock: Mutex::new(()),
            lock_wait,
            core_up: AtomicBool::new(false),
            synced: AtomicBool::new(false),
            sentinel: Uuid::new_v4(),
        }
    }

    /// The longest a request waits for a running mutation or resync before answering `503 busy`.
    pub fn lock_wait(&self) -> Duration {
        self.lock_wait
    }

    /// The metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The core client.
    pub fn core(&self) -> &Core {
        &self.core
    }

    /// The ledger (blocking calls: use [`Agent::blocking`]).
    pub fn ledger(&self) -> &Arc<Ledger> {
        &self.ledger
    }

    /// Whether the last probe reached the core and the ledger has been applied to it since.
    pub fn ready(&self) -> bool {
        self.core_up.load(Ordering::Relaxed) && self.synced.load(Ordering::Relaxed)
    }

    /// Runs a ledger call on the blocking pool (a commit waits for the disk).
    ///
    /// # Errors
    /// The ledger's error.
    pub async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Ledger) -> Result<T, LedgerError> + Send + 'static,
    ) -> Result<T, LedgerError> {
        let l = self.ledger.clone();
        tokio::task::spawn_blocking(move || f(&l))
            .await
            .expect("ledger calls do not panic")
    }

    async fn lock(&self) -> Result<MutexGuard<'_, ()>, AgentError> {
        tokio::time::timeout(self.lock_wait, self.lock.lock())
            .await
            .map_err(|_| AgentError::Busy)
    }

    async fn refresh_gauge(&self) {
        if let Ok(n) = self.blocking(|l| l.len()).await {
            self.metrics.ledger_users.set(n as i64);
        }
    }

    fn note_core(&self, e: &CoreError) {
        if e.is_transient() && self.core_up.swap(false, Ordering::Relaxed) {
            self.metrics.core_up.set(0);
            tracing::warn!(error = %e.outcome(), "core unreachable; the ledger keeps the desired users");
        }
    }

    /// `add-user`.
    ///
    /// # Errors
    /// See [`AgentError`]; `409 conflict` when the UUID is present with another email,
    /// `409 email_taken` when another UUID has the email.
    pub async fn add_user(&self, id: Uuid, email: String) -> Result<MutationResult, AgentError> {
        validate_email(&email)?;
        let _g = self.lock().await?;
        let present = self.blocking(move |l| l.get(id)).await?;
        if present.as_deref().is_some_and(|p| p != email) {
            return Err(AgentError::Conflict("conflict"));
        }
        let e = email.clone();
        let outcome = self
            .blocking(move |l| l.put(id, &e, false))
            .await?
            .expect("put without only_if_present always answers");
        let result = match outcome {
            PutOutcome::EmailTaken => return Err(AgentError::Conflict("email_taken")),
            PutOutcome::Same => MutationResult::Unchanged,
            PutOutcome::Inserted | PutOutcome::Replaced { .. } => MutationResult::Created,
        };
        tracing::debug!(uuid = %id, "add-user");
        match self.core.add_user("add_user", id, &email).await {
            Ok(()) => {}
            Err(CoreError::AlreadyExists) if result == MutationResult::Unchanged => {}
            Err(CoreError::AlreadyExists) => {
                // The core has this email from before the ledger knew it (a crash before the
                // ledger write was committed, or a user from the core's config file): replace
                // it so the core holds exactly the ledger's UUID.
                if let Err(e) = self.replace_in_core(id, &email).await {
                    return Err(self.fail_add(id, &e).await);
                }
            }
            Err(e) => return Err(self.fail_add(id, &e).await),
        }
        self.refresh_gauge().await;
        Ok(result)
    }

    async fn replace_in_core(&self, id: Uuid, email: &str) -> Result<(), CoreError> {
        match self.core.remove_user("remove_user", email).await {
            Ok(()) | Err(CoreError::NotFound) => {}
            Err(e) => return Err(e),
        }
        self.core.add_user("add_user", id, email).await
    }

    /// A failed core add: a definitive refusal rolls the ledger back; a down or hung core leaves
    /// it (the resync applies it later).
    async fn fail_add(&self, id: Uuid, e: &CoreError) -> AgentError {
        self.note_core(e);
        if !e.is_transient() {
            tracing::warn!(
                outcome = e.outcome(),
                "core refused add-user; ledger entry rolled back"
            );
            tracing::debug!(uuid = %id, error = %e, "core refusal");
            if let Err(le) = self.blocking(move |l| l.remove(id, false)).await {
                return AgentError::Ledger(le);
            }
        }
        AgentError::from_core(e)
    }

    /// `update-user`: replaces the email of a present user (remove then add on the core: V2Ray's
    /// add of an existing email does not update it).
    ///
    /// # Errors
    /// See [`AgentError`]; `404` when absent, `400 email_taken` when another UUID has the email.
    pub async fn update_user(&self, id: Uuid, email: String) -> Result<MutationResult, AgentError> {
        validate_email(&email)?;
        let _g = self.lock().await?;
        let e = email.clone();
        let outcome = self.blocking(move |l| l.put(id, &e, true)).await?;
        let old = match outcome {
            None => return Err(AgentError::NotFound),
            Some(PutOutcome::EmailTaken) => return Err(AgentError::BadRequest("email_taken")),
            Some(PutOutcome::Same) => {
                return match self.core.add_user("add_user", id, &email).await {
                    Ok(()) | Err(CoreError::AlreadyExists) => Ok(MutationResult::Unchanged),
                    Err(e) => {
                        self.note_core(&e);
                        Err(AgentError::from_core(&e))
                    }
                }
            }
            Some(PutOutcome::Inserted) => unreachable!("only_if_present never inserts"),
            Some(PutOutcome::Replaced { old }) => old,
        };
        tracing::debug!(uuid = %id, "update-user");
        match self.core.remove_user("remove_user", &old).await {
            Ok(()) | Err(CoreError::NotFound) => {}
            Err(e) => {
                self.note_core(&e);
                return Err(AgentError::from_core(&e));
            }
        }
        let o = old.clone();
        self.blocking(move |l| l.clear_tombstone(&o)).await?;
        match self.core.add_user("add_user", id, &email).await {
            Ok(()) | Err(CoreError::AlreadyExists) => Ok(MutationResult::Updated),
            Err(e) if e.is_transient() => {
                self.note_core(&e);
                Err(AgentError::from_core(&e))
            }
            Err(e) => {
                // Refused: put the old email back in the ledger and in the core.
                let o = old.clone();
                let new = email.clone();
                self.blocking(move |l| {
                    l.put(id, &o, true)?;
                    l.clear_tombstone(&new)
                })
                .await?;
                let _ = self.core.add_user("add_user", id, &old).await;
                Err(AgentError::from_core(&e))
            }
        }
    }

    /// `remove-user`: `removed`, or `absent` (then pending removals are retried first).
    ///
    /// # Errors
    /// See [`AgentError`]: `503` when the core is down or hung (the removal stays pending and
    /// is applied by the next resync).
    pub async fn remove_user(&self, id: Uuid) -> Result<MutationResult, AgentError> {
        let _g = self.lock().await?;
        let old = self.blocking(move |l| l.remove(id, true)).await?;
        tracing::debug!(uuid = %id, "remove-user");
        let result = match old {
            Some(email) => {
                match self.core.remove_user("remove_user", &email).await {
                    Ok(()) | Err(CoreError::NotFound) => {}
                    Err(e) => {
                        self.note_core(&e);
                        return Err(AgentError::from_core(&e));
                    }
                }
                self.blocking(move |l| l.clear_tombstone(&email)).await?;
                MutationResult::Removed
            }
            None => {
                self.flush_tombstones()
                    .await
                    .map_err(|e| AgentError::from_core(&e))?;
                MutationResult::Absent
            }
        };
        self.refresh_gauge().await;
        Ok(result)
    }

    /// Applies pending removals; returns how many.
    async fn flush_tombstones(&self) -> Result<u64, CoreError> {
        let tombs = self.blocking(|l| l.tombstones()).await.unwrap_or_default();
        let mut n = 0;
        for email in tombs {
            match self.core.remove_user("resync_remove", &email).await {
                Ok(()) | Err(CoreError::NotFound) => {}
                Err(e) => {
                    self.note_core(&e);
                    return Err(e);
                }
            }
            if self
                .blocking(move |l| l.clear_tombstone(&email))
                .await
                .is_ok()
            {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Re-applies the whole ledger to the core (pending removals, every user, the sentinel),
    /// then counts it in `vpnbot_node_core_resyncs_total` and logs the counts.
    ///
    /// # Errors
    /// The core went down or hung during the resync (it is retried by the probe).
    pub async fn resync(&self, reason: &'static str) -> Result<ResyncReport, CoreError> {
        let _g = self.lock.lock().await;
        self.resync_locked(reason).await
    }

    async fn resync_locked(&self, reason: &'static str) -> Result<ResyncReport, CoreError> {
        let start = Instant::now();
        // The sentinel first, with this process's UUID (a previous agent left its own): should
        // the core restart while the users are being added, the sentinel is gone too and the
        // next probe resyncs again.
        match self.core.remove_user("resync_remove", SENTINEL_EMAIL).await {
            Ok(()) | Err(CoreError::NotFound) => {}
            Err(e) => {
                self.note_core(&e);
                self.synced.store(false, Ordering::Relaxed);
                return Err(e);
            }
        }
        match self
            .core
            .add_user("probe", self.sentinel, SENTINEL_EMAIL)
            .await
        {
            Ok(()) | Err(CoreError::AlreadyExists) => {}
            Err(e) => {
                self.note_core(&e);
                self.synced.store(false, Ordering::Relaxed);
                return Err(e);
            }
        }
        let mut report = ResyncReport {
            removed: self.flush_tombstones().await?,
            ..Default::default()
        };
        let users = self
            .blocking(|l| l.all())
            .await
            .map_err(|e| CoreError::Other(e.to_string()))?;
        let total = users.len();
        // A core that can list (Xray): add only what it lacks (a restarted core lacks all).
        let users = match self.core.list_users().await {
            None => users,
            Some(Err(e)) => {
                self.note_core(&e);
                self.synced.store(false, Ordering::Relaxed);
                return Err(e);
            }
            Some(Ok(on_core)) => {
                let have: std::collections::HashMap<String, String> = on_core
                    .into_iter()
                    .map(|u| (email_key(&u.email), u.id))
                    .collect();
                let mut missing = Vec::new();
                for (id, email) in users {
                    match have.get(&email_key(&email)) {
                        Some(core_id) if core_id.eq_ignore_ascii_case(&id.to_string()) => {
                            report.present += 1
                        }
                        Some(_) => {
                            // Same email, another id: replace it with the ledger's.
                            match self.core.remove_user("resync_remove", &email).await {
                                Ok(()) | Err(CoreError::NotFound) => missing.push((id, email)),
                                Err(e) => return Err(e),
                            }
                        }
                        None => missing.push((id, email)),
                    }
                }
                missing
            }
        };
        let mut results = futures_util::stream::iter(users)
            .map(|(id, email)| async move { self.core.add_user("resync_add", id, &email).await })
            .buffer_unordered(RESYNC_CONCURRENCY);
        while let Some(r) = results.next().await {
            match r {
                Ok(()) => report.added += 1,
                Err(CoreError::AlreadyExists) => report.present += 1,
                Err(e) if e.is_transient() => {
                    self.note_core(&e);
                    self.synced.store(false, Ordering::Relaxed);
                    return Err(e);
                }
                Err(e @ CoreError::Inbound(_)) => {
                    self.synced.store(false, Ordering::Relaxed);
                    tracing::error!(error = %e, "resync: the core's inbound is misconfigured");
                    return Err(e);
                }
                Err(_) => report.rejected += 1,
            }
        }
        drop(results);
        let took = start.elapsed();
        self.metrics.resyncs.inc();
        self.metrics.resync_duration.observe(took.as_secs_f64());
        self.metrics.ledger_users.set(total as i64);
        self.core_up.store(true, Ordering::Relaxed);
        self.metrics.core_up.set(1);
        self.synced.store(true, Ordering::Relaxed);
        tracing::info!(
            reason,
            users = total,
            added = report.added,
            already_present = report.present,
            rejected = report.rejected,
            removals_applied = report.removed,
            took_ms = took.as_millis() as u64,
            "core resync: ledger applied to the core"
        );
        Ok(report)
    }

    /// One probe of the core (see the module doc); resyncs when the core forgot the agent's
    /// users or the last resync did not complete. Returns whether the core is up.
    pub async fn probe(&self) -> bool {
        let r = self
            .core
            .add_user("probe", self.sentinel, SENTINEL_EMAIL)
            .await;
        let need = match r {
            Ok(()) => {
                if self.synced.load(Ordering::Relaxed) {
                    tracing::warn!("core forgot the agent's users (it restarted); resyncing");
                }
                Some("core_restarted")
            }
            Err(CoreError::AlreadyExists) => {
                (!self.synced.load(Ordering::Relaxed)).then_some("core_back")
            }
            Err(e) => {
                self.note_core(&e);
                if !e.is_transient() {
                    tracing::error!(
                        outcome = e.outcome(),
                        "core probe failed (details at debug)"
                    );
                    tracing::debug!(error = %e, "core probe failure");
                    self.core_up.store(false, Ordering::Relaxed);
                    self.metrics.core_up.set(0);
                }
                return false;
            }
        };
        if !self.core_up.swap(true, Ordering::Relaxed) {
            self.metrics.core_up.set(1);
            tracing::info!("core reachable");
        }
        if let Some(reason) = need {
            self.synced.store(false, Ordering::Relaxed);
            if let Err(e) = self.resync(reason).await {
                tracing::warn!(
                    outcome = e.outcome(),
                    "resync failed; retried at the next probe"
                );
                return false;
            }
        }
        true
    }

    /// Resyncs at start (errors are retried by the probe loop), then probes every `interval`
    /// until the task is dropped.
    pub async fn run_probe_loop(self: Arc<Self>, interval: Duration) {
        if let Err(e) = self.resync("start").await {
            tracing::warn!(
                outcome = e.outcome(),
                "core not reachable at start; the ledger is applied when it is"
            );
        }
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            self.probe().await;
        }
    }
}
