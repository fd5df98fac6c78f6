//! Property tests of the journal parser: a journal is by definition the leftover of
//! an apply that was killed mid-write (so it can end anywhere, even mid-line), and the
//! next apply or teardown must recover from it or say clearly why it cannot.
//!
//! Properties: random text and mutations of valid journals never panic and either
//! parse or give a `BadJournal` error naming the file; a valid journal (as
//! `Journal::begin` and `record` write it, cut after any step) round-trips.
//!
//! Long run (this module and the state file's):
//!   PROPTEST_CASES=100000 cargo test -p ringrelay-setup --release --lib fuzz
//!
//! The seed corpus is setup/tests/corpus/journal/: every `ok-*.journal` must parse,
//! every `bad-*.journal` must fail with exactly the reason in the `bad-*.err` next to it.

use super::*;
use crate::state::fuzz::{any_state, config, corpus, edits, golden_err, mutate};
use proptest::prelude::*;

/// The invariants on any text: no panic; an error is a `BadJournal` for this file
/// with a reason; a parsed previous state renders back to itself.
fn check(text: &str) -> Result<(), TestCaseError> {
    let path = PathBuf::from("/run/ringrelay/x.state.journal");
    match parse(text, path.clone()) {
        Ok(j) => {
            prop_assert_eq!(&j.path, &path);
            if let Some(prev) = &j.prev {
                let again = State::parse(&prev.render());
                prop_assert_eq!(again.as_ref(), Ok(prev));
            }
            let _ = j.begun();
        }
        Err(SetupError::BadJournal { path: p, reason }) => {
            prop_assert_eq!(p, path);
            prop_assert!(!reason.is_empty());
        }
        Err(e) => prop_assert!(false, "not a BadJournal error: {e}"),
    }
    Ok(())
}

#[test]
fn corpus_files_parse_or_fail_with_their_golden_errors() {
    let seeds = corpus("journal");
    assert!(seeds.iter().filter(|(n, _)| n.starts_with("ok-")).count() >= 2);
    for (name, text) in seeds {
        let got = parse(&text, PathBuf::from(&name));
        if name.starts_with("ok-") {
            let j = got.unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(!j.id.is_empty() && !j.netns.is_empty(), "{name}");
        } else {
            assert!(name.starts_with("bad-"), "{name}: neither ok- nor bad-");
            match got {
                Err(SetupError::BadJournal { reason, .. }) => {
                    assert_eq!(reason, golden_err("journal", &name), "{name}")
                }
                other => panic!("{name}: {other:?}"),
            }
        }
        check(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    let seeds = corpus("journal");
    let (_, text) = seeds
        .iter()
        .find(|(n, _)| n == "ok-interrupted.journal")
        .unwrap();
    let j = parse(text, PathBuf::new()).unwrap();
    assert_eq!(j.begun(), 3);
    assert!(j.prev.is_some());
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn valid_journals_round_trip(
        id in "[^\r\n]{0,24}",
        netns in "[^\r\n]{0,24}",
        prev in prop::option::of(any_state()),
        steps in prop::collection::vec("[^\r\n]{0,30}", 0..6),
        written in any::<prop::sample::Index>(),
    ) {
        // Killed after any step: the file is whole up to the last step written.
        let steps = &steps[..written.index(steps.len() + 1)];
        let mut text = head(&id, &netns, prev.as_ref());
        for s in steps {
            text.push_str(&step_line(s));
        }
        let path = PathBuf::from("x.state.journal");
        let got = parse(&text, path.clone());
        prop_assert_eq!(
            got.ok(),
            Some(Interrupted { path, id, netns, prev, steps: steps.to_vec() })
        );
        check(&text)?;
    }

    #[test]
    fn random_text_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        let text = String::from_utf8_lossy(&bytes);
        check(&text)?;
        check(&format!("journal 1\nid x\nnetns y\n{text}"))?;
    }

    /// Random edits of valid journals and of the corpus seeds, including a cut in the
    /// middle of a line (a kill mid-write).
    #[test]
    fn mutated_journals_never_panic(
        prev in prop::option::of(any_state()),
        steps in prop::collection::vec("[ -~]{0,30}", 0..6),
        seed in any::<prop::sample::Index>(),
        edits in edits(),
    ) {
        let mut text = head("id1", "ns1", prev.as_ref());
        for s in &steps {
            text.push_str(&step_line(s));
        }
        check(&mutate(&text, &edits))?;
        let seeds = corpus("journal");
        check(&mutate(&seeds[seed.index(seeds.len())].1, &edits))?;
    }
}
