//! `ringrelay-setup`: turns a Linux router into one that hands forwarded TCP and UDP
//! to the ringrelay engine through TPROXY, for IPv4 and IPv6, and takes it back out.
//!
//! The crate follows one shape (house style lesson 9, after kubernetes-sigs/knftables):
//!
//! 1. [`config::Config`] holds validated options (defaults from `docs/CONTRACTS.md`).
//! 2. [`plan::build`] turns them into a [`plan::Plan`] of typed objects: firewall rules,
//!    ip rules, local routes and sysctls. It reads nothing from the system.
//! 3. [`nft`], [`iptables`], [`iproute`] and [`sysctl`] render that plan into the exact
//!    text sent to `nft -f -`, `iptables-restore --noflush`, `ip` and `/proc/sys`.
//!    `setup apply --dry-run` prints the same text.
//! 4. [`ops`] applies the plan as a transaction (validate everything, firewall in one
//!    atomic call, then ip rules, routes and sysctls, rolling back on failure), records
//!    what it changed in a [`state::State`] file, and tears exactly that down again.
//!    Each step's inverse goes to a [`journal`] before the step runs, so an apply that
//!    is killed half-way is undone by the next apply or teardown.
//! 5. [`status`] checks a live box against the recorded plan, and the data path: a
//!    transparent listener on the port ([`sockdiag`]), sysctls that drop marked
//!    packets, and the box's own input firewall ([`input`]).
//!
//! Every command and every `/proc` or `/sys` access goes through the
//! [`runner::Runner`] trait, so tests replay the whole flow against a recording fake
//! and compare the text that would have been sent.
//!
//! [`cli`] holds the `setup` binary's command line (clap), so the man page generator
//! can render it too.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod cli;
pub mod config;
pub mod error;
pub mod host;
pub mod input;
pub mod iproute;
pub mod iptables;
pub mod journal;
pub mod nft;
pub mod ops;
pub mod plan;
pub mod ports;
pub mod runner;
pub mod sockdiag;
pub mod state;
pub mod status;
pub mod sysctl;

pub use error::SetupError;
