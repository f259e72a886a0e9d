//! A private, throwaway PostgreSQL cluster started from the server binaries already on the
//! machine (`initdb`, `pg_ctl`), trust auth on a free loopback port, removed on drop.
//!
//! Crates that embed PostgreSQL (`postgresql_embedded`, `pg-embed`) download server builds at
//! run time, which this project's machines cannot do; the system binaries are used instead.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// How to install the server when no binaries are found (printed as one line).
pub const INSTALL_HINT: &str =
    "PostgreSQL server binaries not found: install them with `apt-get install postgresql` \
     (Debian/Ubuntu), or set DATABASE_URL to a running server";

/// Why a cluster could not be started.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddedPgError {
    /// No `initdb`/`pg_ctl` on this machine.
    #[error("{INSTALL_HINT}")]
    NotInstalled,
    /// A step failed; carries the step and its stderr.
    #[error("embedded PostgreSQL: {step} failed: {detail}")]
    Step {
        /// Which step.
        step: &'static str,
        /// What it printed.
        detail: String,
    },
}

/// A running throwaway cluster. Stopped (`pg_ctl stop -m immediate`) and deleted on drop.
#[derive(Debug)]
pub struct EmbeddedPostgres {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    as_postgres_user: bool,
}

impl EmbeddedPostgres {
    /// Finds the server binaries, runs `initdb` and starts the server (about 2.5 s here).
    ///
    /// # Errors
    /// [`EmbeddedPgError::NotInstalled`] or the failing step.
    pub fn start() -> Result<EmbeddedPostgres, EmbeddedPgError> {
        let bin = find_bin_dir().ok_or(EmbeddedPgError::NotInstalled)?;
        let dir = tempfile::Builder::new()
            .prefix("vpnbot-pg-")
            .tempdir()
            .map_err(|e| step("tempdir", e))?;
        // initdb refuses to run as root; run the server as the `postgres` system user then.
        let as_postgres_user = is_root();
        if as_postgres_user {
            chown_postgres(dir.path())?;
        }
        let port = free_port().map_err(|e| step("pick port", e))?;
        let me = EmbeddedPostgres {
            bin,
            dir,
            port,
            as_postgres_user,
        };
        let data = me.data_dir();
        me.run(
            "initdb",
            &[
                "-D",
                data.to_str().unwrap_or_default(),
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
            ],
        )?;
        let opts = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
            me.dir.path().display()
        );
        me.run(
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap_or_default(),
                "-o",
                &opts,
                "-l",
                me.dir
                    .path()
                    .join("server.log")
                    .to_str()
                    .unwrap_or_default(),
                "-w",
                "-t",
                "30",
                "start",
            ],
        )?;
        Ok(me)
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres` (trust auth, no password).
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn run(&self, tool: &'static str, args: &[&str]) -> Result<(), EmbeddedPgError> {
        let exe = self.bin.join(tool);
        let mut cmd = if self.as_postgres_user {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        let out = cmd
            .args(args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .output()
            .map_err(|e| step(tool, e))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(EmbeddedPgError::Step {
                step: tool,
                detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            })
        }
    }
}

impl Drop for EmbeddedPostgres {
    fn drop(&mut self) {
        let data = self.data_dir();
        let _ = self.run(
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap_or_default(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        );
    }
}

fn step(step: &'static str, e: impl std::fmt::Display) -> EmbeddedPgError {
    EmbeddedPgError::Step {
        step,
        detail: e.to_string(),
    }
}

/// The server's bin directory: `pg_config --bindir`, else the newest `/usr/lib/postgresql/*/bin`.
pub fn find_bin_dir() -> Option<PathBuf> {
    let has_tools = |p: &Path| p.join("initdb").exists() && p.join("pg_ctl").exists();
    let mut candidates: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| rd.flatten().map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    candidates.sort();
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        if out.status.success() {
            candidates.push(PathBuf::from(
                String::from_utf8_lossy(&out.stdout).trim().to_string(),
            ));
        }
    }
    candidates.into_iter().rev().find(|p| has_tools(p))
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn chown_postgres(dir: &Path) -> Result<(), EmbeddedPgError> {
    let out = Command::new("chown")
        .arg("postgres:postgres")
        .arg(dir)
        .output()
        .map_err(|e| step("chown", e))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(EmbeddedPgError::Step {
            step: "chown",
            detail: "running as root needs a `postgres` system user (installed with the server)"
                .into(),
        })
    }
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
