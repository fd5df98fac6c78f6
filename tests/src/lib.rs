//! Shared helpers of ringrelay's namespace integration tests (`tests/tests/*.rs`).
//!
//! Every test builds its own [`Rig`]: a bench [`Lab`] (client, router and server
//! namespaces, see `docs/CONTRACTS.md`), the real `setup apply` run inside the router,
//! and the real `engine` started there and waited for (`ready:` on its stdout).
//! Servers run as threads that entered the server namespace, clients as threads in the
//! client namespace. Dropping the rig stops the engine, then deletes the namespaces,
//! also while a failed assertion unwinds, so tests run in parallel and leave nothing.
//!
//! Nothing here sleeps for a fixed time to "let things settle": every wait is a poll
//! with a deadline ([`poll_until`]), and every blocking socket call has a timeout.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use nix::sys::signal::Signal;
use socket2::{Domain, Socket, Type};

pub use ringrelay_bench::lab::{
    addrs, count_sockets, is_need_root, wait_tcp_listen, Lab, Netns, NsChild, Proto,
};

/// How long the engine may take to print `ready:`.
pub const ENGINE_READY_TIMEOUT: Duration = Duration::from_secs(15);
/// Read/write timeout put on every socket the helpers create: no test hangs forever.
pub const IO_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a counter read (SIGUSR1 and the table on stdout) may take.
const COUNTERS_TIMEOUT: Duration = Duration::from_secs(5);
/// Interval of every poll loop: short, and always inside a deadline.
pub const POLL_INTERVAL: Duration = Duration::from_millis(10);

// ---------------------------------------------------------------------------------
// Skipping without privileges
// ---------------------------------------------------------------------------------

/// Prints the skip line the test runner's log is grepped for. Written to the stderr
/// handle directly: libtest captures `eprintln!` of passing tests, and a skip must
/// never look like a silent pass.
pub fn print_skip(test: &str) {
    let _ = writeln!(
        io::stderr(),
        "SKIPPED: {test}: needs root (network namespaces, TPROXY)"
    );
}

/// True (after printing `SKIPPED: ...`) when this process is not root: namespaces,
/// veth, nft and IP_TRANSPARENT all need it. Tests `return` on true; they never pass
/// silently without having run.
pub fn skip_without_root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        false
    } else {
        print_skip(test);
        true
    }
}

// ---------------------------------------------------------------------------------
// Binaries under test
// ---------------------------------------------------------------------------------

/// The path of a workspace binary: `$env` if set, else next to the test executable's
/// profile directory (`target/<profile>/deps/test-xxx` -> `target/<profile>/<name>`).
/// Panics with the command to run when it is missing: the tests exercise the real
/// binaries and `cargo test` does not build other packages' binaries.
pub fn bin_path(name: &str, env: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "{env}={} does not name a file; unset it or point it at the `{name}` binary",
            p.display()
        );
        return p;
    }
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable lives in target/<profile>/deps");
    let p = profile_dir.join(name);
    assert!(
        p.is_file(),
        "{} not found: run `cargo build --workspace` first (or set {env})",
        p.display()
    );
    p
}

/// The engine binary (`RINGRELAY_ENGINE` overrides).
pub fn engine_bin() -> PathBuf {
    bin_path("engine", "RINGRELAY_ENGINE")
}

/// The setup binary (`RINGRELAY_SETUP` overrides).
pub fn setup_bin() -> PathBuf {
    bin_path("setup", "RINGRELAY_SETUP")
}

// ---------------------------------------------------------------------------------
// Address families and lab addresses
// ---------------------------------------------------------------------------------

/// Which IP family a test exercises; every lab address exists in both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl Family {
    /// The client's address.
    pub fn client(self) -> IpAddr {
        match self {
            Family::V4 => addrs::CLIENT4.into(),
            Family::V6 => addrs::CLIENT6.into(),
        }
    }
    /// The router's address on the client side.
    pub fn router_c(self) -> IpAddr {
        match self {
            Family::V4 => addrs::ROUTER_C4.into(),
            Family::V6 => addrs::ROUTER_C6.into(),
        }
    }
    /// The router's address on the server side: the source of the engine's upstream
    /// connections (the engine is not transparent towards servers).
    pub fn router_s(self) -> IpAddr {
        match self {
            Family::V4 => addrs::ROUTER_S4.into(),
            Family::V6 => addrs::ROUTER_S6.into(),
        }
    }
    /// First server address.
    pub fn server_a(self) -> IpAddr {
        match self {
            Family::V4 => addrs::SERVER4_A.into(),
            Family::V6 => addrs::SERVER6_A.into(),
        }
    }
    /// Second server address.
    pub fn server_b(self) -> IpAddr {
        match self {
            Family::V4 => addrs::SERVER4_B.into(),
            Family::V6 => addrs::SERVER6_B.into(),
        }
    }
    /// The wildcard address of the family.
    pub fn unspecified(self) -> IpAddr {
        match self {
            Family::V4 => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
            Family::V6 => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
        }
    }
}

// ---------------------------------------------------------------------------------
// Polling
// ---------------------------------------------------------------------------------

/// Calls `f` every [`POLL_INTERVAL`] until it returns `Some`, or `timeout` passes
/// (then one last call decides).
pub fn poll_until<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

// ---------------------------------------------------------------------------------
// The rig: lab + setup + engine
// ---------------------------------------------------------------------------------

/// Firewall front end for `setup apply --backend` (the setup crate's own type).
pub use ringrelay_setup::config::Backend;

/// What a [`Rig`] sets up. Built with the chained setters.
#[derive(Clone, Debug)]
pub struct RigConfig {
    /// `setup apply --backend`.
    pub backend: Backend,
    /// Extra `setup apply` arguments (e.g. `--tcp-ports 5000-5100`).
    pub setup_args: Vec<String>,
    /// Extra engine arguments (e.g. `--relay copy`).
    pub engine_args: Vec<String>,
    /// `engine --cores`.
    pub cores: String,
    /// Whether to start the engine at all.
    pub start_engine: bool,
}

