//! ringrelay's benchmark harness and test lab.
//!
//! - [`lab`]: the three-namespace topology of `docs/CONTRACTS.md` (the `tests` crate
//!   builds on it too).
//! - [`load`]: the scenarios' load generators and servers.
//! - [`targets`]: kernel forwarding, the engine (splice or copy relay) and HAProxy in
//!   the router.
//! - [`harness`]: the matrix of scenarios and targets.
//! - [`cpu`]: CPU per unit of work on the proxy's core(s), from `/proc/stat`.
//! - [`report`]: JSON, Markdown and SVG output.
//! - [`soak`]: `bench soak`, one engine under hostile mixed load, judged for leaks.
//! - [`capacity`]: the `tcp-capacity` scenario: how many connections each target
//!   holds, and their memory, idle and stalled.
//! - [`meter`]: what both read off a running target (counters, RSS, socket memory).
#![forbid(unsafe_code)]

pub mod capacity;
pub mod cpu;
pub mod harness;
pub mod lab;
pub mod load;
pub mod meter;
pub mod policy;
pub mod report;
pub mod soak;
pub mod targets;

use std::sync::atomic::{AtomicBool, Ordering};

/// Set by SIGINT/SIGTERM (see [`install_signal_handlers`]) or [`request_stop`]; every
/// load loop and the harness look at it and wind down.
static STOP: AtomicBool = AtomicBool::new(false);

/// True once a stop was requested.
pub fn stop_requested() -> bool {
    STOP.load(Ordering::Relaxed)
}

/// Asks every running scenario to stop.
pub fn request_stop() {
    STOP.store(true, Ordering::SeqCst);
}

/// First SIGINT/SIGTERM/SIGHUP: set the stop flag, so scenarios end, children are
/// killed and namespaces deleted on the normal path. A second one exits at once
/// (status 130) for when something is stuck; `bench lab down` then cleans up.
pub fn install_signal_handlers() -> anyhow::Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    for sig in [SIGINT, SIGTERM, SIGHUP] {
        // Order matters: the shutdown action must be registered before the flag
        // setter, so that the first signal only arms it.
        signal_hook::flag::register_conditional_shutdown(sig, 130, &STOP)?;
        signal_hook::flag::register(sig, &STOP)?;
    }
    Ok(())
}
