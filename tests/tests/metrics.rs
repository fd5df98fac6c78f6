//! `engine --metrics ADDR`: the Prometheus endpoint of the real engine in a lab.
//!
//! The engine serves on 127.0.0.1:9108 of the router namespace; every fetch comes from
//! a thread that entered that namespace. The scrape is checked against what was
//! relayed and against the SIGUSR1 table, validated with `promtool check metrics`,
//! and scraped by a real Prometheus server. Needs root (namespaces, TPROXY) and the
//! Debian package `prometheus` (scripts/deps.sh installs it); without root each test
//! prints `SKIPPED: <name>: needs root ...`.
#![forbid(unsafe_code)]

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant, SystemTime};

use ringrelay_engine::metrics::{counter_metrics, Kind};
use ringrelay_tests::*;

const METRICS: &str = "127.0.0.1:9108";

fn metrics_addr() -> SocketAddr {
    METRICS.parse().unwrap()
}

fn rig(test: &str, cores: &str) -> Option<Rig> {
    Rig::start(
        test,
        RigConfig::new()
            .cores(cores)
            .engine_args(&["--metrics", METRICS]),
    )
}

/// Scrapes until `pred` holds (bounded); returns the last text and its parse.
fn scrape_until(
    rig: &Rig,
    timeout: Duration,
    pred: impl Fn(&Exposition) -> bool,
) -> (String, Exposition) {
    let mut last = None;
    let ok = poll_until(timeout, || {
        let text = scrape(&rig.lab.router, metrics_addr()).unwrap();
        let x = Exposition::parse(&text).unwrap();
        let done = pred(&x);
        last = Some((text, x));
        done.then_some(())
    });
    let (text, x) = last.unwrap();
    assert!(
        ok.is_some(),
        "condition not met within {timeout:?}:\n{text}"
    );
    (text, x)
}

/// The `name N` token of the ready line.
fn ready_value(ready: &str, name: &str) -> u64 {
    let mut words = ready.split_whitespace();
    while let Some(w) = words.next() {
        if w == name {
            return words.next().unwrap().parse().unwrap();
        }
    }
    panic!("no `{name}` in {ready}");
}

