//! The lab: three network namespaces joined by two veth pairs, exactly as
//! `docs/CONTRACTS.md` draws it.
//!
//! ```text
//!  client ns                 router ns                       server ns
//!  eth0 198.18.0.2/24  <-> veth-c 198.18.0.1/24
//!       fd00:18:0::2/64       fd00:18:0::1/64
//!                             veth-s 198.18.1.1/24   <->  eth0 198.18.1.2/24, 198.18.1.3/24
//!                                    fd00:18:1::1/64           fd00:18:1::2/64, fd00:18:1::3/64
//! ```
//!
//! [`Lab::up`] builds it and waits (by polling) until IPv4 and IPv6 work end to end;
//! dropping the [`Lab`] kills every process living in its namespaces and deletes them,
//! also while a panic unwinds. Code runs inside a namespace either as a thread that
//! `setns(2)`-ed into it ([`Netns::spawn`], [`Netns::run`]) or as a child process
//! started through `ip netns exec` ([`Netns::command`], [`NsChild`]).
//!
//! Everything here shells out to iproute2 (`ip`) rather than speaking rtnetlink:
//! the lab is built once per test, and the exact commands are easy to replay by hand.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use nix::sched::CloneFlags;
use nix::sys::signal::Signal;
use nix::unistd::Pid;

/// Where `ip netns add` puts the bind mounts that name namespaces.
const NETNS_RUN_DIR: &str = "/run/netns";

/// How long [`Lab::up`] waits for links, addresses and routes to work.
const LAB_READY_TIMEOUT: Duration = Duration::from_secs(15);

/// Grace period between SIGTERM and SIGKILL when a child or a lab goes away.
pub const DEFAULT_KILL_GRACE: Duration = Duration::from_secs(3);

/// Lab addresses and interface names (`docs/CONTRACTS.md`, "Lab topology").
///
/// 198.18.0.0/15 is the RFC 2544 benchmarking range and fd00::/8 is ULA: traffic to
/// these addresses never leaves the namespaces this process created.
pub mod addrs {
    use std::net::{Ipv4Addr, Ipv6Addr};

    /// Client address (client ns, `eth0`).
    pub const CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
    /// Router address on the client side (router ns, `veth-c`); the client's gateway.
    pub const ROUTER_C4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
    /// Router address on the server side (router ns, `veth-s`); the server's gateway.
    pub const ROUTER_S4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
    /// First server address (server ns, `eth0`).
    pub const SERVER4_A: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
    /// Second server address (server ns, `eth0`), for tests that need two destinations.
    pub const SERVER4_B: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 3);
    /// IPv4 prefix length of both lab subnets.
    pub const PREFIX4_LEN: u8 = 24;

    /// Client address, IPv6 (`fd00:18:0::2`).
    pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, 2);
    /// Router address on the client side, IPv6 (`fd00:18:0::1`).
    pub const ROUTER_C6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, 1);
    /// Router address on the server side, IPv6 (`fd00:18:1::1`).
    pub const ROUTER_S6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 1, 0, 0, 0, 0, 1);
    /// First server address, IPv6 (`fd00:18:1::2`).
    pub const SERVER6_A: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 1, 0, 0, 0, 0, 2);
    /// Second server address, IPv6 (`fd00:18:1::3`).
    pub const SERVER6_B: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 1, 0, 0, 0, 0, 3);
    /// IPv6 prefix length of both lab subnets.
    pub const PREFIX6_LEN: u8 = 64;

    /// The router's interface towards the client.
    pub const ROUTER_IFACE_CLIENT: &str = "veth-c";
    /// The router's interface towards the server.
    pub const ROUTER_IFACE_SERVER: &str = "veth-s";
    /// The client's only interface.
    pub const CLIENT_IFACE: &str = "eth0";
    /// The server's only interface.
    pub const SERVER_IFACE: &str = "eth0";
}

/// Errors of the lab module. Callers usually see them wrapped in `anyhow::Error`;
/// use [`is_need_root`] to tell "cannot run here" from "broke".
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// Namespaces cannot be created by this process (not root, no CAP_SYS_ADMIN).
    /// Tests print `SKIPPED` on this one instead of failing.
    #[error("network namespaces need root: {0}")]
    NeedRoot(String),
    /// An external command (`ip`, `sh`) exited non-zero; `stderr` says why.
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Command {
        /// The command line as run.
        cmd: String,
        /// Its exit status.
        status: String,
        /// Its standard error, trimmed.
        stderr: String,
    },
    /// Something polled for did not happen in time.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout {
        /// What was waited for.
        what: String,
        /// How long it was waited for.
        after: Duration,
    },
}

/// True when `err` (or its cause chain) says the lab cannot be built for lack of privilege.
pub fn is_need_root(err: &anyhow::Error) -> bool {
    err.chain()
        .any(|e| matches!(e.downcast_ref::<LabError>(), Some(LabError::NeedRoot(_))))
}

