//! Smoke test of `bench soak`: 20 s of the mixed hostile load through engine-splice,
//! which must PASS (nothing grows, nothing leaks, no byte lost) and leave no
//! namespace behind. Needs root and a built engine and setup
//! (`cargo build --release -p ringrelay-engine -p ringrelay-setup`, or
//! RINGRELAY_ENGINE / RINGRELAY_SETUP); prints SKIPPED otherwise.
#![forbid(unsafe_code)]

use std::time::Duration;

use ringrelay_bench::harness;
use ringrelay_bench::lab::Lab;
use ringrelay_bench::load::Family;
use ringrelay_bench::soak::{self, Mix, SoakConfig};
use ringrelay_bench::targets::{Target, Tools, DEFAULT_PORT};

#[test]
fn soak_20s_passes_and_cleans_up() {
    if !nix::unistd::geteuid().is_root() {
        println!("SKIPPED: soak smoke: needs root for network namespaces");
        return;
    }
    let tools = Tools::discover();
    if let Some(why) = tools.missing_for(Target::EngineSplice) {
        println!("SKIPPED: soak smoke: {why}");
        return;
    }
    let (engine_cores, load_cores) = harness::default_cores();
    let cfg = SoakConfig {
        target: Target::EngineSplice,
        duration: Duration::from_secs(20),
        mix: Mix::DEFAULT,
        server_cores: load_cores.clone(),
        engine_cores,
        load_cores,
        family: Family::Ipv4,
        port: DEFAULT_PORT,
    };
    let lab = Lab::up().expect("lab up");
    let prefix = lab.prefix().to_string();
    let res = soak::run(&lab, &cfg, &tools, &mut |l| println!("{l}"));
    drop(lab);
    let left: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&format!("{prefix}-")))
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
    let res = res.expect("soak ran");
    let line = res.verdict.summary_line();
    println!("{line}");
    assert!(res.verdict.pass, "{line}");
    assert!(res.samples.iter().filter(|s| s.phase == "load").count() >= 18);
    assert!(res.samples.iter().any(|s| s.phase == "drain"));
}
