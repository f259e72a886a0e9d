//! Per-worker poll tracking through tokio's task hooks, readable from any OS thread.
//!
//! `on_before_task_poll` stores the poll's start (coarse monotonic clock, [`coarse_now_ns`]: a
//! vDSO read of a few ns, a kernel tick of resolution), the task id and spawn location in the
//! polling thread's slot and bumps its poll sequence; `on_after_task_poll` clears the task.
//! The watchdog samples each slot on its period and ages a poll from its recorded start. (It
//! used to age a poll from its own first sight of it, up to one period late: detection took up
//! to threshold + 2 periods; now threshold + 1 period + up to two clock ticks.) The per-poll
//! cost is a thread-local read, the clock read and four relaxed stores (see `bench`).
//!
//! A task table maps task ids to their name (from [`crate::tasks::Tasks::spawn_named`]),
//! spawn location and spawn time, maintained by the spawn/terminate hooks. It is split into
//! [`SHARDS`] cache-line-aligned shards **by thread**: a spawn inserts into the spawning
//! thread's shard, an exit removes from the exiting thread's shard when the task was spawned
//! there, and otherwise queues the id in its own shard; a shard whose queue reaches
//! [`EXIT_BATCH`] ids removes them from the other shards in one sweep. So a spawn or exit
//! takes the calling thread's own (uncontended, cache-resident) lock, and cross-thread work
//! is batched. (Sharded by task id before: every exit on another worker than the spawn moved
//! the shard's lock and table lines between cores; with SipHash and `Instant::now` that made
//! the hooks +18–20 % of `vpnbot-bench spawn-churn`.) Within a shard ids are hashed so that
//! consecutive ids take neighbouring buckets ([`TaskIdHasher`]), and the spawn time is read
//! from the coarse monotonic clock (a few ns; a kernel tick of resolution, plenty for a
//! task's age in a dump). Readers ([`PollTracker::task`], [`PollTracker::census`]) look in
//! every shard and skip queued exits.

use std::cell::Cell;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::panic::Location;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::runtime::TaskMeta;

/// Most threads that can be tracked at once (workers plus threads that left a worker through
/// `block_in_place`).
pub(crate) const MAX_SLOTS: usize = 64;
/// Shards of the live-task table (threads beyond it share shards round-robin).
pub(crate) const SHARDS: usize = 16;
/// Exits of tasks spawned on another thread that a shard queues before sweeping them out.
pub(crate) const EXIT_BATCH: usize = 64;

/// One shard of the task table, alone on its cache line(s).
#[derive(Debug, Default)]
#[repr(align(128))]
struct TaskShard(Mutex<ShardTasks>);

#[derive(Debug, Default)]
struct ShardTasks {
    /// Tasks spawned by this shard's threads and not known to have ended.
    live: TaskMap,
    /// Ids of tasks that ended on this shard's threads but were spawned elsewhere: still in
    /// another shard's `live` until the next sweep.
    exited: Vec<u64>,
}

type TaskMap = HashMap<u64, TaskEntry, BuildHasherDefault<TaskIdHasher>>;

/// Hasher of the task table's keys (tokio task ids, handed out sequentially): the low bits
/// are the id itself, so consecutive spawns fill neighbouring buckets; the top 7 bits
/// (hashbrown's tag byte) are a multiplicative mix of the id, so a probe still tells keys
/// apart.
#[derive(Debug, Default)]
pub(crate) struct TaskIdHasher(u64);