impl Default for RigConfig {
    fn default() -> Self {
        RigConfig {
            backend: Backend::Nft,
            setup_args: Vec::new(),
            engine_args: Vec::new(),
            cores: "0-1".to_string(),
            start_engine: true,
        }
    }
}

impl RigConfig {
    /// Defaults: nft backend, every port intercepted, engine on cores 0-1.
    pub fn new() -> Self {
        Self::default()
    }
    /// Selects the firewall backend.
    pub fn backend(mut self, b: Backend) -> Self {
        self.backend = b;
        self
    }
    /// Adds `setup apply` arguments.
    pub fn setup_args(mut self, args: &[&str]) -> Self {
        self.setup_args.extend(args.iter().map(|s| s.to_string()));
        self
    }
    /// Adds engine arguments.
    pub fn engine_args(mut self, args: &[&str]) -> Self {
        self.engine_args.extend(args.iter().map(|s| s.to_string()));
        self
    }
    /// `engine --relay splice|copy`.
    pub fn relay(self, relay: &str) -> Self {
        self.engine_args(&["--relay", relay])
    }
    /// `engine --cores LIST`.
    pub fn cores(mut self, cores: &str) -> Self {
        self.cores = cores.to_string();
        self
    }
    /// Builds the lab and applies the rules but starts no engine.
    pub fn without_engine(mut self) -> Self {
        self.start_engine = false;
        self
    }
}

/// The output of one finished command.
#[derive(Debug)]
pub struct CmdOutput {
    /// Exit status.
    pub status: ExitStatus,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl CmdOutput {
    /// Errors (with both streams) unless the command succeeded.
    pub fn ok(self, what: &str) -> anyhow::Result<CmdOutput> {
        if self.status.success() {
            Ok(self)
        } else {
            bail!(
                "{what} failed ({}):\nstdout: {}\nstderr: {}",
                self.status,
                self.stdout.trim(),
                self.stderr.trim()
            )
        }
    }
}

/// Runs `cmd` to completion with a deadline (killing it on expiry).
pub fn run_with_timeout(cmd: Command, timeout: Duration) -> anyhow::Result<CmdOutput> {
    run_collecting(cmd, None, timeout)
}

/// Runs `cmd` with `input` on its stdin (none: `/dev/null`), to completion within
/// `timeout` (killing it on expiry), and collects its output.
fn run_collecting(
    mut cmd: Command,
    input: Option<&[u8]>,
    timeout: Duration,
) -> anyhow::Result<CmdOutput> {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {shown}"))?;
    let feeder = match input {
        Some(input) => {
            let mut stdin = child.stdin.take().context("stdin")?;
            let input = input.to_vec();
            Some(std::thread::spawn(move || {
                let _ = stdin.write_all(&input);
            }))
        }
        None => None,
    };
    // Pumps so that a chatty child never blocks on a full pipe while we poll.
    let mut out = child.stdout.take().context("stdout")?;
    let mut err = child.stderr.take().context("stderr")?;
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let Some(status) = poll_until(timeout, || child.try_wait().ok().flatten()) else {
        let _ = child.kill();
        let _ = child.wait();
        bail!("{shown} did not finish within {timeout:?}");
    };
    if let Some(f) = feeder {
        let _ = f.join();
    }
    Ok(CmdOutput {
        status,
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
    })
}

/// A lab with interception rules applied in the router and (usually) the engine
/// running there. Fields drop in order: engine first, then the namespaces.
pub struct Rig {
    /// The engine, when [`RigConfig::start_engine`] was set.
    pub engine: Option<Engine>,
    /// The namespaces.
    pub lab: Lab,
    /// Private `RINGRELAY_STATE_DIR` for `setup` (parallel rigs must not share the
    /// state file that records what `setup apply` changed).
    state_dir: PathBuf,
    /// The configuration the rig was built with.
    pub config: RigConfig,
}

impl Rig {
    /// Builds the rig, or prints `SKIPPED` and returns `None` without root. Any other
    /// failure panics with the cause (the test fails).
    pub fn start(test: &str, config: RigConfig) -> Option<Rig> {
        if skip_without_root(test) {
            return None;
        }
        match Rig::up(config) {
            Ok(rig) => Some(rig),
            Err(e) if is_need_root(&e) => {
                print_skip(test);
                None
            }
            Err(e) => panic!("{test}: cannot build the rig: {e:#}"),
        }
    }

    /// Builds the lab, runs `setup apply`, starts the engine and waits for `ready:`.
    pub fn up(config: RigConfig) -> anyhow::Result<Rig> {
        let lab = Lab::up()?;
        let state_dir = std::env::temp_dir().join(format!("ringrelay-tests-{}", lab.prefix()));
        std::fs::create_dir_all(&state_dir)
            .with_context(|| format!("creating {}", state_dir.display()))?;
        let mut rig = Rig {
            engine: None,
            lab,
            state_dir,
            config: config.clone(),
        };
        let mut args: Vec<String> = vec![
            "apply".into(),
            "--backend".into(),
            config.backend.name().into(),
        ];
        args.extend(config.setup_args.iter().cloned());
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        rig.setup(&argv)?.ok("setup apply")?;
        if config.start_engine {
            rig.engine = Some(rig.start_engine(&config.cores, &config.engine_args)?);
        }
        Ok(rig)
    }

    /// Starts an engine in the router: `--cores CORES --drain-timeout-s 1 EXTRA...`,
    /// without the default drain timeout when `extra` sets its own (the engine
    /// refuses a flag given twice).
    pub fn start_engine(&self, cores: &str, extra: &[String]) -> anyhow::Result<Engine> {
        let mut args: Vec<String> = vec!["--cores".into(), cores.into()];
        if !extra.iter().any(|a| a == "--drain-timeout-s") {
            args.extend(["--drain-timeout-s".into(), "1".into()]);
        }
        args.extend(extra.iter().cloned());
        Engine::start(&self.lab.router, &args)
    }

    /// The running engine (panics when the rig has none).
    pub fn engine(&self) -> &Engine {
        self.engine.as_ref().expect("this rig runs no engine")
    }

    /// The running engine, mutably.
    pub fn engine_mut(&mut self) -> &mut Engine {
        self.engine.as_mut().expect("this rig runs no engine")
    }

