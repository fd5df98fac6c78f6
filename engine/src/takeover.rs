//! Restarts that drop nothing: a new engine takes the listening sockets over from
//! the running one, which then drains and exits.
//!
//! `engine --takeover PATH` means: if an engine serves the Unix socket PATH, take its
//! sockets over and let it drain; either way, serve PATH for the next one. Every
//! engine of a unit can therefore be started the same way.
//!
//! The sockets themselves move (`SCM_RIGHTS`), not just the port: a listener keeps
//! its accept queue and a UDP socket its receive queue, so a connection or datagram
//! the kernel already queued is not lost, and the port is never closed, so nft's
//! tproxy never lets a packet through unrelayed nor refuses one in between. For a
//! moment both engines accept from the same sockets; each connection is taken by
//! exactly one of them. The old engine keeps its live connections and UDP flows and
//! drains them as on SIGTERM (`--drain-timeout-s`).
//!
//! The exchange, one Unix stream connection, text lines, fds attached where said:
//!
//! ```text
//! new -> old   TAKEOVER 1
//! old -> new   FDS <k>            (k <= 200 fds attached; repeated as needed)
//! old -> new   END <port> <pid>
//!              (the new engine starts its workers on the sockets)
//! new -> old   READY
//! old -> new   DRAINING           (the old engine stops accepting and drains)
//! ```
//!
//! A new engine that fails before `READY` changes nothing: the old one keeps serving.

use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::sockets::Listen;
use crate::sys;

const HELLO: &str = "TAKEOVER 1";

/// How long either side waits for the other's next line.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors of a takeover attempt.
#[derive(Debug, thiserror::Error)]
pub enum TakeoverError {
    /// Talking to the running engine failed.
    #[error("takeover through {}: {what}: {source}", path.display())]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    /// The running engine said something unexpected.
    #[error("takeover through {}: {msg}", path.display())]
    Protocol { path: PathBuf, msg: String },
}

/// The sockets taken from a running engine, and the line back to it.
pub struct Inherited {
    /// The predecessor's listening sockets.
    pub sockets: Vec<Listen>,
    /// The port they listen on.
    pub port: u16,
    /// The predecessor's pid.
    pub pid: u32,
    link: BufReader<UnixStream>,
    path: PathBuf,
}

fn io_err<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(io::Error) -> TakeoverError + 'a {
    move |source| TakeoverError::Io {
        path: path.to_path_buf(),
        what,
        source,
    }
}

fn protocol(path: &Path, msg: String) -> TakeoverError {
    TakeoverError::Protocol {
        path: path.to_path_buf(),
        msg,
    }
}

/// Reads one line (without the newline) together with any fds sent with it.
fn read_line_with_fds(link: &mut BufReader<UnixStream>) -> io::Result<(String, Vec<OwnedFd>)> {
    // Lines are short and the sender writes each with its fds in one sendmsg, so a
    // line never straddles two messages; anything buffered is a protocol error.
    if !link.buffer().is_empty() {
        return Err(io::Error::other("unexpected data before a line with fds"));
    }
    let mut buf = [0u8; 256];
    let (n, fds) = sys::recv_with_fds(link.get_ref().as_fd(), &mut buf)?;
    if n == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    let text = std::str::from_utf8(&buf[..n]).map_err(|_| io::Error::other("not UTF-8"))?;
    match text.strip_suffix('\n') {
        Some(line) if !line.contains('\n') => Ok((line.to_string(), fds)),
        _ => Err(io::Error::other(format!("malformed line {text:?}"))),
    }
}

/// Asks the engine serving `path`, if any, for its sockets. `Ok(None)`: nobody
/// serves it (no file, or a stale one from an engine that is gone).
pub fn take_over(path: &Path) -> Result<Option<Inherited>, TakeoverError> {
    let stream = match UnixStream::connect(path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(io_err(path, "connecting")(e)),
    };
    stream
        .set_read_timeout(Some(STEP_TIMEOUT))
        .map_err(io_err(path, "setting a timeout"))?;
    let mut link = BufReader::new(stream);
    writeln!(link.get_mut(), "{HELLO}").map_err(io_err(path, "sending the request"))?;
    let mut sockets = Vec::new();
    loop {
        let (line, fds) = read_line_with_fds(&mut link).map_err(io_err(path, "reading"))?;
        let mut words = line.split_whitespace();
        match (words.next(), words.next(), words.next()) {
            (Some("FDS"), Some(k), None) => {
                if k.parse::<usize>().ok() != Some(fds.len()) {
                    return Err(protocol(
                        path,
                        format!("{line:?} came with {} fds", fds.len()),
                    ));
                }
                for fd in fds {
                    let (l, _) =
                        Listen::inspect(fd).map_err(io_err(path, "inspecting a socket"))?;
                    sockets.push(l);
                }
            }
            (Some("END"), Some(port), Some(pid)) if fds.is_empty() => {
                let (Ok(port), Ok(pid)) = (port.parse(), pid.parse()) else {
                    return Err(protocol(path, format!("bad line {line:?}")));
                };
                return Ok(Some(Inherited {
                    sockets,
                    port,
                    pid,
                    link,
                    path: path.to_path_buf(),
                }));
            }
            (Some("ERR"), ..) => return Err(protocol(path, format!("the engine said {line:?}"))),
            _ => return Err(protocol(path, format!("unexpected {line:?}"))),
        }
    }
}

