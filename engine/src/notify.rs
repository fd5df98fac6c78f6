//! The systemd notification protocol (`sd_notify(3)`), without libsystemd: one
//! datagram of `KEY=VALUE` lines to the Unix socket in `$NOTIFY_SOCKET` (a path, or
//! `@name` in the abstract namespace). Outside systemd the variable is unset and
//! every call is a no-op.
//!
//! The engine sends `READY=1` once every worker listens (`Type=notify`), `STATUS=`
//! with a one-line summary, `MAINPID=` when a successor takes over (`--takeover`,
//! which needs `NotifyAccess=all`), `STOPPING=1` when it starts draining, and
//! `WATCHDOG=1` from a thread that first checks that every worker is still turning
//! its loop (`WatchdogSec=`): a wedged worker stops the pings and systemd restarts
//! the engine.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// Where notifications go, if anywhere.
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
}

impl Notifier {
    /// From `$NOTIFY_SOCKET`; a no-op notifier when it is unset.
    pub fn from_env() -> io::Result<Notifier> {
        let Some(name) = std::env::var_os("NOTIFY_SOCKET") else {
            return Ok(Notifier { target: None });
        };
        let name = name.to_string_lossy().into_owned();
        let addr = match name.strip_prefix('@') {
            Some(abs) => SocketAddr::from_abstract_name(abs.as_bytes())?,
            None => SocketAddr::from_pathname(&name)?,
        };
        Ok(Notifier {
            target: Some((UnixDatagram::unbound()?, addr)),
        })
    }

    /// Whether a service manager listens.
    pub fn is_active(&self) -> bool {
        self.target.is_some()
    }

    /// Sends `state` (newline-separated `KEY=VALUE` lines).
    pub fn send(&self, state: &str) -> io::Result<()> {
        match &self.target {
            Some((sock, addr)) => sock.send_to_addr(state.as_bytes(), addr).map(drop),
            None => Ok(()),
        }
    }
}

/// The watchdog interval systemd asks for (`$WATCHDOG_USEC`, for this pid only if
/// `$WATCHDOG_PID` says so).
pub fn watchdog_interval() -> Option<Duration> {
    if let Some(pid) = std::env::var_os("WATCHDOG_PID") {
        if pid.to_string_lossy().parse::<u32>().ok() != Some(std::process::id()) {
            return None;
        }
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// Pings the watchdog at half its interval while `alive()` says every worker is
/// turning its loop; stops pinging (and says why in `STATUS=`) as soon as it does
/// not, so systemd's `WatchdogSec=` restarts the engine.
pub fn spawn_watchdog(
    notifier: Notifier,
    interval: Duration,
    mut alive: impl FnMut() -> Result<(), String> + Send + 'static,
) -> io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("ringrelay-watchdog".into())
        .spawn(move || loop {
            std::thread::sleep(interval / 2);
            match alive() {
                Ok(()) => {
                    let _ = notifier.send("WATCHDOG=1");
                }
                Err(why) => {
                    crate::log::error(
                        "watchdog_stuck",
                        format_args!("watchdog: {why}; no more pings"),
                        &[],
                    );
                    let _ = notifier.send(&format!("STATUS=stuck: {why}"));
                    return;
                }
            }
        })
}