    /// Runs `setup ARGS...` in the router with this rig's private state directory.
    /// Returns the output whatever the exit status (see [`CmdOutput::ok`]).
    pub fn setup(&self, args: &[&str]) -> anyhow::Result<CmdOutput> {
        let mut cmd = self.lab.router.command(setup_bin());
        cmd.args(args).env("RINGRELAY_STATE_DIR", &self.state_dir);
        run_with_timeout(cmd, Duration::from_secs(30))
    }

    /// The private state directory given to `setup`.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if let Some(mut e) = self.engine.take() {
            e.child.stop(Duration::from_secs(5));
        }
        let _ = std::fs::remove_dir_all(&self.state_dir);
        // `lab` drops next: it kills what is left in the namespaces and deletes them.
    }
}

// ---------------------------------------------------------------------------------
// The engine process
// ---------------------------------------------------------------------------------

/// Whether the engine's counter table can print `name` (the engine library's own
/// list). Asking for another name is a typo in a test, and panics instead of
/// reading as 0.
pub fn is_known_counter(name: &str) -> bool {
    ringrelay_engine::Snapshot::default()
        .fields()
        .iter()
        .any(|(n, _)| *n == name)
}

/// One reading of the engine's counter table (all-cores totals).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    totals: BTreeMap<String, u64>,
}

impl Counters {
    /// The total of counter `name`; the engine omits zero rows, so absent reads 0.
    pub fn get(&self, name: &str) -> u64 {
        assert!(
            is_known_counter(name) || self.totals.contains_key(name),
            "unknown engine counter {name:?}"
        );
        self.totals.get(name).copied().unwrap_or(0)
    }

    /// Every row the engine printed.
    pub fn rows(&self) -> &BTreeMap<String, u64> {
        &self.totals
    }
}

/// Parses one counter table: a header line starting with `counter`, then rows
/// `name  <per-core values...>  <total>`. Stops at the first line that is not a row.
pub fn parse_counter_table(text: &str) -> anyhow::Result<Counters> {
    let mut lines = text.lines().skip_while(|l| !l.starts_with("counter"));
    let header = lines.next().context("no counter table header")?;
    let columns = header.split_whitespace().count(); // counter, cpuN..., total
    let mut totals = BTreeMap::new();
    for line in lines {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() != columns || fields[1..].iter().any(|f| f.parse::<u64>().is_err()) {
            break;
        }
        let total: u64 = fields[columns - 1].parse()?;
        totals.insert(fields[0].to_string(), total);
    }
    Ok(Counters { totals })
}

/// The engine running inside a namespace (`ip netns exec NS engine ...`; `ip` execs
/// the engine, so the child's pid is the engine's, checked at start).
pub struct Engine {
    /// The process; its stdout and stderr are captured.
    pub child: NsChild,
    /// The `ready:` line.
    pub ready_line: String,
    /// Open fds right after `ready:`.
    pub baseline_fds: usize,
    /// Open socket fds right after `ready:`.
    pub baseline_sockets: usize,
}

impl Engine {
    /// Starts the engine in `ns` and waits for `ready:`.
    pub fn start(ns: &Netns, args: &[String]) -> anyhow::Result<Engine> {
        Engine::start_with_env(ns, args, &[])
    }

    /// [`Engine::start`] with extra environment variables for the engine.
    pub fn start_with_env(
        ns: &Netns,
        args: &[String],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Engine> {
        Engine::start_wrapped(ns, &[], args, env)
    }

    /// [`Engine::start_with_env`] through `wrapper` (e.g. `prlimit ... setpriv ...
    /// --`): `ip netns exec NS WRAPPER... engine ARGS...`. The wrappers must exec,
    /// not fork: the pid must stay the engine's (checked).
    pub fn start_wrapped(
        ns: &Netns,
        wrapper: &[String],
        args: &[String],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Engine> {
        let bin = engine_bin();
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = ns.command(first);
                c.args(rest).arg(&bin);
                c
            }
            None => ns.command(&bin),
        };
        cmd.args(args);
        cmd.envs(env.iter().copied());
        let mut child = NsChild::spawn(format!("engine@{}", ns.name()), cmd)?;
        let ready_line = child.wait_for_line(|l| l.starts_with("ready:"), ENGINE_READY_TIMEOUT)?;
        let pid = child.pid();
        // `ip netns exec` must have exec'd the engine (no fork), or the fd counts and
        // signals below would go to the wrong process.
        let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
            .with_context(|| format!("reading /proc/{pid}/exe"))?;
        let want = bin.canonicalize()?;
        // A rebuild while the test runs unlinks the running file: "PATH (deleted)".
        let exe = PathBuf::from(
            exe.to_string_lossy()
                .trim_end_matches(" (deleted)")
                .to_string(),
        );
        if exe != want {
            bail!(
                "pid {pid} runs {} instead of the engine {}",
                exe.display(),
                want.display()
            );
        }
        let baseline_fds = fd_count(pid)?;
        let baseline_sockets = socket_fd_count(pid)?;
        Ok(Engine {
            child,
            ready_line,
            baseline_fds,
            baseline_sockets,
        })
    }

    /// The engine's pid.
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// Open fds now.
    pub fn fds(&self) -> usize {
        fd_count(self.pid()).expect("engine fd count")
    }

    /// Open socket fds now.
    pub fn sockets(&self) -> usize {
        socket_fd_count(self.pid()).expect("engine socket fd count")
    }