/// Runs `cmd`, returns its stdout, or a [`LabError::Command`] carrying its stderr.
fn run_checked(cmd: &mut Command) -> anyhow::Result<String> {
    let shown = format!("{cmd:?}").replace('"', "");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start `{shown}`"))?;
    if !out.status.success() {
        return Err(LabError::Command {
            cmd: shown,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        }
        .into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A named network namespace (`/run/netns/NAME`). Cheap to clone: it is only the name;
/// the [`Lab`] that created it owns its lifetime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Refers to an existing named namespace (for example one kept by `bench lab up`).
    pub fn from_name(name: impl Into<String>) -> Netns {
        Netns { name: name.into() }
    }

    /// The namespace's name as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bind mount that pins the namespace; what `setns(2)` opens.
    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_RUN_DIR).join(&self.name)
    }

    /// `ip netns exec NAME program`: add arguments and run it like any `Command`.
    /// `ip` execs the program, so the child's pid is the program's pid.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Runs `sh -c script` inside the namespace; returns stdout, errors with stderr.
    pub fn sh(&self, script: &str) -> anyhow::Result<String> {
        run_checked(self.command("sh").arg("-c").arg(script))
            .with_context(|| format!("in netns {}", self.name))
    }

    /// Runs `ip -n NAME args...` (iproute2 enters the namespace itself, no exec needed).
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        run_checked(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// Feeds `script` to `ip -n NAME -batch -`: one process for many commands; stops
    /// at the first failing line and says which one.
    pub fn ip_batch(&self, script: &str) -> anyhow::Result<()> {
        let shown = format!("ip -n {} -batch -", self.name);
        let mut child = Command::new("ip")
            .args(["-n", &self.name, "-batch", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start `{shown}`"))?;
        child
            .stdin
            .take()
            .context("ip -batch stdin")?
            .write_all(script.as_bytes())
            .with_context(|| format!("writing to `{shown}`"))?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            return Err(LabError::Command {
                cmd: format!("{shown} <<< {script:?}"),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            }
            .into());
        }
        Ok(())
    }

    /// Writes a sysctl inside the namespace, e.g. `sysctl("net.ipv4.ip_forward", "1")`.
    ///
    /// `/proc/sys/net` resolves against the network namespace of the *task* that
    /// opens it, so a thread that entered the namespace sees that namespace's values.
    pub fn sysctl(&self, key: &str, value: &str) -> anyhow::Result<()> {
        let path = sysctl_path(key);
        let value = value.to_string();
        let name = self.name.clone();
        self.run(move || {
            std::fs::write(&path, value.as_bytes())
                .with_context(|| format!("sysctl {} in netns {name}", path.display()))
        })
    }

    /// Reads a sysctl inside the namespace (trimmed).
    pub fn read_sysctl(&self, key: &str) -> anyhow::Result<String> {
        let path = sysctl_path(key);
        let name = self.name.clone();
        self.run(move || {
            std::fs::read_to_string(&path)
                .map(|s| s.trim().to_string())
                .with_context(|| format!("read {} in netns {name}", path.display()))
        })
    }

    /// Starts a thread that first enters this namespace with `setns(CLONE_NEWNET)`,
    /// then runs `f`. Sockets it creates, and threads it spawns, live in the namespace.
    /// If entering fails the thread panics, so `join()` reports it.
    pub fn spawn<F, R>(&self, f: F) -> JoinHandle<R>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        let path = self.path();
        let tag: String = self.name.rsplit('-').next().unwrap_or("ns").to_string();
        std::thread::Builder::new()
            .name(format!("ns-{tag}"))
            .spawn(move || {
                if let Err(e) = enter_netns(&path) {
                    panic!("cannot enter netns {}: {e:#}", path.display());
                }
                f()
            })
            .expect("cannot spawn a thread")
    }

    /// [`Netns::spawn`] and join; a panic in `f` propagates to the caller.
    pub fn run<F, R>(&self, f: F) -> R
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        match self.spawn(f).join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// Starts `program args...` inside the namespace as an [`NsChild`] (killed on drop).
    pub fn spawn_child<I, S>(&self, program: &str, args: I) -> anyhow::Result<NsChild>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.command(program);
        cmd.args(args);
        NsChild::spawn(format!("{program}@{}", self.name), cmd)
    }

    /// Pids of the processes whose network namespace is this one (`ip netns pids`),
    /// never including this process.
    pub fn pids(&self) -> Vec<i32> {
        let me = std::process::id() as i32;
        Command::new("ip")
            .args(["netns", "pids", &self.name])
            .stderr(Stdio::null())
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok())
                    .filter(|&p| p != me)
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// The `rps_cpus` mask of `cores`: hex, in comma-separated 32-bit groups, most
/// significant first (the kernel's bitmap format).
fn rps_mask(cores: &[usize]) -> anyhow::Result<String> {
    anyhow::ensure!(!cores.is_empty(), "no cores to steer receive processing to");
    let top = *cores.iter().max().expect("not empty");
    let mut words = vec![0u32; top / 32 + 1];
    for &c in cores {
        words[c / 32] |= 1 << (c % 32);
    }
    Ok(words
        .iter()
        .rev()
        .map(|w| format!("{w:08x}"))
        .collect::<Vec<_>>()
        .join(","))
}

/// `net.ipv4.ip_forward` -> `/proc/sys/net/ipv4/ip_forward`. Interface names in keys
/// (`net.ipv4.conf.veth-c.rp_filter`) contain no dots in this lab.
fn sysctl_path(key: &str) -> PathBuf {
    Path::new("/proc/sys").join(key.replace('.', "/"))
}

/// Moves the calling thread into the network namespace pinned at `path`.
fn enter_netns(path: &Path) -> anyhow::Result<()> {
    let file = File::open(path).with_context(|| format!("open {}", path.display()))?;
    nix::sched::setns(&file, CloneFlags::CLONE_NEWNET).context("setns(CLONE_NEWNET)")?;
    Ok(())
}

/// Text captured from one of a child's output streams, with a condition variable so
/// readers can wait for a line (the engine's `ready`) instead of sleeping.
#[derive(Default)]
struct Captured {
    state: Mutex<CapturedState>,
    changed: Condvar,
}

#[derive(Default)]
struct CapturedState {
    text: String,
    eof: bool,
}

impl Captured {
    /// Reads `src` line by line until EOF; runs on its own thread.
    fn pump(self: Arc<Self>, src: impl Read) {
        let mut reader = BufReader::new(src);
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = reader.read_until(b'\n', &mut line).unwrap_or(0);
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if n == 0 {
                st.eof = true;
                self.changed.notify_all();
                return;
            }
            st.text.push_str(&String::from_utf8_lossy(&line));
            self.changed.notify_all();
        }
    }

    /// Waits up to `timeout` for the writer side to close; true if it did.
    fn wait_eof(&self, timeout: Duration) -> bool {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (st, _) = self
            .changed
            .wait_timeout_while(st, timeout, |s| !s.eof)
            .unwrap_or_else(|p| p.into_inner());
        st.eof
    }

    fn snapshot(&self) -> String {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .text
            .clone()
    }
}