/// One TCP connection and one UDP exchange relayed: the scrape counts them, agrees
/// with the SIGUSR1 table on every counter, and passes promtool.
#[test]
fn metrics_count_relayed_traffic_and_pass_promtool() {
    let test = "metrics_count_relayed_traffic_and_pass_promtool";
    let Some(mut rig) = rig(test, "0-1") else {
        return;
    };
    let started = SystemTime::now();
    assert!(
        rig.engine()
            .child
            .stdout()
            .contains(&format!("metrics: http://{METRICS}/metrics")),
        "{}",
        rig.engine().child.stdout()
    );
    relay_tcp_and_udp_once(&rig, 5040, 5041).unwrap();

    let reasons = ["client_fin", "server_fin"];
    let (text, x) = scrape_until(&rig, Duration::from_secs(10), |x| {
        let clean: f64 = reasons
            .iter()
            .map(|r| x.sum("ringrelay_tcp_connections_closed_total", &[("reason", *r)]))
            .sum();
        clean >= 1.0
            && x.sum(
                "ringrelay_udp_datagrams_total",
                &[("direction", "server_to_client")],
            ) >= 1.0
            && x.sum("ringrelay_tcp_connection_duration_seconds_count", &[]) >= 1.0
    });

    let total = |name: &str| x.sum(name, &[]);
    assert!(total("ringrelay_tcp_connections_accepted_total") >= 1.0);
    assert_eq!(total("ringrelay_tcp_connections_active"), 0.0);
    // accepted == active + every close reason, once nothing is in flight.
    assert_eq!(
        total("ringrelay_tcp_connections_accepted_total"),
        total("ringrelay_tcp_connections_closed_total")
    );
    for dir in ["client_to_server", "server_to_client"] {
        assert!(x.sum("ringrelay_udp_datagrams_total", &[("direction", dir)]) >= 1.0);
        let tcp = [("protocol", "tcp"), ("direction", dir)];
        assert!(x.sum("ringrelay_relayed_bytes_total", &tcp) >= 4.0, "{dir}");
        let udp = [("protocol", "udp"), ("direction", dir)];
        assert!(x.sum("ringrelay_relayed_bytes_total", &udp) >= 4.0, "{dir}");
    }
    assert!(total("ringrelay_udp_flows_created_total") >= 1.0);
    // Histograms: at least one observation each, cumulative, +Inf == _count.
    for h in [
        "ringrelay_tcp_upstream_connect_duration_seconds",
        "ringrelay_tcp_connection_duration_seconds",
    ] {
        let count = total(&format!("{h}_count"));
        assert!(count >= 1.0, "{h}");
        let buckets = x.select(&format!("{h}_bucket"), &[]);
        assert!(buckets.windows(2).all(|w| w[0].value <= w[1].value), "{h}");
        let inf = buckets.last().unwrap();
        assert_eq!(inf.labels["le"], "+Inf");
        assert_eq!(inf.value, count, "{h}");
        assert!(total(&format!("{h}_sum")) > 0.0, "{h}");
        assert_eq!(x.types[h], "histogram");
    }
    // Per core: one sample per worker CPU, labelled with the CPU number.
    let cores: Vec<&str> = x
        .select("ringrelay_tcp_connections_accepted_total", &[])
        .iter()
        .map(|s| s.labels["core"].as_str())
        .collect();
    assert_eq!(cores, ["0", "1"]);

    // Process and engine facts.
    let ready = rig.engine().ready_line.clone();
    let info = x.select("ringrelay_info", &[]);
    assert_eq!(info.len(), 1);
    assert_eq!(info[0].value, 1.0);
    assert_eq!(info[0].labels["cores"], "0-1");
    assert_eq!(info[0].labels["relay"], "splice");
    assert_eq!(info[0].labels["version"], env!("CARGO_PKG_VERSION"));
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let t0 = started
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let start = total("ringrelay_start_time_seconds");
    assert!(
        start > t0 - 60.0 && start <= now,
        "start {start}, now {now}"
    );
    assert_eq!(
        total("ringrelay_process_max_fds"),
        ready_value(&ready, "nofile") as f64
    );
    let open = total("ringrelay_process_open_fds");
    assert!(
        open >= 10.0 && open < total("ringrelay_process_max_fds"),
        "{open}"
    );
    assert_eq!(
        total("ringrelay_tcp_connections_max"),
        ready_value(&ready, "max_conns") as f64
    );
    assert_eq!(
        total("ringrelay_udp_flows_max"),
        ready_value(&ready, "udp_max_flows") as f64
    );

    let verdict = promtool_check_metrics(&text).unwrap_or_else(|e| panic!("{e:#}\n{text}"));
    let _ = writeln!(
        std::io::stderr(),
        "promtool check metrics: ok{}",
        if verdict.trim().is_empty() {
            String::new()
        } else {
            format!(": {}", verdict.trim())
        }
    );

    // Every counter of the SIGUSR1 table, summed over cores, equals its metric. The
    // table and the scrape are read at different instants, so compare only when two
    // tables around the scrape agree (a UDP flow may expire in between).
    let router = rig.lab.router.clone();
    let e = rig.engine_mut();
    let agreed = poll_until(Duration::from_secs(10), || {
        let before = e.counters();
        let x = Exposition::parse(&scrape(&router, metrics_addr()).unwrap()).unwrap();
        (e.counters() == before).then_some((before, x))
    });
    let (table, x) = agreed.expect("counters kept changing");
    for m in counter_metrics() {
        if m.kind != Kind::Counter {
            continue; // gauges are refreshed every second by the workers
        }
        let want = table.get(m.field) as f64;
        assert_eq!(
            x.sum(m.family, &m.labels),
            want,
            "{} = {want} in the SIGUSR1 table, but {}{:?} in the scrape",
            m.field,
            m.family,
            m.labels
        );
    }
}

