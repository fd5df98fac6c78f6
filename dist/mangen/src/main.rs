//! `mangen OUT_DIR`: writes the man pages `ringrelay-engine.8` and `ringrelay-setup.8`
//! into OUT_DIR, rendered with clap_mangen from the clap definitions the binaries
//! parse their arguments with (`ringrelay_engine::config::Args`,
//! `ringrelay_setup::cli::Cli`), so a page cannot drift from `--help`.
//!
//! The pages carry the installed names (`ringrelay-engine`, `ringrelay-setup`), the
//! names the Debian package puts on PATH; inside the workspace the binaries are still
//! `engine` and `setup`. `ringrelay-setup(8)` is one page for the whole command: each
//! subcommand gets a subsection with its description and all of its options.
//! `scripts/package.sh` runs this and gzips the result.
#![forbid(unsafe_code)]

use std::io;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::CommandFactory;
use clap_mangen::roff::{bold, roman, Roff};
use clap_mangen::Man;

const VERSION: &str = env!("CARGO_PKG_VERSION");

fn main() -> Result<()> {
    let mut args = std::env::args_os().skip(1);
    let (Some(out), None) = (args.next(), args.next()) else {
        bail!("usage: mangen OUT_DIR (writes ringrelay-engine.8 and ringrelay-setup.8)");
    };
    for path in write_pages(Path::new(&out))? {
        println!("{}", path.display());
    }
    Ok(())
}

