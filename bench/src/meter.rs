//! What the bench reads off a running target, shared by `bench soak` and the
//! `tcp-capacity` scenario of `bench run`: the engine's SIGUSR1 counter table, a
//! process's RSS, a namespace's kernel socket memory (`ss -m`), and the machine's TCP
//! memory against `net.ipv4.tcp_mem`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::sys::signal::Signal;

use crate::lab::Netns;
use crate::targets::Armed;

/// Totals (last column) of the last SIGUSR1 table in `text`; counters the engine
/// leaves out (zero) are absent.
pub fn parse_counter_table(text: &str) -> Option<BTreeMap<String, u64>> {
    let start = text
        .rfind("\ncounter ")
        .map(|i| i + 1)
        .or_else(|| text.starts_with("counter ").then_some(0))?;
    let mut out = BTreeMap::new();
    for line in text[start..].lines().skip(1) {
        let mut words = line.split_whitespace();
        let Some(name) = words.next() else { break };
        let Some(Ok(total)) = words.next_back().map(str::parse::<u64>) else {
            break;
        };
        if !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            break;
        }
        out.insert(name.to_string(), total);
    }
    Some(out)
}

/// `VmRSS` in KiB from a `/proc/PID/status` text.
pub fn parse_vmrss_kb(status: &str) -> Option<u64> {
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Sum of skmem `r` + `t` + `w` (receive queue, transmit allocation, queued writes)
/// over every socket in `ss -m` output.
pub fn parse_skmem_total(ss: &str) -> u64 {
    let mut total = 0;
    for part in ss.split("skmem:(").skip(1) {
        let inner = part.split(')').next().unwrap_or("");
        for field in inner.split(',') {
            let digits = field.trim_start_matches(|c: char| c.is_ascii_alphabetic());
            let key = &field[..field.len() - digits.len()];
            if matches!(key, "r" | "t" | "w") {
                total += digits.parse::<u64>().unwrap_or(0);
            }
        }
    }
    total
}

/// `VmRSS` of process `pid`, in KiB.
pub fn rss_kb(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status =
        std::fs::read_to_string(&path).with_context(|| format!("{path} (process gone?)"))?;
    parse_vmrss_kb(&status).with_context(|| format!("no VmRSS in {path}"))
}

/// Kernel socket memory in `ns`, bytes: [`parse_skmem_total`] over `ss -m FLAGS` run
/// there (`flags` picks the sockets, e.g. `-tnH`: TCP, not listening, numeric, no
/// header).
pub fn socket_memory(ns: &Netns, flags: &str) -> anyhow::Result<u64> {
    let out = ns
        .command("ss")
        .args(["-m", flags])
        .stdin(std::process::Stdio::null())
        .output()
        .with_context(|| format!("ss -m {flags} in {}", ns.name()))?;
    anyhow::ensure!(
        out.status.success(),
        "ss -m {flags} in {} failed ({}): {}",
        ns.name(),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(parse_skmem_total(&String::from_utf8_lossy(&out.stdout)))
}

/// Pages of TCP memory the whole machine has allocated: `mem` of the `TCP:` line of
/// `/proc/net/sockstat` (the count is global, whichever namespace reads it).
pub fn parse_sockstat_tcp_pages(sockstat: &str) -> Option<u64> {
    let line = sockstat.lines().find(|l| l.starts_with("TCP:"))?;
    let mut words = line.split_whitespace();
    words.find(|w| *w == "mem")?;
    words.next()?.parse().ok()
}

/// The three page counts of `net.ipv4.tcp_mem`: below the first the kernel leaves TCP
/// buffers alone, past it it is under memory pressure and shrinks them, past the
/// third it refuses to allocate.
pub fn parse_tcp_mem(text: &str) -> Option<[u64; 3]> {
    let v: Vec<u64> = text
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    <[u64; 3]>::try_from(v).ok()
}

/// The machine's TCP memory now and its `tcp_mem` thresholds, both in pages.
pub fn machine_tcp_memory() -> anyhow::Result<(u64, [u64; 3])> {
    let sockstat = std::fs::read_to_string("/proc/net/sockstat").context("/proc/net/sockstat")?;
    let tcp_mem = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_mem")
        .context("/proc/sys/net/ipv4/tcp_mem")?;
    Ok((
        parse_sockstat_tcp_pages(&sockstat).context("no TCP mem in /proc/net/sockstat")?,
        parse_tcp_mem(&tcp_mem).context("unreadable net.ipv4.tcp_mem")?,
    ))
}

/// SIGUSR1 and the table it prints (waits up to `timeout` for it to be complete).
pub fn read_counters(armed: &Armed, timeout: Duration) -> anyhow::Result<BTreeMap<String, u64>> {
    let before = armed.stdout().len();
    armed.signal(Signal::SIGUSR1)?;
    let deadline = Instant::now() + timeout;
    let mut last_len = before;
    loop {
        std::thread::sleep(Duration::from_millis(20));
        let out = armed.stdout();
        let fresh = &out[before.min(out.len())..];
        // Complete once something with a header arrived and nothing more came in
        // the last 20 ms.
        if fresh.contains("counter ") && out.len() == last_len && out.ends_with('\n') {
            return parse_counter_table(fresh).context("unreadable SIGUSR1 table");
        }
        last_len = out.len();
        if Instant::now() >= deadline {
            anyhow::bail!("the engine printed no SIGUSR1 table within {timeout:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_is_sampled() {
        let table =
            "ready: port 15001\nsomething\ncounter                         cpu3           total\n\
                     accepted                         120             120\n\
                     active                             3               3\n\
                     close_client_fin                 100             100\n\
                     close_client_reset                17              17\n\
                     udp_flows_active                   2               2\n";
        let m = parse_counter_table(table).unwrap();
        assert_eq!(m["accepted"], 120);
        assert_eq!(m["active"], 3);
        assert_eq!(m["close_client_reset"], 17);
        assert_eq!(m["udp_flows_active"], 2);
        assert_eq!(m.len(), 5);
        // The last table wins.
        let two = format!("{table}counter  cpu3  total\naccepted 1 1\n");
        assert_eq!(parse_counter_table(&two).unwrap()["accepted"], 1);
        assert!(parse_counter_table("no table").is_none());
        assert_eq!(
            parse_vmrss_kb("Name:\tengine\nVmRSS:\t   12345 kB\n"),
            Some(12345)
        );
        let ss = "tcp ESTAB 0 0 1.2.3.4:5 6.7.8.9:10 skmem:(r100,rb131072,t20,tb87040,f4096,w300,o0,bl0,d0)\n\
                  udp UNCONN 0 0 *:5 *:* skmem:(r1,rb212992,t0,tb212992,f0,w0,o0,bl0,d3)\n\
                  tcp TIME-WAIT 0 0 1.2.3.4:6 6.7.8.9:10\n";
        assert_eq!(parse_skmem_total(ss), 421);
    }

    #[test]
    fn parses_the_machines_tcp_memory() {
        let sockstat = "sockets: used 9\nTCP: inuse 1 orphan 0 tw 3 alloc 4 mem 1234\n\
                        UDP: inuse 0 mem 7\n";
        assert_eq!(parse_sockstat_tcp_pages(sockstat), Some(1234));
        assert_eq!(parse_sockstat_tcp_pages("UDP: inuse 0 mem 7\n"), None);
        assert_eq!(parse_sockstat_tcp_pages("TCP: inuse 1 mem\n"), None);
        assert_eq!(
            parse_tcp_mem("288450\t384602\t576900\n"),
            Some([288450, 384602, 576900])
        );
        assert_eq!(parse_tcp_mem("1 2"), None);
        assert_eq!(parse_tcp_mem("1 2 x"), None);
    }
}
