//! A `tracing` layer that keeps a registry of open spans of interest with their fields, age,
//! optional deadline and the OS thread they are entered on, readable from the watchdog thread.
//!
//! Recognised fields: `task.name` (inherited by child spans), `node`, `phase`, `label`, and
//! `deadline_seconds` (a number: the span's own budget; makes it eligible for
//! `operation_overdue`). Every other field is kept as text in the entry's detail.
//!
//! Cost: install it with [`OpenSpansLayer::filtered`] (as `Instruments::install` does). Its
//! per-layer filter is interested only in spans at `info` or above whose target is tracked, so
//! the callsites of dependencies' spans and every event are never enabled because of this
//! layer, and its level hint (`info`) does not raise the process-wide maximum level. Open spans
//! live in [`SHARDS`] cache-padded shards keyed by span id, so opening and closing spans on
//! different workers does not contend on one lock.

use std::cell::Cell;
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::subscriber::Interest;
use tracing::{Metadata, Subscriber};
use tracing_subscriber::filter::{Filtered, LevelFilter};
use tracing_subscriber::layer::{Context, Filter};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

use super::inflight::{InflightEntry, InflightKind, InflightSource};
use super::poll_tracking::current_tid;

/// Most open spans kept; further spans are counted as dropped.
pub const MAX_OPEN_SPANS: usize = 10_000;
/// Shards of the open-span registry (a power of two).
pub const SHARDS: usize = 64;
/// The most verbose level of span tracked (the service's spans are `info`).
pub const TRACKED_LEVEL: LevelFilter = LevelFilter::INFO;
const MAX_FIELDS: usize = 16;
const MAX_VALUE_LEN: usize = 128;

