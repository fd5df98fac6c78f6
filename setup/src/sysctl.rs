//! Sysctls, read and written through `/proc/sys` (equivalent to `sysctl -w`).
//!
//! Everything under `/proc/sys/net` belongs to the network namespace of the process
//! that opens it, so `ip netns exec NS setup apply` changes NS only.

use crate::error::SetupError;
use crate::runner::Runner;
use std::fmt;
use std::path::PathBuf;

/// A sysctl, stored as its path below `/proc/sys` (`net/ipv4/conf/eth0.100/rp_filter`).
///
/// The path form is the unambiguous one: in `sysctl(8)` dotted notation a dot inside
/// an interface name must be written as `/` (`net.ipv4.conf.eth0/100.rp_filter`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SysctlKey(String);

impl SysctlKey {
    /// A key from its path below `/proc/sys`, e.g. `net/ipv4/ip_forward`.
    pub fn new(rel: &str) -> Self {
        SysctlKey(rel.trim_matches('/').to_string())
    }

    /// `net/<family>/conf/<iface>/<leaf>`, e.g. `conf("ipv4", "all", "rp_filter")`.
    pub fn conf(family: &str, iface: &str, leaf: &str) -> Self {
        SysctlKey(format!("net/{family}/conf/{iface}/{leaf}"))
    }

    /// The path below `/proc/sys`.
    pub fn rel(&self) -> &str {
        &self.0
    }

    /// The file to read and write.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/proc/sys").join(&self.0)
    }

    /// The `sysctl(8)` name: components joined by `.`, dots inside one turned into `/`.
    pub fn dotted(&self) -> String {
        self.0
            .split('/')
            .map(|c| c.replace('.', "/"))
            .collect::<Vec<_>>()
            .join(".")
    }
}

impl fmt::Display for SysctlKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.dotted())
    }
}

/// Reads a sysctl's current value, trimmed.
pub fn read(runner: &dyn Runner, key: &SysctlKey) -> Result<String, SetupError> {
    runner
        .read_file(&key.path())
        .map(|v| v.trim().to_string())
        .map_err(|e| SetupError::file(key.path(), e))
}

/// Writes a sysctl (equivalent to `sysctl -w key=value`).
pub fn write(runner: &dyn Runner, key: &SysctlKey, value: &str) -> Result<(), SetupError> {
    runner
        .write_file(&key.path(), &format!("{value}\n"))
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::PermissionDenied {
                SetupError::NotPermitted {
                    what: format!("writing {}", key.path().display()),
                }
            } else {
                SetupError::file(key.path(), e)
            }
        })
}

/// The effective `rp_filter` of an interface: the kernel uses
/// `max(conf/all/rp_filter, conf/<iface>/rp_filter)` (`IN_DEV_RPFILTER`).
pub fn effective_rp_filter(all: &str, iface: &str) -> u32 {
    let a = all.trim().parse::<u32>().unwrap_or(0);
    let i = iface.trim().parse::<u32>().unwrap_or(0);
    a.max(i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_forms() {
        let k = SysctlKey::conf("ipv4", "eth0.100", "rp_filter");
        assert_eq!(k.rel(), "net/ipv4/conf/eth0.100/rp_filter");
        assert_eq!(k.dotted(), "net.ipv4.conf.eth0/100.rp_filter");
        assert_eq!(
            k.path(),
            PathBuf::from("/proc/sys/net/ipv4/conf/eth0.100/rp_filter")
        );
        assert_eq!(
            SysctlKey::new("/net/ipv4/ip_forward/").dotted(),
            "net.ipv4.ip_forward"
        );
    }

    #[test]
    fn rp_filter_is_the_max() {
        assert_eq!(effective_rp_filter("0", "1"), 1);
        assert_eq!(effective_rp_filter("2", "1"), 2);
        assert_eq!(effective_rp_filter("1", "0"), 1);
        assert_eq!(effective_rp_filter("0", "0"), 0);
    }
}
