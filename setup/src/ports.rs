//! Destination port lists such as `80,443,8000-8100`.
//!
//! Lists are normalised (sorted, overlapping and adjacent ranges merged) before they
//! reach a renderer: an nft anonymous interval set rejects overlapping elements
//! ("conflicting intervals specified"), and a canonical list makes re-applying the
//! same flags produce byte-identical rules.

use std::fmt;
use thiserror::Error;

/// An inclusive range of destination ports; `first == last` for a single port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PortRange {
    /// First port of the range (1-65535).
    pub first: u16,
    /// Last port of the range, `>= first`.
    pub last: u16,
}

impl PortRange {
    /// A range holding one port.
    pub fn single(port: u16) -> Self {
        PortRange {
            first: port,
            last: port,
        }
    }

    /// How many slots the range takes in one iptables `multiport` match: a single port
    /// counts 1 and a range counts 2 (`XT_MULTI_PORTS` is 15 slots).
    pub fn multiport_slots(&self) -> usize {
        if self.first == self.last {
            1
        } else {
            2
        }
    }

    /// Renders the range with `sep` between the ends: `-` for nft, `:` for iptables.
    pub fn render(&self, sep: char) -> String {
        if self.first == self.last {
            self.first.to_string()
        } else {
            format!("{}{}{}", self.first, sep, self.last)
        }
    }
}

/// Which destination ports of one protocol are intercepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortSel {
    /// Every port (no `dport` match in the rule).
    All,
    /// Only these ports; sorted, merged, never empty.
    Only(Vec<PortRange>),
}

impl fmt::Display for PortSel {
    /// `all`, or the list in the same syntax the command line takes (`80,443,8000-8100`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PortSel::All => f.write_str("all"),
            PortSel::Only(ranges) => {
                let parts: Vec<String> = ranges.iter().map(|r| r.render('-')).collect();
                f.write_str(&parts.join(","))
            }
        }
    }
}

/// Why a port list did not parse. Each message names the offending entry and the fix.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum PortListError {
    /// The list holds no entries at all.
    #[error("empty port list: give ports like 80,443,8000-8100 or `all`")]
    Empty,
    /// Two commas with nothing between them, or a trailing comma.
    #[error("empty entry in port list {list:?}: remove the extra comma")]
    EmptyEntry {
        /// The whole list as given.
        list: String,
    },
    /// An entry is not a decimal number or a `first-last` range.
    #[error(
        "invalid port {entry:?} in port list {list:?}: expected a number 1-65535 or a range like 8000-8100"
    )]
    NotANumber {
        /// The entry that failed.
        entry: String,
        /// The whole list as given.
        list: String,
    },
    /// A port is 0 or above 65535.
    #[error("port {entry:?} in port list {list:?} is out of range: ports are 1-65535")]
    OutOfRange {
        /// The entry that failed.
        entry: String,
        /// The whole list as given.
        list: String,
    },
    /// A range whose first port is above its last.
    #[error(
        "invalid range {entry:?} in port list {list:?}: the first port is greater than the last"
    )]
    Reversed {
        /// The range that failed.
        entry: String,
        /// The whole list as given.
        list: String,
    },
}

/// Parses `80,443,8000-8100` (spaces around entries are allowed) or `all`.
pub fn parse_port_list(list: &str) -> Result<PortSel, PortListError> {
    let trimmed = list.trim();
    if trimmed.is_empty() {
        return Err(PortListError::Empty);
    }
    if trimmed.eq_ignore_ascii_case("all") {
        return Ok(PortSel::All);
    }
    let mut ranges = Vec::new();
    for raw in trimmed.split(',') {
        let entry = raw.trim();
        if entry.is_empty() {
            return Err(PortListError::EmptyEntry {
                list: list.to_string(),
            });
        }
        let range = match entry.split_once('-') {
            Some((a, b)) => {
                let first = parse_port(a.trim(), entry, list)?;
                let last = parse_port(b.trim(), entry, list)?;
                if first > last {
                    return Err(PortListError::Reversed {
                        entry: entry.to_string(),
                        list: list.to_string(),
                    });
                }
                PortRange { first, last }
            }
            None => PortRange::single(parse_port(entry, entry, list)?),
        };
        ranges.push(range);
    }
    Ok(PortSel::Only(normalize(ranges)))
}

/// Parses one port number; `entry` and `list` are only used for the error message.
fn parse_port(text: &str, entry: &str, list: &str) -> Result<u16, PortListError> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(PortListError::NotANumber {
            entry: entry.to_string(),
            list: list.to_string(),
        });
    }
    // Any run of digits longer than 5 is out of range whatever its value.
    match text.parse::<u32>() {
        Ok(n) if (1..=65535).contains(&n) => Ok(n as u16),
        _ => Err(PortListError::OutOfRange {
            entry: entry.to_string(),
            list: list.to_string(),
        }),
    }
}

