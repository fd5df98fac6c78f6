//! Property tests of the state file parser ([`State::parse`]): the file sits in a
//! world-readable tmpfs directory, outlives the process that wrote it and is read
//! back by `status` and `teardown`, which must say what is wrong with a corrupt one
//! rather than panic (or tear down the wrong thing).
//!
//! Properties: random text and mutations of valid files never panic, and either
//! parse or give an error that names the line (or the missing / unsupported version);
//! whatever parses renders back to itself and yields a plan; a valid state round-trips
//! (render, parse, equal).
//!
//! The default case count keeps the unit suite fast; a long run sets
//! PROPTEST_CASES, e.g.
//!   PROPTEST_CASES=100000 cargo test -p ringrelay-setup --release --lib fuzz
//! (this module and journal's; failures are shrunk and saved under
//! setup/proptest-regressions/).
//!
//! The seed corpus is setup/tests/corpus/state/: every `ok-*.state` must parse and
//! round-trip, every `bad-*.state` must fail with exactly the `bad-*.err` next to it.

use super::*;
use crate::config::Mark;
use proptest::prelude::*;

/// Cases per property unless PROPTEST_CASES says otherwise.
pub(crate) fn config() -> ProptestConfig {
    let mut c = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        c.cases = 128;
    }
    c
}

/// Random edits of a seed: flips, inserts, deletes, truncation, duplication (the
/// engine's mutator, engine/src/policy/sniff/tests.rs), plus line-level edits (drop,
/// duplicate or move a line), which keep the rest of the file well-formed.
pub(crate) fn mutate(text: &str, edits: &[(u8, usize, u8)]) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let mut bytes_edits = Vec::new();
    for &(op, at, byte) in edits {
        let n = lines.len();
        match op % 9 {
            6 if n > 0 => {
                lines.remove(at % n);
            }
            7 if n > 0 => {
                let l = lines[at % n].clone();
                lines.insert(usize::from(byte) % (n + 1), l);
            }
            8 if n > 1 => lines.swap(at % n, usize::from(byte) % n),
            _ => bytes_edits.push((op, at, byte)),
        }
    }
    let mut b = lines.join("\n").into_bytes();
    b.push(b'\n');
    for &(op, at, byte) in &bytes_edits {
        let at = if b.is_empty() { 0 } else { at % b.len() };
        match op % 6 {
            0 if !b.is_empty() => b[at] = byte,
            1 if !b.is_empty() => b[at] ^= 1 << (byte % 8),
            2 => b.insert(at, byte),
            3 if !b.is_empty() => {
                b.remove(at);
            }
            4 => b.truncate(at),
            _ => {
                let end = (at + usize::from(byte)).min(b.len());
                let copy = b[at..end].to_vec();
                b.splice(at..at, copy);
            }
        }
    }
    String::from_utf8_lossy(&b).into_owned()
}

pub(crate) fn edits() -> impl Strategy<Value = Vec<(u8, usize, u8)>> {
    prop::collection::vec(any::<(u8, usize, u8)>(), 0..6)
}

/// The invariants on any text: no panic; an error is one of the documented forms;
/// a parsed state renders back to itself and yields a plan.
pub(crate) fn check(text: &str) -> Result<(), TestCaseError> {
    match State::parse(text) {
        Ok(st) => {
            let again = State::parse(&st.render());
            prop_assert_eq!(again.as_ref(), Ok(&st), "render of a parsed state");
            let _ = st.plan();
        }
        Err(e) => prop_assert!(
            e.starts_with("line ")
                || e == "no version line"
                || e.starts_with("unsupported version"),
            "unclear error {e:?}"
        ),
    }
    Ok(())
}

fn corpus_dir(kind: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/corpus")).join(kind)
}