    /// Whether the process is still running (and was not reaped).
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().is_none()
    }

    /// Reads the counters: sends SIGUSR1, waits for a table header, then sends SIGUSR1
    /// again and waits for the next header. The engine prints tables one after the
    /// other, so the second header proves the first table was written completely.
    pub fn counters(&mut self) -> Counters {
        self.try_counters()
            .unwrap_or_else(|e| panic!("reading engine counters: {e:#}"))
    }

    /// [`Engine::counters`] returning errors.
    pub fn try_counters(&mut self) -> anyhow::Result<Counters> {
        let start = self.child.stdout().len();
        // (start, end) of the first complete header line at or after `from`. The
        // capture holds whole lines, so `from` (a previous length) is a line start.
        let header_after = |text: &str, from: usize| -> Option<(usize, usize)> {
            let mut pos = from;
            for line in text.get(from..)?.split_inclusive('\n') {
                if line.starts_with("counter") && line.ends_with('\n') {
                    return Some((pos, pos + line.len()));
                }
                pos += line.len();
            }
            None
        };
        self.child.signal(Signal::SIGUSR1)?;
        let (table_start, first_end) = poll_until(COUNTERS_TIMEOUT, || {
            header_after(&self.child.stdout(), start)
        })
        .ok_or_else(|| self.dead_or("no counter table after SIGUSR1"))?;
        self.child.signal(Signal::SIGUSR1)?;
        let text = poll_until(COUNTERS_TIMEOUT, || {
            let t = self.child.stdout();
            header_after(&t, first_end).map(|_| t)
        })
        .ok_or_else(|| self.dead_or("no second counter table after SIGUSR1"))?;
        parse_counter_table(&text[table_start..])
    }

    fn dead_or(&self, what: &str) -> anyhow::Error {
        anyhow!(
            "{what}; engine stdout tail: {:?}; stderr: {}",
            tail(&self.child.stdout(), 600),
            self.child.stderr().trim()
        )
    }

    /// Polls the counters until `pred` holds; returns the last reading either way
    /// (`Ok` when `pred` held).
    pub fn wait_counters(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&Counters) -> bool,
    ) -> Result<Counters, Counters> {
        let deadline = Instant::now() + timeout;
        loop {
            let c = self.counters();
            if pred(&c) {
                return Ok(c);
            }
            if Instant::now() >= deadline {
                return Err(c);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Polls the fd count until it is back at [`Engine::baseline_fds`]; returns the
    /// last count on failure.
    pub fn wait_fds_baseline(&self, timeout: Duration) -> Result<(), usize> {
        let base = self.baseline_fds;
        let mut last = 0;
        poll_until(timeout, || {
            last = self.fds();
            (last <= base).then_some(())
        })
        .ok_or(last)
    }

    /// SIGTERM, waits for exit, and returns the status and everything printed.
    pub fn stop(&mut self, grace: Duration) -> (Option<ExitStatus>, String, String) {
        let st = self.child.stop(grace);
        self.child.finish_output();
        (st, self.child.stdout(), self.child.stderr())
    }
}

/// The last `n` bytes of `s` (on a char boundary).
pub fn tail(s: &str, n: usize) -> &str {
    let mut i = s.len().saturating_sub(n);
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}

/// Number of open fds of `pid` (`/proc/PID/fd`).
pub fn fd_count(pid: u32) -> anyhow::Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("/proc/{pid}/fd"))?
        .count())
}

/// Number of open socket fds of `pid` (links reading `socket:[inode]`).
pub fn socket_fd_count(pid: u32) -> anyhow::Result<usize> {
    let mut n = 0;
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let Ok(e) = e else { continue };
        if let Ok(target) = std::fs::read_link(e.path()) {
            if target.to_string_lossy().starts_with("socket:") {
                n += 1;
            }
        }
    }
    Ok(n)
}

// ---------------------------------------------------------------------------------
// Deterministic payloads and checksums
// ---------------------------------------------------------------------------------

/// FNV-1a, 64 bit: order-sensitive, so a reordered, duplicated or lost chunk changes it.
#[derive(Clone, Copy, Debug)]
pub struct Fnv64(u64);

