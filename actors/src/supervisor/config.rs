//! The supervisor's tunables, and the deadlines an API caller should wait with.

use std::time::Duration;

use crate::policy::RestartPolicy;

/// Tunables of the supervisor.
#[derive(Debug, Clone, PartialEq)]
pub struct SupervisorConfig {
    /// When and how fast to restart crashed sessions.
    pub policy: RestartPolicy,
    /// How long a session gets to close before it is killed.
    pub shutdown_timeout: Duration,
    /// How long a session gets to answer a call (a fault), or may spend on one message
    /// before the watchdog kills it.
    pub call_timeout: Duration,
    /// How often the watchdog looks for sessions stuck in one message.
    pub watchdog_interval: Duration,
    /// How long a create waits for the first pairing code before it is rolled back.
    pub create_timeout: Duration,
    /// Sessions started per boot batch.
    pub boot_batch: usize,
    /// Pause between boot batches (staggers first connects); zero: no pause.
    pub boot_interval: Duration,
    /// Seed for the jitter source (`None`: from the clock).
    pub jitter_seed: Option<u64>,
}

impl Default for SupervisorConfig {
    fn default() -> Self {
        SupervisorConfig {
            policy: RestartPolicy::default(),
            shutdown_timeout: Duration::from_secs(10),
            call_timeout: Duration::from_secs(5),
            watchdog_interval: Duration::from_secs(10),
            create_timeout: Duration::from_secs(30),
            boot_batch: 32,
            boot_interval: Duration::from_millis(200),
            jitter_seed: None,
        }
    }
}

/// The commands an API caller waits on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// `Create`: until the first pairing code.
    Create,
    /// `Start` and `Get`: one step.
    Start,
    /// `Stop`, `Delete`, `Restore`: the child closes (and may be killed).
    Stop,
    /// `Logout`: the network is told, then the child closes.
    Logout,
    /// `Fault`: the session answers or is declared hung.
    Fault,
    /// `Send`: the network takes the message (bounded by [`SEND_TIMEOUT`]).
    Send,
}

/// How long a send may take before the caller is told it timed out.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(30);

impl SupervisorConfig {
    /// How long the caller of `cmd` should wait before answering 503: the supervisor's own
    /// deadlines for that command, plus one call timeout of margin (which also covers the
    /// commit the reply waits for).
    pub fn reply_deadline(&self, cmd: Command) -> Duration {
        let margin = self.call_timeout;
        // A stop waits `shutdown_timeout`, then kills; the kill deadline adds a little.
        let stop = self.shutdown_timeout * 2;
        margin
            + match cmd {
                Command::Create => self.create_timeout,
                Command::Start => Duration::ZERO,
                Command::Stop => stop,
                Command::Logout => stop + self.shutdown_timeout,
                Command::Fault => self.call_timeout,
                Command::Send => SEND_TIMEOUT,
            }
    }
}