/// Every `(file name, text)` of one corpus folder (`state` or `journal`), `.err` files
/// left out.
pub(crate) fn corpus(kind: &str) -> Vec<(String, String)> {
    let mut out: Vec<_> = std::fs::read_dir(corpus_dir(kind))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| !n.ends_with(".err"))
        .map(|n| {
            let text = std::fs::read_to_string(corpus_dir(kind).join(&n)).unwrap();
            (n, text)
        })
        .collect();
    out.sort();
    out
}

/// The golden error of a `bad-*` seed.
pub(crate) fn golden_err(kind: &str, name: &str) -> String {
    let (stem, _) = name.rsplit_once('.').unwrap();
    let path = corpus_dir(kind).join(format!("{stem}.err"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    text.trim_end_matches('\n').to_string()
}

#[test]
fn corpus_files_parse_or_fail_with_their_golden_errors() {
    let seeds = corpus("state");
    assert!(seeds.iter().filter(|(n, _)| n.starts_with("ok-")).count() >= 3);
    for (name, text) in seeds {
        if name.starts_with("ok-") {
            let st = State::parse(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(State::parse(&st.render()).as_ref(), Ok(&st), "{name}");
        } else {
            assert!(name.starts_with("bad-"), "{name}: neither ok- nor bad-");
            let e = State::parse(&text).expect_err(&name);
            assert_eq!(e, golden_err("state", &name), "{name}");
        }
        check(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    // The full seed is what `render` writes, byte for byte.
    let seeds = corpus("state");
    let (_, full) = seeds.iter().find(|(n, _)| n == "ok-full.state").unwrap();
    assert_eq!(State::parse(full).unwrap().render(), *full);
}

#[test]
fn non_utf8_file_is_a_clear_error() {
    let dir = std::env::temp_dir().join(format!("rrsetup-fuzz-{}", std::process::id()));
    let path = dir.join("x.state");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(&path, b"version 1\nnetns \xff\xfe\n").unwrap();
    let e = State::load(&path).unwrap_err();
    assert!(
        matches!(&e, SetupError::BadState { path: p, .. } if *p == path),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A word as the state file holds one: no whitespace, no comma (lists), not `-`
/// (the empty list).
fn word() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_.:/@+=-]{1,16}".prop_filter("the empty-list marker", |w| w != "-")
}

/// A sysctl path below /proc/sys (no leading or trailing slash, which `SysctlKey`
/// trims).
fn sysctl_key() -> impl Strategy<Value = SysctlKey> {
    "[a-z0-9_]{1,8}(/[a-z0-9_.]{1,10}){1,4}".prop_map(|k| SysctlKey::new(&k))
}

/// Text for the free-form fields (`fw`, `ipv6-skipped`): anything but a line end.
fn free_text() -> impl Strategy<Value = String> {
    "[^\r\n]{0,40}"
}

fn family() -> impl Strategy<Value = Family> {
    prop_oneof![Just(Family::V4), Just(Family::V6)]
}

fn port_sel() -> impl Strategy<Value = Option<PortSel>> {
    let range = (1..=u16::MAX, 0..200u16).prop_map(|(a, n)| {
        let b = a.saturating_add(n);
        if n % 3 == 0 {
            a.to_string()
        } else {
            format!("{a}-{b}")
        }
    });
    prop_oneof![
        Just(None),
        Just(Some(PortSel::All)),
        prop::collection::vec(range, 1..5)
            .prop_map(|v| Some(parse_port_list(&v.join(",")).unwrap())),
    ]
}

fn any_config() -> impl Strategy<Value = Config> {
    (
        (
            prop_oneof![Just(Backend::Nft), Just(Backend::Iptables)],
            any::<u16>(),
            port_sel(),
            port_sel(),
            any::<bool>(),
            prop::collection::vec(word(), 0..3),
        ),
        (
            any::<(u32, u32, u32, u32)>(),
            prop_oneof![Just(FailMode::Open), Just(FailMode::Closed)],
            any::<bool>(),
            prop_oneof![
                Just(Source::Router),
                Just(Source::ClientIp),
                Just(Source::Client)
            ],
        ),
    )
        .prop_map(
            |(
                (backend, port, tcp, udp, ipv6, in_ifaces),
                ((value, mask, table, bypass_mark), fail_mode, accept_input, source),
            )| Config {
                backend,
                port,
                tcp,
                udp,
                ipv6,
                in_ifaces,
                fwmark: Mark { value, mask },
                table,
                bypass_mark,
                fail_mode,
                accept_input,
                source,
            },
        )
}

pub(crate) fn any_state() -> impl Strategy<Value = State> {
    let rule = (family(), any::<bool>(), any::<Option<u32>>()).prop_map(|(family, added, pref)| {
        RuleRecord {
            family,
            added,
            pref,
        }
    });
    let route = (family(), any::<bool>()).prop_map(|(family, added)| RouteRecord { family, added });
    let sysctl = (
        sysctl_key(),
        word(),
        word(),
        prop::collection::vec((sysctl_key(), word()), 0..3),
    )
        .prop_map(|(key, original, written, side)| SysctlRecord {
            key,
            original,
            written,
            side,
        });
    let mangle = (family(), any::<bool>(), any::<bool>()).prop_map(|(family, t, p)| MangleOrigin {
        family,
        table_existed: t,
        prerouting_existed: p,
    });
    let input = prop_oneof![
        family().prop_map(InputTarget::Iptables),
        (word(), word(), word()).prop_map(|(family, table, chain)| InputTarget::Nft {
            family,
            table,
            chain
        }),
    ];
    (
        (word(), any_config(), prop::collection::vec(word(), 0..3)),
        (
            prop::collection::vec(rule, 0..3),
            prop::collection::vec(route, 0..3),
            prop::collection::vec(sysctl, 0..4),
            prop::collection::vec(mangle, 0..3),
            prop::collection::vec(input, 0..3),
        ),
        (
            prop::option::of(free_text()),
            prop::option::of(word()),
            prop::collection::vec(free_text(), 0..6),
        ),
    )
        .prop_map(
            |(
                (netns, config, rp_ifaces),
                (rules, routes, sysctls, mangle, input_rules),
                (ipv6_skipped, apply_id, fingerprint),
            )| State {
                netns,
                config,
                rp_ifaces,
                rules,
                routes,
                sysctls,
                mangle,
                input_rules,
                ipv6_skipped,
                apply_id,
                fingerprint,
            },
        )
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn valid_states_round_trip(st in any_state()) {
        let text = st.render();
        prop_assert_eq!(State::parse(&text), Ok(st.clone()));
        let _ = st.plan();
        check(&text)?;
    }

    #[test]
    fn random_text_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        check(&String::from_utf8_lossy(&bytes))?;
        // Behind a valid version line, so that the keys get looked at.
        check(&format!("version 1\n{}", String::from_utf8_lossy(&bytes)))?;
    }

    #[test]
    fn random_lines_never_panic(
        lines in prop::collection::vec(
            (
                prop::sample::select(&[
                    "version", "netns", "apply-id", "backend", "port", "tcp", "udp", "ipv6",
                    "in-ifaces", "fwmark", "table", "bypass-mark", "fail-mode", "accept-input",
                    "source", "rp-ifaces", "rule", "route", "sysctl", "side", "mangle",
                    "input-rule", "ipv6-skipped", "fw", "#", "",
                ][..]),
                "[ -~]{0,30}",
            ),
            0..12,
        ),
    ) {
        let text: String = lines.iter().map(|(k, v)| format!("{k} {v}\n")).collect();
        check(&text)?;
        check(&format!("version 1\n{text}"))?;
    }

    #[test]
    fn mutated_files_never_panic(
        st in any_state(),
        seed in any::<prop::sample::Index>(),
        edits in edits(),
    ) {
        check(&mutate(&st.render(), &edits))?;
        let seeds = corpus("state");
        check(&mutate(&seeds[seed.index(seeds.len())].1, &edits))?;
    }
}
