//! Flow logs: one JSON line per finished TCP connection and per ended UDP flow.
//!
//! The data plane only copies a small [`FlowRecord`] into its core's bounded queue
//! (`try_send`: never blocks, never allocates for formatting); when the queue is
//! full the record is dropped and counted (`flowlog_dropped`). One writer thread,
//! not on a data-plane core, drains every core's queue, formats the lines and
//! writes them. `reopen()` (SIGHUP) makes it reopen the file, for logrotate without
//! `copytruncate`. The schema is in docs/deployment.md.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Records a core can queue before the writer catches up.
pub const QUEUE_PER_CORE: usize = 8192;

/// Transport of a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowProto {
    Tcp,
    Udp,
}

/// One finished connection or flow, as the data plane hands it over.
#[derive(Clone, Debug)]
pub struct FlowRecord {
    pub proto: FlowProto,
    /// When it ended (wall clock).
    pub ended: SystemTime,
    pub duration: Duration,
    pub client: SocketAddr,
    pub orig_dst: SocketAddr,
    /// Where the engine sent it (differs from `orig_dst` on a redirect).
    pub upstream: SocketAddr,
    /// TLS SNI or HTTP Host, when the policy sniffed one.
    pub name: Option<Box<str>>,
    /// Name of the rule that decided, `None` for the default verdict.
    pub rule: Option<Arc<str>>,
    /// The verdict: relay, redirect, reject, drop.
    pub verdict: &'static str,
    /// Client to server bytes (UDP: payload bytes).
    pub bytes_c2s: u64,
    pub bytes_s2c: u64,
    /// UDP: datagrams each way.
    pub dgrams: Option<(u64, u64)>,
    /// Close reason or flow end reason (`CloseReason::name`, `FlowEnd::name`).
    pub reason: &'static str,
    /// The errno of a failure, if there was one.
    pub errno: Option<i32>,
}

/// Where the writer writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Stdout,
    File(PathBuf),
}

impl Target {
    /// `-` is standard output, anything else a file path.
    pub fn parse(s: &str) -> Target {
        if s == "-" {
            Target::Stdout
        } else {
            Target::File(PathBuf::from(s))
        }
    }

    fn open(&self) -> io::Result<Box<dyn Write + Send>> {
        match self {
            Target::Stdout => Ok(Box::new(io::stdout())),
            Target::File(p) => {
                let f: File = OpenOptions::new().create(true).append(true).open(p)?;
                Ok(Box::new(f))
            }
        }
    }
}

/// The writer side: owns the receivers and the output.
pub struct FlowLog {
    reopen: Arc<AtomicBool>,
    senders: Vec<SyncSender<FlowRecord>>,
    thread: std::thread::JoinHandle<()>,
}

impl FlowLog {
    /// Opens `target` (so a bad path fails at startup, not later) and starts the
    /// writer thread with one bounded queue per core.
    pub fn start(target: Target, cores: usize) -> io::Result<FlowLog> {
        let mut out = BufWriter::new(target.open()?);
        let reopen = Arc::new(AtomicBool::new(false));
        let (senders, receivers): (Vec<_>, Vec<_>) = (0..cores)
            .map(|_| mpsc::sync_channel(QUEUE_PER_CORE))
            .unzip();
        let flag = reopen.clone();
        let thread = std::thread::Builder::new()
            .name("ringrelay-flowlog".into())
            .spawn(move || writer(target, &mut out, receivers, &flag))?;
        Ok(FlowLog {
            reopen,
            senders,
            thread,
        })
    }

    /// The queue of worker `i`.
    pub fn sender(&self, i: usize) -> SyncSender<FlowRecord> {
        self.senders[i].clone()
    }

    /// Waits until every record queued by workers that have ended is written.
    pub fn finish(self) {
        drop(self.senders);
        let _ = self.thread.join();
    }

    /// Asks the writer to reopen its file (after logrotate moved it).
    pub fn reopen(&self) {
        self.reopen.store(true, Ordering::Relaxed);
    }
}

