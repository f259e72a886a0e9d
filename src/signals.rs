//! Shutdown signals, registered before startup so that a SIGTERM that arrives while vpnbot
//! is still migrating or connecting is queued and honoured, instead of killing the process
//! with the default disposition (exit by signal, no drain).

use std::io;

/// SIGINT and SIGTERM listeners. Creating one replaces the default "terminate" action of both
/// signals for the rest of the process's life; a signal delivered before [`Self::recv`] is
/// polled is kept and returned by the first `recv`.
#[derive(Debug)]
pub struct ShutdownSignal {
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
}

impl ShutdownSignal {
    /// Registers the listeners. Must be called inside a tokio runtime.
    ///
    /// # Errors
    /// The OS refused to install a handler (`sigaction` failed).
    pub fn install() -> io::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Self {
                interrupt: signal(SignalKind::interrupt())?,
                terminate: signal(SignalKind::terminate())?,
            })
        }
        #[cfg(not(unix))]
        Ok(Self {})
    }

    /// Waits for the next signal and names it: `"SIGINT"` or `"SIGTERM"`.
    pub async fn recv(&mut self) -> &'static str {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.interrupt.recv() => "SIGINT",
                _ = self.terminate.recv() => "SIGTERM",
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            "SIGINT"
        }
    }
}
