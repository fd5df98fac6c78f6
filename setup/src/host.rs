//! Read-only facts about the box (interfaces, capabilities, listeners) and the helper
//! that turns a failed command into an actionable [`SetupError`].

use crate::error::SetupError;
use crate::plan::{Family, L4};
use crate::runner::{Cmd, Output, RunError, Runner};
use crate::sockdiag::{self, DiagSocket};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

/// Interfaces of this network namespace (`/sys/class/net`), sorted.
///
/// `ip netns exec` remounts `/sys` for the namespace it enters, so this lists the
/// namespace's own interfaces.
pub fn interfaces(runner: &dyn Runner) -> Result<Vec<String>, SetupError> {
    let dir = Path::new("/sys/class/net");
    runner.list_dir(dir).map_err(|e| SetupError::file(dir, e))
}

/// Whether an interface is administratively up (`IFF_UP` in `/sys/class/net/IF/flags`);
/// `None` when unknown.
pub fn interface_up(runner: &dyn Runner, name: &str) -> Option<bool> {
    let text = runner
        .read_file(&PathBuf::from(format!("/sys/class/net/{name}/flags")))
        .ok()?;
    let flags = u32::from_str_radix(text.trim().trim_start_matches("0x"), 16).ok()?;
    Some(flags & 0x1 != 0)
}

/// Whether the process holds CAP_NET_ADMIN (bit 12 of `CapEff` in `/proc/self/status`);
/// `None` when that cannot be read.
pub fn has_cap_net_admin(runner: &dyn Runner) -> Option<bool> {
    const CAP_NET_ADMIN: u32 = 12;
    let status = runner.read_file(Path::new("/proc/self/status")).ok()?;
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))?
        .trim();
    let caps = u64::from_str_radix(hex, 16).ok()?;
    Some(caps & (1 << CAP_NET_ADMIN) != 0)
}

/// Whether IPv6 exists in this kernel and namespace.
pub fn ipv6_available(runner: &dyn Runner) -> bool {
    runner.exists(Path::new("/proc/sys/net/ipv6/conf/all"))
}

/// The sockets of this namespace from `/proc/net/{tcp,tcp6,udp,udp6}`: the fallback
/// when `sock_diag` cannot be asked. These tables show neither `IP_TRANSPARENT` nor
/// `IPV6_V6ONLY` (both come back `None`); TCP sockets other than listeners are left out.
pub fn proc_sockets(runner: &dyn Runner) -> Vec<DiagSocket> {
    let mut out = Vec::new();
    for (file, family, l4) in [
        ("tcp", Family::V4, L4::Tcp),
        ("tcp6", Family::V6, L4::Tcp),
        ("udp", Family::V4, L4::Udp),
        ("udp6", Family::V6, L4::Udp),
    ] {
        let Ok(text) = runner.read_file(&PathBuf::from(format!("/proc/net/{file}"))) else {
            continue;
        };
        out.extend(parse_proc_net(&text, family, l4));
    }
    out
}

/// Parses one `/proc/net/{tcp,udp}[6]` table (`sl local_address rem_address st ...`,
/// addresses as hex words in host order, the port as big-endian hex).
pub fn parse_proc_net(table: &str, family: Family, l4: L4) -> Vec<DiagSocket> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (addr_hex, port_hex) = f.get(1)?.rsplit_once(':')?;
            let port = u16::from_str_radix(port_hex, 16).ok()?;
            let state = u8::from_str_radix(f.get(3)?, 16).ok()?;
            if l4 == L4::Tcp && state != sockdiag::STATE_LISTEN {
                return None;
            }
            // Only "is it the wildcard" matters here; other addresses are kept as
            // a non-wildcard placeholder of the right family.
            let zero = addr_hex.bytes().all(|b| b == b'0');
            let addr = match (family, zero) {
                (Family::V4, true) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                (Family::V4, false) => IpAddr::V4(Ipv4Addr::BROADCAST),
                (Family::V6, true) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
                (Family::V6, false) => IpAddr::V6(Ipv6Addr::LOCALHOST),
            };
            Some(DiagSocket {
                family,
                l4,
                state,
                addr,
                port,
                v6only: None,
                transparent: None,
                inode: f.get(9).and_then(|i| i.parse().ok()).unwrap_or(0),
            })
        })
        .collect()
}

/// Whether a `/proc/net/{tcp,udp}[6]` table has a socket whose local port is `port`
/// (and whose state is `state`, when given).
pub fn proc_net_has_port(table: &str, port: u16, state: Option<&str>) -> bool {
    let want = format!("{port:04X}");
    table.lines().skip(1).any(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let local_port = f.get(1).and_then(|l| l.rsplit(':').next());
        local_port.is_some_and(|p| p.eq_ignore_ascii_case(&want))
            && match state {
                None => true,
                Some(s) => f.get(3).is_some_and(|st| st.eq_ignore_ascii_case(s)),
            }
    })
}

/// The inode of `/proc/self/ns/net`: distinct namespaces that exist at the same time
/// have distinct inodes, so it names the state file.
pub fn netns_inode() -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self/ns/net").map(|m| m.ino())
}

/// An identity of this network namespace that a later namespace does not share:
/// `NETNS_INODE-LO_INODE-BOOT_ID`.
///
/// The netns inode alone is not enough: the kernel reuses it as soon as a namespace
/// is gone (measured: a new namespace got the inode of one deleted a moment before),
/// and a state file left by a deleted namespace must not be taken for the new one's.
/// The sysfs (kernfs) inode of this namespace's `lo` is allocated cyclically when the
/// namespace is created, and the boot id changes at reboot.
pub fn netns_identity() -> std::io::Result<String> {
    use std::os::unix::fs::MetadataExt;
    let ns = netns_inode()?;
    let lo = std::fs::metadata("/sys/class/net/lo").map_or(0, |m| m.ino());
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|b| b.trim().to_string())
        .unwrap_or_else(|_| "unknown".to_string());
    Ok(format!("{ns}-{lo}-{boot}"))
}