thread_local! {
    static TID: Cell<u32> = const { Cell::new(0) };
    /// The tracked spans entered on this thread, innermost last: a span created outside its
    /// task (`spawn_named("x", fut.instrument(span))`) learns its task on enter from the
    /// innermost one. Each entry is the span's own record (its `Arc` is touched by that span's
    /// task only), so entering costs no lock and no shared reference count.
    static ENTERED: std::cell::RefCell<Vec<Arc<SpanRec>>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn tid() -> u32 {
    TID.with(|t| {
        let v = t.get();
        if v != 0 {
            return v;
        }
        let v = current_tid();
        t.set(v);
        v
    })
}

#[derive(Debug, Default)]
struct Fields {
    task: Option<Arc<str>>,
    node: Option<String>,
    phase: Option<String>,
    label: Option<String>,
    deadline: Option<Duration>,
    /// Every other field as ` name=value` pairs in one string (one allocation per span, not
    /// one per field); a field recorded again is appended again.
    other: String,
    others: usize,
}

impl Fields {
    fn set(&mut self, name: &'static str, value: fmt::Arguments<'_>) {
        use std::fmt::Write;
        let slot = match name {
            "task.name" => {
                self.task = Some(bounded(value.to_string()).into());
                return;
            }
            "node" => &mut self.node,
            "phase" => &mut self.phase,
            "label" => &mut self.label,
            _ => {
                if self.others >= MAX_FIELDS {
                    return;
                }
                self.others += 1;
                if self.other.capacity() == 0 {
                    self.other.reserve(96);
                }
                self.other.push(' ');
                self.other.push_str(name);
                self.other.push('=');
                let from = self.other.len();
                let _ = self.other.write_fmt(value);
                if self.other.len() - from > MAX_VALUE_LEN {
                    let mut cut = from + MAX_VALUE_LEN;
                    while !self.other.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    self.other.truncate(cut);
                }
                return;
            }
        };
        *slot = Some(bounded(value.to_string()));
    }
}

/// `value` cut to [`MAX_VALUE_LEN`] bytes at a character boundary.
fn bounded(mut value: String) -> String {
    if value.len() > MAX_VALUE_LEN {
        let mut cut = MAX_VALUE_LEN;
        while !value.is_char_boundary(cut) {
            cut -= 1;
        }
        value.truncate(cut);
    }
    value
}

impl Visit for Fields {
    fn record_f64(&mut self, field: &Field, value: f64) {
        if field.name() == "deadline_seconds" {
            if value.is_finite() && value >= 0.0 {
                self.deadline = Some(Duration::from_secs_f64(value));
            }
            return;
        }
        self.set(field.name(), format_args!("{value}"));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        if field.name() == "deadline_seconds" {
            self.deadline = Some(Duration::from_secs(value));
            return;
        }
        self.set(field.name(), format_args!("{value}"));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        if field.name() == "deadline_seconds" {
            self.deadline = Some(Duration::from_secs(value.max(0) as u64));
            return;
        }
        self.set(field.name(), format_args!("{value}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.set(field.name(), format_args!("{value}"));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.set(field.name(), format_args!("{value:?}"));
    }
}

#[derive(Debug)]
struct SpanRec {
    name: &'static str,
    target: &'static str,
    opened: Instant,
    /// The task the span runs in, once known: its own `task.name`, else its parent's task
    /// (at creation), else the task of the tracked span it is first entered inside.
    task: OnceLock<Arc<str>>,
    fields: Mutex<Fields>,
    entered_on: AtomicU32,
}

/// One shard, on its own cache line so neighbouring shards' locks do not false-share.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Shard(Mutex<HashMap<u64, Arc<SpanRec>>>);

#[derive(Debug)]
struct Registry {
    shards: Box<[Shard]>,
    len: AtomicUsize,
    dropped: AtomicU64,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
            len: AtomicUsize::new(0),
            dropped: AtomicU64::new(0),
        }
    }
}

impl Registry {
    fn shard(&self, id: u64) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<SpanRec>>> {
        // Fibonacci hashing: the registry's span ids are slab indices, close together.
        let i = (id.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 58) as usize % SHARDS;
        self.shards[i].0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn insert(&self, id: u64, rec: Arc<SpanRec>) -> bool {
        if self.len.fetch_add(1, Ordering::Relaxed) >= MAX_OPEN_SPANS {
            self.len.fetch_sub(1, Ordering::Relaxed);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        self.shard(id).insert(id, rec);
        true
    }

    fn remove(&self, id: u64) {
        if self.shard(id).remove(&id).is_some() {
            self.len.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn all(&self) -> Vec<Arc<SpanRec>> {
        let mut out = Vec::with_capacity(self.len.load(Ordering::Relaxed));
        for s in self.shards.iter() {
            out.extend(
                s.0.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .values()
                    .cloned(),
            );
        }
        out
    }
}

/// Read side of the layer: the open spans, as an [`InflightSource`] (section `spans`).
#[derive(Debug, Clone, Default)]
pub struct OpenSpans {
    inner: Arc<Registry>,
}

impl OpenSpans {
    /// Number of spans not tracked because [`MAX_OPEN_SPANS`] were open.
    pub fn dropped(&self) -> u64 {
        self.inner.dropped.load(Ordering::Relaxed)
    }

    /// Number of open spans tracked now.
    pub fn len(&self) -> usize {
        self.inner.len.load(Ordering::Relaxed)
    }

    /// True when no span is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl InflightSource for OpenSpans {
    fn section(&self) -> &'static str {
        "spans"
    }

    fn entries(&self) -> Vec<InflightEntry> {
        let recs = self.inner.all();
        let mut out: Vec<InflightEntry> = recs
            .iter()
            .map(|r| {
                let f = r.fields.lock().unwrap_or_else(|e| e.into_inner());
                let mut e = InflightEntry::started_at(InflightKind::Span, r.opened);
                e.task = f
                    .task
                    .as_deref()
                    .or(r.task.get().map(|t| &**t))
                    .map(str::to_owned);
                e.node = f.node.clone();
                e.operation = Some(r.name.to_owned());
                e.phase = f.phase.clone();
                e.label = f.label.clone();
                e.deadline = f.deadline;
                let t = r.entered_on.load(Ordering::Relaxed);
                e.thread = (t != 0).then_some(t);
                e.detail = format!("target={}{}", r.target, f.other);
                e.bounded()
            })
            .collect();
        out.sort_by_key(|e| std::cmp::Reverse(e.age));
        out
    }
}

/// The layer; add it to the subscriber in telemetry init and give [`OpenSpansLayer::spans`] to
/// [`super::Diagnostics::add_source`].
///
/// Tracks spans whose target starts with one of the configured prefixes: this crate's own
/// (the `task` span of [`crate::tasks::Tasks::spawn_named`]) plus those added with
/// [`OpenSpansLayer::track_target`] (the embedding service's crate name).
#[derive(Debug, Clone)]
pub struct OpenSpansLayer {
    spans: OpenSpans,
    prefixes: Vec<&'static str>,
}

impl Default for OpenSpansLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl OpenSpansLayer {
    /// A layer tracking this crate's own spans; add the service's targets with
    /// [`OpenSpansLayer::track_target`].
    pub fn new() -> Self {
        Self {
            spans: OpenSpans::default(),
            prefixes: vec![env!("CARGO_CRATE_NAME")],
        }
    }

    /// Also tracks spans whose target starts with `prefix`.
    pub fn track_target(mut self, prefix: &'static str) -> Self {
        self.prefixes.push(prefix);
        self
    }

    /// The read side (clone it into the diagnostics).
    pub fn spans(&self) -> OpenSpans {
        self.spans.clone()
    }

    fn interesting(&self, target: &str) -> bool {
        interesting(&self.prefixes, target)
    }

    /// The filter this layer should be installed with: see [`SpanTargets`].
    pub fn filter(&self) -> SpanTargets {
        SpanTargets {
            prefixes: self.prefixes.clone(),
        }
    }

    /// This layer behind its own per-layer filter ([`OpenSpansLayer::filter`]): the way to
    /// install it in production, so that it enables nothing a dependency would emit.
    pub fn filtered<S>(self) -> Filtered<Self, SpanTargets, S>
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        let f = self.filter();
        self.with_filter(f)
    }
}

fn interesting(prefixes: &[&'static str], target: &str) -> bool {
    prefixes.iter().any(|p| {
        target.starts_with(p) && (target.len() == p.len() || target[p.len()..].starts_with("::"))
    })
}

/// Per-layer filter of [`OpenSpansLayer`]: spans (never events) at [`TRACKED_LEVEL`] or above
/// whose target is a tracked prefix (e.g. `vpnbot`, `vpnbot::...`). Decided once per callsite
/// (`Interest::always`/`never`), with `info` as level hint, so it adds no per-event check and
/// does not make any dependency's `trace`/`debug` callsite enabled.
#[derive(Debug, Clone)]
pub struct SpanTargets {
    prefixes: Vec<&'static str>,
}

impl SpanTargets {
    fn wants(&self, meta: &Metadata<'_>) -> bool {
        meta.is_span()
            && *meta.level() <= TRACKED_LEVEL
            && interesting(&self.prefixes, meta.target())
    }
}

impl<S> Filter<S> for SpanTargets {
    fn enabled(&self, meta: &Metadata<'_>, _cx: &Context<'_, S>) -> bool {
        self.wants(meta)
    }

    fn callsite_enabled(&self, meta: &'static Metadata<'static>) -> Interest {
        if self.wants(meta) {
            Interest::always()
        } else {
            Interest::never()
        }
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(TRACKED_LEVEL)
    }
}

impl<S> Layer<S> for OpenSpansLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let meta = attrs.metadata();
        if !self.interesting(meta.target()) {
            return;
        }
        let Some(span) = ctx.span(id) else { return };
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        let task = OnceLock::new();
        let own = fields.task.clone().or_else(|| {
            span.scope().skip(1).find_map(|p| {
                p.extensions()
                    .get::<Arc<SpanRec>>()
                    .and_then(|r| r.task.get().cloned())
            })
        });
        if let Some(t) = own {
            let _ = task.set(t);
        }
        let rec = Arc::new(SpanRec {
            name: meta.name(),
            target: meta.target(),
            opened: Instant::now(),
            task,
            fields: Mutex::new(fields),
            entered_on: AtomicU32::new(0),
        });
        if self.spans.inner.insert(id.into_u64(), rec.clone()) {
            span.extensions_mut().insert(rec);
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            if let Some(r) = span.extensions().get::<Arc<SpanRec>>() {
                let mut f = r.fields.lock().unwrap_or_else(|e| e.into_inner());
                values.record(&mut *f);
                if let Some(t) = &f.task {
                    let _ = r.task.set(t.clone());
                }
            }
        }
    }

    fn on_enter(&self, id: &Id, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            if let Some(r) = span.extensions().get::<Arc<SpanRec>>() {
                r.entered_on.store(tid(), Ordering::Relaxed);
                ENTERED.with(|stack| {
                    let mut stack = stack.borrow_mut();
                    if r.task.get().is_none() {
                        if let Some(t) = stack.last().and_then(|outer| outer.task.get()) {
                            let _ = r.task.set(t.clone());
                        }
                    }
                    stack.push(r.clone());
                });
            }
        }
    }

    fn on_exit(&self, id: &Id, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            if let Some(r) = span.extensions().get::<Arc<SpanRec>>() {
                r.entered_on.store(0, Ordering::Relaxed);
                ENTERED.with(|stack| {
                    stack.borrow_mut().pop();
                });
            }
        }
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        // Only spans that made it into the registry carry a record: skip the shard otherwise.
        let tracked = ctx
            .span(&id)
            .is_some_and(|s| s.extensions().get::<Arc<SpanRec>>().is_some());
        if tracked {
            self.spans.inner.remove(id.into_u64());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    #[test]
    fn a_span_learns_its_task_on_enter_and_keeps_its_fields_until_it_closes() {
        let layer = OpenSpansLayer::new();
        let spans = layer.spans();
        let subscriber = tracing_subscriber::registry().with(layer.filtered());
        tracing::subscriber::with_default(subscriber, || {
            let task = tracing::info_span!("task", task.name = "worker");
            // Created outside the task span, as `spawn_named("x", fut.instrument(span))` does.
            let op = tracing::info_span!(
                parent: None,
                "op",
                node = "n1",
                label = "l1",
                rows = 5u64,
                status = tracing::field::Empty
            );
            let child = op.in_scope(|| tracing::info_span!("child"));
            let ignored = tracing::debug_span!("verbose");
            {
                let _t = task.enter();
                let _o = op.enter();
            }
            op.record("status", "done");
            let entries = spans.entries();
            let e = entries
                .iter()
                .find(|e| e.operation.as_deref() == Some("op"))
                .expect("op tracked");
            assert_eq!(e.task.as_deref(), Some("worker"));
            assert_eq!(e.node.as_deref(), Some("n1"));
            assert_eq!(e.label.as_deref(), Some("l1"));
            assert!(e.detail.ends_with(" rows=5 status=done"), "{}", e.detail);
            // The child was created before the parent learned its task: it has none.
            let c = entries
                .iter()
                .find(|e| e.operation.as_deref() == Some("child"))
                .expect("child tracked");
            assert_eq!(c.task, None);
            assert!(!entries
                .iter()
                .any(|e| e.operation.as_deref() == Some("verbose")));
            assert_eq!(spans.len(), 3);
            drop((op, child, ignored, task));
            assert!(spans.is_empty());
        });
    }
}
