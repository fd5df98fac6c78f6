//! CPU lists (`0-7`, `0,2,4-5`) as the kernel writes them in `/sys` and `cpuset`.

use std::collections::BTreeSet;

/// Why a CPU list was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CpuListError {
    /// The text is empty.
    #[error("empty CPU list")]
    Empty,
    /// An element is not a number or range.
    #[error("`{0}` is not a CPU number or range (expected forms: 3, 0-7, 0,2,4-5)")]
    Syntax(String),
    /// A range runs backwards.
    #[error("range `{0}` runs backwards")]
    Backwards(String),
    /// A CPU number beyond any plausible machine.
    #[error("CPU {0} is out of range")]
    TooLarge(usize),
    /// The CPU is not online or not in this process's affinity mask.
    #[error("CPU {cpu} is not available to this process (allowed: {allowed})")]
    NotAllowed {
        /// The CPU that was asked for.
        cpu: usize,
        /// What the process may run on, as a CPU list.
        allowed: String,
    },
}

/// Largest CPU number accepted (the kernel's `NR_CPUS` maximum is 8192).
const MAX_CPU: usize = 8191;

/// Parses a CPU list into a sorted, de-duplicated list of CPU numbers.
pub fn parse(text: &str) -> Result<Vec<usize>, CpuListError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(CpuListError::Empty);
    }
    let mut set = BTreeSet::new();
    for part in text.split(',') {
        let part = part.trim();
        let num = |s: &str| -> Result<usize, CpuListError> {
            let n: usize = s
                .trim()
                .parse()
                .map_err(|_| CpuListError::Syntax(part.to_string()))?;
            if n > MAX_CPU {
                return Err(CpuListError::TooLarge(n));
            }
            Ok(n)
        };
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (num(a)?, num(b)?);
                if a > b {
                    return Err(CpuListError::Backwards(part.to_string()));
                }
                set.extend(a..=b);
            }
            None => {
                set.insert(num(part)?);
            }
        }
    }
    Ok(set.into_iter().collect())
}

/// Formats CPU numbers back into the compact list form (`0-3,6`).
pub fn format(cpus: &[usize]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < cpus.len() {
        let start = cpus[i];
        let mut end = start;
        while i + 1 < cpus.len() && cpus[i + 1] == end + 1 {
            i += 1;
            end = cpus[i];
        }
        if !out.is_empty() {
            out.push(',');
        }
        if start == end {
            out.push_str(&start.to_string());
        } else {
            out.push_str(&format!("{start}-{end}"));
        }
        i += 1;
    }
    out
}

/// CPUs this process may run on: its affinity mask (which the kernel already limits
/// to online CPUs).
pub fn allowed() -> Vec<usize> {
    let mut ids: Vec<usize> = core_affinity::get_core_ids()
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.id)
        .collect();
    ids.sort_unstable();
    ids
}

/// Checks that every requested CPU is in `allowed`; names the first that is not.
pub fn validate(requested: &[usize], allowed: &[usize]) -> Result<(), CpuListError> {
    for &cpu in requested {
        if !allowed.contains(&cpu) {
            return Err(CpuListError::NotAllowed {
                cpu,
                allowed: format(allowed),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_single_ranges_and_mixtures() {
        assert_eq!(parse("3").unwrap(), vec![3]);
        assert_eq!(parse("0-7").unwrap(), (0..8).collect::<Vec<_>>());
        assert_eq!(parse("0,2,4-5").unwrap(), vec![0, 2, 4, 5]);
        assert_eq!(parse(" 1 , 0 ").unwrap(), vec![0, 1]);
        assert_eq!(parse("4-4").unwrap(), vec![4]);
    }

    #[test]
    fn duplicates_and_overlaps_collapse() {
        assert_eq!(parse("1,1,0-2,2").unwrap(), vec![0, 1, 2]);
    }

    #[test]
    fn bad_input_is_named() {
        assert_eq!(parse(""), Err(CpuListError::Empty));
        assert_eq!(parse("a"), Err(CpuListError::Syntax("a".into())));
        assert_eq!(parse("1,,2"), Err(CpuListError::Syntax("".into())));
        assert_eq!(parse("1-"), Err(CpuListError::Syntax("1-".into())));
        assert_eq!(parse("-1"), Err(CpuListError::Syntax("-1".into())));
        assert_eq!(parse("5-2"), Err(CpuListError::Backwards("5-2".into())));
        assert_eq!(parse("9000"), Err(CpuListError::TooLarge(9000)));
        assert_eq!(parse("0-1-2"), Err(CpuListError::Syntax("0-1-2".into())));
    }

    #[test]
    fn format_round_trips() {
        for s in ["0", "0-7", "0,2,4-5", "1,3,5", "0-1,3-4,9"] {
            assert_eq!(format(&parse(s).unwrap()), s);
        }
        assert_eq!(format(&[]), "");
    }

    #[test]
    fn validate_names_the_missing_cpu() {
        let allowed = [0, 1];
        assert!(validate(&[0, 1], &allowed).is_ok());
        let err = validate(&[0, 5], &allowed).unwrap_err();
        assert_eq!(
            err,
            CpuListError::NotAllowed {
                cpu: 5,
                allowed: "0-1".into()
            }
        );
        assert!(err.to_string().contains("CPU 5"));
    }
}
