//! Per-worker poll tracking through tokio's task hooks, readable from any OS thread.
//!
//! `on_before_task_poll` stores the task id and spawn location in the polling thread's slot
//! and bumps its poll sequence; `on_after_task_poll` clears the task. No clock is read in the
//! hooks: the watchdog samples each slot on its period, and a slot whose sequence has not moved
//! while a task is set has been in one poll since the watchdog first saw it. That keeps the
//! per-poll cost at a thread-local read and three relaxed stores (see `bench`).
//!
//! A task table maps task ids to their name (from [`crate::tasks::Tasks::spawn_named`]) and
//! spawn location, maintained by the spawn/terminate hooks. It is split into [`SHARDS`]
//! cache-line-aligned shards by task id (ids are sequential, so consecutive spawns land on
//! different shards): a spawn or exit takes one uncontended shard lock for one insert or
//! remove, never a process-wide lock (see `bench spawn-churn`).

use std::cell::Cell;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::panic::Location;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::runtime::TaskMeta;

/// Most threads that can be tracked at once (workers plus threads that left a worker through
/// `block_in_place`).
pub(crate) const MAX_SLOTS: usize = 64;
/// Shards of the live-task table.
pub(crate) const SHARDS: usize = 64;

/// One shard of the task table, alone on its cache line(s).
#[derive(Debug, Default)]
#[repr(align(128))]
struct TaskShard(Mutex<HashMap<u64, TaskEntry>>);

thread_local! {
    /// (tracker id, slot index) of this thread; slot `u32::MAX` = not assigned yet.
    static SLOT: Cell<(usize, u32)> = const { Cell::new((0, u32::MAX)) };
    /// Name for the next task spawned from this thread, set by `Tasks::spawn_named`.
    static SPAWN_NAME: Cell<Option<&'static str>> = const { Cell::new(None) };
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
    pub(crate) location: Option<&'static Location<'static>>,
}

/// What is known about a live task.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TaskEntry {
    pub(crate) name: Option<&'static str>,
    pub(crate) location: &'static Location<'static>,
    pub(crate) spawned: Instant,
}

/// Per-thread poll slots plus the live task table.
#[derive(Debug)]
pub(crate) struct PollTracker {
    slots: Box<[WorkerSlot]>,
    tasks: Box<[TaskShard]>,
}

impl PollTracker {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            slots: (0..MAX_SLOTS).map(|_| WorkerSlot::default()).collect(),
            tasks: (0..SHARDS).map(|_| TaskShard::default()).collect(),
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
            s.task.store(id_u64(meta.id()), Ordering::Relaxed);
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
            spawned: Instant::now(),
        };
        self.shard(id).insert(id, entry);
    }

    /// `on_task_terminate`.
    pub(crate) fn on_terminate(&self, meta: &TaskMeta<'_>) {
        let id = id_u64(meta.id());
        self.shard(id).remove(&id);
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

    fn shard(&self, id: u64) -> std::sync::MutexGuard<'_, HashMap<u64, TaskEntry>> {
        self.tasks[(id as usize) % SHARDS]
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// The name and location of a live task.
    pub(crate) fn task(&self, id: u64) -> Option<TaskEntry> {
        self.shard(id).get(&id).copied()
    }

    /// Live tasks counted by name (unnamed ones by spawn location), largest first, at most `n`.
    pub(crate) fn census(&self, n: usize) -> (usize, Vec<(String, usize)>) {
        let mut counts: HashMap<String, usize> = HashMap::new();
        let mut total = 0;
        for shard in self.tasks.iter() {
            let shard = shard.0.lock().unwrap_or_else(|e| e.into_inner());
            total += shard.len();
            for e in shard.values() {
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
