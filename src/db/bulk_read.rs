//! Reading many rows without paying for tracing once per row.
//!
//! sqlx builds its row streams with its `try_stream!` macro, which wraps each stream in
//! `tracing::Instrument::in_current_span`: the span current when the stream is created is
//! entered and exited every time the stream is polled, and the stream is polled once per row,
//! at every layer of nesting (three for `fetch_all` on PostgreSQL: `query`, `fetch_many`,
//! `run`). Each enter and exit goes through the registry and every layer of the subscriber
//! `vpnbot run` installs. For the reconcile snapshot (a million rows per pass) that made
//! span bookkeeping about a fifth of the runtime workers' CPU time (perf, `bench_bot`,
//! issue 16), and the workers were then waiting for a core two thirds of the time.
//!
//! [`BulkRead`] polls a statement's future with no subscriber as the thread's default, so
//! the span sqlx captures is disabled and entering it costs a branch. The caller's own span
//! stays entered around it (its `.instrument(..)` is outside), so dumps and traces still show
//! the phase. What is given up: sqlx's own events for that statement (its debug-level
//! statement log and its slow-statement warning); the statement's time is still measured by
//! the pool's hold-time histogram under the connection's label.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// A statement future polled with no tracing subscriber as the default; see the module docs.
/// Use it for statements whose row count grows with the user base.
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
        let inner = self.inner.as_mut();
        tracing::dispatcher::with_default(&tracing::Dispatch::none(), || inner.poll(cx))
    }
}