impl Inherited {
    /// Tells the predecessor that this engine serves the sockets now; it stops
    /// accepting and drains.
    pub fn release(mut self) -> Result<(), TakeoverError> {
        let path = self.path.clone();
        writeln!(self.link.get_mut(), "READY").map_err(io_err(&path, "sending READY"))?;
        let mut line = String::new();
        self.link
            .read_line(&mut line)
            .map_err(io_err(&path, "reading the answer to READY"))?;
        if line.trim_end() != "DRAINING" {
            return Err(protocol(&path, format!("answer to READY: {line:?}")));
        }
        Ok(())
    }
}

/// What [`serve`] reports to the engine's main loop.
#[derive(Debug)]
pub enum Event {
    /// A successor took the sockets over: stop and drain.
    HandedOver { pid: u32 },
    /// A successor asked but failed before taking over; still serving.
    Failed(String),
}

/// Serves `path` from a thread: hands the sockets in `handover` (the engine's
/// duplicates; `None` once stopping) to the next engine that asks, then reports
/// [`Event::HandedOver`] and stops serving. Replaces any stale file at `path`.
pub fn serve(
    path: &Path,
    handover: Arc<Mutex<Option<Vec<Listen>>>>,
    port: u16,
    events: mpsc::Sender<Event>,
) -> io::Result<std::thread::JoinHandle<()>> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    std::thread::Builder::new()
        .name("ringrelay-takeover".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                match hand_over(stream, &handover, port) {
                    Ok(pid) => {
                        let _ = events.send(Event::HandedOver { pid });
                        return;
                    }
                    Err(e) => {
                        let _ = events.send(Event::Failed(e.to_string()));
                    }
                }
            }
        })
}

/// One takeover, from the predecessor's side. Returns the successor's pid.
fn hand_over(
    stream: UnixStream,
    handover: &Mutex<Option<Vec<Listen>>>,
    port: u16,
) -> io::Result<u32> {
    stream.set_read_timeout(Some(STEP_TIMEOUT))?;
    stream.set_write_timeout(Some(STEP_TIMEOUT))?;
    let successor = sys::peer_pid(stream.as_fd()).ok();
    let mut link = BufReader::new(stream);
    let mut line = String::new();
    link.read_line(&mut line)?;
    if line.trim_end() != HELLO {
        writeln!(link.get_mut(), "ERR expected {HELLO}")?;
        return Err(io::Error::other(format!("bad request {line:?}")));
    }
    // Hold the lock while sending: a concurrent stop must not drop them mid-way.
    let guard = handover.lock().unwrap_or_else(|e| e.into_inner());
    let Some(sockets) = guard.as_ref() else {
        writeln!(link.get_mut(), "ERR stopping")?;
        return Err(io::Error::other("asked while stopping"));
    };
    let fds: Vec<BorrowedFd<'_>> = sockets.iter().map(|l| l.fd.as_fd()).collect();
    for chunk in fds.chunks(sys::MAX_FDS_PER_MSG) {
        let head = format!("FDS {}\n", chunk.len());
        sys::send_with_fds(link.get_ref().as_fd(), head.as_bytes(), chunk)?;
    }
    let end = format!("END {port} {}\n", std::process::id());
    sys::send_with_fds(link.get_ref().as_fd(), end.as_bytes(), &[])?;
    drop(guard);
    line.clear();
    link.read_line(&mut line)?;
    if line.trim_end() != "READY" {
        return Err(io::Error::other(format!(
            "the successor did not get ready (said {line:?})"
        )));
    }
    writeln!(link.get_mut(), "DRAINING")?;
    Ok(successor.unwrap_or(0))
}
