//! Where the database time of the last seconds went: statements (a slow server or network) or
//! waits for a pool connection (a pool too small for the load, or connections held too long).
//!
//! The database monitor takes a [`DbTotals`] (cumulative statement and acquire-wait histograms,
//! summed over labels) on every tick, together with its own ping's round trip, and compares the
//! newest with the one [`WINDOW`] older ([`DbTimeWindow::between`]). [`assess`] is a pure
//! function from that window to at most one finding, shown in every dump (section `db_time`),
//! appended to a healthy dump's verdict, and used as the cause of `service_starved` when the
//! database is slow. The two findings read differently on purpose:
//! - `slow_database`: "database time dominates: statements p50 310 ms, round trip 302 ms, 4 of
//!   15 connections in statements (5 held) ...";
//! - `pool_waits`: "pool waits dominate: acquires wait 850 ms on average while statements take
//!   p50 2 ms (round trip 1 ms) ...".

use std::time::{Duration, Instant};

use prometheus::core::Collector;
use prometheus::HistogramVec;

/// Length of the window the findings describe.
pub const WINDOW: Duration = Duration::from_secs(10);

/// Mean statement time from which the database counts as slow, seconds: the threshold of the
/// alert `VpnbotDbSlow` (statements averaging over 100 ms).
pub const SLOW_MEAN_SECONDS: f64 = 0.1;

/// Mean acquire wait from which pool waits count as dominant, seconds.
pub const POOL_WAIT_MEAN_SECONDS: f64 = 0.1;

/// Fewer statements (or acquires) than this in the window is too little to judge.
pub const MIN_SAMPLES: u64 = 5;

/// Cumulative statement and acquire-wait totals at one moment (all labels summed).
#[derive(Debug, Clone)]
pub struct DbTotals {
    /// When they were read.
    pub at: Instant,
    /// Statements observed so far.
    pub statements: u64,
    /// Their total duration, seconds.
    pub statement_seconds: f64,
    /// Cumulative bucket counts `(upper bound seconds, count)` of the statement histogram.
    pub statement_buckets: Vec<(f64, u64)>,
    /// Statement seconds by call-site label.
    pub by_label: Vec<(String, f64)>,
    /// Acquires observed so far (successful or not).
    pub acquires: u64,
    /// Their total wait, seconds.
    pub acquire_seconds: f64,
    /// Round trip of the monitor's ping at that tick, seconds.
    pub roundtrip_seconds: Option<f64>,
}

impl DbTotals {
    /// Reads the histograms now.
    pub(crate) fn read(
        statement: &HistogramVec,
        acquire: &HistogramVec,
        roundtrip: Option<f64>,
    ) -> Self {
        let mut t = DbTotals {
            at: Instant::now(),
            statements: 0,
            statement_seconds: 0.0,
            statement_buckets: Vec::new(),
            by_label: Vec::new(),
            acquires: 0,
            acquire_seconds: 0.0,
            roundtrip_seconds: roundtrip,
        };
        for fam in statement.collect() {
            for m in fam.get_metric() {
                let h = m.get_histogram();
                t.statements += h.get_sample_count();
                t.statement_seconds += h.get_sample_sum();
                for (i, b) in h.get_bucket().iter().enumerate() {
                    if t.statement_buckets.len() <= i {
                        t.statement_buckets.push((b.upper_bound(), 0));
                    }
                    t.statement_buckets[i].1 += b.cumulative_count();
                }
                let label = m
                    .get_label()
                    .iter()
                    .find(|l| l.name() == "label")
                    .map(|l| l.value().to_string())
                    .unwrap_or_default();
                t.by_label.push((label, h.get_sample_sum()));
            }
        }
        for fam in acquire.collect() {
            for m in fam.get_metric() {
                let h = m.get_histogram();
                t.acquires += h.get_sample_count();
                t.acquire_seconds += h.get_sample_sum();
            }
        }
        t
    }
}