/// A real Prometheus server in the router scrapes the engine every second; its query
/// API sees the relayed connection.
#[test]
fn metrics_scraped_by_prometheus() {
    let test = "metrics_scraped_by_prometheus";
    let Some(rig) = rig(test, "0-1") else {
        return;
    };
    relay_tcp_and_udp_once(&rig, 5042, 5043).unwrap();
    let prom = PrometheusServer::start(
        &rig.lab.router,
        metrics_addr(),
        Duration::from_secs(1),
        Duration::from_secs(20),
    )
    .unwrap();
    let query = "sum(ringrelay_tcp_connections_accepted_total)";
    let mut last = None;
    let seen = poll_until(Duration::from_secs(20), || {
        last = Some(prom.query_scalar(query));
        matches!(last, Some(Ok(Some(v))) if v >= 1.0).then_some(())
    });
    if seen.is_none() {
        let targets = prom
            .api("/api/v1/targets")
            .unwrap_or_else(|e| e.to_string());
        panic!(
            "Prometheus never saw {query} >= 1 within 20 s; last answer {last:?}; \
             targets: {targets}; log: {}",
            prom.stderr()
        );
    }
    let up = prom.query_scalar("up{job=\"ringrelay\"}").unwrap();
    assert_eq!(up, Some(1.0));
    let info = prom
        .query_scalar("count(ringrelay_info{relay=\"splice\",cores=\"0-1\"})")
        .unwrap();
    assert_eq!(info, Some(1.0));
}

/// Other paths are 404, other methods 405, garbage 400; a client that sends nothing
/// does not keep the next scrape waiting beyond the 2 s read deadline; the thread
/// runs off the worker cores.
#[test]
fn metrics_404_bad_requests_slow_clients_and_pinning() {
    let test = "metrics_404_bad_requests_slow_clients_and_pinning";
    let Some(rig) = rig(test, "0") else {
        return;
    };
    let addr = metrics_addr();
    let t = Duration::from_secs(5);
    let (nf, root, post, bad, huge, idle_scrape) = rig.lab.router.run(move || {
        let nf = http_request(addr, "GET", "/nope", t).unwrap();
        let root = http_request(addr, "GET", "/", t).unwrap();
        let post = http_request(addr, "POST", "/metrics", t).unwrap();
        let bad = http_raw(addr, b"hello there\r\n\r\n", t).unwrap();
        let huge = http_raw(addr, &vec![b'x'; 64 * 1024], t);
        // Connects and sends nothing: held for the read deadline, then dropped.
        let idle = TcpStream::connect(addr).unwrap();
        let at = Instant::now();
        let ok = http_request(addr, "GET", "/metrics", t).unwrap();
        let waited = at.elapsed();
        drop(idle);
        (nf, root, post, bad, huge, (ok, waited))
    });
    assert_eq!(nf.status, 404, "{nf:?}");
    assert!(nf.body.contains("/metrics"), "{nf:?}");
    assert_eq!(root.status, 404);
    assert_eq!(post.status, 405, "{post:?}");
    assert!(post.head.contains("Allow: GET, HEAD"), "{post:?}");
    assert_eq!(bad.status, 400, "{bad:?}");
    // 64 KiB without a blank line: answered 400 after 8 KiB (or reset while the rest
    // was still being written: either way it is not served).
    if let Ok(h) = huge {
        assert_eq!(h.status, 400, "{h:?}");
    }
    let (ok, waited) = idle_scrape;
    assert_eq!(ok.status, 200);
    assert!(waited < Duration::from_secs(4), "waited {waited:?}");

    // The metrics thread runs on the CPUs the workers do not use (unpinned when
    // there are none).
    let allowed = cpus_of_self();
    let spare: Vec<usize> = allowed.iter().copied().filter(|&c| c != 0).collect();
    let want = if spare.is_empty() { &allowed } else { &spare };
    let pid = rig.engine().pid();
    // The kernel keeps 15 bytes of a thread name.
    let got = thread_cpus(pid, "ringrelay-metri")
        .unwrap()
        .expect("no ringrelay-metrics thread");
    assert_eq!(got, ringrelay_engine::cpus::format(want));
    assert_eq!(
        thread_cpus(pid, "ringrelay-cpu0").unwrap().as_deref(),
        Some("0")
    );
}

fn cpus_of_self() -> Vec<usize> {
    ringrelay_engine::cpus::allowed()
}

