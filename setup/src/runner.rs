//! The only door to the system: commands, `/proc`, `/sys`.
//!
//! [`RealRunner`] spawns programs and touches real files. [`RecordingRunner`] is an
//! in-memory fake that records every command (with its stdin) and every file write,
//! and answers reads from canned data, so tests can check the exact text `apply`
//! would send without root.

use crate::plan::{Family, L4};
use crate::sockdiag::{self, DiagSocket};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use thiserror::Error;

/// One command line to run, with optional text fed to its stdin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cmd {
    /// Program name, looked up in `PATH` (plus the sbin directories).
    pub program: String,
    /// Arguments, not including the program.
    pub args: Vec<String>,
    /// Text written to stdin (`nft -f -`, `iptables-restore`), or `None` for no stdin.
    pub stdin: Option<String>,
}

impl Cmd {
    /// A command with arguments and no stdin.
    pub fn new<S: AsRef<str>>(program: &str, args: &[S]) -> Self {
        Cmd {
            program: program.to_string(),
            args: args.iter().map(|a| a.as_ref().to_string()).collect(),
            stdin: None,
        }
    }

    /// The same command with `text` fed to stdin.
    pub fn with_stdin(mut self, text: String) -> Self {
        self.stdin = Some(text);
        self
    }
}

impl fmt::Display for Cmd {
    /// The command line as a shell would take it (arguments quoted where needed);
    /// stdin is not shown.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.program)?;
        for a in &self.args {
            f.write_str(" ")?;
            f.write_str(&shell_quote(a))?;
        }
        Ok(())
    }
}

/// Quotes a word for a POSIX shell when it holds anything but safe characters.
pub fn shell_quote(word: &str) -> String {
    let safe = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=,@+%".contains(c));
    if safe {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', "'\\''"))
    }
}

/// What a finished command left behind.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Output {
    /// Exit code; `None` when killed by a signal.
    pub code: Option<i32>,
    /// Everything written to stdout.
    pub stdout: String,
    /// Everything written to stderr.
    pub stderr: String,
}

impl Output {
    /// Exit code 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// A successful output with this stdout (for fakes).
    pub fn ok(stdout: &str) -> Self {
        Output {
            code: Some(0),
            stdout: stdout.to_string(),
            stderr: String::new(),
        }
    }

    /// A failed output with this exit code and stderr (for fakes).
    pub fn fail(code: i32, stderr: &str) -> Self {
        Output {
            code: Some(code),
            stdout: String::new(),
            stderr: stderr.to_string(),
        }
    }
}

