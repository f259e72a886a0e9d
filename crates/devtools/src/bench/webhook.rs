//! `vpnbot-bench webhook-scale`: updates per second handled by 1, 2 and 3 `vpnbot run`
//! processes in webhook mode against one PostgreSQL, fed by the Bot API stand-in's push mode
//! (round-robin over the instances, 40 connections as Telegram's default `max_connections`).
//! Each update is a `/help` from its own user: claim in PostgreSQL, one `sendMessage` to the
//! stand-in, mark handled. Besides the rate it reports where the CPU went (the instances, this
//! process, which runs the stand-in and its client, the PostgreSQL server, and the whole
//! machine from `/proc/stat`), to say where the ceiling comes from.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vpnbot_sim::botapi::{BotApiSim, BotApiSimOptions, PushOptions, SimUser};

const SECRET: &str = "bench-secret_token";

/// One run's figures.
#[derive(Debug, Clone)]
pub struct ScaleReport {
    /// Instances behind the stand-in.
    pub instances: usize,
    /// Updates delivered and acknowledged.
    pub updates: usize,
    /// From the first push to the last acknowledgement.
    pub elapsed: Duration,
    /// CPU seconds of the `vpnbot` processes together.
    pub instances_cpu: f64,
    /// CPU seconds of this process (stand-in server and push client).
    pub standin_cpu: f64,
    /// CPU seconds of the PostgreSQL server processes.
    pub postgres_cpu: f64,
    /// Busy share of all the machine's cores over the run (0-1), every process included.
    pub machine_busy: f64,
}

impl ScaleReport {
    /// Updates per second.
    pub fn rate(&self) -> f64 {
        self.updates as f64 / self.elapsed.as_secs_f64()
    }
}

/// `utime + stime` of `pid`, seconds.
fn cpu_of(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks / hz.max(1.0)
}

/// CPU seconds of every process whose command name is `postgres`.
fn postgres_cpu() -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "postgres")
        })
        .map(cpu_of)
        .sum()
}

/// (busy, total) jiffies of the whole machine.
fn machine_jiffies() -> (f64, f64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<f64> = text
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: f64 = v.iter().sum();
    let idle = v.get(3).copied().unwrap_or(0.0) + v.get(4).copied().unwrap_or(0.0);
    (total - idle, total)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// The `vpnbot` binary next to this one.
fn vpnbot_bin() -> Result<PathBuf, String> {
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let p = me.with_file_name("vpnbot");
    if p.is_file() {
        Ok(p)
    } else {
        Err(format!(
            "{} is missing: build it first (cargo build --workspace --bins)",
            p.display()
        ))
    }
}

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn fresh_db(admin_url: &str, name: &str) -> Result<String, String> {
    use sqlx::Connection;
    let mut c = sqlx::PgConnection::connect(admin_url)
        .await
        .map_err(|e| format!("database: {e}"))?;
    for sql in [
        format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
        format!("CREATE DATABASE {name}"),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&mut c)
            .await
            .map_err(|e| format!("database: {e}"))?;
    }
    let mut u = url::Url::parse(admin_url).map_err(|e| e.to_string())?;
    u.set_path(name);
    Ok(u.to_string())
}