/// A taken or foreign `--metrics` address stops the engine before `ready:`, with a
/// message that names the address.
#[test]
fn metrics_bind_failure_stops_startup() {
    let test = "metrics_bind_failure_stops_startup";
    let Some(rig) = Rig::start(test, RigConfig::new().without_engine()) else {
        return;
    };
    let ns = &rig.lab.router;
    let fails = |addr: &str| -> String {
        let mut cmd = ns.command(engine_bin());
        cmd.args(["--cores", "0", "--metrics", addr]);
        let out = run_with_timeout(cmd, Duration::from_secs(15)).unwrap();
        assert!(!out.status.success(), "started: {}", out.stdout);
        assert!(!out.stdout.contains("ready:"), "{}", out.stdout);
        out.stderr
    };
    let taken: TcpListener = ns.run(|| TcpListener::bind(METRICS)).unwrap();
    let err = fails(METRICS);
    assert!(
        err.contains(&format!("--metrics {METRICS}")) && err.contains("already in use"),
        "{err}"
    );
    drop(taken);
    let err = fails("192.0.2.1:9108");
    assert!(
        err.contains("--metrics 192.0.2.1:9108") && err.contains("no interface"),
        "{err}"
    );
    // The port is free again: the same command starts.
    let args: Vec<String> = ["--cores", "0", "--metrics", METRICS]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let engine = Engine::start(ns, &args);
    assert!(engine.is_ok(), "{:?}", engine.err());
}

/// The scrape config and alert rules in docs/deployment.md load in promtool, so the
/// documentation cannot drift from what Prometheus accepts. No root needed.
#[test]
fn metrics_docs_config_and_alerts_pass_promtool() {
    let test = "metrics_docs_config_and_alerts_pass_promtool";
    if which("promtool").is_none() && !nix::unistd::geteuid().is_root() {
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: {test}: needs promtool (Debian package prometheus; scripts/deps.sh \
             installs it as root)"
        );
        return;
    }
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/deployment.md"
    ))
    .unwrap();
    // Fenced ```yaml blocks whose first line is `# <file name>`.
    let mut files = Vec::new();
    let mut rest = doc.as_str();
    while let Some(at) = rest.find("```yaml\n") {
        let body = &rest[at + 8..];
        let end = body.find("```").unwrap();
        let block = &body[..end];
        if let Some(name) = block.lines().next().and_then(|l| l.strip_prefix("# ")) {
            files.push((name.trim().to_string(), block.to_string()));
        }
        rest = &body[end + 3..];
    }
    let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
    assert!(
        names.contains(&"prometheus.yml") && names.contains(&"ringrelay-alerts.yml"),
        "docs/deployment.md must hold ```yaml blocks starting `# prometheus.yml` and \
         `# ringrelay-alerts.yml`; found {names:?}"
    );
    let dir = std::env::temp_dir().join(format!("ringrelay-docs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (name, text) in &files {
        std::fs::write(dir.join(name), text).unwrap();
    }
    let mut cmd = std::process::Command::new(prometheus_tool("promtool"));
    cmd.args(["check", "config"])
        .arg(dir.join("prometheus.yml"));
    let out = run_with_timeout(cmd, Duration::from_secs(30)).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let out = out.ok("promtool check config").unwrap();
    assert!(
        out.stdout.contains("SUCCESS") && out.stdout.contains("3 rules found"),
        "{}{}",
        out.stdout,
        out.stderr
    );
}

/// Every family the engine renders has a row in docs/deployment.md's table, and the
/// table names no family the engine does not render. No root needed.
#[test]
fn metrics_docs_list_every_family() {
    use ringrelay_engine::metrics::{render, EngineInfo, FdUse};
    let info = EngineInfo {
        version: "0".into(),
        relay: "splice".into(),
        cores: "0".into(),
        start_time_s: 0.0,
        max_conns: 1,
        max_flows_per_core: 1,
    };
    let mut text = render(
        &info,
        &FdUse {
            open: 1,
            limit: 1,
            credits_in_use: 0,
            credits: 1,
        },
        &[(0, ringrelay_engine::Snapshot::default())],
    );
    text.push_str(&ringrelay_engine::metrics::render_policy(&[]));
    let rendered: std::collections::BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .map(str::to_string)
        .collect();
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/deployment.md"
    ))
    .unwrap();
    // Table rows: "| `ringrelay_name` | type | ...".
    let documented: std::collections::BTreeSet<String> = doc
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .filter(|name| name.starts_with("ringrelay_"))
        .map(str::to_string)
        .collect();
    let missing: Vec<_> = rendered.difference(&documented).collect();
    let stale: Vec<_> = documented.difference(&rendered).collect();
    assert!(
        missing.is_empty() && stale.is_empty(),
        "docs/deployment.md, Metrics: families without a row {missing:?}, rows without \
         a family {stale:?}"
    );
}