/// The Debian package that ships a program, and an alternative to suggest.
pub fn package_of(program: &str) -> (&'static str, &'static str) {
    match program {
        "nft" => ("nftables", ", or use --backend iptables"),
        p if p.contains("tables") => ("iptables", ", or use --backend nft"),
        "ip" => ("iproute2", ""),
        _ => ("matching", ""),
    }
}

/// The error for a program that is not installed.
pub fn missing_program(program: &str) -> SetupError {
    let (package, hint) = package_of(program);
    SetupError::MissingProgram {
        program: program.to_string(),
        package,
        hint,
    }
}

/// Fails with [`SetupError::MissingProgram`] unless `program` is installed.
pub fn require_program(runner: &dyn Runner, program: &str) -> Result<(), SetupError> {
    runner
        .find_program(program)
        .map(|_| ())
        .ok_or_else(|| missing_program(program))
}

/// Whether a command's message is the kernel's EPERM (or iptables' root check).
pub fn is_eperm(message: &str) -> bool {
    message.contains("Operation not permitted")
        || message.contains("Permission denied")
        || message.contains("must be root")
}

/// stderr (or stdout when stderr is empty) folded to one line.
pub fn one_line(out: &Output) -> String {
    let text = if out.stderr.trim().is_empty() {
        &out.stdout
    } else {
        &out.stderr
    };
    let mut s = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" | ");
    if s.len() > 600 {
        let mut cut = 600;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push_str(" ...");
    }
    if s.is_empty() {
        s.push_str("no message");
    }
    s
}

/// The error for a command that ran and failed.
pub fn command_error(cmd: &Cmd, out: &Output) -> SetupError {
    let message = one_line(out);
    if is_eperm(&message) {
        return SetupError::NotPermitted {
            what: format!("`{cmd}`"),
        };
    }
    SetupError::CommandFailed {
        cmd: cmd.to_string(),
        code: match out.code {
            Some(c) => format!("exit {c}"),
            None => "killed by a signal".to_string(),
        },
        stderr: message,
    }
}

/// Runs a command; an absent program, EPERM and a non-zero exit become errors.
pub fn run_checked(runner: &dyn Runner, cmd: &Cmd) -> Result<Output, SetupError> {
    let out = run_any(runner, cmd)?;
    if out.success() {
        Ok(out)
    } else {
        Err(command_error(cmd, &out))
    }
}

/// Runs a command whose failure the caller interprets (a lookup that may find
/// nothing); only an absent program is an error.
pub fn run_any(runner: &dyn Runner, cmd: &Cmd) -> Result<Output, SetupError> {
    runner.run(cmd).map_err(|e| match e {
        RunError::NotFound { program } => missing_program(&program),
        other => SetupError::Run(other),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runner::RecordingRunner;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:3A99 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0
   1: 0100007F:0050 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0 20 4 30 10 -1
";

    #[test]
    fn finds_listener_by_port_and_state() {
        assert!(proc_net_has_port(TCP, 15001, Some("0A")));
        assert!(!proc_net_has_port(TCP, 80, Some("0A")));
        assert!(proc_net_has_port(TCP, 80, None));
        let tcp6 = "  sl  local_address                         remote_address                        st\n   0: 00000000000000000000000000000000:3A99 00000000000000000000000000000000:0000 0A\n";
        assert!(proc_net_has_port(tcp6, 15001, Some("0A")));
        let socks = parse_proc_net(TCP, Family::V4, L4::Tcp);
        assert_eq!(socks.len(), 1, "listeners only");
        assert!(socks[0].is_wildcard() && socks[0].port == 15001 && socks[0].transparent.is_none());
        let udp = parse_proc_net(
            "  sl  local_address rem_address   st\n  1: 0100007F:0035 00000000:0000 07 0 0 0 0 0 123\n",
            Family::V4,
            L4::Udp,
        );
        assert_eq!(
            (udp[0].port, udp[0].is_wildcard(), udp[0].inode),
            (53, false, 123)
        );
    }

    #[test]
    fn capabilities_from_status() {
        let r = RecordingRunner::new();
        r.set_file("/proc/self/status", "Name:\tx\nCapEff:\t000001ffffffffff\n");
        assert_eq!(has_cap_net_admin(&r), Some(true));
        r.set_file("/proc/self/status", "CapEff:\t0000000000000000\n");
        assert_eq!(has_cap_net_admin(&r), Some(false));
    }

    #[test]
    fn failures_become_actionable() {
        let cmd = Cmd::new("nft", &["-f", "-"]);
        let e = command_error(
            &cmd,
            &Output::fail(
                1,
                "Error: Could not process rule: Operation not permitted\n",
            ),
        );
        assert_eq!(
            e.to_string(),
            "`nft -f -`: operation not permitted: run as root or with CAP_NET_ADMIN"
        );
        let e = command_error(&cmd, &Output::fail(1, "Error: syntax error\nline 2\n"));
        assert_eq!(
            e.to_string(),
            "`nft -f -` failed (exit 1): Error: syntax error | line 2"
        );
        assert_eq!(
            missing_program("nft").to_string(),
            "nft not found in PATH: install the nftables package, or use --backend iptables"
        );
    }
}
