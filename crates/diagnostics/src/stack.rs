//! Native stacks of blocked worker threads and cheap `/proc` evidence.
//!
//! Stacks come from `rstack-self` (libdw backend): the process re-executes its own binary as
//! a helper that ptraces the parent, so `main` must call [`maybe_run_child`] before anything
//! else. The helper's part takes a few ms; symbolizing the frames, done in this process,
//! parses the binary's debug info on first use ([`warm_symbols`] does that at start-up); the
//! process carries on unharmed. Where ptrace is forbidden (Yama, seccomp, no
//! `CAP_SYS_PTRACE`) or the helper fails, the dump says `stack unavailable: <reason>`.
//!
//! Dumps capture through [`capture_bounded`]: one capture at a time per process (a second one
//! waits for the first, at most the helper's bound), on its own thread; a helper still running
//! after [`HELPER_TIMEOUT`] is killed (which ends the capture thread), and the dump waits for
//! the symbolized frames at most [`CAPTURE_TIMEOUT`], so a hung ptrace helper cannot hang the
//! dump that asked for it.
//!
//! `/proc/self/task/<tid>/{stat,wchan,syscall}` needs no ptrace: a sleeping worker shows state
//! `S` and `hrtimer_nanosleep`, a spinning one `R` with CPU time growing.

use std::collections::HashMap;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;

/// Environment variable that turns the re-executed binary into the stack helper.
pub const CHILD_ENV: &str = "DIAGNOSTICS_STACK_CHILD";
/// Argument given to the helper so that a `main` that forgot [`maybe_run_child`] exits on a
/// usage error instead of starting the service.
pub const CHILD_ARG: &str = "__diagnostics-stack-child";
const MAX_FRAMES: usize = 48;

/// Call first thing in `main` (and in a test binary's constructor): when this process is the
/// stack helper, runs it and exits; otherwise returns at once.
pub fn maybe_run_child() {
    if std::env::var_os(CHILD_ENV).is_some() {
        let code = match rstack_self::child() {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("native stack helper: {e}");
                1
            }
        };
        std::process::exit(code);
    }
}

/// Why native stacks could not be captured. Its text is a dump's `stack_unavailable`.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// An earlier capture was still running after waiting for it (one runs at a time, so a
    /// stuck helper cannot pile up more).
    #[error(
        "another capture was still running after waiting {:.1} s for it",
        .waited.as_secs_f64()
    )]
    AlreadyRunning {
        /// How long this capture waited for the earlier one.
        waited: Duration,
    },
    /// The capture thread could not be started.
    #[error("cannot start the capture thread: {0}")]
    Thread(#[source] std::io::Error),
    /// No result within the bound: the helper was killed, or (none killed) it had finished and
    /// the symbolization in this process was still running (it completes in the background).
    #[error(
        "timed out after {:.1} s ({})",
        .timeout.as_secs_f64(),
        if *.killed > 0 { "the ptrace helper was killed" } else { "the helper had finished; symbolizing was still running" }
    )]
    TimedOut {
        /// The bound that passed.
        timeout: Duration,
        /// Helper processes killed.
        killed: usize,
    },
    /// The capture thread panicked (in the unwinder or the symbolizer).
    #[error("the capture thread panicked")]
    Panicked,
    /// This process's own executable could not be found to start the helper.
    #[error("current_exe: {0}")]
    CurrentExe(#[source] std::io::Error),
    /// The ptrace helper failed (usually no ptrace permission).
    #[error(
        "ptrace helper failed: {0} (needs ptrace permission: CAP_SYS_PTRACE or Yama \
         ptrace_scope <= 1, and main calling diagnostics::stack::maybe_run_child)"
    )]
    Helper(#[source] rstack_self::Error),
}

/// Longest the ptrace helper may run (it stops each traced thread for a few ms; it normally
/// finishes within 100 ms). Past it, a helper still running is killed.
pub const HELPER_TIMEOUT: Duration = Duration::from_secs(3);