impl Hasher for TaskIdHasher {
    fn finish(&self) -> u64 {
        let id = self.0;
        id ^ (id.wrapping_mul(0x9E37_79B9_7F4A_7C15) & (0x7F << 57))
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8) | u64::from(*b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

/// `CLOCK_MONOTONIC_COARSE` in nanoseconds: a few ns to read, resolution of a kernel tick.
pub(crate) fn coarse_now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    (ts.tv_sec as u64).wrapping_mul(1_000_000_000) + ts.tv_nsec as u64
}

/// Resolution of [`coarse_now_ns`] (a kernel tick, e.g. 4 ms at `HZ=250`), from
/// `clock_getres`; 10 ms if it cannot be read. A reading may lag real time by up to this much,
/// so an age from two readings is a lower bound only after subtracting it.
pub(crate) fn coarse_resolution_ns() -> u64 {
    static RES: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *RES.get_or_init(|| {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_getres writes into the timespec it is given.
        let rc = unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
        if rc == 0 {
            (ts.tv_sec as u64).wrapping_mul(1_000_000_000) + ts.tv_nsec as u64
        } else {
            10_000_000
        }
    })
}

thread_local! {
    /// (tracker id, slot index) of this thread; slot `u32::MAX` = not assigned yet.
    static SLOT: Cell<(usize, u32)> = const { Cell::new((0, u32::MAX)) };
    /// Name for the next task spawned from this thread, set by `Tasks::spawn_named`.
    static SPAWN_NAME: Cell<Option<&'static str>> = const { Cell::new(None) };
    /// This thread's task-table shard, `usize::MAX` until its first spawn or exit.
    static TASK_SHARD: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// Runs `f` (which spawns exactly one task) with `name` offered to the spawn hook.
pub(crate) fn with_spawn_name<R>(name: &'static str, f: impl FnOnce() -> R) -> R {
    SPAWN_NAME.with(|n| n.set(Some(name)));
    let r = f();
    SPAWN_NAME.with(|n| n.set(None));
    r
}

/// Offers `name` to the spawn hook for the next spawn from this thread.
pub(crate) fn offer_spawn_name(name: Option<&'static str>) {
    SPAWN_NAME.with(|n| n.set(name));
}

/// tokio's task `Id` as a `u64` without formatting: `Id` hashes as its `NonZeroU64`.
pub(crate) fn id_u64(id: tokio::task::Id) -> u64 {
    struct Capture(u64);
    impl Hasher for Capture {
        fn finish(&self) -> u64 {
            self.0
        }
        fn write(&mut self, bytes: &[u8]) {
            for b in bytes {
                self.0 = (self.0 << 8) | u64::from(*b);
            }
        }
        fn write_u64(&mut self, v: u64) {
            self.0 = v;
        }
    }
    let mut h = Capture(0);
    id.hash(&mut h);
    h.0
}

/// The OS thread id (`gettid`) of the calling thread.
pub(crate) fn current_tid() -> u32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() as u32 }
}

/// One tracked thread.
#[derive(Debug, Default)]
pub(crate) struct WorkerSlot {
    in_use: AtomicBool,
    tid: AtomicU32,
    polls: AtomicU64,
    task: AtomicU64,
    /// Start of the current poll, [`coarse_now_ns`].
    poll_started_ns: AtomicU64,
    loc: AtomicPtr<Location<'static>>,
    /// Name and std id of the thread holding the slot (the id maps it to tokio's worker
    /// index, see `RuntimeMetrics::worker_thread_id`).
    thread: Mutex<(String, Option<std::thread::ThreadId>)>,
}

/// What the watchdog reads from one slot.
#[derive(Debug, Clone)]
pub(crate) struct SlotSample {
    pub(crate) index: usize,
    pub(crate) tid: u32,
    pub(crate) thread_name: String,
    pub(crate) thread_id: Option<std::thread::ThreadId>,
    pub(crate) polls: u64,
    /// Task being polled (0 = none).
    pub(crate) task: u64,
    /// Start of that poll on the coarse monotonic clock ([`coarse_now_ns`]).
    pub(crate) poll_started_ns: u64,
    pub(crate) location: Option<&'static Location<'static>>,
}

/// What is known about a live task.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TaskEntry {
    pub(crate) name: Option<&'static str>,
    pub(crate) location: &'static Location<'static>,
    /// Spawn time on the coarse monotonic clock ([`coarse_now_ns`]).
    pub(crate) spawned_ns: u64,
}

impl TaskEntry {
    /// The task's age at `at` (a past instant, e.g. when a view was taken), to within a
    /// coarse-clock tick.
    pub(crate) fn age_at(&self, at: Instant) -> Duration {
        Duration::from_nanos(coarse_now_ns().saturating_sub(self.spawned_ns))
            .saturating_sub(at.elapsed())
    }
}

/// Per-thread poll slots plus the live task table.
#[derive(Debug)]
pub(crate) struct PollTracker {
    slots: Box<[WorkerSlot]>,
    tasks: Box<[TaskShard]>,
    next_shard: AtomicUsize,
}