/// One run: `instances` processes, `updates` `/help` updates.
///
/// # Errors
/// A process, database or stand-in that could not be set up, or updates left unacknowledged
/// after 300 s.
pub async fn run_once(
    admin_url: &str,
    instances: usize,
    updates: usize,
) -> Result<ScaleReport, String> {
    let bin = vpnbot_bin()?;
    let db = fresh_db(
        admin_url,
        &format!("vpnbot_bench_webhook_{instances}_{}", std::process::id()),
    )
    .await?;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let sim = BotApiSim::start(l, BotApiSimOptions::default());
    let mut procs = Vec::new();
    let mut urls = Vec::new();
    for _ in 0..instances {
        let hook = format!("127.0.0.1:{}", free_port());
        let child = Command::new(&bin)
            .arg("run")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("VPNBOT_DB__URL", &db)
            .env("VPNBOT_TELEGRAM__TOKEN", sim.token())
            .env("VPNBOT_TELEGRAM__API_URL", sim.api_url())
            .env("VPNBOT_TELEGRAM__MODE", "webhook")
            .env("VPNBOT_TELEGRAM__WEBHOOK__LISTEN", &hook)
            .env(
                "VPNBOT_TELEGRAM__WEBHOOK__PUBLIC_URL",
                "http://127.0.0.1:1/",
            )
            .env("VPNBOT_TELEGRAM__WEBHOOK__SECRET_TOKEN", SECRET)
            .env(
                "VPNBOT_OBSERVABILITY__LISTEN",
                format!("127.0.0.1:{}", free_port()),
            )
            .env("VPNBOT_OBSERVABILITY__LOG_FILTER", "warn")
            .env("VPNBOT_RECONCILE__ENABLED", "false")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("{}: {e}", bin.display()))?;
        procs.push(Kill(child));
        let t = Instant::now();
        while tokio::net::TcpStream::connect(&hook).await.is_err() {
            if t.elapsed() > Duration::from_secs(60) {
                return Err(format!("instance on {hook} never listened"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        urls.push(url::Url::parse(&format!("http://{hook}/")).map_err(|e| e.to_string())?);
    }
    for i in 0..updates {
        sim.send_text(&SimUser::new(10_000_000 + i as i64, "en"), "/help");
    }
    let pids: Vec<u32> = procs.iter().map(|k| k.0.id()).collect();
    let me = std::process::id();
    let before = (
        pids.iter().map(|p| cpu_of(*p)).sum::<f64>(),
        cpu_of(me),
        postgres_cpu(),
        machine_jiffies(),
    );
    let started = Instant::now();
    sim.start_push(PushOptions::new(urls, SECRET));
    while sim.push_stats().acknowledged < updates as u64 {
        if started.elapsed() > Duration::from_secs(300) {
            return Err(format!(
                "unacknowledged after 300 s: {:?}",
                sim.push_stats()
            ));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed();
    let after = (
        pids.iter().map(|p| cpu_of(*p)).sum::<f64>(),
        cpu_of(me),
        postgres_cpu(),
        machine_jiffies(),
    );
    let answered = sim.sent().len();
    if answered != updates {
        return Err(format!("{answered} answers to {updates} updates"));
    }
    Ok(ScaleReport {
        instances,
        updates,
        elapsed,
        instances_cpu: after.0 - before.0,
        standin_cpu: after.1 - before.1,
        postgres_cpu: after.2 - before.2,
        machine_busy: (after.3 .0 - before.3 .0) / (after.3 .1 - before.3 .1).max(1.0),
    })
}

/// Runs 1, 2 and 3 instances with `updates` each and prints the figures.
pub async fn bench(admin_url: &str, updates: usize) -> bool {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "bench webhook-scale: {updates} /help updates pushed over 40 connections round-robin; \
         {cores} cores (shared with whatever else runs here)"
    );
    let mut ok = true;
    for n in 1..=3 {
        match run_once(admin_url, n, updates).await {
            Ok(r) => {
                let s = r.elapsed.as_secs_f64();
                println!(
                    "  {n} instance(s): {:>7.0} updates/s ({:.2} s); CPU s: instances {:.2} \
                     ({:.0} % of a core), stand-in {:.2}, postgres {:.2}; machine busy {:.0} %",
                    r.rate(),
                    s,
                    r.instances_cpu,
                    100.0 * r.instances_cpu / s,
                    r.standin_cpu,
                    r.postgres_cpu,
                    100.0 * r.machine_busy
                );
            }
            Err(e) => {
                println!("  {n} instance(s): failed: {e}");
                ok = false;
            }
        }
    }
    ok
}