/// A child process inside a namespace; on drop it gets SIGTERM, then SIGKILL after
/// [`DEFAULT_KILL_GRACE`], and is reaped. Its stdout and stderr are captured.
///
/// The child runs in its own process group so that a Ctrl-C on the terminal reaches
/// only `bench`, which then shuts children down in order.
pub struct NsChild {
    label: String,
    child: Child,
    status: Option<ExitStatus>,
    stdout: Arc<Captured>,
    stderr: Arc<Captured>,
    pumps: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for NsChild {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NsChild")
            .field("label", &self.label)
            .field("pid", &self.child.id())
            .field("status", &self.status)
            .finish()
    }
}

impl NsChild {
    /// Spawns `cmd` (usually from [`Netns::command`]) with stdin closed and stdout and
    /// stderr captured. `label` names it in errors.
    pub fn spawn(label: impl Into<String>, mut cmd: Command) -> anyhow::Result<NsChild> {
        use std::os::unix::process::CommandExt;
        let label = label.into();
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .with_context(|| format!("cannot start {label}: {cmd:?}"))?;
        let stdout = Arc::new(Captured::default());
        let stderr = Arc::new(Captured::default());
        let mut pumps = Vec::new();
        if let Some(out) = child.stdout.take() {
            let c = stdout.clone();
            pumps.push(std::thread::spawn(move || c.pump(out)));
        }
        if let Some(err) = child.stderr.take() {
            let c = stderr.clone();
            pumps.push(std::thread::spawn(move || c.pump(err)));
        }
        Ok(NsChild {
            label,
            child,
            status: None,
            stdout,
            stderr,
            pumps,
        })
    }

    /// The label given at spawn time.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The child's pid (the program's: `ip netns exec` execs it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `sig` to the child; does nothing once it has been reaped (the pid may
    /// belong to someone else by then).
    pub fn signal(&self, sig: Signal) -> anyhow::Result<()> {
        if self.status.is_some() {
            return Ok(());
        }
        nix::sys::signal::kill(Pid::from_raw(self.child.id() as i32), sig)
            .with_context(|| format!("kill -{sig} {}", self.label))
    }

    /// The exit status if the child has exited (reaps it), without blocking.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Waits up to `d` for the child to exit; `None` if it is still running.
    pub fn wait_timeout(&mut self, d: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + d;
        loop {
            if let Some(st) = self.try_wait() {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL the whole process group and reap.
    /// Returns the exit status (a signal status if it had to be killed).
    pub fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        if let Some(st) = self.try_wait() {
            return Some(st);
        }
        let _ = self.signal(Signal::SIGTERM);
        if let Some(st) = self.wait_timeout(grace) {
            return Some(st);
        }
        // The group id is the child's pid (process_group(0)); killing the group also
        // takes down anything it forked.
        let _ = nix::sys::signal::killpg(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
        self.status = self.child.wait().ok();
        self.status
    }

    /// Everything the child wrote to stdout so far.
    pub fn stdout(&self) -> String {
        self.stdout.snapshot()
    }

    /// Everything the child wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.snapshot()
    }

    /// Waits until a stdout line satisfies `pred` and returns it. Fails when the child
    /// exits (or closes stdout) first, or after `timeout`; the error carries stderr.
    pub fn wait_for_line(
        &mut self,
        pred: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let st = self.stdout.state.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(line) = st.text.lines().find(|l| pred(l)) {
                    return Ok(line.to_string());
                }
                let now = Instant::now();
                if st.eof || now >= deadline {
                    let eof = st.eof;
                    drop(st);
                    let status = self.wait_timeout(Duration::from_millis(200));
                    // The stderr pump may lag the stdout one: let it catch up.
                    if status.is_some() {
                        self.stderr.wait_eof(Duration::from_millis(500));
                    }
                    return Err(anyhow!(
                        "{}: {} (exit status {:?}); stderr: {}",
                        self.label,
                        if eof {
                            "closed stdout before the expected line"
                        } else {
                            "expected line did not appear in time"
                        },
                        status,
                        self.stderr().trim()
                    ));
                }
                let wait = (deadline - now).min(Duration::from_millis(50));
                drop(
                    self.stdout
                        .changed
                        .wait_timeout(st, wait)
                        .unwrap_or_else(|p| p.into_inner()),
                );
            }
            if self.try_wait().is_some() {
                // Let the pump drain what was written before exit, then check once more.
                self.stdout.wait_eof(Duration::from_millis(200));
            }
        }
    }

