//! Shared by the integration tests of this crate.

use ringrelay_bench::lab::{self, Lab};

/// A lab for test `name`, or `None` (SKIPPED printed) where namespaces need a root
/// this process is not.
pub fn lab_or_skip(name: &str) -> Option<Lab> {
    match Lab::up() {
        Ok(lab) => Some(lab),
        Err(e) if lab::is_need_root(&e) => {
            println!("SKIPPED: {name}: needs root for network namespaces ({e:#})");
            None
        }
        Err(e) => panic!("{name}: lab up failed: {e:#}"),
    }
}
