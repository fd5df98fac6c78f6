//! Structured log lines on standard error (the journal under systemd).
//!
//! Every line is one event with a level, a stable event name, a human message and
//! named fields: `key=value` pairs (`--log-format text`, quoted where needed) or one
//! JSON object (`--log-format json`). `--log-level` drops what is below it. The data
//! plane logs only through [`crate::core::Core::log_limited`], at most one line per
//! core per second, so a flood of bad input or failing upstreams cannot flood the
//! log (the counters have the totals).

use std::fmt::{self, Write as _};
use std::io::Write as _;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::SystemTime;

/// How important a line is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Level {
    /// Something failed that the operator must fix.
    Error = 0,
    /// Something is wrong or degraded; the engine goes on.
    Warn = 1,
    /// Startup, reloads, takeovers, stops.
    Info = 2,
    /// More detail.
    Debug = 3,
}

impl Level {
    fn name(self) -> &'static str {
        match self {
            Level::Error => "error",
            Level::Warn => "warn",
            Level::Info => "info",
            Level::Debug => "debug",
        }
    }
}

/// How lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// `ts=... level=... event=... msg="..." key=value ...`
    Text,
    /// One JSON object per line.
    Json,
}

static LEVEL: AtomicU8 = AtomicU8::new(Level::Info as u8);
static JSON: AtomicU8 = AtomicU8::new(0);

/// Sets the level and format for the whole process (once, at startup).
pub fn init(level: Level, format: Format) {
    LEVEL.store(level as u8, Ordering::Relaxed);
    JSON.store(u8::from(format == Format::Json), Ordering::Relaxed);
}

/// Whether a line at `level` would be written.
pub fn enabled(level: Level) -> bool {
    level as u8 <= LEVEL.load(Ordering::Relaxed)
}

/// Writes one event line (if its level is enabled).
pub fn emit(
    level: Level,
    event: &str,
    msg: fmt::Arguments<'_>,
    fields: &[(&str, &dyn fmt::Display)],
) {
    if !enabled(level) {
        return;
    }
    let line = format_line(
        level,
        event,
        &msg.to_string(),
        fields,
        JSON.load(Ordering::Relaxed) == 1,
        SystemTime::now(),
    );
    // One write per line, so lines of different threads do not interleave.
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// `level=info` shorthand.
pub fn info(event: &str, msg: fmt::Arguments<'_>, fields: &[(&str, &dyn fmt::Display)]) {
    emit(Level::Info, event, msg, fields);
}

/// `level=warn` shorthand.
pub fn warn(event: &str, msg: fmt::Arguments<'_>, fields: &[(&str, &dyn fmt::Display)]) {
    emit(Level::Warn, event, msg, fields);
}

/// `level=error` shorthand.
pub fn error(event: &str, msg: fmt::Arguments<'_>, fields: &[(&str, &dyn fmt::Display)]) {
    emit(Level::Error, event, msg, fields);
}

fn text_value(v: &str, out: &mut String) {
    let plain = !v.is_empty()
        && v.chars()
            .all(|c| c.is_ascii_graphic() && c != '"' && c != '=' && c != '\\');
    if plain {
        out.push_str(v);
        return;
    }
    out.push('"');
    for c in v.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// One line, newline included.
pub fn format_line(
    level: Level,
    event: &str,
    msg: &str,
    fields: &[(&str, &dyn fmt::Display)],
    json: bool,
    now: SystemTime,
) -> String {
    let ts = crate::flowlog::rfc3339(now);
    if json {
        let mut m = serde_json::Map::new();
        m.insert("ts".into(), ts.into());
        m.insert("level".into(), level.name().into());
        m.insert("event".into(), event.into());
        m.insert("msg".into(), msg.into());
        for (k, v) in fields {
            m.insert((*k).into(), v.to_string().into());
        }
        let mut s = serde_json::Value::Object(m).to_string();
        s.push('\n');
        return s;
    }
    let mut s = format!("ts={ts} level={} event=", level.name());
    text_value(event, &mut s);
    s.push_str(" msg=");
    text_value(msg, &mut s);
    for (k, v) in fields {
        s.push(' ');
        s.push_str(k);
        s.push('=');
        text_value(&v.to_string(), &mut s);
    }
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn text_lines_are_key_value_and_quote_what_needs_it() {
        let t = UNIX_EPOCH + Duration::from_secs(1);
        let path = "/etc/a b.toml";
        let line = format_line(
            Level::Warn,
            "reload_refused",
            "line 1\nline \"2\"",
            &[("path", &path), ("n", &3)],
            false,
            t,
        );
        assert_eq!(
            line,
            "ts=1970-01-01T00:00:01.000000Z level=warn event=reload_refused \
             msg=\"line 1\\nline \\\"2\\\"\" path=\"/etc/a b.toml\" n=3\n"
        );
    }

    #[test]
    fn json_lines_parse_with_every_field() {
        let line = format_line(
            Level::Info,
            "ready",
            "up",
            &[("port", &15001)],
            true,
            UNIX_EPOCH,
        );
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["level"], "info");
        assert_eq!(v["event"], "ready");
        assert_eq!(v["msg"], "up");
        assert_eq!(v["port"], "15001");
        assert!(line.ends_with('\n') && line.matches('\n').count() == 1);
    }

    #[test]
    fn levels_order_from_error_to_debug() {
        assert!(Level::Error < Level::Warn && Level::Info < Level::Debug);
    }
}