impl Default for Fnv64 {
    fn default() -> Self {
        Fnv64(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv64 {
    /// Folds `data` in.
    pub fn update(&mut self, data: &[u8]) {
        for &b in data {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    /// The hash so far.
    pub fn value(&self) -> u64 {
        self.0
    }
}

/// FNV-1a of `data`.
pub fn fnv(data: &[u8]) -> u64 {
    let mut h = Fnv64::default();
    h.update(data);
    h.value()
}

/// A deterministic pseudo-random byte stream (xorshift64*), different per seed.
#[derive(Clone, Debug)]
pub struct Pattern(u64);

impl Pattern {
    /// A stream for `seed`.
    pub fn new(seed: u64) -> Self {
        Pattern(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    /// Fills `buf` with the next bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let v = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
    /// `len` bytes of stream `seed`.
    pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        Pattern::new(seed).fill(&mut v);
        v
    }
}

/// Length and hash of a byte stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Digest {
    /// Bytes.
    pub len: u64,
    /// FNV-1a over them.
    pub hash: u64,
}

/// What writing `len` bytes of stream `seed` produces.
pub fn pattern_digest(seed: u64, len: u64) -> Digest {
    let mut p = Pattern::new(seed);
    let mut h = Fnv64::default();
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        // Keep chunking identical to `write_pattern` (fill is 8-byte aligned per call).
        p.fill(&mut buf[..n]);
        h.update(&buf[..n]);
        left -= n as u64;
    }
    Digest {
        len,
        hash: h.value(),
    }
}

/// Writes `len` bytes of stream `seed` to `w`; returns their digest.
pub fn write_pattern(w: &mut impl Write, seed: u64, len: u64) -> io::Result<Digest> {
    let mut p = Pattern::new(seed);
    let mut h = Fnv64::default();
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        p.fill(&mut buf[..n]);
        h.update(&buf[..n]);
        w.write_all(&buf[..n])?;
        left -= n as u64;
    }
    w.flush()?;
    Ok(Digest {
        len,
        hash: h.value(),
    })
}

/// One `read`, retried when a signal interrupts it (`EINTR`: the test process has
/// signal handlers, so a blocking read can return early), for tests that assert on
/// what a single read sees: data, EOF, a reset or a timeout.
pub fn read_once(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match r.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// Reads `r` to EOF; returns the digest of everything read.
pub fn read_digest(r: &mut impl Read) -> io::Result<Digest> {
    let mut h = Fnv64::default();
    let mut buf = vec![0u8; 64 * 1024];
    let mut len = 0u64;
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        h.update(&buf[..n]);
        len += n as u64;
    }
    Ok(Digest {
        len,
        hash: h.value(),
    })
}

// ---------------------------------------------------------------------------------
// Sockets
// ---------------------------------------------------------------------------------

/// A TCP listener with a deep backlog (std's is 128; the many-connections test needs
/// thousands in flight), `SO_REUSEADDR` set. Call from a thread inside the namespace.
pub fn tcp_listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_reuse_address(true)?;
    s.bind(&addr.into())?;
    s.listen(4096)?;
    Ok(s.into())
}

/// Connects with a timeout and puts [`IO_TIMEOUT`] on reads and writes. Call from a
/// thread inside the client namespace.
pub fn tcp_connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

/// A UDP socket bound to the family's wildcard address (an ephemeral port) with a
/// read timeout. Call from a thread inside the client namespace.
pub fn udp_client(family: Family, read_timeout: Duration) -> io::Result<UdpSocket> {
    let s = UdpSocket::bind(SocketAddr::new(family.unspecified(), 0))?;
    s.set_read_timeout(Some(read_timeout))?;
    Ok(s)
}

/// Where and from whom a server accepted a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnInfo {
    /// The server socket's local address: the destination the server saw.
    pub local: SocketAddr,
    /// The peer: the engine's upstream address if relayed, the client if not.
    pub peer: SocketAddr,
}

/// State shared between a [`TcpServer`] and its threads.
#[derive(Default)]
struct ServerShared {
    stop: AtomicBool,
    accepted: Mutex<Vec<ConnInfo>>,
    errors: Mutex<Vec<String>>,
    finished: AtomicUsize,
}

/// A threaded TCP server in some namespace: an accept loop plus one thread (small
/// stack) per connection running the handler. It records every accepted connection's
/// local and peer address and every handler error.
pub struct TcpServer {
    /// The listening address.
    pub addr: SocketAddr,
    shared: Arc<ServerShared>,
    thread: Option<JoinHandle<()>>,
}

/// A connection handler: gets the stream (with [`IO_TIMEOUT`]s set) and its addresses.
pub type Handler = dyn Fn(TcpStream, ConnInfo) -> anyhow::Result<()> + Send + Sync + 'static;

impl TcpServer {
    /// Binds `addr` inside `ns` (synchronously: the server listens when this returns)
    /// and serves every connection with `handler` on its own thread.
    pub fn start<F>(ns: &Netns, addr: SocketAddr, handler: F) -> anyhow::Result<TcpServer>
    where
        F: Fn(TcpStream, ConnInfo) -> anyhow::Result<()> + Send + Sync + 'static,
    {
        let listener = ns
            .run(move || tcp_listen(addr))
            .with_context(|| format!("listening on {addr} in {}", ns.name()))?;
        listener.set_nonblocking(true)?;
        let shared = Arc::new(ServerShared::default());
        let sh = shared.clone();
        let handler: Arc<Handler> = Arc::new(handler);
        let thread = std::thread::Builder::new()
            .name(format!("srv-{}", addr.port()))
            .spawn(move || accept_loop(listener, sh, handler))?;
        Ok(TcpServer {
            addr,
            shared,
            thread: Some(thread),
        })
    }

    /// An echo server: copies everything back, then closes its write side at EOF.
    pub fn echo(ns: &Netns, addr: SocketAddr) -> anyhow::Result<TcpServer> {
        TcpServer::start(ns, addr, |mut s, _| {
            let mut r = s.try_clone()?;
            io::copy(&mut r, &mut s)?;
            s.shutdown(std::net::Shutdown::Write)?;
            Ok(())
        })
    }

    /// Every connection accepted so far.
    pub fn accepted(&self) -> Vec<ConnInfo> {
        self.shared.accepted.lock().unwrap().clone()
    }

    /// Handler errors so far (`"peer: error"`).
    pub fn errors(&self) -> Vec<String> {
        self.shared.errors.lock().unwrap().clone()
    }

    /// Handlers that returned (successfully or not).
    pub fn finished(&self) -> usize {
        self.shared.finished.load(Ordering::SeqCst)
    }