fn writer(
    target: Target,
    out: &mut BufWriter<Box<dyn Write + Send>>,
    mut receivers: Vec<Receiver<FlowRecord>>,
    reopen: &AtomicBool,
) {
    let mut line = String::with_capacity(512);
    while !receivers.is_empty() {
        let mut wrote = false;
        receivers.retain(|rx| loop {
            match rx.try_recv() {
                Ok(r) => {
                    line.clear();
                    format_record(&r, &mut line);
                    if let Err(e) = out.write_all(line.as_bytes()) {
                        crate::log::warn("flow_log", format_args!("flow log: {e}"), &[]);
                    }
                    wrote = true;
                }
                Err(TryRecvError::Empty) => break true,
                // The core's sender is gone: the worker ended.
                Err(TryRecvError::Disconnected) => break false,
            }
        });
        if wrote {
            let _ = out.flush();
        }
        if reopen.swap(false, Ordering::Relaxed) {
            let _ = out.flush();
            match target.open() {
                Ok(w) => *out = BufWriter::new(w),
                Err(e) => crate::log::error(
                    "flow_log",
                    format_args!("flow log: reopening {target:?}: {e}"),
                    &[],
                ),
            }
        }
        if !wrote {
            // Lines wait at most this long; the data plane never waits at all.
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let _ = out.flush();
}

/// RFC 3339 in UTC with microseconds, e.g. `2026-12-01T19:45:03.123456Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_micros()
    )
}

/// Appends one JSON line for `r` to `out`.
pub fn format_record(r: &FlowRecord, out: &mut String) {
    let start = r.ended.checked_sub(r.duration).unwrap_or(r.ended);
    let mut v = serde_json::json!({
        "start": rfc3339(start),
        "duration_s": r.duration.as_secs_f64(),
        "proto": match r.proto { FlowProto::Tcp => "tcp", FlowProto::Udp => "udp" },
        "client": r.client.ip().to_string(),
        "client_port": r.client.port(),
        "orig_dst": r.orig_dst.ip().to_string(),
        "orig_dst_port": r.orig_dst.port(),
        "upstream": r.upstream.to_string(),
        "verdict": r.verdict,
        "rule": r.rule.as_deref(),
        "bytes_c2s": r.bytes_c2s,
        "bytes_s2c": r.bytes_s2c,
        "reason": r.reason,
    });
    let m = v.as_object_mut().expect("an object");
    if let Some(n) = &r.name {
        m.insert("name".into(), serde_json::Value::from(&**n));
    }
    if let Some((c2s, s2c)) = r.dgrams {
        m.insert("dgrams_c2s".into(), c2s.into());
        m.insert("dgrams_s2c".into(), s2c.into());
    }
    if let Some(e) = r.errno {
        m.insert("errno".into(), e.into());
        m.insert(
            "error".into(),
            io::Error::from_raw_os_error(e).to_string().into(),
        );
    }
    out.push_str(&v.to_string());
    out.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_known_instants() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000000Z");
        let t = UNIX_EPOCH + Duration::from_micros(1_798_574_703_123_456);
        assert_eq!(rfc3339(t), "2026-12-29T20:05:03.123456Z");
        // A leap day.
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(t), "2000-02-29T00:00:00.000000Z");
    }

    #[test]
    fn a_record_is_one_json_line_with_every_field() {
        let r = FlowRecord {
            proto: FlowProto::Tcp,
            ended: UNIX_EPOCH + Duration::from_secs(100),
            duration: Duration::from_millis(2500),
            client: "198.18.0.2:40000".parse().unwrap(),
            orig_dst: "[2001:db8::1]:443".parse().unwrap(),
            upstream: "[2001:db8::1]:443".parse().unwrap(),
            name: Some("a.example.com".into()),
            rule: Some("web\"quoted".into()),
            verdict: "relay",
            bytes_c2s: 10,
            bytes_s2c: 20,
            dgrams: None,
            reason: "server_fin",
            errno: None,
        };
        let mut s = String::new();
        format_record(&r, &mut s);
        assert!(s.ends_with('\n') && s.matches('\n').count() == 1, "{s}");
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["start"], "1970-01-01T00:01:37.500000Z");
        assert_eq!(v["duration_s"], 2.5);
        assert_eq!(v["client"], "198.18.0.2");
        assert_eq!(v["orig_dst"], "2001:db8::1");
        assert_eq!(v["orig_dst_port"], 443);
        assert_eq!(v["upstream"], "[2001:db8::1]:443");
        assert_eq!(v["rule"], "web\"quoted");
        assert_eq!(v["name"], "a.example.com");
        assert_eq!(v["reason"], "server_fin");
        assert!(v.get("errno").is_none());
    }
}
