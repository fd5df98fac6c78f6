//! `setup`: the command line of ringrelay-setup. Parses options, picks the state file,
//! calls the library and turns its result into output and an exit code.
#![forbid(unsafe_code)]

use anyhow::{Context, Result};
use clap::Parser;
use ringrelay_setup::cli::{Cli, Command};
use ringrelay_setup::config::Config;
use ringrelay_setup::runner::RealRunner;
use ringrelay_setup::state::{self, LockFor, StateLock};
use ringrelay_setup::{host, ops, status};
use std::path::PathBuf;
use std::process::ExitCode;

fn state_path(cli: &Cli) -> Result<PathBuf> {
    if let Some(p) = &cli.state_file {
        return Ok(p.clone());
    }
    let inode = host::netns_inode().context("reading /proc/self/ns/net to name the state file")?;
    Ok(state::default_path(
        std::env::var_os(state::STATE_DIR_ENV),
        inode,
    ))
}

fn netns_identity() -> Result<String> {
    host::netns_identity().context("reading /proc/self/ns/net to identify the network namespace")
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let is_status = matches!(cli.command, Command::Status);
    match run(&cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("setup: error: {e:#}");
            ExitCode::from(if is_status {
                status::EXIT_CANNOT_CHECK
            } else {
                1
            })
        }
    }
}

fn run(cli: &Cli) -> Result<ExitCode> {
    let runner = RealRunner;
    let path = state_path(cli)?;
    match &cli.command {
        Command::Apply { plan, dry_run } => {
            let (config, defaulted_closed) = plan.to_config();
            if defaulted_closed {
                eprintln!(
                    "setup: note: --backend iptables is fail-closed: TPROXY drops intercepted packets while nothing listens on port {}",
                    config.port
                );
            }
            if *dry_run {
                print!("{}", ops::dry_run(&runner, &config, &path)?);
                return Ok(ExitCode::SUCCESS);
            }
            let _lock = StateLock::acquire(&path, LockFor::Apply, state::LOCK_WAIT)?;
            let report = ops::apply(&runner, &config, &path, &netns_identity()?)?;
            for line in &report.lines {
                println!("{line}");
            }
            for w in &report.warnings {
                eprintln!("setup: warning: {w}");
            }
            println!(
                "ringrelay: applied (backend {}, port {}, fail-{}); check with `setup status`",
                config.backend.name(),
                config.port,
                config.fail_mode.name()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Status => {
            let _lock = StateLock::acquire(&path, LockFor::Status, state::LOCK_WAIT)?;
            // Without a state file, what is missing is listed against the defaults.
            let report = status::status(&runner, &path, &netns_identity()?, &Config::default())?;
            print!("{}", report.render());
            Ok(ExitCode::from(report.exit_code()))
        }
        Command::Teardown => {
            let _lock = StateLock::acquire(&path, LockFor::Teardown, state::LOCK_WAIT)?;
            let report = ops::teardown(&runner, &path, &netns_identity()?)?;
            for line in &report.lines {
                println!("{line}");
            }
            for w in &report.warnings {
                eprintln!("setup: warning: {w}");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