    /// Polls until `n` handlers have returned.
    pub fn wait_finished(&self, n: usize, timeout: Duration) -> bool {
        poll_until(timeout, || (self.finished() >= n).then_some(())).is_some()
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // Handler threads are detached: their sockets have IO timeouts, and the lab's
        // teardown kills their peers.
    }
}

fn accept_loop(listener: TcpListener, sh: Arc<ServerShared>, handler: Arc<Handler>) {
    while !sh.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, peer)) => {
                let setup = || -> io::Result<ConnInfo> {
                    stream.set_nonblocking(false)?;
                    stream.set_read_timeout(Some(IO_TIMEOUT))?;
                    stream.set_write_timeout(Some(IO_TIMEOUT))?;
                    Ok(ConnInfo {
                        local: stream.local_addr()?,
                        peer,
                    })
                };
                let info = match setup() {
                    Ok(i) => i,
                    Err(e) => {
                        sh.errors
                            .lock()
                            .unwrap()
                            .push(format!("{peer}: setup: {e}"));
                        continue;
                    }
                };
                sh.accepted.lock().unwrap().push(info);
                let (sh2, h) = (sh.clone(), handler.clone());
                let spawned = std::thread::Builder::new()
                    .stack_size(256 * 1024)
                    .spawn(move || {
                        if let Err(e) = h(stream, info) {
                            sh2.errors.lock().unwrap().push(format!("{peer}: {e:#}"));
                        }
                        sh2.finished.fetch_add(1, Ordering::SeqCst);
                    });
                if let Err(e) = spawned {
                    sh.errors
                        .lock()
                        .unwrap()
                        .push(format!("{peer}: spawn: {e}"));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(1))
            }
            Err(e) => {
                sh.errors.lock().unwrap().push(format!("accept: {e}"));
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

/// The prefix a tagged [`UdpEcho`] puts before the echoed payload: names the server
/// address and port that answered.
pub fn udp_tag(server: SocketAddr) -> Vec<u8> {
    format!("from {server}|").into_bytes()
}

/// A UDP echo server on one address in some namespace. Tagged: replies
/// `udp_tag(local) + payload`; untagged: the payload unchanged. Records every peer.
pub struct UdpEcho {
    /// The bound address.
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    received: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl UdpEcho {
    /// Binds `addr` inside `ns` and echoes on a thread.
    pub fn start(ns: &Netns, addr: SocketAddr, tagged: bool) -> anyhow::Result<UdpEcho> {
        let sock = ns
            .run(move || -> io::Result<UdpSocket> {
                let s = Socket::new(Domain::for_address(addr), Type::DGRAM, None)?;
                if addr.is_ipv6() {
                    s.set_only_v6(true)?;
                }
                s.set_recv_buffer_size(4 << 20)?;
                s.bind(&addr.into())?;
                Ok(s.into())
            })
            .with_context(|| format!("binding UDP {addr} in {}", ns.name()))?;
        sock.set_read_timeout(Some(Duration::from_millis(20)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let peers = Arc::new(Mutex::new(Vec::new()));
        let received = Arc::new(AtomicU64::new(0));
        let (st, pe, rc) = (stop.clone(), peers.clone(), received.clone());
        let tag = if tagged { udp_tag(addr) } else { Vec::new() };
        let thread = std::thread::Builder::new()
            .name(format!("udp-{}", addr.port()))
            .spawn(move || {
                let mut buf = vec![0u8; 70_000];
                let mut out = Vec::with_capacity(70_000);
                while !st.load(Ordering::SeqCst) {
                    let (n, peer) = match sock.recv_from(&mut buf) {
                        Ok(x) => x,
                        Err(_) => continue, // timeout: look at `stop` again
                    };
                    rc.fetch_add(1, Ordering::SeqCst);
                    pe.lock().unwrap().push(peer);
                    out.clear();
                    out.extend_from_slice(&tag);
                    out.extend_from_slice(&buf[..n]);
                    let _ = sock.send_to(&out, peer);
                }
            })?;
        Ok(UdpEcho {
            addr,
            stop,
            peers,
            received,
            thread: Some(thread),
        })
    }

    /// Every datagram's source so far.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().unwrap().clone()
    }

    /// Datagrams received so far.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::SeqCst)
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------------
// Metrics: HTTP, the exposition, promtool, a Prometheus server
// ---------------------------------------------------------------------------------

/// One HTTP response.
#[derive(Clone, Debug)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Status line and headers.
    pub head: String,
    /// Body.
    pub body: String,
}

/// Sends `raw` to `addr` over a fresh connection and reads the answer to EOF; every
/// step has `timeout`. Call from a thread inside the namespace.
pub fn http_raw(addr: SocketAddr, raw: &[u8], timeout: Duration) -> io::Result<HttpResponse> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.write_all(raw)?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    let text = String::from_utf8_lossy(&out).into_owned();
    let bad = || io::Error::new(io::ErrorKind::InvalidData, format!("not HTTP: {text:?}"));
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(bad)?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(bad)?;
    Ok(HttpResponse {
        status,
        head: head.to_string(),
        body: body.to_string(),
    })
}

/// `METHOD target HTTP/1.1` with `Connection: close`. Call from a thread inside the
/// namespace.
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    target: &str,
    timeout: Duration,
) -> io::Result<HttpResponse> {
    let req = format!("{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    http_raw(addr, req.as_bytes(), timeout)
}

/// `GET http://addr/metrics` from inside `ns`; the body of a 200, else an error.
pub fn scrape(ns: &Netns, addr: SocketAddr) -> anyhow::Result<String> {
    let r = ns
        .run(move || http_request(addr, "GET", "/metrics", Duration::from_secs(5)))
        .with_context(|| format!("GET http://{addr}/metrics in {}", ns.name()))?;
    if r.status != 200 {
        bail!("GET http://{addr}/metrics: {}: {}", r.head, r.body);
    }
    anyhow::ensure!(
        r.head
            .contains("Content-Type: text/plain; version=0.0.4; charset=utf-8"),
        "not text format 0.0.4: {}",
        r.head
    );
    Ok(r.body)
}

/// One sample of a Prometheus text exposition.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// Metric name (with `_bucket`, `_sum`, `_count` for histograms).
    pub name: String,
    /// Labels, unescaped.
    pub labels: BTreeMap<String, String>,
    /// Value.
    pub value: f64,
}

/// A parsed exposition: its samples and the `# TYPE` of each family.
#[derive(Clone, Debug, Default)]
pub struct Exposition {
    /// Every sample, in order.
    pub samples: Vec<Sample>,
    /// Family name -> type.
    pub types: BTreeMap<String, String>,
}

impl Exposition {
    /// Parses text format 0.0.4 (what the engine writes: no timestamps).
    pub fn parse(text: &str) -> anyhow::Result<Exposition> {
        let mut x = Exposition::default();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, ty) = rest.split_once(' ').context("TYPE line")?;
                x.types.insert(name.to_string(), ty.to_string());
                continue;
            }
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            x.samples
                .push(parse_sample(line).with_context(|| format!("sample line {line:?}"))?);
        }
        Ok(x)
    }

    /// Samples of `name` whose labels include every pair of `want`, in order.
    pub fn select(&self, name: &str, want: &[(&str, &str)]) -> Vec<&Sample> {
        self.samples
            .iter()
            .filter(|s| {
                s.name == name
                    && want
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect()
    }

    /// Sum of the samples of `name` with labels `want`; panics when there are none
    /// (a renamed metric must fail the test, not read as 0).
    pub fn sum(&self, name: &str, want: &[(&str, &str)]) -> f64 {
        let v: Vec<f64> = self.select(name, want).iter().map(|s| s.value).collect();
        assert!(!v.is_empty(), "no sample {name}{want:?} in the scrape");
        v.iter().sum()
    }
}

fn parse_sample(line: &str) -> anyhow::Result<Sample> {
    let name_end = line.find(['{', ' ']).context("no value")?;
    let name = line[..name_end].to_string();
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(mut r) = rest.strip_prefix('{') {
        loop {
            if let Some(after) = r.strip_prefix('}') {
                r = after;
                break;
            }
            let (key, after) = r.split_once("=\"").context("label without =\"")?;
            let mut value = String::new();
            let mut chars = after.char_indices();
            let end = loop {
                match chars.next().context("unterminated label value")? {
                    (i, '"') => break i,
                    (_, '\\') => match chars.next().context("dangling escape")?.1 {
                        'n' => value.push('\n'),
                        c => value.push(c),
                    },
                    (_, c) => value.push(c),
                }
            };
            labels.insert(key.trim_start_matches(',').to_string(), value);
            r = &after[end + 1..];
        }
        rest = r;
    }
    let value = rest.trim();
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().with_context(|| format!("value {v:?}"))?,
    };
    Ok(Sample {
        name,
        labels,
        value,
    })
}