impl PollTracker {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            slots: (0..MAX_SLOTS).map(|_| WorkerSlot::default()).collect(),
            tasks: (0..SHARDS).map(|_| TaskShard::default()).collect(),
            next_shard: AtomicUsize::new(0),
        })
    }

    fn key(self: &Arc<Self>) -> usize {
        Arc::as_ptr(self) as usize
    }

    #[inline]
    fn slot(self: &Arc<Self>) -> Option<&WorkerSlot> {
        let (owner, idx) = SLOT.with(|s| s.get());
        if owner == self.key() && idx != u32::MAX {
            return self.slots.get(idx as usize);
        }
        self.assign_slot()
    }

    #[cold]
    fn assign_slot(self: &Arc<Self>) -> Option<&WorkerSlot> {
        for (i, s) in self.slots.iter().enumerate() {
            if s.in_use
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                s.tid.store(current_tid(), Ordering::Relaxed);
                let me = std::thread::current();
                // A worker's thread takes its worker's number (crate::runtime explains why
                // here and not when the thread starts).
                let name = match tokio::runtime::worker_index() {
                    Some(i) => {
                        let name =
                            crate::runtime::worker_thread_name(me.name().unwrap_or("wrk"), i);
                        crate::runtime::set_os_thread_name(&name);
                        name
                    }
                    None => me.name().unwrap_or("<unnamed>").to_owned(),
                };
                *s.thread.lock().unwrap_or_else(|e| e.into_inner()) = (name, Some(me.id()));
                SLOT.with(|c| c.set((self.key(), i as u32)));
                return Some(s);
            }
        }
        None
    }

    /// `on_before_task_poll`.
    #[inline]
    pub(crate) fn before_poll(self: &Arc<Self>, meta: &TaskMeta<'_>) {
        if let Some(s) = self.slot() {
            // Single writer per slot: a load+store is cheaper than a locked fetch_add.
            let p = s.polls.load(Ordering::Relaxed);
            // Start before task, task with Release: a reader that sees this task sees this
            // poll's start or a later one (never an earlier poll's, which would age it falsely).
            s.poll_started_ns.store(coarse_now_ns(), Ordering::Relaxed);
            s.task.store(id_u64(meta.id()), Ordering::Release);
            s.loc.store(
                meta.spawned_at() as *const Location<'static> as *mut Location<'static>,
                Ordering::Relaxed,
            );
            s.polls.store(p.wrapping_add(1), Ordering::Release);
        }
    }

    /// `on_after_task_poll`.
    #[inline]
    pub(crate) fn after_poll(self: &Arc<Self>, _meta: &TaskMeta<'_>) {
        let (owner, idx) = SLOT.with(|s| s.get());
        if owner == self.key() {
            if let Some(s) = self.slots.get(idx as usize) {
                s.task.store(0, Ordering::Release);
            }
        }
    }

    /// `on_task_spawn`: records name (if offered by `with_spawn_name`) and location.
    pub(crate) fn on_spawn(&self, meta: &TaskMeta<'_>) {
        let id = id_u64(meta.id());
        let entry = TaskEntry {
            name: SPAWN_NAME.with(|n| n.take()),
            location: meta.spawned_at(),
            spawned_ns: coarse_now_ns(),
        };
        self.lock_shard(self.my_shard()).live.insert(id, entry);
    }

    /// `on_task_terminate`.
    pub(crate) fn on_terminate(&self, meta: &TaskMeta<'_>) {
        let id = id_u64(meta.id());
        let mine = self.my_shard();
        let batch = {
            let mut own = self.lock_shard(mine);
            if own.live.remove(&id).is_some() {
                return;
            }
            own.exited.push(id);
            if own.exited.len() < EXIT_BATCH {
                return;
            }
            std::mem::take(&mut own.exited)
        };
        self.sweep(mine, batch);
    }

    /// Removes `ids` (exits seen by shard `from`) from every other shard.
    fn sweep(&self, from: usize, mut ids: Vec<u64>) {
        for (i, shard) in self.tasks.iter().enumerate() {
            if i == from || ids.is_empty() {
                continue;
            }
            let mut s = shard.0.lock().unwrap_or_else(|e| e.into_inner());
            if s.live.is_empty() {
                continue;
            }
            ids.retain(|id| s.live.remove(id).is_none());
        }
    }

    /// Sweeps every shard's queued exits (readers call it for an exact view).
    fn sweep_all(&self) {
        for i in 0..self.tasks.len() {
            let batch = std::mem::take(&mut self.lock_shard(i).exited);
            if !batch.is_empty() {
                self.sweep(i, batch);
            }
        }
    }

    /// The calling thread's shard (assigned round-robin on first use).
    fn my_shard(&self) -> usize {
        TASK_SHARD.with(|c| {
            let v = c.get();
            if v < self.tasks.len() {
                return v;
            }
            let v = self.next_shard.fetch_add(1, Ordering::Relaxed) % self.tasks.len();
            c.set(v);
            v
        })
    }

    fn lock_shard(&self, i: usize) -> std::sync::MutexGuard<'_, ShardTasks> {
        self.tasks[i].0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `on_thread_stop`: frees this thread's slot.
    pub(crate) fn on_thread_stop(self: &Arc<Self>) {
        let (owner, idx) = SLOT.with(|s| s.get());
        if owner == self.key() {
            if let Some(s) = self.slots.get(idx as usize) {
                s.task.store(0, Ordering::Release);
                s.in_use.store(false, Ordering::Release);
            }
            SLOT.with(|c| c.set((0, u32::MAX)));
        }
    }

    /// The name and location of a live task.
    pub(crate) fn task(&self, id: u64) -> Option<TaskEntry> {
        let mut found = None;
        for shard in self.tasks.iter() {
            let s = shard.0.lock().unwrap_or_else(|e| e.into_inner());
            if s.exited.contains(&id) {
                return None;
            }
            if found.is_none() {
                found = s.live.get(&id).copied();
            }
        }
        found
    }

    /// Live tasks counted by name (unnamed ones by spawn location), largest first, at most `n`.
    pub(crate) fn census(&self, n: usize) -> (usize, Vec<(String, usize)>) {
        self.sweep_all();
        let mut counts: HashMap<String, usize> = HashMap::new();
        let mut total = 0;
        for shard in self.tasks.iter() {
            let shard = shard.0.lock().unwrap_or_else(|e| e.into_inner());
            total += shard.live.len();
            for e in shard.live.values() {
                let key = match e.name {
                    Some(n) => n.to_owned(),
                    None => format!("<unnamed> {}", e.location),
                };
                *counts.entry(key).or_default() += 1;
            }
        }
        let mut v: Vec<_> = counts.into_iter().collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        v.truncate(n);
        (total, v)
    }

    /// Samples every slot in use.
    pub(crate) fn sample(&self) -> Vec<SlotSample> {
        let mut out = Vec::new();
        for (index, s) in self.slots.iter().enumerate() {
            if !s.in_use.load(Ordering::Acquire) {
                continue;
            }
            let polls = s.polls.load(Ordering::Acquire);
            let task = s.task.load(Ordering::Acquire);
            let poll_started_ns = s.poll_started_ns.load(Ordering::Relaxed);
            let loc = s.loc.load(Ordering::Relaxed);
            let (thread_name, thread_id) =
                s.thread.lock().unwrap_or_else(|e| e.into_inner()).clone();
            out.push(SlotSample {
                index,
                tid: s.tid.load(Ordering::Relaxed),
                thread_name,
                thread_id,
                polls,
                task,
                poll_started_ns,
                // SAFETY: only ever stored from `&'static Location` or null.
                location: if task == 0 {
                    None
                } else {
                    unsafe { loc.as_ref() }
                },
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Census of `tracker` once no queued exit is left to sweep (the terminate hook of the
    /// last joined task may run just after its join handle wakes).
    fn settled_census(tracker: &PollTracker, want: usize) -> (usize, Vec<(String, usize)>) {
        let start = Instant::now();
        loop {
            let c = tracker.census(10);
            if c.0 == want || start.elapsed() > Duration::from_secs(2) {
                return c;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn tasks_ending_on_another_thread_leave_the_table_and_live_ones_keep_name_and_age() {
        let tracker = PollTracker::new();
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(2).enable_all();
        let t = tracker.clone();
        b.on_task_spawn(move |m| t.on_spawn(m));
        let t = tracker.clone();
        b.on_task_terminate(move |m| t.on_terminate(m));
        let rt = b.build().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let _rt_guard = rt.enter();
        let keeper = with_spawn_name("keeper", || {
            tokio::spawn(async move {
                let _ = rx.await;
            })
        });
        rt.block_on(async {
            // Spawned from one task, run and ended on either worker: most exits are queued
            // and swept in batches.
            tokio::spawn(async {
                let hs: Vec<_> = (0..10_000u64)
                    .map(|i| {
                        tokio::spawn(async move {
                            tokio::task::yield_now().await;
                            i
                        })
                    })
                    .collect();
                for h in hs {
                    h.await.unwrap();
                }
            })
            .await
            .unwrap();
        });
        let (live, by_name) = settled_census(&tracker, 1);
        assert_eq!(live, 1, "{by_name:?}");
        assert_eq!(by_name, vec![("keeper".to_string(), 1)]);
        let e = tracker
            .task(id_u64(keeper.id()))
            .expect("live task in the table");
        assert_eq!(e.name, Some("keeper"));
        assert!(e.age_at(Instant::now()) < Duration::from_secs(60));
        tx.send(()).unwrap();
        rt.block_on(keeper).unwrap();
        assert_eq!(settled_census(&tracker, 0).0, 0);
    }

    #[test]
    fn task_ids_hash_to_neighbouring_buckets_with_distinct_tags() {
        let h = |id: u64| {
            let mut s = TaskIdHasher::default();
            s.write_u64(id);
            s.finish()
        };
        assert_eq!(h(1001) & 0xFFFF, 1001);
        let tags: std::collections::HashSet<u64> = (1..=64).map(|id| h(id) >> 57).collect();
        assert!(tags.len() > 32, "{tags:?}");
    }
}