/// Longest a dump waits for native stacks in all, symbolizing included. Symbolizing runs in
/// this process and stops no thread; cold, it parses the binary's debug info (1.0-1.6 s for a
/// debug build on an idle machine, several seconds under load; [`warm_symbols`] does it at
/// start-up), so it gets a bound of its own rather than the helper's.
pub const CAPTURE_TIMEOUT: Duration = Duration::from_secs(20);

static SYMBOLS_LOADED: AtomicBool = AtomicBool::new(false);

/// Whether [`warm_symbols`] has finished loading the symbol tables (benchmarks wait for it so
/// that they measure the steady state, not start-up).
pub fn symbols_loaded() -> bool {
    SYMBOLS_LOADED.load(Ordering::Acquire)
}

/// Loads the symbol tables of this binary on a background thread (`diag-symbols`) so that the
/// first native-stack capture does not pay for it while a stall is on.
///
/// Captures are symbolized in this process by the `backtrace` crate, which parses the binary's
/// DWARF on first use and caches it for the life of the process (the same cache `rstack-self`
/// uses). Measured here (`crates/devtools/examples/stack_capture.rs`): the first capture took
/// 0.14-0.19 s (24 MB release binary) and 1.0-1.6 s (debug builds), later ones 3-7 ms; under
/// the CI's load the cold one passed the old 3 s bound. Warming moves that cost to start-up;
/// the anonymous memory it takes (56 MB release, 68 MB debug) is what the first dump would
/// take anyway. A capture that starts meanwhile waits for the load (the cache is locked).
/// Once per process: later calls (another `Diagnostics` in the same process) do nothing.
pub fn warm_symbols() {
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(spawn_symbol_loader);
}

fn spawn_symbol_loader() {
    let _ = std::thread::Builder::new()
        .name("diag-symbols".into())
        .spawn(|| {
            let t0 = std::time::Instant::now();
            let mut found = false;
            backtrace::resolve(warm_symbols as *mut std::ffi::c_void, |_| found = true);
            SYMBOLS_LOADED.store(true, Ordering::Release);
            tracing::debug!(
                seconds = t0.elapsed().as_secs_f64(),
                found,
                "native-stack symbols loaded"
            );
        });
}

static CAPTURES_STARTED: AtomicU64 = AtomicU64::new(0);
/// `true` while a capture thread runs; [`CAPTURE_ENDED`] is notified when it returns.
static CAPTURE_RUNNING: Mutex<bool> = Mutex::new(false);
static CAPTURE_ENDED: Condvar = Condvar::new();

/// Native-stack captures started by [`capture_bounded`] in this process (each one spawns the
/// ptrace helper once).
pub fn captures_started() -> u64 {
    CAPTURES_STARTED.load(Ordering::Relaxed)
}

fn running() -> MutexGuard<'static, bool> {
    // The flag stays meaningful after a panic elsewhere: it is a plain bool.
    CAPTURE_RUNNING.lock().unwrap_or_else(|e| e.into_inner())
}

/// Takes the one capture slot, waiting at most `wait` for a capture already running (two
/// dumps at the same moment, e.g. the watchdog's episode dump and an on-demand one, both get
/// stacks). `false`: still taken after `wait`.
fn take_slot(wait: Duration) -> bool {
    let (mut taken, _) = CAPTURE_ENDED
        .wait_timeout_while(running(), wait, |taken| *taken)
        .unwrap_or_else(|e| e.into_inner());
    if *taken {
        return false;
    }
    *taken = true;
    true
}

fn release_slot() {
    *running() = false;
    CAPTURE_ENDED.notify_all();
}

/// Releases the slot when the capture thread ends, by return or by panic.
struct SlotGuard;

impl Drop for SlotGuard {
    fn drop(&mut self) {
        release_slot();
    }
}

