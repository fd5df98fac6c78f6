//! The apply journal: a write-ahead log that makes an interrupted `setup apply`
//! recoverable.
//!
//! apply changes the box in several steps (nft or iptables, ip rules, routes,
//! sysctls) and records the outcome in the state file only at the end. A `kill -9`
//! (or a power cut, an OOM kill, systemd's stop timeout) in between used to leave the
//! table, a rule or a route behind with no state file describing them. Now, before
//! each step, apply appends the step's inverse to `<state file>.journal` and syncs
//! it; only then does it act. The journal also holds a copy of the state file as it
//! was (the previous apply's, if any), and the id that the new state file will carry.
//!
//! The next `apply` or `teardown` finds the journal and recovers first:
//!
//! * the state file carries the journal's id: the apply had finished and recorded
//!   itself; only removing what the apply before it had added may be incomplete, so
//!   that cleanup runs again (every step of it is idempotent);
//! * otherwise every journalled step is undone, newest first, which leaves the box as
//!   the previous apply left it (or as it was, with none). Undoing a step whose action
//!   never ran is harmless: each inverse checks what is there before it acts.
//!
//! `status` only reads: it reports the interrupted apply and names both commands.

use crate::error::SetupError;
use crate::state::State;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

const HEADER: &str = "# ringrelay setup apply journal: each line is written before its step runs. If this file\n# exists, an apply was interrupted; the next `setup apply` or `setup teardown` recovers.\n";
const VERSION: &str = "1";

/// The journal next to a state file: `<state file>.journal`.
pub fn path_for(state_path: &Path) -> PathBuf {
    let mut p = state_path.as_os_str().to_owned();
    p.push(".journal");
    PathBuf::from(p)
}

/// A fresh id for one apply (time and pid: unique on one box).
pub fn new_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{nanos:x}-{}", std::process::id())
}

/// The journal's text before its first step: header, version, id, namespace and the
/// copy of the previous state. A pure function, so that the tests can round-trip it.
fn head(id: &str, netns: &str, prev: Option<&State>) -> String {
    let mut text = String::from(HEADER);
    text.push_str(&format!("journal {VERSION}\nid {id}\nnetns {netns}\n"));
    if let Some(prev) = prev {
        for line in prev.render().lines() {
            text.push_str("prev ");
            text.push_str(line);
            text.push('\n');
        }
    }
    text
}

/// The line [`Journal::record`] appends for one step.
fn step_line(step: &str) -> String {
    format!("step {step}\n")
}

/// An open journal of an apply in progress.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: File,
}

fn write_err(path: &Path) -> impl Fn(io::Error) -> SetupError + '_ {
    move |source| SetupError::StateWrite {
        path: path.to_path_buf(),
        source,
    }
}

/// Makes a created or removed file's directory entry durable.
fn sync_dir(path: &Path) -> io::Result<()> {
    match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

impl Journal {
    /// Starts the journal of apply `id` in namespace `netns`, with a copy of the state
    /// as it is now (`prev`). Synced before it returns: nothing has changed yet.
    pub fn begin(
        state_path: &Path,
        id: &str,
        netns: &str,
        prev: Option<&State>,
    ) -> Result<Journal, SetupError> {
        let path = path_for(state_path);
        let err = write_err(&path);
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(&err)?;
        }
        let text = head(id, netns, prev);
        let mut file = File::create(&path).map_err(&err)?;
        file.write_all(text.as_bytes()).map_err(&err)?;
        file.sync_all().map_err(&err)?;
        sync_dir(&path).map_err(&err)?;
        let file = OpenOptions::new().append(true).open(&path).map_err(&err)?;
        drop(err);
        Ok(Journal { path, file })
    }

    /// Appends one step and syncs it, before the step runs.
    pub fn record(&mut self, step: &str) -> Result<(), SetupError> {
        let err = write_err(&self.path);
        self.file
            .write_all(step_line(step).as_bytes())
            .map_err(&err)?;
        self.file.sync_data().map_err(&err)
    }

    /// The apply is over (committed, or rolled back): the journal goes.
    pub fn finish(self) -> Result<(), SetupError> {
        remove(&self.path)
    }

    /// Where the journal lives.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Removes a journal; a missing one is fine.
pub fn remove(path: &Path) -> Result<(), SetupError> {
    match std::fs::remove_file(path) {
        Ok(()) => sync_dir(path).map_err(write_err(path)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(write_err(path)(e)),
    }
}

/// What an interrupted apply left in its journal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interrupted {
    /// The journal file.
    pub path: PathBuf,
    /// The apply's id (the state file carries it once the apply recorded itself).
    pub id: String,
    /// The namespace identity it ran in.
    pub netns: String,
    /// The state file as it was before that apply.
    pub prev: Option<State>,
    /// The steps begun, oldest first (each one the inverse to run).
    pub steps: Vec<String>,
}

impl Interrupted {
    /// How many steps the apply began (`rule-pref` lines only complete a rule step).
    pub fn begun(&self) -> usize {
        self.steps
            .iter()
            .filter(|s| !s.starts_with("rule-pref "))
            .count()
    }

    /// Whether the apply got as far as recording itself in `current` (the state now).
    pub fn committed(&self, current: Option<&State>) -> bool {
        current.and_then(|s| s.apply_id.as_deref()) == Some(self.id.as_str())
    }
}

/// Reads the journal next to `state_path`, if there is one.
pub fn load(state_path: &Path) -> Result<Option<Interrupted>, SetupError> {
    let path = path_for(state_path);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(SetupError::BadJournal {
                path,
                reason: e.to_string(),
            })
        }
    };
    parse(&text, path).map(Some)
}