/// What happened between two [`DbTotals`], plus the pool's state now.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DbTimeWindow {
    /// Length of the window, seconds.
    pub seconds: f64,
    /// Statements completed in it.
    pub statements: u64,
    /// Their total duration, seconds.
    pub statement_seconds: f64,
    /// Median statement duration (linear within a histogram bucket), seconds.
    pub statement_p50_seconds: Option<f64>,
    /// The label with the most statement time, and that time, seconds.
    pub top_label: Option<(String, f64)>,
    /// Acquires completed in it.
    pub acquires: u64,
    /// Their total wait, seconds.
    pub acquire_seconds: f64,
    /// Median round trip of the monitor's pings in the window, seconds.
    pub roundtrip_seconds: Option<f64>,
    /// Pool connections running a statement now.
    pub in_statement: usize,
    /// Pool connections held by a caller now.
    pub held: usize,
    /// Configured maximum pool size.
    pub max_connections: u32,
}

impl DbTimeWindow {
    /// The window from `old` to `new`; `rtts` are the pings' round trips within it.
    pub fn between(old: &DbTotals, new: &DbTotals, rtts: &[f64]) -> Self {
        let statements = new.statements.saturating_sub(old.statements);
        let buckets: Vec<(f64, u64)> = new
            .statement_buckets
            .iter()
            .enumerate()
            .map(|(i, (ub, c))| {
                let before = old.statement_buckets.get(i).map_or(0, |b| b.1);
                (*ub, c.saturating_sub(before))
            })
            .collect();
        let top_label = new
            .by_label
            .iter()
            .map(|(l, s)| {
                let before = old
                    .by_label
                    .iter()
                    .find(|(o, _)| o == l)
                    .map_or(0.0, |x| x.1);
                (l.clone(), (s - before).max(0.0))
            })
            .filter(|(_, s)| *s > 0.0)
            .max_by(|a, b| a.1.total_cmp(&b.1));
        let mut r: Vec<f64> = rtts.to_vec();
        r.sort_by(f64::total_cmp);
        DbTimeWindow {
            seconds: new.at.saturating_duration_since(old.at).as_secs_f64(),
            statements,
            statement_seconds: (new.statement_seconds - old.statement_seconds).max(0.0),
            statement_p50_seconds: quantile(&buckets, statements, 0.5),
            top_label,
            acquires: new.acquires.saturating_sub(old.acquires),
            acquire_seconds: (new.acquire_seconds - old.acquire_seconds).max(0.0),
            roundtrip_seconds: r.get(r.len() / 2).copied(),
            in_statement: 0,
            held: 0,
            max_connections: 0,
        }
    }

    fn statement_mean(&self) -> f64 {
        self.statement_seconds / self.statements.max(1) as f64
    }

    fn acquire_mean(&self) -> f64 {
        self.acquire_seconds / self.acquires.max(1) as f64
    }
}

/// The `q` quantile of cumulative `(upper bound, count)` buckets holding `total` samples,
/// linear within the bucket, as PromQL's `histogram_quantile`.
fn quantile(buckets: &[(f64, u64)], total: u64, q: f64) -> Option<f64> {
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut prev = (0.0, 0u64);
    for (ub, c) in buckets {
        if *c as f64 >= rank {
            if ub.is_infinite() {
                return Some(prev.0);
            }
            let span = c.saturating_sub(prev.1).max(1) as f64;
            return Some(prev.0 + (ub - prev.0) * ((rank - prev.1 as f64) / span));
        }
        prev = (*ub, *c);
    }
    Some(prev.0)
}

/// What [`assess`] found.
#[derive(Debug, Clone, PartialEq)]
pub enum DbTimeFinding {
    /// Statements are slow (mean past [`SLOW_MEAN_SECONDS`]) and take more time than waits
    /// for a connection: a slow server or network. The text says so with the numbers.
    SlowDatabase(String),
    /// Waits for a pool connection take more time than statements and average past
    /// [`POOL_WAIT_MEAN_SECONDS`] while statements are fast: the pool is too small for the
    /// load, or connections are held too long between statements.
    PoolWaits(String),
}

