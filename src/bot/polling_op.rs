//! The receive loop as a tracked operation for the watchdog: which phase it is in (long poll,
//! waiting for a free handler slot, backing off), since when, and the deadline of that phase.
//! Dumps list it under `bot_polling`; a phase that outlives its deadline is
//! `operation_overdue` ("the bot stopped answering" with its cause attached).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::diagnostics::{InflightEntry, InflightKind, InflightSource};

/// Where the receive loop is. Names are the `phase` field of the dump entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollPhase {
    /// `getWebhookInfo` and `setMyCommands` before the first poll.
    Startup,
    /// A `getUpdates` long poll is in flight.
    LongPoll,
    /// Every handler slot of a lane is busy and its queue (`bot.update_queue_capacity`) is
    /// full; the loop waits for room before it polls again.
    HandlerSlot,
    /// Pausing after a failed poll (backoff, `retry_after`, 409 Conflict).
    Backoff,
    /// Stopping: waiting (bounded) for handlers in flight and confirming the last offset.
    Drain,
}

impl PollPhase {
    /// The phase name in dumps.
    pub fn as_str(self) -> &'static str {
        match self {
            PollPhase::Startup => "startup",
            PollPhase::LongPoll => "long_poll",
            PollPhase::HandlerSlot => "handler_slot",
            PollPhase::Backoff => "backoff",
            PollPhase::Drain => "drain",
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct State {
    phase: PollPhase,
    since: Instant,
    deadline: Duration,
}

/// Shared between the loop (writer) and the watchdog thread (reader). The mutex guards a few
/// words and is never held across an `.await`. Empty while the loop is not running.
#[derive(Debug, Clone, Default)]
pub struct PollingOperation {
    state: Arc<Mutex<Option<State>>>,
}

impl PollingOperation {
    /// The loop enters `phase`, which must end within `deadline`.
    pub fn enter(&self, phase: PollPhase, deadline: Duration) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = Some(State {
            phase,
            since: Instant::now(),
            deadline,
        });
    }

    /// The loop stopped.
    pub fn clear(&self) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// The current phase, if the loop runs.
    pub fn phase(&self) -> Option<PollPhase> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map(|s| s.phase)
    }
}

impl InflightSource for PollingOperation {
    fn section(&self) -> &'static str {
        "bot_polling"
    }

    fn entries(&self) -> Vec<InflightEntry> {
        let Some(s) = *self.state.lock().unwrap_or_else(|e| e.into_inner()) else {
            return Vec::new();
        };
        let mut e = InflightEntry::started_at(InflightKind::Operation, s.since);
        e.task = Some("bot_polling".into());
        e.operation = Some("bot.receive_loop".into());
        e.phase = Some(s.phase.as_str().into());
        e.deadline = Some(s.deadline);
        e.detail = format!(
            "receive loop in phase {} for {:.1} s (deadline {:.1} s)",
            s.phase.as_str(),
            e.age.as_secs_f64(),
            s.deadline.as_secs_f64()
        );
        vec![e]
    }
}

/// Clears the operation when the loop ends, however it ends.
#[derive(Debug)]
pub(crate) struct ClearOnDrop(pub(crate) PollingOperation);

impl Drop for ClearOnDrop {
    fn drop(&mut self) {
        self.0.clear();
    }
}