/// Sorts ranges and merges those that overlap or touch (`80,81` becomes `80-81`).
pub fn normalize(mut ranges: Vec<PortRange>) -> Vec<PortRange> {
    ranges.sort();
    let mut out: Vec<PortRange> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match out.last_mut() {
            Some(prev) if u32::from(r.first) <= u32::from(prev.last) + 1 => {
                prev.last = prev.last.max(r.last);
            }
            _ => out.push(r),
        }
    }
    out
}

/// Splits a list into chunks that each fit one iptables `-m multiport --dports` match
/// (at most 15 slots, a range taking 2): the kernel's `XT_MULTI_PORTS` limit.
pub fn multiport_chunks(ranges: &[PortRange]) -> Vec<Vec<PortRange>> {
    const MAX_SLOTS: usize = 15;
    let mut chunks: Vec<Vec<PortRange>> = Vec::new();
    let mut current: Vec<PortRange> = Vec::new();
    let mut used = 0;
    for r in ranges {
        if used + r.multiport_slots() > MAX_SLOTS {
            chunks.push(std::mem::take(&mut current));
            used = 0;
        }
        used += r.multiport_slots();
        current.push(*r);
    }
    if !current.is_empty() {
        chunks.push(current);
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(first: u16, last: u16) -> PortRange {
        PortRange { first, last }
    }

    #[test]
    fn parses_singles_and_ranges() {
        assert_eq!(
            parse_port_list("80,443,8000-8100").unwrap(),
            PortSel::Only(vec![r(80, 80), r(443, 443), r(8000, 8100)])
        );
        assert_eq!(
            parse_port_list(" 53 , 1-2 ").unwrap(),
            PortSel::Only(vec![r(1, 2), r(53, 53)])
        );
        assert_eq!(parse_port_list("all").unwrap(), PortSel::All);
        assert_eq!(parse_port_list("ALL").unwrap(), PortSel::All);
        assert_eq!(
            parse_port_list("65535,1").unwrap(),
            PortSel::Only(vec![r(1, 1), r(65535, 65535)])
        );
    }

    #[test]
    fn normalizes_overlaps_and_duplicates() {
        assert_eq!(
            parse_port_list("443,80,80,8050,8000-8100,8101").unwrap(),
            PortSel::Only(vec![r(80, 80), r(443, 443), r(8000, 8101)])
        );
        assert_eq!(parse_port_list("80,81").unwrap().to_string(), "80-81");
        assert_eq!(
            parse_port_list("1-65535,22").unwrap().to_string(),
            "1-65535"
        );
    }

    #[test]
    fn rejects_bad_input_with_exact_messages() {
        let cases = [
            ("", "empty port list: give ports like 80,443,8000-8100 or `all`"),
            (
                "80,,443",
                "empty entry in port list \"80,,443\": remove the extra comma",
            ),
            (
                "80,",
                "empty entry in port list \"80,\": remove the extra comma",
            ),
            (
                "80,http",
                "invalid port \"http\" in port list \"80,http\": expected a number 1-65535 or a range like 8000-8100",
            ),
            (
                "0x50",
                "invalid port \"0x50\" in port list \"0x50\": expected a number 1-65535 or a range like 8000-8100",
            ),
            (
                "-5",
                "invalid port \"-5\" in port list \"-5\": expected a number 1-65535 or a range like 8000-8100",
            ),
            (
                "0",
                "port \"0\" in port list \"0\" is out of range: ports are 1-65535",
            ),
            (
                "70000",
                "port \"70000\" in port list \"70000\" is out of range: ports are 1-65535",
            ),
            (
                "99999999999999999999",
                "port \"99999999999999999999\" in port list \"99999999999999999999\" is out of range: ports are 1-65535",
            ),
            (
                "9000-8000",
                "invalid range \"9000-8000\" in port list \"9000-8000\": the first port is greater than the last",
            ),
            (
                "1-2-3",
                "invalid port \"1-2-3\" in port list \"1-2-3\": expected a number 1-65535 or a range like 8000-8100",
            ),
        ];
        for (input, want) in cases {
            let err = parse_port_list(input).expect_err(input);
            assert_eq!(err.to_string(), want, "input {input:?}");
        }
    }

    #[test]
    fn chunks_respect_multiport_limit() {
        let ports: Vec<PortRange> = (1..=20).map(|p| r(p * 10, p * 10)).collect();
        let chunks = multiport_chunks(&ports);
        assert_eq!(chunks.len(), 2);
        assert_eq!(chunks[0].len(), 15);
        assert_eq!(chunks[1].len(), 5);
        // Ranges take two slots: 8 ranges need 2 chunks (7 + 1).
        let ranges: Vec<PortRange> = (1..=8).map(|p| r(p * 100, p * 100 + 5)).collect();
        let chunks = multiport_chunks(&ranges);
        assert_eq!(chunks.iter().map(Vec::len).collect::<Vec<_>>(), vec![7, 1]);
        for c in &chunks {
            assert!(c.iter().map(PortRange::multiport_slots).sum::<usize>() <= 15);
        }
    }
}