/// Writes both pages into `out` (created if missing); returns their paths.
fn write_pages(out: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut written = Vec::new();
    for (name, page) in [
        ("ringrelay-engine.8", engine_page()?),
        ("ringrelay-setup.8", setup_page()?),
    ] {
        let path = out.join(name);
        std::fs::write(&path, page).with_context(|| format!("writing {}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

/// A page's `Man` with the settings both pages share: section 8 (system
/// administration), the title in capitals, the package as source and manual, and the
/// date. The date must not be empty: clap_mangen then leaves the `.TH` argument out and
/// the source ends up in the date's place.
fn man(cmd: clap::Command) -> Man {
    let title = cmd.get_name().to_uppercase();
    Man::new(cmd)
        .title(title)
        .section("8")
        .date(page_date())
        .source(format!("ringrelay {VERSION}"))
        .manual("ringrelay")
}

/// `YYYY-MM-DD` of `$SOURCE_DATE_EPOCH` (the reproducible-builds convention; the
/// package script sets it to the commit time), else of now, in UTC.
fn page_date() -> String {
    let secs = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        });
    let (y, m, d) = civil_from_days(secs / 86_400);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Days since 1970-01-01 to a Gregorian (year, month, day); H. Hinnant's
/// `civil_from_days`, for days >= 0.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

/// Renders `roff` without the apostrophe preamble every `Roff` writes: a page gets
/// it once, at the top.
fn text(roff: &Roff) -> String {
    let preamble = Roff::new().render();
    let all = roff.render();
    all.strip_prefix(&preamble).unwrap_or(&all).to_owned()
}

/// What one of `Man`'s renderers writes, without the preamble.
fn clap_section(render: impl FnOnce(&mut dyn io::Write) -> io::Result<()>) -> Result<String> {
    let mut buf = Vec::new();
    render(&mut buf)?;
    let all = String::from_utf8(buf).context("clap_mangen wrote non-UTF-8")?;
    let preamble = Roff::new().render();
    Ok(all.strip_prefix(&preamble).unwrap_or(&all).to_owned())
}

/// The same without the section's own `.SH` line, to go under a heading of ours.
fn clap_body(render: impl FnOnce(&mut dyn io::Write) -> io::Result<()>) -> Result<String> {
    let section = clap_section(render)?;
    match section.split_once('\n') {
        Some((first, rest)) if first.starts_with(".SH ") => Ok(rest.to_owned()),
        _ => bail!("expected a .SH heading first in {section:?}"),
    }
}

/// A heading: `.SH` (section) or `.SS` (subsection).
fn heading(level: &str, title: &str) -> String {
    let mut roff = Roff::new();
    roff.control(level, [title]);
    text(&roff)
}

/// Paragraphs of plain text; one written `TAG : TEXT` (a path, a variable) becomes a
/// tagged item with TAG in bold.
fn paragraphs(paras: &[&str]) -> String {
    let mut roff = Roff::new();
    for p in paras {
        match p.split_once(" : ") {
            Some((tag, body)) => {
                roff.control("TP", []);
                roff.text([bold(tag)]);
                roff.text([roman(body)]);
            }
            None => {
                roff.control("PP", []);
                roff.text([roman(*p)]);
            }
        }
    }
    text(&roff)
}

/// A section of our own.
fn section(title: &str, paras: &[&str]) -> String {
    heading("SH", title) + &paragraphs(paras)
}

/// A command's long help (else its short one). Text is filled; runs of indented lines
/// (the tables in `setup --help`) keep their layout, where clap_mangen's description
/// section would fill them into one another.
fn description(cmd: &clap::Command) -> String {
    let help = cmd
        .get_long_about()
        .or_else(|| cmd.get_about())
        .map(|s| s.to_string())
        .unwrap_or_default();
    let mut roff = Roff::new();
    roff.control("PP", []);
    let mut verbatim = false;
    for line in help.lines() {
        let blank = line.trim().is_empty();
        let indented = !blank && line.starts_with(' ');
        if verbatim && !indented {
            roff.control("fi", []);
            verbatim = false;
        }
        if blank {
            roff.control("PP", []);
            continue;
        }
        if indented && !verbatim {
            roff.control("nf", []);
            verbatim = true;
        }
        roff.text([roman(line)]);
    }
    if verbatim {
        roff.control("fi", []);
    }
    text(&roff)
}

const FILES_COMMON: &str = "/etc/default/ringrelay : Read by both systemd units \
    (EnvironmentFile=): ENGINE_ARGS are appended to the engine's command line, \
    SETUP_ARGS to setup apply's. A conffile: upgrades keep local changes.";

/// SEE ALSO of one page, naming the other.
fn see_also(other: &str) -> String {
    section(
        "SEE ALSO",
        &[&format!(
            "{other}(8), systemctl(1), nft(8), ip-rule(8); \
             /usr/share/doc/ringrelay/deployment.md (installing on an appliance, \
             verifying, rolling back) and /usr/share/doc/ringrelay/architecture.md."
        )],
    )
}

/// `engine --help` has a one-line description (`long_about = None`); the page adds
/// what the engine is for and how it pairs with setup.
const ENGINE_DESCRIPTION: &str = "The data plane of ringrelay. It accepts the TCP \
    connections and UDP datagrams that the TPROXY rules of ringrelay-setup(8) hand to \
    the transparent port, on one pinned io_uring worker per core, and relays each to \
    the destination the client originally asked for. Its --port and --mark must match \
    the --port and --bypass-mark of ringrelay-setup apply (both default to the same \
    values).";

fn engine_page() -> Result<String> {
    let cmd = ringrelay_engine::config::Args::command()
        .name("ringrelay-engine")
        .bin_name("ringrelay-engine");
    let man = man(cmd.clone());
    let mut page = Roff::new().render();
    page += &clap_section(|w| man.render_title(w))?;
    page += &clap_section(|w| man.render_name_section(w))?;
    page += &clap_section(|w| man.render_synopsis_section(w))?;
    page += &heading("SH", "DESCRIPTION");
    page += &description(&cmd);
    page += &paragraphs(&[ENGINE_DESCRIPTION]);
    page += &clap_section(|w| man.render_options_section(w))?;
    // The after-help text of `engine --help` is about signals.
    page += &heading("SH", "SIGNALS");
    page += &clap_body(|w| man.render_extra_section(w))?;
    page += &section(
        "FILES",
        &[
            FILES_COMMON,
            "/lib/systemd/system/ringrelay-engine.service : Runs the engine (Type=notify, \
             watchdog, --takeover /run/ringrelay/takeover.sock for restarts in place). \
             Installed, not enabled: see ringrelay-setup(8) for enabling both units.",
        ],
    );
    page += &see_also("ringrelay-setup");
    Ok(page)
}

fn setup_page() -> Result<String> {
    let mut cmd = ringrelay_setup::cli::Cli::command()
        .name("ringrelay-setup")
        .bin_name("ringrelay-setup")
        .disable_help_subcommand(true);
    // Gives every subcommand its bin name ("ringrelay-setup apply") for its synopsis.
    cmd.build();
    let man = man(cmd.clone());
    let mut page = Roff::new().render();
    page += &clap_section(|w| man.render_title(w))?;
    page += &clap_section(|w| man.render_name_section(w))?;
    page += &clap_section(|w| man.render_synopsis_section(w))?;
    page += &heading("SH", "DESCRIPTION");
    page += &description(&cmd);
    page += &clap_section(|w| man.render_options_section(w))?;
    page += &heading("SH", "COMMANDS");
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let sub_man = Man::new(sub.clone());
        page += &heading("SS", sub.get_bin_name().unwrap_or_else(|| sub.get_name()));
        page += &clap_body(|w| sub_man.render_synopsis_section(w))?;
        page += &description(sub);
        if sub.get_arguments().any(|a| !a.is_hide_set()) {
            page += &clap_body(|w| sub_man.render_options_section(w))?;
        }
    }
    page += &section(
        "ENVIRONMENT",
        &["RINGRELAY_STATE_DIR : Directory of the state file (default /run/ringrelay)."],
    );
    page += &section(
        "FILES",
        &[
            FILES_COMMON,
            "/run/ringrelay/setup-netns-INODE.state : What apply changed, per network \
             namespace; teardown undoes exactly that. INODE.state.journal exists while an \
             apply runs or after one was killed.",
            "/lib/systemd/system/ringrelay-setup.service : A oneshot that runs setup apply \
             on start and setup teardown on stop. Installed, not enabled or started: \
             interception starting on package installation could cut a router off. \
             Preview with ringrelay-setup apply --dry-run (plus your SETUP_ARGS), put the \
             options in /etc/default/ringrelay, then run systemctl enable --now \
             ringrelay-setup ringrelay-engine.",
        ],
    );
    page += &see_also("ringrelay-engine");
    if cmd.get_version().is_some() {
        page += &clap_section(|w| man.render_version_section(w))?;
    }
    Ok(page)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every option of every command appears on its page.
    fn assert_covers(page: &str, cmd: &clap::Command) {
        for arg in cmd.get_arguments().filter(|a| !a.is_hide_set()) {
            if let Some(long) = arg.get_long() {
                // roff escapes '-' as '\-'.
                let want = format!("\\-\\-{}", long.replace('-', "\\-"));
                assert!(page.contains(&want), "{} lacks {want}", cmd.get_name());
            }
        }
        for sub in cmd.get_subcommands() {
            assert_covers(page, sub);
        }
    }

    /// `.TH TITLE 8 DATE "ringrelay VERSION" ringrelay`: all five arguments in place.
    fn assert_title(page: &str, title: &str) {
        let th = page.lines().find(|l| l.starts_with(".TH ")).expect(".TH");
        let want_end = format!(" \"ringrelay {VERSION}\" ringrelay");
        let date = th
            .strip_prefix(&format!(".TH {title} 8 "))
            .and_then(|rest| rest.strip_suffix(&want_end))
            .unwrap_or_else(|| panic!("unexpected title line {th:?}"));
        assert_eq!(date.len(), 10, "date {date:?}");
    }

    #[test]
    fn engine_page_has_every_option_and_the_installed_name() {
        let page = engine_page().unwrap();
        assert_title(&page, "RINGRELAY-ENGINE");
        assert!(page.contains("ringrelay\\-engine"));
        assert!(page.contains(".SH SIGNALS") && page.contains("SIGUSR1"));
        assert!(!page.contains(".SH EXTRA"));
        assert_covers(&page, &ringrelay_engine::config::Args::command());
    }

    #[test]
    fn setup_page_has_every_subcommand_and_option() {
        let page = setup_page().unwrap();
        assert_title(&page, "RINGRELAY-SETUP");
        for sub in ["apply", "status", "teardown"] {
            assert!(
                page.contains(&format!(".SS \"ringrelay-setup {sub}\"")),
                "no subsection for {sub}:\n{page}"
            );
        }
        assert!(!page.contains("ringrelay\\-setup\\-apply(8)"));
        assert!(page.contains("Exit codes"));
        assert_covers(&page, &ringrelay_setup::cli::Cli::command());
    }

    #[test]
    fn dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_000), (2024, 10, 4));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
    }

    #[test]
    fn writes_both_pages() {
        let dir = std::env::temp_dir().join(format!("ringrelay-mangen-{}", std::process::id()));
        let written = write_pages(&dir).unwrap();
        let names: Vec<_> = written.iter().map(|p| p.file_name().unwrap()).collect();
        assert_eq!(names, ["ringrelay-engine.8", "ringrelay-setup.8"]);
        assert!(written.iter().all(|p| p.is_file()));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