/// `cmd` on `PATH`.
pub fn which(cmd: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(cmd))
            .find(|p| p.is_file())
    })
}

/// A tool of the Debian `prometheus` package (`promtool`, `prometheus`); panics with
/// the fix when it is missing (scripts/deps.sh installs it for test.sh and CI).
pub fn prometheus_tool(cmd: &str) -> PathBuf {
    which(cmd).unwrap_or_else(|| {
        panic!(
            "`{cmd}` not found: install the Debian package `prometheus` (scripts/deps.sh \
             does, as root)"
        )
    })
}

/// Runs `cmd` with `input` on its stdin, to completion within `timeout`.
pub fn run_with_stdin(cmd: Command, input: &[u8], timeout: Duration) -> anyhow::Result<CmdOutput> {
    run_collecting(cmd, Some(input), timeout)
}

/// `promtool check metrics < text`: Ok with promtool's output when it finds nothing
/// to complain about (format and lint: names, units, HELP, `_total`), else the error
/// with its findings.
pub fn promtool_check_metrics(text: &str) -> anyhow::Result<String> {
    let mut cmd = Command::new(prometheus_tool("promtool"));
    cmd.args(["check", "metrics"]);
    let out = run_with_stdin(cmd, text.as_bytes(), Duration::from_secs(30))?;
    let out = out.ok("promtool check metrics")?;
    Ok(format!("{}{}", out.stdout, out.stderr))
}