fn parse(text: &str, path: PathBuf) -> Result<Interrupted, SetupError> {
    let bad = |reason: String| SetupError::BadJournal {
        path: path.clone(),
        reason,
    };
    let mut version = None;
    let mut id = None;
    let mut netns = None;
    let mut prev = String::new();
    let mut steps = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, rest) = line.split_once(' ').unwrap_or((line, ""));
        match key {
            "journal" => version = Some(rest.to_string()),
            "id" => id = Some(rest.to_string()),
            "netns" => netns = Some(rest.to_string()),
            "prev" => {
                prev.push_str(rest);
                prev.push('\n');
            }
            "step" => steps.push(rest.to_string()),
            _ => return Err(bad(format!("line {}: unknown key: {line:?}", i + 1))),
        }
    }
    if version.as_deref() != Some(VERSION) {
        return Err(bad(format!(
            "missing or unsupported `journal` line (this setup writes version {VERSION})"
        )));
    }
    let prev = if prev.is_empty() {
        None
    } else {
        Some(State::parse(&prev).map_err(|e| bad(format!("the copy of the previous state: {e}")))?)
    };
    Ok(Interrupted {
        path: path.clone(),
        id: id.ok_or_else(|| bad("no id line".to_string()))?,
        netns: netns.ok_or_else(|| bad("no netns line".to_string()))?,
        prev,
        steps,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn state() -> State {
        State {
            netns: "ns1".into(),
            config: Config::default(),
            rp_ifaces: vec!["eth0".into()],
            rules: Vec::new(),
            routes: Vec::new(),
            sysctls: Vec::new(),
            mangle: Vec::new(),
            input_rules: Vec::new(),
            ipv6_skipped: None,
            apply_id: Some("old".into()),
            fingerprint: vec!["table inet ringrelay {".into()],
        }
    }

    #[test]
    fn written_steps_survive_and_finish_removes() {
        let dir = std::env::temp_dir().join(format!("rrsetup-journal-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let sp = dir.join("x.state");
        assert_eq!(load(&sp).unwrap(), None);
        let mut j = Journal::begin(&sp, "id1", "ns1", Some(&state())).unwrap();
        j.record("nft").unwrap();
        j.record("rule v4 0x1/0x1 100").unwrap();
        // As if killed here: the file is complete up to the last step.
        let got = load(&sp).unwrap().unwrap();
        assert_eq!(got.id, "id1");
        assert_eq!(got.netns, "ns1");
        assert_eq!(got.prev, Some(state()));
        assert_eq!(got.steps, vec!["nft", "rule v4 0x1/0x1 100"]);
        assert_eq!(got.begun(), 2);
        assert!(!got.committed(Some(&state())));
        let mut now = state();
        now.apply_id = Some("id1".into());
        assert!(got.committed(Some(&now)));
        j.finish().unwrap();
        assert_eq!(load(&sp).unwrap(), None);
        // A first apply has no previous state.
        let j = Journal::begin(&sp, "id2", "ns1", None).unwrap();
        assert_eq!(load(&sp).unwrap().unwrap().prev, None);
        j.finish().unwrap();
        std::fs::write(path_for(&sp), "id x\n").unwrap();
        assert!(load(&sp)
            .unwrap_err()
            .to_string()
            .contains("unsupported `journal` line"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// Property tests against corrupt journals, and the seed corpus.
#[cfg(test)]
mod fuzz;