/// A command that could not be run at all (as opposed to one that ran and failed).
#[derive(Debug, Error)]
pub enum RunError {
    /// The program is not installed, or not in `PATH` nor the sbin directories.
    #[error("{program} not found in PATH")]
    NotFound {
        /// The program looked for.
        program: String,
    },
    /// Spawning the program or feeding its stdin failed.
    #[error("could not run {program}: {source}")]
    Io {
        /// The program.
        program: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// Everything setup does to the system goes through this trait.
pub trait Runner {
    /// Runs a command to completion and returns its exit code and output.
    fn run(&self, cmd: &Cmd) -> Result<Output, RunError>;
    /// Where a program would be run from, or `None` when it is not installed.
    fn find_program(&self, name: &str) -> Option<PathBuf>;
    /// Reads a whole (small) file, such as a `/proc/sys` entry.
    fn read_file(&self, path: &Path) -> io::Result<String>;
    /// Writes a whole file, such as a `/proc/sys` entry (equivalent to `sysctl -w`).
    fn write_file(&self, path: &Path, contents: &str) -> io::Result<()>;
    /// Names in a directory, sorted.
    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>>;
    /// Whether a path exists.
    fn exists(&self, path: &Path) -> bool;
    /// The listening TCP / every UDP socket of one family in this network namespace,
    /// from the kernel's `sock_diag` (equivalent to `ss -lnte` / `ss -anue`).
    fn sockets(&self, family: Family, l4: L4) -> io::Result<Vec<DiagSocket>>;
}

/// Directories searched after `PATH`: the firewall tools live in sbin, which an
/// unprivileged user's `PATH` often lacks.
const SBIN_DIRS: [&str; 4] = ["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin"];

/// The runner that really spawns programs and touches files.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealRunner;

impl Runner for RealRunner {
    fn run(&self, cmd: &Cmd) -> Result<Output, RunError> {
        let path = self
            .find_program(&cmd.program)
            .ok_or_else(|| RunError::NotFound {
                program: cmd.program.clone(),
            })?;
        let io_err = |source| RunError::Io {
            program: cmd.program.clone(),
            source,
        };
        let mut child = Command::new(path)
            .args(&cmd.args)
            // Stable, parseable messages from nft, iptables and ip.
            .env("LC_ALL", "C")
            .stdin(if cmd.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(io_err)?;
        // Feed stdin from another thread so a child that writes a lot before it has
        // read everything cannot deadlock against us.
        let out = std::thread::scope(|scope| {
            if let (Some(text), Some(mut stdin)) = (&cmd.stdin, child.stdin.take()) {
                scope.spawn(move || {
                    // A child that exits early closes the pipe; its exit code tells why.
                    let _ = stdin.write_all(text.as_bytes());
                });
            }
            child.wait_with_output()
        })
        .map_err(io_err)?;
        Ok(Output {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    fn find_program(&self, name: &str) -> Option<PathBuf> {
        if name.contains('/') {
            let p = PathBuf::from(name);
            return is_executable(&p).then_some(p);
        }
        let path_var = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path_var)
            .chain(SBIN_DIRS.iter().map(PathBuf::from))
            .map(|dir| dir.join(name))
            .find(|p| is_executable(p))
    }

    fn read_file(&self, path: &Path) -> io::Result<String> {
        std::fs::read_to_string(path)
    }

    fn write_file(&self, path: &Path, contents: &str) -> io::Result<()> {
        // One write(2) per value: /proc/sys handlers parse the first write only.
        let mut f = std::fs::OpenOptions::new().write(true).open(path)?;
        f.write_all(contents.as_bytes())
    }

    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(path)? {
            names.push(entry?.file_name().to_string_lossy().into_owned());
        }
        names.sort();
        Ok(names)
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }

    fn sockets(&self, family: Family, l4: L4) -> io::Result<Vec<DiagSocket>> {
        sockdiag::dump(family, l4)
    }
}

fn is_executable(p: &Path) -> bool {
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Something the fake saw: a command or a file write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A command, with its stdin.
    Run(Cmd),
    /// A file write (a sysctl).
    Write {
        /// The file written.
        path: PathBuf,
        /// What was written.
        contents: String,
    },
}

/// A canned answer for commands whose line starts with `prefix`.
#[derive(Debug)]
struct Response {
    prefix: String,
    output: Output,
    once: bool,
}

#[derive(Debug, Default)]
struct Fake {
    events: Vec<Event>,
    responses: Vec<Response>,
    files: BTreeMap<PathBuf, String>,
    missing: Vec<String>,
    denied: Vec<PathBuf>,
    sockets: Option<Vec<DiagSocket>>,
}

/// An in-memory runner for tests: records commands and writes, answers from canned
/// data. Commands with no canned answer succeed with empty output.
#[derive(Debug, Default)]
pub struct RecordingRunner {
    fake: RefCell<Fake>,
}

impl RecordingRunner {
    /// An empty fake: every program exists, every command succeeds silently, no files.
    pub fn new() -> Self {
        Self::default()
    }

    /// Answers every later command whose displayed line starts with `prefix` with
    /// `output`. The most recently added matching answer wins.
    pub fn respond(&self, prefix: &str, output: Output) {
        self.fake.borrow_mut().responses.push(Response {
            prefix: prefix.to_string(),
            output,
            once: false,
        });
    }

    /// Like [`respond`](Self::respond) but used for one command only; queued one-shot
    /// answers for the same prefix are used in the order they were added.
    pub fn respond_once(&self, prefix: &str, output: Output) {
        self.fake.borrow_mut().responses.push(Response {
            prefix: prefix.to_string(),
            output,
            once: true,
        });
    }

    /// Makes `find_program(name)` and `run` of `name` fail as if it were not installed.
    pub fn remove_program(&self, name: &str) {
        self.fake.borrow_mut().missing.push(name.to_string());
    }

    /// Makes writes to `path` fail with EACCES (as /proc/sys does without privileges).
    pub fn deny_write(&self, path: &str) {
        self.fake.borrow_mut().denied.push(PathBuf::from(path));
    }

    /// Answers [`Runner::sockets`] from this list (filtered by family and protocol).
    /// Without it the fake has no `sock_diag`, and callers fall back to `/proc/net`.
    pub fn set_sockets(&self, sockets: Vec<DiagSocket>) {
        self.fake.borrow_mut().sockets = Some(sockets);
    }

    /// Creates or replaces a file.
    pub fn set_file(&self, path: &str, contents: &str) {
        self.fake
            .borrow_mut()
            .files
            .insert(PathBuf::from(path), contents.to_string());
    }

    /// The current content of a file.
    pub fn file(&self, path: &str) -> Option<String> {
        self.fake.borrow().files.get(Path::new(path)).cloned()
    }

    /// Everything seen so far.
    pub fn events(&self) -> Vec<Event> {
        self.fake.borrow().events.clone()
    }

    /// The commands seen so far, as displayed lines.
    pub fn command_lines(&self) -> Vec<String> {
        self.fake
            .borrow()
            .events
            .iter()
            .filter_map(|e| match e {
                Event::Run(c) => Some(c.to_string()),
                Event::Write { .. } => None,
            })
            .collect()
    }

    /// Forgets the events seen so far.
    pub fn clear_events(&self) {
        self.fake.borrow_mut().events.clear();
    }
}

impl Runner for RecordingRunner {
    fn run(&self, cmd: &Cmd) -> Result<Output, RunError> {
        let mut fake = self.fake.borrow_mut();
        fake.events.push(Event::Run(cmd.clone()));
        if fake.missing.contains(&cmd.program) {
            return Err(RunError::NotFound {
                program: cmd.program.clone(),
            });
        }
        let line = cmd.to_string();
        // One-shot answers first, oldest first; then standing answers, newest first.
        let once = fake
            .responses
            .iter()
            .position(|r| r.once && line.starts_with(&r.prefix));
        if let Some(i) = once {
            return Ok(fake.responses.remove(i).output);
        }
        Ok(fake
            .responses
            .iter()
            .rev()
            .find(|r| !r.once && line.starts_with(&r.prefix))
            .map(|r| r.output.clone())
            .unwrap_or_else(|| Output::ok("")))
    }

    fn find_program(&self, name: &str) -> Option<PathBuf> {
        let fake = self.fake.borrow();
        (!fake.missing.iter().any(|m| m == name)).then(|| PathBuf::from("/usr/sbin").join(name))
    }

    fn read_file(&self, path: &Path) -> io::Result<String> {
        self.fake
            .borrow()
            .files
            .get(path)
            .cloned()
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
    }

    fn write_file(&self, path: &Path, contents: &str) -> io::Result<()> {
        let mut fake = self.fake.borrow_mut();
        fake.events.push(Event::Write {
            path: path.to_path_buf(),
            contents: contents.to_string(),
        });
        if fake.denied.iter().any(|d| d == path) {
            return Err(io::Error::from(io::ErrorKind::PermissionDenied));
        }
        match fake.files.get_mut(path) {
            // /proc/sys entries keep the value without the newline `echo` adds.
            Some(v) => {
                *v = contents.trim_end().to_string();
                Ok(())
            }
            None => Err(io::Error::from(io::ErrorKind::NotFound)),
        }
    }

    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        let fake = self.fake.borrow();
        let mut names: Vec<String> = fake
            .files
            .keys()
            .filter_map(|p| p.strip_prefix(path).ok())
            .filter_map(|rest| rest.components().next())
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names.dedup();
        if names.is_empty() {
            return Err(io::Error::from(io::ErrorKind::NotFound));
        }
        Ok(names)
    }

    fn exists(&self, path: &Path) -> bool {
        self.fake.borrow().files.keys().any(|p| p.starts_with(path))
    }

    fn sockets(&self, family: Family, l4: L4) -> io::Result<Vec<DiagSocket>> {
        match &self.fake.borrow().sockets {
            Some(all) => Ok(all
                .iter()
                .filter(|s| s.family == family && s.l4 == l4)
                .cloned()
                .collect()),
            None => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "no sock_diag in the fake runner",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("0x1/0x1"), "0x1/0x1");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn fake_answers_and_records() {
        let r = RecordingRunner::new();
        r.respond("ip rule", Output::ok("standing"));
        r.respond_once("ip rule show", Output::ok("first"));
        r.set_file("/sys/class/net/eth1/flags", "0x1003");
        r.set_file("/proc/sys/net/ipv4/ip_forward", "0");
        let show = Cmd::new("ip", &["rule", "show"]);
        assert_eq!(r.run(&show).unwrap().stdout, "first");
        assert_eq!(r.run(&show).unwrap().stdout, "standing");
        assert_eq!(
            r.list_dir(Path::new("/sys/class/net")).unwrap(),
            vec!["eth1"]
        );
        r.write_file(Path::new("/proc/sys/net/ipv4/ip_forward"), "1\n")
            .unwrap();
        assert_eq!(r.file("/proc/sys/net/ipv4/ip_forward").unwrap(), "1");
        assert!(r.write_file(Path::new("/proc/sys/nope"), "1").is_err());
        r.remove_program("nft");
        assert!(r.find_program("nft").is_none());
        assert_eq!(r.command_lines(), vec!["ip rule show", "ip rule show"]);
    }

    #[test]
    fn real_runner_runs_and_feeds_stdin() {
        let out = RealRunner
            .run(&Cmd::new("cat", &[] as &[&str]).with_stdin("hello".into()))
            .unwrap();
        assert!(out.success());
        assert_eq!(out.stdout, "hello");
        let missing = RealRunner.run(&Cmd::new("no-such-program-rr", &["x"]));
        assert!(matches!(missing, Err(RunError::NotFound { .. })));
    }
}