impl DbTimeFinding {
    /// `slow_database` or `pool_waits`.
    pub fn kind(&self) -> &'static str {
        match self {
            DbTimeFinding::SlowDatabase(_) => "slow_database",
            DbTimeFinding::PoolWaits(_) => "pool_waits",
        }
    }

    /// The one-line finding.
    pub fn text(&self) -> &str {
        match self {
            DbTimeFinding::SlowDatabase(s) | DbTimeFinding::PoolWaits(s) => s,
        }
    }
}

fn ms(s: f64) -> String {
    format!("{:.0} ms", s * 1000.0)
}

/// Judges one window. `None` when there is too little traffic or neither statements nor pool
/// waits are slow.
///
/// Every acquire costs one round trip even when connections are free: sqlx pings a connection
/// before handing it out (`test_before_acquire`). That part of the wait is database time, not
/// a shortage of connections, so only the rest (`acquire_seconds - acquires × round trip`)
/// counts as pool waits.
pub fn assess(w: &DbTimeWindow) -> Option<DbTimeFinding> {
    let rtt = w
        .roundtrip_seconds
        .map(|r| format!("round trip {}", ms(r)))
        .unwrap_or_else(|| "round trip unknown".into());
    let check = (w.roundtrip_seconds.unwrap_or(0.0) * w.acquires as f64).min(w.acquire_seconds);
    let shortage = w.acquire_seconds - check;
    let stmt_slow = w.statements >= MIN_SAMPLES && w.statement_mean() >= SLOW_MEAN_SECONDS;
    if stmt_slow && w.statement_seconds >= shortage {
        let mut s = format!(
            "database time dominates: statements p50 {}, {rtt}, {} of {} connections in \
             statements ({} held); {} statements in the last {:.0} s took {:.1} s, acquires \
             {:.1} s ({:.1} s of it the liveness round trip on each acquire)",
            ms(w.statement_p50_seconds.unwrap_or(w.statement_mean())),
            w.in_statement,
            w.max_connections,
            w.held,
            w.statements,
            w.seconds,
            w.statement_seconds,
            w.acquire_seconds,
            check,
        );
        if let Some((l, t)) = &w.top_label {
            s.push_str(&format!("; most statement time at `{l}` ({t:.1} s)"));
        }
        match w.roundtrip_seconds {
            Some(r) if r >= SLOW_MEAN_SECONDS => s.push_str(
                ": the server or the network to it answers slowly (every round trip is slow)",
            ),
            Some(_) => s.push_str(
                ": round trips are fast, so the statements themselves are slow on the server",
            ),
            None => {}
        }
        return Some(DbTimeFinding::SlowDatabase(s));
    }
    if w.acquires >= MIN_SAMPLES
        && shortage / w.acquires as f64 >= POOL_WAIT_MEAN_SECONDS
        && shortage > w.statement_seconds
    {
        return Some(DbTimeFinding::PoolWaits(format!(
            "pool waits dominate: acquires wait {} on average while statements take p50 {} \
             ({rtt}); {} of {} connections held, {} in statements: the pool is too small for \
             the load or connections are held between statements",
            ms(w.acquire_mean()),
            ms(w.statement_p50_seconds.unwrap_or(w.statement_mean())),
            w.held,
            w.max_connections,
            w.in_statement,
        )));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(stmts: u64, stmt_s: f64, acqs: u64, acq_s: f64, rtt: f64) -> DbTimeWindow {
        DbTimeWindow {
            seconds: 10.0,
            statements: stmts,
            statement_seconds: stmt_s,
            statement_p50_seconds: Some(stmt_s / stmts.max(1) as f64),
            top_label: Some(("bot_subscription".into(), stmt_s / 2.0)),
            acquires: acqs,
            acquire_seconds: acq_s,
            roundtrip_seconds: Some(rtt),
            in_statement: 4,
            held: 5,
            max_connections: 15,
        }
    }

    #[test]
    fn slow_server_reads_as_database_time() {
        let f = assess(&window(100, 31.0, 40, 0.4, 0.302)).expect("a finding");
        assert_eq!(f.kind(), "slow_database");
        let t = f.text();
        assert!(
            t.starts_with(
                "database time dominates: statements p50 310 ms, round trip 302 ms, 4 of 15 \
                 connections in statements (5 held)"
            ),
            "{t}"
        );
        assert!(t.contains("`bot_subscription`"), "{t}");
        assert!(t.contains("every round trip is slow"), "{t}");
    }

    #[test]
    fn slow_statements_on_a_fast_network_blame_the_statements() {
        let f = assess(&window(50, 10.0, 20, 0.1, 0.001)).unwrap();
        assert_eq!(f.kind(), "slow_database");
        assert!(f.text().contains("statements themselves are slow"), "{f:?}");
    }

    #[test]
    fn small_pool_reads_as_pool_waits_not_as_a_slow_database() {
        // Fast statements, long waits for a connection: a pool too small for the load.
        let f = assess(&window(200, 0.4, 200, 90.0, 0.001)).expect("a finding");
        assert_eq!(f.kind(), "pool_waits");
        assert!(
            f.text()
                .starts_with("pool waits dominate: acquires wait 450 ms on average"),
            "{f:?}"
        );
        // Slow statements but even longer waits: the waits are what callers feel.
        let f = assess(&window(20, 4.0, 40, 30.0, 0.2)).unwrap();
        assert_eq!(f.kind(), "pool_waits");
        // Acquires as slow as one round trip each on a slow network are the liveness ping,
        // not a shortage: still a slow database.
        let f = assess(&window(50, 16.0, 50, 17.0, 0.3)).unwrap();
        assert_eq!(f.kind(), "slow_database", "{f:?}");
    }

    #[test]
    fn healthy_or_idle_is_no_finding() {
        assert_eq!(assess(&window(500, 1.0, 500, 0.05, 0.001)), None);
        assert_eq!(
            assess(&window(2, 2.0, 2, 0.0, 0.5)),
            None,
            "too few samples"
        );
        assert_eq!(assess(&DbTimeWindow::default()), None);
    }

    #[test]
    fn window_deltas_and_median() {
        let t0 = Instant::now();
        let old = DbTotals {
            at: t0,
            statements: 10,
            statement_seconds: 0.1,
            statement_buckets: vec![(0.01, 10), (0.5, 10), (f64::INFINITY, 10)],
            by_label: vec![("a".into(), 0.1)],
            acquires: 10,
            acquire_seconds: 0.01,
            roundtrip_seconds: None,
        };
        let new = DbTotals {
            at: t0 + Duration::from_secs(10),
            statements: 30,
            statement_seconds: 6.1,
            statement_buckets: vec![(0.01, 10), (0.5, 30), (f64::INFINITY, 30)],
            by_label: vec![("a".into(), 0.1), ("b".into(), 6.0)],
            acquires: 30,
            acquire_seconds: 0.02,
            roundtrip_seconds: None,
        };
        let w = DbTimeWindow::between(&old, &new, &[0.3, 0.31, 0.29]);
        assert_eq!(w.statements, 20);
        assert!((w.statement_seconds - 6.0).abs() < 1e-9);
        // 20 new samples all in (0.01, 0.5]: the median interpolates to the middle.
        assert!(
            (w.statement_p50_seconds.unwrap() - 0.255).abs() < 1e-9,
            "{w:?}"
        );
        assert_eq!(w.top_label.as_ref().unwrap().0, "b");
        assert_eq!(w.roundtrip_seconds, Some(0.3));
        assert!((w.seconds - 10.0).abs() < 1e-9);
    }
}