/// [`capture`] on a thread of its own. The ptrace helper may run for `helper_timeout` (then it
/// is killed, which makes the capture thread return); the whole capture, symbolizing
/// included, is waited for at most `timeout` (then the helper, if any, is killed and the
/// symbolizing finishes in the background). Only one capture runs at a time: a call that finds
/// one running waits for it to end, at most `helper_timeout` (a warm capture takes a few ms;
/// a running one normally ends within the helper's bound), then fails without starting a
/// helper, so a stuck capture cannot pile up more.
///
/// # Errors
/// As [`capture`]; [`CaptureError::AlreadyRunning`], [`CaptureError::Thread`],
/// [`CaptureError::TimedOut`], [`CaptureError::Panicked`].
pub fn capture_bounded(
    tids: &[u32],
    helper_timeout: Duration,
    timeout: Duration,
) -> Result<HashMap<u32, Vec<String>>, CaptureError> {
    let t_wait = Instant::now();
    if !take_slot(helper_timeout) {
        return Err(CaptureError::AlreadyRunning {
            waited: t_wait.elapsed(),
        });
    }
    CAPTURES_STARTED.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = std::sync::mpsc::channel();
    let tids = tids.to_vec();
    let spawned = std::thread::Builder::new()
        .name("diag-stacks".into())
        .spawn(move || {
            let _slot = SlotGuard;
            let r = capture(&tids);
            let _ = tx.send(r);
        });
    if let Err(e) = spawned {
        release_slot();
        return Err(CaptureError::Thread(e));
    }
    let t0 = Instant::now();
    let mut helper_checked = false;
    loop {
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(r) => return r,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            // The capture thread panicked (its guard released the slot).
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                return Err(CaptureError::Panicked);
            }
        }
        let waited = t0.elapsed();
        if waited >= timeout {
            let killed = kill_helpers();
            return Err(CaptureError::TimedOut { timeout, killed });
        }
        if !helper_checked && waited >= helper_timeout {
            helper_checked = true;
            let killed = kill_helpers();
            if killed > 0 {
                return Err(CaptureError::TimedOut {
                    timeout: helper_timeout,
                    killed,
                });
            }
            // The helper is done: what remains is symbolizing, which stops no thread.
        }
    }
}

/// Kills this process's stack helpers (children started with [`CHILD_ARG`]); returns how many.
fn kill_helpers() -> usize {
    let me = std::process::id();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let mut n = 0;
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the parenthesised command name: state, ppid, ...
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid != Some(me) {
            continue;
        }
        let is_helper = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|c| c.split(|b| *b == 0).any(|a| a == CHILD_ARG.as_bytes()))
            .unwrap_or(false);
        // SAFETY: kill(2) on a child of this process that we identified by its arguments.
        if is_helper && unsafe { libc::kill(pid, libc::SIGKILL) } == 0 {
            n += 1;
        }
    }
    n
}

/// Captures the stacks of the threads `tids` of this process, as rendered frame lines
/// (`function (file:line)`), innermost first. Threads not found are absent from the map.
///
/// # Errors
/// [`CaptureError::CurrentExe`], [`CaptureError::Helper`] (helper failed to start, ptrace
/// refused, ...).
pub fn capture(tids: &[u32]) -> Result<HashMap<u32, Vec<String>>, CaptureError> {
    let exe = std::env::current_exe().map_err(CaptureError::CurrentExe)?;
    let mut cmd = Command::new(exe);
    cmd.arg(CHILD_ARG).env(CHILD_ENV, "1");
    let trace = rstack_self::trace(&mut cmd).map_err(CaptureError::Helper)?;
    let mut out = HashMap::new();
    for t in trace.threads() {
        if !tids.contains(&t.id()) {
            continue;
        }
        let mut lines = Vec::new();
        'frames: for f in t.frames() {
            if f.symbols().is_empty() {
                lines.push(format!("{:#x} <unknown>", f.ip()));
            }
            for s in f.symbols() {
                let name = s
                    .name()
                    .map(strip_hash)
                    .unwrap_or_else(|| "<unknown>".into());
                let line = match (s.file(), s.line()) {
                    (Some(file), Some(l)) => format!("{name} ({}:{l})", file.display()),
                    _ => name.to_owned(),
                };
                lines.push(line);
                if lines.len() >= MAX_FRAMES {
                    break 'frames;
                }
            }
        }
        out.insert(t.id(), lines);
    }
    Ok(out)
}