/// Percent-encodes a URL query value (everything but unreserved characters).
pub fn url_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A free TCP port on `ip` inside `ns` (bound and released: the namespace is the
/// rig's own, so nobody else takes it in between).
pub fn free_port(ns: &Netns, ip: IpAddr) -> anyhow::Result<u16> {
    let port = ns.run(move || -> io::Result<u16> {
        Ok(TcpListener::bind(SocketAddr::new(ip, 0))?
            .local_addr()?
            .port())
    })?;
    Ok(port)
}

/// A real Prometheus server inside a namespace, scraping one target, with its own
/// config and storage in a temporary directory. Killed (and the directory removed)
/// on drop.
pub struct PrometheusServer {
    child: Option<NsChild>,
    /// Its web and API address (127.0.0.1 in the namespace).
    pub addr: SocketAddr,
    dir: PathBuf,
    ns: Netns,
}

static NEXT_PROMETHEUS: AtomicUsize = AtomicUsize::new(0);

impl PrometheusServer {
    /// Starts `prometheus` in `ns` scraping `target` (`job="ringrelay"`) every
    /// `interval`, and waits (up to `ready_timeout`) until it answers `/-/ready`.
    pub fn start(
        ns: &Netns,
        target: SocketAddr,
        interval: Duration,
        ready_timeout: Duration,
    ) -> anyhow::Result<PrometheusServer> {
        let bin = prometheus_tool("prometheus");
        let n = NEXT_PROMETHEUS.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("ringrelay-prometheus-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("data"))
            .with_context(|| format!("creating {}", dir.display()))?;
        let ms = interval.as_millis().max(1);
        let config = format!(
            "global:\n  scrape_interval: {ms}ms\n  scrape_timeout: {ms}ms\n\
             scrape_configs:\n  - job_name: ringrelay\n    static_configs:\n      \
             - targets: [\"{target}\"]\n"
        );
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config)?;
        let ip: IpAddr = std::net::Ipv4Addr::LOCALHOST.into();
        let addr = SocketAddr::new(ip, free_port(ns, ip)?);
        let mut cmd = ns.command(&bin);
        cmd.arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn");
        let child = NsChild::spawn(format!("prometheus@{}", ns.name()), cmd)?;
        let mut p = PrometheusServer {
            child: Some(child),
            addr,
            dir,
            ns: ns.clone(),
        };
        let ready = poll_until(ready_timeout, || {
            let a = p.addr;
            let r =
                p.ns.run(move || http_request(a, "GET", "/-/ready", Duration::from_secs(2)));
            matches!(r, Ok(ref r) if r.status == 200).then_some(())
        });
        if ready.is_none() {
            let err = p.child.as_ref().map(|c| c.stderr()).unwrap_or_default();
            let exited = p.child.as_mut().and_then(|c| c.try_wait());
            bail!(
                "prometheus on {addr} not ready within {ready_timeout:?} (exit {exited:?}); \
                 stderr: {}",
                tail(&err, 2000)
            );
        }
        Ok(p)
    }

    /// `GET` of an API path (`/api/v1/...`) from inside the namespace: the body of a
    /// 200.
    pub fn api(&self, path_and_query: &str) -> anyhow::Result<String> {
        let (a, p) = (self.addr, path_and_query.to_string());
        let r = self
            .ns
            .run(move || http_request(a, "GET", &p, Duration::from_secs(5)))?;
        if r.status != 200 {
            bail!("prometheus {path_and_query}: {}: {}", r.head, r.body);
        }
        Ok(r.body)
    }

    /// An instant query whose result is one value (e.g. `sum(x)`); `None` while the
    /// result is empty (nothing scraped yet).
    pub fn query_scalar(&self, expr: &str) -> anyhow::Result<Option<f64>> {
        let body = self.api(&format!("/api/v1/query?query={}", url_encode(expr)))?;
        anyhow::ensure!(
            body.contains("\"status\":\"success\""),
            "query {expr}: {body}"
        );
        // {"status":"success","data":{"resultType":"vector","result":[{"metric":{},
        //  "value":[1700000000.1,"5"]}]}}: the value is the string after the timestamp.
        let Some(at) = body.find("\"value\":[") else {
            return Ok(None);
        };
        let v = body[at..]
            .split('"')
            .nth(3)
            .with_context(|| format!("query {expr}: cannot parse {body}"))?;
        Ok(Some(v.parse().with_context(|| format!("value {v:?}"))?))
    }

    /// Prometheus' own log so far.
    pub fn stderr(&self) -> String {
        self.child.as_ref().map(|c| c.stderr()).unwrap_or_default()
    }
}

impl Drop for PrometheusServer {
    fn drop(&mut self) {
        // NsChild's drop: SIGTERM, SIGKILL after a grace period, reap.
        drop(self.child.take());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The CPUs a thread of `pid` named `comm` may run on (`Cpus_allowed_list`), or
/// `None` when no thread has that name.
pub fn thread_cpus(pid: u32, comm: &str) -> anyhow::Result<Option<String>> {
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let t = t?.path();
        let name = std::fs::read_to_string(t.join("comm")).unwrap_or_default();
        if name.trim_end() == comm {
            let status = std::fs::read_to_string(t.join("status"))?;
            let list = status
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .context("no Cpus_allowed_list")?;
            return Ok(Some(list.trim().to_string()));
        }
    }
    Ok(None)
}

/// One TCP echo (v4) and one UDP echo (v4) through the rig's engine: returns once
/// both answers came back and the TCP client has closed its socket.
pub fn relay_tcp_and_udp_once(rig: &Rig, tcp_port: u16, udp_port: u16) -> anyhow::Result<()> {
    let dst = SocketAddr::new(Family::V4.server_a(), tcp_port);
    let _srv = TcpServer::echo(&rig.lab.server, dst)?;
    let udp_dst = SocketAddr::new(Family::V4.server_a(), udp_port);
    let _udp = UdpEcho::start(&rig.lab.server, udp_dst, false)?;
    rig.lab.client.run(move || -> anyhow::Result<()> {
        let mut s = tcp_connect(dst)?;
        s.write_all(b"ping")?;
        let mut b = [0u8; 4];
        s.read_exact(&mut b)?;
        anyhow::ensure!(&b == b"ping", "TCP echo {b:?}");
        s.shutdown(std::net::Shutdown::Write)?;
        let mut rest = Vec::new();
        s.read_to_end(&mut rest)?;
        let u = udp_client(Family::V4, Duration::from_secs(3))?;
        u.send_to(b"pong", udp_dst)?;
        let mut b = [0u8; 8];
        let (n, from) = u.recv_from(&mut b)?;
        anyhow::ensure!(
            &b[..n] == b"pong" && from == udp_dst,
            "UDP echo from {from}"
        );
        Ok(())
    })
}

/// dnsmasq in `ns` listening on the A addresses (v4 and v6), port 53, with `extra`
/// options (e.g. `--address=/example.test/192.0.2.7`); killed on drop. Returns once
/// its TCP listener (which it opens next to UDP 53) is up.
pub fn dnsmasq(ns: &Netns, extra: &[&str]) -> NsChild {
    let listen = format!(
        "--listen-address={},{}",
        Family::V4.server_a(),
        Family::V6.server_a()
    );
    let mut args = vec![
        "--no-daemon",
        "--conf-file=/dev/null",
        "--pid-file=",
        "--user=root",
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
        listen.as_str(),
        "--port=53",
    ];
    args.extend_from_slice(extra);
    let child = ns.spawn_child("dnsmasq", args).expect("starting dnsmasq");
    wait_tcp_listen(ns, 53, std::time::Duration::from_secs(10)).expect("dnsmasq listening");
    child
}

/// Checks that an engine started with `--batch-wait-us us` applied it (its `ready`
/// line says `batch_wait_us=us`). On a kernel without io_uring min-wait (before
/// 6.12) the engine ignores the option by design: this says so (`SKIPPED`) and
/// returns false, so the caller knows it tested the plain path.
pub fn batch_wait_applied(test: &str, ready_line: &str, us: &str) -> bool {
    let kernel_has_it = ringrelay_engine::core::ring::probe(None).is_ok_and(|f| f.min_wait);
    if !kernel_has_it {
        eprintln!("SKIPPED: {test}: --batch-wait-us needs io_uring min-wait (Linux 6.12+)");
        return false;
    }
    assert!(
        ready_line.contains(&format!("batch_wait_us={us}")),
        "{test}: --batch-wait-us {us} not in effect: {ready_line}"
    );
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_table_parses_totals_and_stops_at_the_end() {
        let text = "ready: port 15001\n\
counter                           cpu0          cpu1           total\n\
accepted                             3             2               5\n\
udp_flows_active                     0             1               1\n\
summary: something else\n\
counter                           cpu0          cpu1           total\n\
accepted                             9             9              18\n";
        let c = parse_counter_table(text).unwrap();
        assert_eq!(c.get("accepted"), 5);
        assert_eq!(c.get("udp_flows_active"), 1);
        assert_eq!(c.get("resets"), 0);
        assert_eq!(c.rows().len(), 2);
        let one = parse_counter_table(
            "counter        cpu0           total\naccept_paused     4               4\n",
        )
        .unwrap();
        assert_eq!(one.get("accept_paused"), 4);
    }

    #[test]
    #[should_panic(expected = "unknown engine counter")]
    fn unknown_counter_names_panic() {
        Counters::default().get("acceptd");
    }

    #[test]
    fn pattern_and_digest_agree() {
        let mut out = Vec::new();
        let d = write_pattern(&mut out, 7, 200_003).unwrap();
        assert_eq!(d, pattern_digest(7, 200_003));
        assert_eq!(read_digest(&mut &out[..]).unwrap(), d);
        assert_ne!(pattern_digest(8, 200_003), d);
        // One flipped byte changes the hash.
        out[100_000] ^= 1;
        assert_ne!(read_digest(&mut &out[..]).unwrap(), d);
        assert_eq!(Pattern::bytes(3, 17), Pattern::bytes(3, 17));
    }
}
