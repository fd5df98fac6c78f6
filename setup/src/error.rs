//! The one error type of the library. Every message names the problem and the fix on
//! one line; `main` prints it as is.

use crate::config::ConfigError;
use crate::ports::PortListError;
use crate::runner::RunError;
use std::io;
use std::path::PathBuf;
use thiserror::Error;

/// Why `apply`, `status` or `teardown` could not do their job.
#[derive(Debug, Error)]
pub enum SetupError {
    /// The options contradict each other or a value is out of range.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A `--tcp-ports` / `--udp-ports` list does not parse.
    #[error(transparent)]
    Ports(#[from] PortListError),
    /// `--in-iface` names an interface this network namespace does not have.
    #[error("unknown interface {name:?} for --in-iface: there is no /sys/class/net/{name} in this network namespace; check the name with `ip link`")]
    UnknownInterface {
        /// The name given.
        name: String,
    },
    /// A program the chosen backend needs is not installed.
    #[error("{program} not found in PATH: install the {package} package{hint}")]
    MissingProgram {
        /// The program looked for.
        program: String,
        /// The Debian package that ships it.
        package: &'static str,
        /// An alternative, starting with ", " (or empty).
        hint: &'static str,
    },
    /// The process lacks CAP_NET_ADMIN (the kernel answered EPERM, or CapEff lacks it).
    #[error("{what}: operation not permitted: run as root or with CAP_NET_ADMIN")]
    NotPermitted {
        /// What was refused.
        what: String,
    },
    /// IPv6 is disabled in this kernel or namespace (`ipv6.disable=1`).
    #[error("IPv6 is disabled here (no /proc/sys/net/ipv6): pass --no-ipv6")]
    Ipv6Unavailable,
    /// `lo` is down: `ip -6 route add local ::/0 dev lo` is refused ("Nexthop device is
    /// not up") and locally delivered packets have nowhere to go.
    #[error("the loopback interface lo is down, and the interception route `local default dev lo` needs it: run `ip link set lo up`")]
    LoopbackDown,
    /// The policy routing table already holds routes setup did not add.
    #[error("routing table {table} already holds routes that setup did not add ({routes}): marked packets would follow them; pick a free table with --table")]
    TableInUse {
        /// The table.
        table: u32,
        /// The foreign routes, `;`-separated.
        routes: String,
    },
    /// `table inet ringrelay` exists, and neither carries setup's marker nor is
    /// recorded in the state file: someone else's table, which apply would replace.
    #[error("nft table inet {table} already exists and setup did not create it (it lacks the comment \"{marker}\" and no state file records it): apply would replace it and its rules would be lost; rename or move that table, or if it is a leftover of an older setup, delete it with `nft delete table inet {table}`")]
    ForeignTable {
        /// The table's name.
        table: &'static str,
        /// The marker comment looked for.
        marker: &'static str,
    },
    /// A command ran and exited non-zero.
    #[error("`{cmd}` failed ({code}): {stderr}")]
    CommandFailed {
        /// The command line.
        cmd: String,
        /// `exit N` or `killed by a signal`.
        code: String,
        /// Its stderr, trimmed to one line per message.
        stderr: String,
    },
    /// A command could not be started.
    #[error(transparent)]
    Run(#[from] RunError),
    /// Reading or writing a `/proc/sys` or `/sys` file failed.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The state file exists but cannot be read or parsed.
    #[error("state file {path}: {reason}; it records what `setup apply` changed: repair it, or remove it and check the box by hand")]
    BadState {
        /// The state file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The journal of an interrupted apply cannot be read or parsed.
    #[error("apply journal {path}: {reason}; it lists the steps an interrupted `setup apply` began: repair it, or remove it and check the box with `setup status`")]
    BadJournal {
        /// The journal file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Undoing an interrupted apply failed part-way; the journal is kept.
    #[error("recovering from an interrupted `setup apply` failed: {failures}; the journal {path} was kept: fix the cause and run `setup teardown` or `setup apply` again")]
    RecoveryIncomplete {
        /// The steps that failed, `;`-separated.
        failures: String,
        /// The journal.
        path: PathBuf,
    },
    /// Writing the state file failed (after a successful apply, which was rolled back).
    #[error("cannot write state file {path}: {source}; set RINGRELAY_STATE_DIR or --state-file to a writable place")]
    StateWrite {
        /// The state file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A step of `apply` failed; what had been done was undone.
    #[error("{cause}; {rollback}")]
    ApplyFailed {
        /// The step that failed.
        cause: Box<SetupError>,
        /// What happened to the steps already done.
        rollback: String,
    },
    /// Another `setup` holds the state directory's lock for longer than we waited.
    #[error("another `setup` run has held the lock on {dir} for {waited_s} s (apply or teardown in progress, possibly stuck): wait for it to finish, or find it with `pgrep -a setup`")]
    Busy {
        /// The locked state directory.
        dir: PathBuf,
        /// How long we waited.
        waited_s: u64,
    },
    /// Some teardown steps failed; the state file is kept so that a rerun finishes.
    #[error("teardown incomplete: {failures}; the state file {path} was kept: fix the cause and run `setup teardown` again")]
    TeardownIncomplete {
        /// The failed steps, `;`-separated.
        failures: String,
        /// The state file.
        path: PathBuf,
    },
}

impl SetupError {
    /// Wraps an I/O error on a file.
    pub fn file(path: impl Into<PathBuf>, source: io::Error) -> Self {
        SetupError::File {
            path: path.into(),
            source,
        }
    }
}
