//! Workers left behind in tokio's task-dump barrier, found and released.
//!
//! `Handle::dump` (tokio 1.54) meets every worker at a start barrier, waited with a 250 ms
//! timeout (`trace_core`), then at an end barrier, waited without one. A timed-out wait returns
//! without taking back its arrival (`loom::std::barrier::Barrier::wait_timeout` leaves `count`
//! raised). So when one worker joins more than 250 ms late (inside a long poll, starved of
//! CPU), the punctual worker times out, arrives again, completes the start barrier alone with
//! its own stale arrival, traces, hands the result to the dump and then waits at the end
//! barrier for a partner that never comes: the dump has finished and no longer asks for it.
//! That worker stays out of the runtime until the next task dump. With two workers the runtime
//! then runs on one, and a single blocked poll stops everything: no heartbeat, no probe, no
//! timers, `runtime_stalled` for the whole block (issue 17: one demo run in five; the left
//! behind worker's native stack shows `Barrier::wait` under `trace_core`).
//!
//! Another task dump releases it: the other worker's arrival completes the start barrier (with
//! the stale arrival, or after its own 250 ms timeout), and the leader's end-barrier arrival is
//! the partner the stranded worker waits for. [`release`] checks for a worker that is neither
//! parked nor polling nor running after every task dump and, when it finds one, runs one more
//! dump (twice at most).

use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::Duration;

use tokio::runtime::Handle;

use super::poll_tracking::{with_spawn_name, SlotSample};
use super::Inner;

/// How long a worker must stay neither parked nor polling to count as left behind.
const WINDOW: Duration = Duration::from_millis(100);
/// Release dumps tried after one task dump.
const MAX_RELEASES: usize = 2;

/// Workers (tokio index) that are neither parked nor in a poll nor on CPU, and started no poll,
/// over [`WINDOW`]. Outside a task dump an unparked worker polls, steals or drives I/O within
/// microseconds; staying like this for 100 ms is a wait inside the scheduler: the barrier.
pub(crate) fn left_behind(inner: &Inner, handle: &Handle) -> Vec<usize> {
    let m = handle.metrics();
    let n = m.num_workers();
    let ids: Vec<_> = (0..n).map(|i| m.worker_thread_id(i)).collect();
    let slot_of = |samples: &[SlotSample], i: usize| {
        ids[i].and_then(|id| {
            samples
                .iter()
                .find(|s| s.thread_id == Some(id))
                .map(|s| (s.polls, s.task, s.tid))
        })
    };
    let parks_before: Vec<u64> = (0..n).map(|i| m.worker_park_unpark_count(i)).collect();
    let before = inner.tracker.sample();
    std::thread::sleep(WINDOW);
    let after = inner.tracker.sample();
    (0..n)
        .filter(|&i| {
            let parks = m.worker_park_unpark_count(i);
            // Odd: parked (idle); changed: it parked or unparked meanwhile.
            if parks % 2 == 1 || parks != parks_before[i] {
                return false;
            }
            match (slot_of(&before, i), slot_of(&after, i)) {
                (Some((p0, t0, tid)), Some((p1, t1, _))) => {
                    p0 == p1
                        && t0 == 0
                        && t1 == 0
                        && super::stack::proc_evidence(tid).is_some_and(|e| e.state == "S")
                }
                _ => false,
            }
        })
        .collect()
}

/// After a task dump: while a worker is [`left_behind`], runs one more `Handle::dump` (at most
/// [`MAX_RELEASES`], each waited for at most `timeout` from this thread). Returns the workers
/// found left behind, in order, and whether the last check found none.
pub(crate) fn release(inner: &Inner, handle: &Handle, timeout: Duration) -> (Vec<usize>, bool) {
    let mut found = Vec::new();
    for _ in 0..MAX_RELEASES {
        let stuck = left_behind(inner, handle);
        if stuck.is_empty() {
            return (found, true);
        }
        found.extend(stuck);
        if inner
            .task_dump_in_flight
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            return (found, false);
        }
        let (tx, rx) = mpsc::sync_channel(1);
        let flag = inner.task_dump_in_flight_arc();
        let h2 = handle.clone();
        with_spawn_name("diag-task-dump-release", || {
            handle.spawn(async move {
                let d = h2.dump().await;
                flag.store(false, Ordering::Release);
                let _ = tx.send(d);
            })
        });
        if super::dump::recv_nudging(&rx, handle, &inner.task_dump_in_flight_arc(), timeout)
            .is_err()
        {
            return (found, false);
        }
    }
    let clear = left_behind(inner, handle).is_empty();
    (found, clear)
}
