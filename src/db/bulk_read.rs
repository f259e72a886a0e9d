//! Reading many rows without paying for tracing once per row.
//!
//! sqlx builds its row streams with its `try_stream!` macro, which wraps each stream in
//! `tracing::Instrument::in_current_span`: the span current when the stream is created is
//! entered and exited every time the stream is polled, and the stream is polled once per row,
//! at every layer of nesting (three for `fetch_all` on PostgreSQL: `query`, `fetch_many`,
//! `run`). Each enter and exit goes through the registry and every layer of the subscriber
//! `vpnbot run` installs. For the reconcile snapshot (a million rows per pass) that made
//! span bookkeeping about a fifth of the runtime workers' CPU time (perf, `bench_bot`,
//! issue 16).
//!
//! [`BulkRead`] polls a statement's future with a thread-default dispatcher that is the
//! process's own in every respect but one: it reports no current span. The span sqlx captures
//! is therefore disabled, and entering it costs a branch. Everything else is forwarded, so
//! sqlx's own events (its slow-statement warning) still reach the log with the caller's span
//! as their parent, and callsite interest is the process dispatcher's: a callsite first
//! reached inside is cached as that dispatcher decides, not as "never" (which a `Dispatch::none()`
//! default would make it, for the whole process; see the test in `tests/it/telemetry_cost.rs`).
//! The caller's own span stays entered around it (its `.instrument(..)` is outside), so dumps
//! and traces still show the phase.

use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};

use tracing::level_filters::LevelFilter;
use tracing::subscriber::{Interest, Subscriber};
use tracing::{span, Dispatch, Event, Metadata};

/// A statement future polled with no current span; see the module docs. Use it for statements
/// whose row count grows with the user base.
#[derive(Debug)]
#[must_use = "futures do nothing unless polled"]
pub struct BulkRead<F> {
    inner: Pin<Box<F>>,
}

impl<F: Future> BulkRead<F> {
    /// Wraps `statement` (e.g. `query.fetch_all(&mut *conn)`).
    pub fn new(statement: F) -> Self {
        Self {
            inner: Box::pin(statement),
        }
    }
}

impl<F: Future> Future for BulkRead<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let dispatch = no_current_span();
        let inner = self.inner.as_mut();
        tracing::dispatcher::with_default(dispatch, || inner.poll(cx))
    }
}

/// The forwarding dispatcher, built once from the default dispatcher of the first poll
/// (`vpnbot run` installs its subscriber before anything reads the database).
fn no_current_span() -> &'static Dispatch {
    static DISPATCH: OnceLock<Dispatch> = OnceLock::new();
    DISPATCH.get_or_init(|| {
        let inner = tracing::dispatcher::get_default(Dispatch::clone);
        // Registering a dispatcher recomputes the process's max level from every
        // registered one: report the current one so it does not change.
        let max_level = LevelFilter::current();
        Dispatch::new(NoCurrentSpan { inner, max_level })
    })
}

/// `inner` in every respect except [`Subscriber::current_span`], which is none.
struct NoCurrentSpan {
    inner: Dispatch,
    max_level: LevelFilter,
}

impl Subscriber for NoCurrentSpan {
    fn register_callsite(&self, metadata: &'static Metadata<'static>) -> Interest {
        self.inner.register_callsite(metadata)
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(self.max_level)
    }

    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        self.inner.enabled(metadata)
    }

    fn new_span(&self, span: &span::Attributes<'_>) -> span::Id {
        self.inner.new_span(span)
    }

    fn record(&self, span: &span::Id, values: &span::Record<'_>) {
        self.inner.record(span, values)
    }

    fn record_follows_from(&self, span: &span::Id, follows: &span::Id) {
        self.inner.record_follows_from(span, follows)
    }

    fn event(&self, event: &Event<'_>) {
        self.inner.event(event)
    }

    fn enter(&self, span: &span::Id) {
        self.inner.enter(span)
    }

    fn exit(&self, span: &span::Id) {
        self.inner.exit(span)
    }

    fn clone_span(&self, id: &span::Id) -> span::Id {
        self.inner.clone_span(id)
    }

    fn try_close(&self, id: span::Id) -> bool {
        self.inner.try_close(id)
    }

    fn current_span(&self) -> tracing_core::span::Current {
        tracing_core::span::Current::none()
    }
}