    /// After the child exited: waits (at most a second per stream) for its output to
    /// be read to the end, so that `stdout()` and `stderr()` are complete. A grandchild
    /// still holding the pipes cannot block this; the pump threads then finish alone.
    pub fn finish_output(&mut self) {
        if self.status.is_some()
            && self.stdout.wait_eof(Duration::from_secs(1))
            && self.stderr.wait_eof(Duration::from_secs(1))
        {
            for p in self.pumps.drain(..) {
                let _ = p.join();
            }
        }
    }
}

impl Drop for NsChild {
    fn drop(&mut self) {
        self.stop(DEFAULT_KILL_GRACE);
        self.finish_output();
    }
}

/// Polls `/proc/thread-self/net/tcp` and `tcp6` inside `ns` until some socket listens
/// on `port`. (`/proc/net` is `/proc/self/net`, the namespace of the *main* thread;
/// only `thread-self` follows the reading thread's `setns`.)
pub fn wait_tcp_listen(ns: &Netns, port: u16, timeout: Duration) -> anyhow::Result<()> {
    let found = ns.run(move || {
        let deadline = Instant::now() + timeout;
        loop {
            if tcp_listening(port) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    if found {
        Ok(())
    } else {
        Err(LabError::Timeout {
            what: format!("a TCP listener on port {port} in netns {}", ns.name()),
            after: timeout,
        }
        .into())
    }
}

/// True when the calling thread's namespace has a TCP socket in LISTEN on `port`.
fn tcp_listening(port: u16) -> bool {
    ["/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"]
        .iter()
        .any(|path| {
            std::fs::read_to_string(path)
                .map(|text| proc_net_has_listener(&text, port))
                .unwrap_or(false)
        })
}

/// Parses `/proc/net/tcp{,6}`: `sl local_address rem_address st ...` with the local
/// address as `HEX_IP:HEX_PORT` and state `0A` = TCP_LISTEN.
fn proc_net_has_listener(text: &str, port: u16) -> bool {
    text.lines()
        .skip(1)
        .any(|line| line.split_whitespace().nth(3) == Some("0A") && local_port(line) == Some(port))
}

/// Transport protocol, for [`count_sockets`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    /// `/proc/net/tcp` and `tcp6` (every state, TIME_WAIT included).
    Tcp,
    /// `/proc/net/udp` and `udp6`.
    Udp,
}

/// Counts the sockets in `ns` whose LOCAL port is `port`, in any state. In the router
/// this proves interception: a TPROXY-accepted socket (or a UDP reply socket) carries
/// the original destination, i.e. the server's address and port, as its local address.
pub fn count_sockets(ns: &Netns, port: u16, proto: Proto) -> usize {
    count_sockets_tw(ns, port, proto, None)
}

/// [`count_sockets`], counting also the TCP TIME_WAIT entries whose remote port lies
/// in `tw_remote` (client ports of the current run; see `load::crr_port_range`):
/// a connection-churn run through a proxy may have nothing but TIME_WAIT left at the
/// moment it is probed, while TIME_WAIT left by an earlier target must not count.
pub fn count_sockets_tw(
    ns: &Netns,
    port: u16,
    proto: Proto,
    tw_remote: Option<(u16, u16)>,
) -> usize {
    ns.run(move || count_sockets_here(port, proto, tw_remote))
}

/// [`count_sockets_tw`] in the calling thread's own network namespace (one that
/// entered it with [`Netns::spawn`] or [`Netns::run`]), so that the caller can say
/// which core does the reading.
pub fn count_sockets_here(port: u16, proto: Proto, tw_remote: Option<(u16, u16)>) -> usize {
    let files: [&str; 2] = match proto {
        Proto::Tcp => ["/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"],
        Proto::Udp => ["/proc/thread-self/net/udp", "/proc/thread-self/net/udp6"],
    };
    files
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .map(|text| count_in_proc_net(&text, port, proto, tw_remote))
        .sum()
}

/// Sockets on local `port` in one `/proc/net/{tcp,udp}{,6}` text. TCP TIME_WAIT
/// entries (state 06) outlive the proxy that made them by up to a minute: they count
/// only when their remote port is in `tw_remote`.
fn count_in_proc_net(text: &str, port: u16, proto: Proto, tw_remote: Option<(u16, u16)>) -> usize {
    text.lines()
        .skip(1)
        .filter(|l| local_port(l) == Some(port))
        .filter(|l| {
            proto != Proto::Tcp
                || tcp_state(l) != Some(0x06)
                || matches!((tw_remote, remote_port(l)), (Some((lo, hi)), Some(p)) if (lo..=hi).contains(&p))
        })
        .count()
}

/// The remote port of one `/proc/net/{tcp,udp}{,6}` line.
fn remote_port(line: &str) -> Option<u16> {
    port_in_column(line, 2)
}

/// The state column (`st`, hex) of one `/proc/net/{tcp,udp}{,6}` line.
fn tcp_state(line: &str) -> Option<u8> {
    u8::from_str_radix(line.split_whitespace().nth(3)?, 16).ok()
}

/// The local port of one `/proc/net/{tcp,udp}{,6}` line.
fn local_port(line: &str) -> Option<u16> {
    port_in_column(line, 1)
}

/// The port of the `ADDR:PORT` (hex) in whitespace column `col` of a `/proc/net` line.
fn port_in_column(line: &str, col: usize) -> Option<u16> {
    let addr = line.split_whitespace().nth(col)?;
    u16::from_str_radix(addr.rsplit(':').next()?, 16).ok()
}

/// Next lab number in this process: several labs coexist (tests run in parallel).
static NEXT_LAB: AtomicU32 = AtomicU32::new(0);

/// Prefixes of the labs alive in this process, for [`cleanup_live_labs`].
static LIVE_LABS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// The namespace name suffixes, in creation order.
const SUFFIXES: [&str; 3] = ["cli", "rtr", "srv"];

/// The three-namespace lab. Dropping it tears everything down (also during a panic
/// unwind); [`Lab::keep`] leaks it on purpose.
#[derive(Debug)]
pub struct Lab {
    /// Client namespace: `eth0` 198.18.0.2/24, fd00:18:0::2/64, default via the router.
    pub client: Netns,
    /// Router namespace: `veth-c` and `veth-s`, forwarding on, rp_filter off.
    pub router: Netns,
    /// Server namespace: `eth0` with .2 and .3 (v4 and v6), default via the router.
    pub server: Netns,
    prefix: String,
    kept: bool,
}

impl Lab {
    /// Builds the CONTRACTS.md topology (IPv4 and IPv6 with `nodad`, forwarding on in
    /// the router, rp_filter 0 there, default routes in client and server via the
    /// router) and waits until TCP over v4 and v6 reaches both server addresses.
    ///
    /// Fails with [`LabError::NeedRoot`] (see [`is_need_root`]) without privileges.
    pub fn up() -> anyhow::Result<Lab> {
        if !nix::unistd::geteuid().is_root() {
            return Err(LabError::NeedRoot(format!(
                "euid is {}, `ip netns add` needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN)",
                nix::unistd::geteuid()
            ))
            .into());
        }
        let n = NEXT_LAB.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("rr{}x{n}", std::process::id());
        let ns = |s: &str| Netns::from_name(format!("{prefix}-{s}"));
        let lab = Lab {
            client: ns("cli"),
            router: ns("rtr"),
            server: ns("srv"),
            prefix: prefix.clone(),
            kept: false,
        };
        LIVE_LABS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(prefix);
        // From here on, `lab`'s Drop removes whatever was half built if a step fails.
        lab.build()
            .with_context(|| format!("building lab {}", lab.prefix))?;
        Ok(lab)
    }

    fn build(&self) -> anyhow::Result<()> {
        use addrs::*;
        for ns in self.namespaces() {
            if let Err(e) = run_checked(Command::new("ip").args(["netns", "add", ns.name()])) {
                let text = format!("{e:#}");
                if text.contains("Permission denied") || text.contains("Operation not permitted") {
                    return Err(LabError::NeedRoot(text).into());
                }
                return Err(e);
            }
            // DAD would hold new IPv6 addresses "tentative" for ~1 s; `nodad` on the
            // addresses covers ours, these cover the link-local ones too.
            ns.sysctl("net.ipv6.conf.default.accept_dad", "0")?;
            ns.sysctl("net.ipv6.conf.all.accept_dad", "0")?;
        }
        let r = &self.router;
        // Forwarding for both families; rp_filter off because the router will carry
        // TPROXY-diverted flows whose reverse path is `lo` (docs/deployment.md, "Sysctl
        // traps").
        // The per-interface value counts too (the kernel uses max(all, iface)), and
        // `default` is what veth-c/veth-s inherit when created below.
        r.sysctl("net.ipv4.ip_forward", "1")?;
        r.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        r.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
        r.sysctl("net.ipv4.conf.default.rp_filter", "0")?;

        // Each veth pair is created from inside the router with its peer placed
        // directly in the other namespace, so no interface name ever appears in the
        // root namespace (labs of parallel tests would collide there).
        r.ip_batch(&format!(
            "link add {ROUTER_IFACE_CLIENT} type veth peer name {CLIENT_IFACE} netns {cli}\n\
             link add {ROUTER_IFACE_SERVER} type veth peer name {SERVER_IFACE} netns {srv}\n",
            cli = self.client.name(),
            srv = self.server.name(),
        ))?;
        r.sysctl(
            &format!("net.ipv4.conf.{ROUTER_IFACE_CLIENT}.rp_filter"),
            "0",
        )?;
        r.sysctl(
            &format!("net.ipv4.conf.{ROUTER_IFACE_SERVER}.rp_filter"),
            "0",
        )?;

        // Links and addresses first, routes after: an IPv4 gateway must be on a
        // connected subnet of an up interface when the route is added.
        self.client.ip_batch(&format!(
            "link set lo up\n\
             link set {CLIENT_IFACE} up\n\
             addr add {CLIENT4}/{PREFIX4_LEN} dev {CLIENT_IFACE}\n\
             addr add {CLIENT6}/{PREFIX6_LEN} dev {CLIENT_IFACE} nodad\n"
        ))?;
        r.ip_batch(&format!(
            "link set lo up\n\
             link set {ROUTER_IFACE_CLIENT} up\n\
             link set {ROUTER_IFACE_SERVER} up\n\
             addr add {ROUTER_C4}/{PREFIX4_LEN} dev {ROUTER_IFACE_CLIENT}\n\
             addr add {ROUTER_S4}/{PREFIX4_LEN} dev {ROUTER_IFACE_SERVER}\n\
             addr add {ROUTER_C6}/{PREFIX6_LEN} dev {ROUTER_IFACE_CLIENT} nodad\n\
             addr add {ROUTER_S6}/{PREFIX6_LEN} dev {ROUTER_IFACE_SERVER} nodad\n"
        ))?;
        self.server.ip_batch(&format!(
            "link set lo up\n\
             link set {SERVER_IFACE} up\n\
             addr add {SERVER4_A}/{PREFIX4_LEN} dev {SERVER_IFACE}\n\
             addr add {SERVER4_B}/{PREFIX4_LEN} dev {SERVER_IFACE}\n\
             addr add {SERVER6_A}/{PREFIX6_LEN} dev {SERVER_IFACE} nodad\n\
             addr add {SERVER6_B}/{PREFIX6_LEN} dev {SERVER_IFACE} nodad\n"
        ))?;
        self.client.ip_batch(&format!(
            "route add default via {ROUTER_C4}\n\
             route add ::/0 via {ROUTER_C6}\n"
        ))?;
        self.server.ip_batch(&format!(
            "route add default via {ROUTER_S4}\n\
             route add ::/0 via {ROUTER_S6}\n"
        ))?;
        self.wait_ready(LAB_READY_TIMEOUT)
    }

    /// Polls until no IPv6 address is tentative and TCP SYNs from the client reach all
    /// four server addresses and come back (a RST for a closed port proves both ways).
    fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        for ns in self.namespaces() {
            loop {
                let out = ns.ip(&["-6", "addr", "show", "tentative"])?;
                if out.trim().is_empty() {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(LabError::Timeout {
                        what: format!("IPv6 addresses in {} to leave tentative", ns.name()),
                        after: timeout,
                    }
                    .into());
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let targets = [
            IpAddr::V4(addrs::SERVER4_A),
            IpAddr::V4(addrs::SERVER4_B),
            IpAddr::V6(addrs::SERVER6_A),
            IpAddr::V6(addrs::SERVER6_B),
        ];
        let pending: Vec<IpAddr> = self.client.run(move || {
            let mut pending: BTreeSet<IpAddr> = targets.into_iter().collect();
            while !pending.is_empty() && Instant::now() < deadline {
                pending.retain(|ip| !path_works(*ip));
                if !pending.is_empty() {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            pending.into_iter().collect()
        });
        if !pending.is_empty() {
            return Err(LabError::Timeout {
                what: format!("client -> server reachability of {pending:?}"),
                after: timeout,
            }
            .into());
        }
        Ok(())
    }

    /// Steers the receive processing of the client's and the server's interface to
    /// `cores` with RPS (`rps_cpus` of every receive queue of their `eth0`).
    ///
    /// On veth a packet is received in the softirq of the CPU that sent it: without
    /// this, what the proxy sends to the server is taken through the *server's*
    /// stack (IP, UDP/TCP receive, waking the server thread) on the proxy's core, and
    /// that work is billed to the proxy. With it, the packet is handed to `cores` (one
    /// IPI per batch), as it would be taken off the wire by another machine. The
    /// router's own interfaces are left alone: what the proxy receives is processed
    /// where the kernel puts it, as on an appliance.
    pub fn steer_receive(&self, cores: &[usize]) -> anyhow::Result<()> {
        let mask = rps_mask(cores)?;
        for (ns, iface) in [
            (&self.client, addrs::CLIENT_IFACE),
            (&self.server, addrs::SERVER_IFACE),
        ] {
            ns.sh(&format!(
                "for q in /sys/class/net/{iface}/queues/rx-*; do echo {mask} > $q/rps_cpus; done"
            ))
            .with_context(|| format!("RPS on {iface} in {}", ns.name()))?;
        }
        Ok(())
    }

    /// The lab's name prefix, `rr<pid>x<n>`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Client, router and server, in that order.
    pub fn namespaces(&self) -> [&Netns; 3] {
        [&self.client, &self.router, &self.server]
    }

    /// Leaks the lab (for `bench lab up`): nothing is torn down on drop. Returns the
    /// prefix to pass to [`Lab::down_by_prefix`] later.
    pub fn keep(mut self) -> String {
        self.kept = true;
        forget_live(&self.prefix);
        self.prefix.clone()
    }

    /// Attaches to a lab kept by [`Lab::keep`] (possibly by another process). The
    /// returned value tears it down on drop like any other lab.
    pub fn attach(prefix: &str) -> anyhow::Result<Lab> {
        let lab = Lab {
            client: Netns::from_name(format!("{prefix}-cli")),
            router: Netns::from_name(format!("{prefix}-rtr")),
            server: Netns::from_name(format!("{prefix}-srv")),
            prefix: prefix.to_string(),
            kept: false,
        };
        for ns in lab.namespaces() {
            if !ns.path().exists() {
                return Err(anyhow!("netns {} does not exist", ns.name()));
            }
        }
        Ok(lab)
    }

    /// Kills every process in, then deletes, the namespaces of the lab(s) `prefix`
    /// names: a full prefix (`rr123x0`) matches exactly that lab, a partial one
    /// (`rr123`, `rr`) every lab that starts with it. Returns the deleted names.
    pub fn down_by_prefix(prefix: &str) -> anyhow::Result<Vec<String>> {
        let names: Vec<String> = list_lab_namespaces()?
            .into_iter()
            .filter(|(lab, _)| {
                lab == prefix || (!is_full_prefix(prefix) && lab.starts_with(prefix))
            })
            .map(|(_, name)| name)
            .collect();
        let nss: Vec<Netns> = names.iter().map(Netns::from_name).collect();
        kill_all_in(&nss, DEFAULT_KILL_GRACE);
        let mut errors = Vec::new();
        for ns in &nss {
            // `ip netns del` only removes the name; the namespace itself (and its veth,
            // which takes the peer with it) dies with its last process, thread or socket.
            if let Err(e) = run_checked(Command::new("ip").args(["netns", "del", ns.name()])) {
                errors.push(format!("{e:#}"));
            }
        }
        forget_live(prefix);
        if errors.is_empty() {
            Ok(names)
        } else {
            Err(anyhow!("deleting lab namespaces: {}", errors.join("; ")))
        }
    }

    /// Tears down every lab whose creating process is gone (kept by `bench lab up`, or
    /// left behind by a killed run). Returns the deleted namespace names.
    pub fn down_stale() -> anyhow::Result<Vec<String>> {
        let mut deleted = Vec::new();
        let labs: BTreeSet<String> = list_lab_namespaces()?.into_iter().map(|(l, _)| l).collect();
        for lab in labs {
            let pid = lab[2..]
                .split('x')
                .next()
                .and_then(|p| p.parse::<u32>().ok());
            let alive = pid.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists());
            if !alive {
                deleted.extend(Lab::down_by_prefix(&lab)?);
            }
        }
        Ok(deleted)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        if let Err(e) = Lab::down_by_prefix(&self.prefix) {
            eprintln!("warning: tearing down lab {}: {e:#}", self.prefix);
        }
    }
}

/// Tears down every lab this process still has alive. For a panic hook when the
/// binary is built with `panic = "abort"` (the release profile), where no `Drop` runs.
pub fn cleanup_live_labs() {
    let prefixes = match LIVE_LABS.try_lock() {
        Ok(v) => v.clone(),
        Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner().clone(),
        Err(std::sync::TryLockError::WouldBlock) => return,
    };
    for p in prefixes {
        let _ = Lab::down_by_prefix(&p);
    }
}

fn forget_live(prefix: &str) {
    if let Ok(mut v) = LIVE_LABS.try_lock() {
        v.retain(|p| p != prefix);
    }
}

/// True for `rr<digits>x<digits>`.
fn is_full_prefix(p: &str) -> bool {
    p.strip_prefix("rr")
        .and_then(|rest| rest.split_once('x'))
        .is_some_and(|(a, b)| {
            !a.is_empty()
                && !b.is_empty()
                && a.bytes().all(|c| c.is_ascii_digit())
                && b.bytes().all(|c| c.is_ascii_digit())
        })
}

/// `(lab prefix, namespace name)` for every `/run/netns` entry shaped like ours.
fn list_lab_namespaces() -> anyhow::Result<Vec<(String, String)>> {
    let dir = match std::fs::read_dir(NETNS_RUN_DIR) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).context(NETNS_RUN_DIR),
    };
    let mut out = Vec::new();
    for entry in dir {
        let name = entry?.file_name().to_string_lossy().into_owned();
        let lab = SUFFIXES
            .iter()
            .find_map(|s| name.strip_suffix(&format!("-{s}")[..]))
            .filter(|lab| is_full_prefix(lab));
        if let Some(lab) = lab {
            out.push((lab.to_string(), name.clone()));
        }
    }
    out.sort();
    Ok(out)
}

/// SIGTERM to every process in `nss`, wait up to `grace` for them to go, SIGKILL the rest.
fn kill_all_in(nss: &[Netns], grace: Duration) {
    let pids = |nss: &[Netns]| -> Vec<i32> { nss.iter().flat_map(|n| n.pids()).collect() };
    let first = pids(nss);
    if first.is_empty() {
        return;
    }
    for &p in &first {
        let _ = nix::sys::signal::kill(Pid::from_raw(p), Signal::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if pids(nss).is_empty() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for p in pids(nss) {
        let _ = nix::sys::signal::kill(Pid::from_raw(p), Signal::SIGKILL);
    }
}

/// One reachability probe: a TCP connect to the discard port, which nothing in the
/// lab listens on. ECONNREFUSED means the SYN went through the router and the RST
/// came back, i.e. both directions are routed.
fn path_works(ip: IpAddr) -> bool {
    match TcpStream::connect_timeout(&SocketAddr::new(ip, 9), Duration::from_millis(300)) {
        Ok(_) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionRefused,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rps_masks_are_the_kernels_bitmap_format() {
        assert_eq!(rps_mask(&[0]).unwrap(), "00000001");
        assert_eq!(rps_mask(&[0, 2, 3]).unwrap(), "0000000d");
        assert_eq!(rps_mask(&[1, 33]).unwrap(), "00000002,00000002");
        assert!(rps_mask(&[]).is_err());
    }

    #[test]
    fn parses_proc_net_tcp() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 00000000:3A99 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0000000000000000 100 0 0 10 0\n   1: 0100007F:0050 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0000000000000000 100 0 0 10 0\n";
        assert!(proc_net_has_listener(text, 15001));
        // Port 80 exists but only as an established socket.
        assert!(!proc_net_has_listener(text, 80));
        let text6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 00000000000000000000000000000000:3A99 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 3 1 0000000000000000 100 0 0 10 0\n";
        assert!(proc_net_has_listener(text6, 15001));
    }

    #[test]
    fn socket_count_ignores_time_wait() {
        let head = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n";
        let est = "   0: 0100007F:1F91 0200007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0000000000000000 100 0 0 10 0\n";
        let tw = "   1: 0100007F:1F91 0200007F:9C41 06 00000000:00000000 03:00001000 00000000     0        0 0 3 0000000000000000\n";
        let other = "   2: 0100007F:0050 0200007F:9C42 01 00000000:00000000 00:00000000 00000000     0        0 4 1 0000000000000000 100 0 0 10 0\n";
        let text = format!("{head}{est}{tw}{other}");
        assert_eq!(count_in_proc_net(&text, 8081, Proto::Tcp, None), 1);
        assert_eq!(
            count_in_proc_net(&format!("{head}{tw}"), 8081, Proto::Tcp, None),
            0
        );
        // TIME_WAIT of this run's client ports (0x9C41 = 40001) counts.
        let ours = Some((40000, 40999));
        assert_eq!(count_in_proc_net(&text, 8081, Proto::Tcp, ours), 2);
        assert_eq!(
            count_in_proc_net(&text, 8081, Proto::Tcp, Some((20000, 23999))),
            1
        );
        // UDP has no TIME_WAIT; state 06 is not special there.
        assert_eq!(count_in_proc_net(&text, 8081, Proto::Udp, None), 2);
        assert_eq!(count_in_proc_net(&text, 80, Proto::Tcp, None), 1);
    }

    #[test]
    fn child_lines_and_exit() {
        let mut sh = Command::new("sh");
        sh.args([
            "-c",
            "echo starting; echo oops >&2; echo ready: port 1; exec sleep 30",
        ]);
        let mut c = NsChild::spawn("sh", sh).unwrap();
        let line = c
            .wait_for_line(|l| l.starts_with("ready"), Duration::from_secs(5))
            .unwrap();
        assert_eq!(line, "ready: port 1");
        assert!(c.wait_timeout(Duration::from_millis(20)).is_none());
        let st = c.stop(Duration::from_secs(2)).unwrap();
        assert!(!st.success());

        let mut sh = Command::new("sh");
        sh.args(["-c", "echo nope; echo broken >&2; exit 3"]);
        let mut c = NsChild::spawn("sh", sh).unwrap();
        let err = c
            .wait_for_line(|l| l.starts_with("ready"), Duration::from_secs(5))
            .unwrap_err();
        assert!(format!("{err}").contains("broken"), "{err}");
        assert_eq!(c.try_wait().and_then(|s| s.code()), Some(3));
        c.finish_output();
        assert_eq!(c.stdout(), "nope\n");
    }

    #[test]
    fn prefixes() {
        assert!(is_full_prefix("rr123x0"));
        assert!(!is_full_prefix("rr123"));
        assert!(!is_full_prefix("rrx1"));
        assert!(!is_full_prefix("rr12x"));
        assert_eq!(
            sysctl_path("net.ipv4.conf.veth-c.rp_filter"),
            PathBuf::from("/proc/sys/net/ipv4/conf/veth-c/rp_filter")
        );
    }
}