/// Drops the legacy `::h<16 hex>` suffix and v0 crate disambiguators (`std[e28293b1]::`).
fn strip_hash(name: &str) -> String {
    let name = match name.rfind("::h") {
        Some(i) if name.len() - i == 19 && name[i + 3..].bytes().all(|b| b.is_ascii_hexdigit()) => {
            &name[..i]
        }
        _ => name,
    };
    let mut out = String::with_capacity(name.len());
    let mut rest = name;
    while let Some(open) = rest.find('[') {
        match rest[open..].find(']').map(|c| open + c) {
            Some(c) if c > open + 1 && rest[open + 1..c].bytes().all(|b| b.is_ascii_hexdigit()) => {
                out.push_str(&rest[..open]);
                rest = &rest[c + 1..];
            }
            _ => {
                out.push_str(&rest[..=open]);
                rest = &rest[open + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The call a blocked thread is in, from its rendered frames: the first frame that is neither
/// a libc symbol nor runtime plumbing (`std::sys`, `core::`). E.g. `std::thread::sleep`.
pub fn blocking_call(frames: &[String]) -> Option<String> {
    frames
        .iter()
        .map(|f| f.split(" (").next().unwrap_or(f))
        .find(|name| {
            name.contains("::")
                && !name.starts_with("std::sys")
                && !name.starts_with("core::")
                && !name.starts_with("<core::")
                && !name.starts_with("std::panicking")
        })
        .map(str::to_owned)
}

/// Cheap evidence about one thread from `/proc/self/task/<tid>`.
#[derive(Debug, Clone, Serialize, Default)]
pub struct ProcEvidence {
    /// Scheduler state: `R` running, `S` sleeping, `D` uninterruptible (I/O)...
    pub state: String,
    /// Kernel function it waits in (`hrtimer_nanosleep`, `do_epoll_wait`...), `0` if running.
    pub wchan: String,
    /// Syscall number and arguments, `running` when in user space.
    pub syscall: String,
    /// User plus system CPU time consumed by the thread, in seconds.
    pub cpu_seconds: f64,
}

/// Reads [`ProcEvidence`] for thread `tid` of this process.
pub fn proc_evidence(tid: u32) -> Option<ProcEvidence> {
    let base = format!("/proc/self/task/{tid}");
    let stat = std::fs::read_to_string(format!("{base}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // fields[0] is field 3 (state); utime is field 14, stime 15.
    let state = fields.first()?.to_string();
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let utime: f64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    let stime: f64 = fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    let read = |f: &str| {
        std::fs::read_to_string(format!("{base}/{f}"))
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|e| format!("unreadable: {e}"))
    };
    Some(ProcEvidence {
        state,
        wchan: read("wchan"),
        syscall: read("syscall"),
        cpu_seconds: (utime + stime) / ticks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocking_call_skips_libc_and_std_sys() {
        let frames = vec![
            "clock_nanosleep".to_owned(),
            "std::sys::pal::unix::thread::Thread::sleep (x.rs:1)".to_owned(),
            "std::thread::sleep (y.rs:2)".to_owned(),
            "app::work (z.rs:3)".to_owned(),
        ];
        assert_eq!(
            blocking_call(&frames).as_deref(),
            Some("std::thread::sleep")
        );
        assert_eq!(strip_hash("a::b::h0123456789abcdef"), "a::b");
        assert_eq!(
            strip_hash("std[e28293b1aa0f68bd]::thread::sleep"),
            "std::thread::sleep"
        );
        assert_eq!(strip_hash("<[u8] as x[1f]::Y>::z"), "<[u8] as x::Y>::z");
    }

    #[test]
    fn proc_evidence_of_own_thread() {
        let e = proc_evidence(crate::poll_tracking::current_tid()).unwrap();
        assert_eq!(e.state, "R");
    }
}
