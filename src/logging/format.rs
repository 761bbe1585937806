//! How a log line is written: text for people, JSON for machines.
//!
//! `tracing-subscriber`'s own formats took 1.9 µs (text) and 3.0 µs (JSON) per access line
//! in a loop writing to a sink, most of it in `core::fmt` and in colour wrappers that write
//! nothing when colour is off; in the load bench that was the largest single cost of a
//! request after hyper's. These formats write the same lines with plain string appends, a
//! date formatted once a second, and integers by `itoa`.
//!
//! Text: `2026-12-02T00:57:35.123456Z  INFO keygate::access: request route=api status=200 …`,
//! values as their `Display` (or `Debug` when logged with `?`), a `&str` value in quotes only
//! when it needs them, as logfmt reads them. JSON: one object per line,
//! `timestamp`, `level`, the event's fields (`message` among them), then `target`. Either way
//! a control character in a value is escaped, so no value can start a line of its own.

use std::cell::RefCell;
use std::fmt::{self, Write as _};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// The line format of `serve --log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

impl<S, N> FormatEvent<S, N> for LogFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        // Appends to a `String` the compiler sees, then one write through the subscriber's
        // `dyn Write`, instead of a dynamic call for every piece of the line.
        with_line(|w| {
            self.write_line(w, event)?;
            writer.write_str(w)
        })
    }
}

/// A scratch line per thread; a fresh one if a value's formatting logs in turn.
pub(super) fn with_line<R>(f: impl FnOnce(&mut String) -> R) -> R {
    thread_local! {
        static LINE: RefCell<String> = const { RefCell::new(String::new()) };
    }
    LINE.with(|cell| match cell.try_borrow_mut() {
        Ok(mut line) => {
            line.clear();
            f(&mut line)
        }
        Err(_) => f(&mut String::new()),
    })
}

/// What an access line says: the fields of `Gateway::handle`'s event, in its order.
#[derive(Debug)]
pub struct AccessLine<'a> {
    pub route: &'a str,
    pub method: &'a str,
    pub status: u16,
    pub outcome: &'a str,
    pub key_id: &'a str,
    pub client_ip: &'a str,
    pub latency_us: u64,
}

impl LogFormat {
    fn write_line(self, w: &mut String, event: &Event<'_>) -> fmt::Result {
        let meta = event.metadata();
        let mut fields = self.begin(w, *meta.level(), meta.target())?;
        event.record(&mut fields);
        fields.result?;
        self.end(w, meta.target())
    }

    /// The line `Gateway::handle`'s INFO event on `keygate::access` makes, written without
    /// `tracing`: its dispatch and one dynamic call per field were a third of the line's cost.
    /// A test holds the two lines equal.
    pub fn write_access(self, w: &mut String, line: &AccessLine<'_>) -> fmt::Result {
        let mut fields = self.begin(w, Level::INFO, super::ACCESS_TARGET)?;
        fields.text("message", false, |w| w.write_str("request"));
        fields.str("route", line.route);
        fields.str("method", line.method);
        fields.bare("status", itoa::Buffer::new().format(line.status));
        fields.str("outcome", line.outcome);
        fields.str("key_id", line.key_id);
        fields.str("client_ip", line.client_ip);
        fields.bare("latency_us", itoa::Buffer::new().format(line.latency_us));
        fields.result?;
        self.end(w, super::ACCESS_TARGET)
    }

    /// The timestamp, level and (in text) target; then the fields' writer.
    fn begin<'w>(
        self,
        w: &'w mut String,
        level: Level,
        target: &str,
    ) -> Result<Fields<'w>, fmt::Error> {
        let json = self == LogFormat::Json;
        if json {
            w.write_str("{\"timestamp\":\"")?;
            write_timestamp(w)?;
            w.write_str("\",\"level\":\"")?;
            w.write_str(level.as_str())?;
            w.write_char('"')?;
        } else {
            write_timestamp(w)?;
            w.write_str(match level {
                Level::ERROR => " ERROR ",
                Level::WARN => "  WARN ",
                Level::INFO => "  INFO ",
                Level::DEBUG => " DEBUG ",
                Level::TRACE => " TRACE ",
            })?;
            w.write_str(target)?;
            w.write_char(':')?;
        }
        Ok(Fields {
            w,
            json,
            result: Ok(()),
        })
    }

    /// The end of a line: in JSON the target, and the object closed.
    fn end(self, w: &mut String, target: &str) -> fmt::Result {
        if self == LogFormat::Json {
            w.write_str(",\"target\":")?;
            write_quoted(w, |e| e.write_str(target))?;
            w.write_str("}\n")
        } else {
            w.write_char('\n')
        }
    }
}

/// RFC 3339 in UTC to the microsecond; the date and time to the second are formatted once
/// a second per thread.
fn write_timestamp(w: &mut String) -> fmt::Result {
    thread_local! {
        static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs();
    SECOND.with_borrow_mut(|(second, text)| {
        if *second != secs {
            *second = secs;
            text.clear();
            let at = i64::try_from(secs)
                .ok()
                .and_then(|s| jiff::Timestamp::from_second(s).ok())
                .unwrap_or(jiff::Timestamp::UNIX_EPOCH);
            let _ = write!(text, "{}", at.strftime("%Y-%m-%dT%H:%M:%S"));
        }
        w.write_str(text)
    })?;
    let mut micros = [b'.', b'0', b'0', b'0', b'0', b'0', b'0', b'Z'];
    let mut m = now.subsec_micros();
    for digit in micros[1..7].iter_mut().rev() {
        *digit = b'0' + (m % 10) as u8;
        m /= 10;
    }
    w.write_str(std::str::from_utf8(&micros).expect("ASCII"))
}

/// Writes each field: ` name=value` in text (the message without its name), `,"name":value`
/// in JSON.
struct Fields<'a> {
    w: &'a mut String,
    json: bool,
    result: fmt::Result,
}

impl Fields<'_> {
    fn name(&mut self, name: &str) -> fmt::Result {
        if self.json {
            self.w.write_char(',')?;
            write_quoted(self.w, |e| e.write_str(name))?;
            self.w.write_char(':')
        } else if name == "message" {
            self.w.write_char(' ')
        } else {
            self.w.write_char(' ')?;
            self.w.write_str(name)?;
            self.w.write_char('=')
        }
    }

    /// A value written as it is in text and as a number (or `true`/`false`) in JSON.
    fn bare(&mut self, field: &str, value: &str) {
        if self.result.is_ok() {
            self.result = self.name(field).and_then(|()| self.w.write_str(value));
        }
    }

    /// A value written as text: escaped, and quoted when `quoted` or in JSON.
    fn text(
        &mut self,
        field: &str,
        quoted: bool,
        value: impl FnOnce(&mut Escaped<'_>) -> fmt::Result,
    ) {
        if self.result.is_err() {
            return;
        }
        let quoted = quoted || self.json;
        self.result = self.name(field).and_then(|()| {
            if quoted {
                write_quoted(self.w, value)
            } else {
                value(&mut Escaped {
                    w: self.w,
                    quoted: false,
                })
            }
        });
    }
}

impl Fields<'_> {
    /// In text, quoted only when it would not read as one value otherwise (empty, or with
    /// a space, `"`, `=`, `\` or a control character), as logfmt does. Passing `&str` rather
    /// than `%value` spares the access line `core::fmt` for each of its five text fields, and a
    /// value with nothing to escape is copied whole after one scan.
    fn str(&mut self, field: &str, value: &str) {
        if value.is_empty() || value.bytes().any(|b| SPECIAL[usize::from(b)]) {
            self.text(field, true, |w| w.write_str(value));
            return;
        }
        if self.result.is_err() {
            return;
        }
        self.result = self.name(field);
        if self.json {
            self.w.push('"');
            self.w.push_str(value);
            self.w.push('"');
        } else {
            self.w.push_str(value);
        }
    }
}

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.str(field.name(), value);
    }

    /// `%value` (Display) and `?value` (Debug) fields, and the message.
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.text(field.name(), false, |w| write!(w, "{value:?}"));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.bare(field.name(), itoa::Buffer::new().format(value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.bare(field.name(), itoa::Buffer::new().format(value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.bare(field.name(), if value { "true" } else { "false" });
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        if self.json && !value.is_finite() {
            // JSON has no NaN or infinity.
            self.bare(field.name(), "null");
        } else {
            self.bare(field.name(), &value.to_string());
        }
    }
}

/// The bytes that end a plain logfmt word: space and control characters, `"`, `=`, `\` and
/// DEL. A text value without them needs neither quotes nor escapes, in text or in JSON.
const SPECIAL: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        table[b] = b <= 0x20 || b == 0x22 || b == 0x3d || b == 0x5c || b == 0x7f;
        b += 1;
    }
    table
};

/// `"…"`, with what `write` writes escaped for its place within quotes.
fn write_quoted(
    w: &mut String,
    write: impl FnOnce(&mut Escaped<'_>) -> fmt::Result,
) -> fmt::Result {
    w.write_char('"')?;
    write(&mut Escaped { w, quoted: true })?;
    w.write_char('"')
}

/// Escapes what a value must not carry: control characters (so a value cannot begin a line
/// or drive a terminal), and within quotes also `"` and `\`.
struct Escaped<'a> {
    w: &'a mut String,
    quoted: bool,
}

impl fmt::Write for Escaped<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut start = 0;
        for (i, b) in s.bytes().enumerate() {
            if b >= 0x20 && !(self.quoted && (b == b'"' || b == b'\\')) {
                continue;
            }
            // Every byte escaped is ASCII, so `i` is a character boundary.
            self.w.write_str(&s[start..i])?;
            match b {
                b'\n' => self.w.write_str("\\n")?,
                b'\r' => self.w.write_str("\\r")?,
                b'\t' => self.w.write_str("\\t")?,
                b'"' => self.w.write_str("\\\"")?,
                b'\\' => self.w.write_str("\\\\")?,
                _ => write!(self.w, "\\u{b:04x}")?,
            }
            start = i + 1;
        }
        self.w.write_str(&s[start..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logging::tests::Sink;

    /// The lines an event makes in this format.
    fn lines(format: LogFormat, emit: impl FnOnce()) -> Vec<String> {
        let sink = Sink::default();
        let writer = sink.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .event_format(format)
            .finish();
        tracing::subscriber::with_default(subscriber, emit);
        sink.text().lines().map(str::to_string).collect()
    }

    /// The access event as the gateway logs it without the direct sink.
    fn access_line() {
        crate::logging::access_event(&ACCESS);
    }

    /// What `access_line` says, for the direct writer.
    const ACCESS: AccessLine<'static> = AccessLine {
        route: "api",
        method: "GET",
        status: 200,
        outcome: "forwarded",
        key_id: "key_1",
        client_ip: "192.0.2.7",
        latency_us: 512,
    };

    /// A line without its timestamp, which differs between two lines.
    fn untimed(line: &str, format: LogFormat) -> String {
        match format {
            LogFormat::Text => line.split_once(' ').unwrap().1.to_string(),
            // The text from the level on: the order of the keys is compared too.
            LogFormat::Json => line[line.find(",\"level\"").unwrap()..].to_string(),
        }
    }

    #[test]
    fn the_direct_access_line_is_the_events_line() {
        for format in [LogFormat::Text, LogFormat::Json] {
            let event = lines(format, access_line);
            let mut direct = String::new();
            format.write_access(&mut direct, &ACCESS).unwrap();
            assert!(direct.ends_with('\n'));
            assert_eq!(
                untimed(direct.trim_end(), format),
                untimed(&event[0], format),
                "{format:?}"
            );
        }
        // Values needing quotes or escapes get them as the event's would.
        let odd = AccessLine {
            route: "my route",
            key_id: "",
            ..ACCESS
        };
        let mut direct = String::new();
        LogFormat::Text.write_access(&mut direct, &odd).unwrap();
        assert!(direct.contains(" route=\"my route\" "), "{direct}");
        assert!(direct.contains(" key_id=\"\" "), "{direct}");
    }

    const HOSTILE: &str = "bad \"thing\" \\ next\nFAKE  INFO line\r\t\u{1b}[31m";

    #[test]
    fn text_lines_are_logfmt() {
        let lines = lines(LogFormat::Text, || {
            access_line();
            tracing::warn!(
                plain = "a b",
                bare = "b",
                empty = "",
                ok = true,
                neg = -3i64,
                ratio = 0.5f64,
                "flush failed"
            );
        });
        let (at_text, rest) = lines[0].split_once(' ').unwrap();
        // Always six digits of microseconds, trailing zeros included (jiff's own Display drops
        // them, so the text is checked, not the parsed value printed again).
        assert_eq!(
            at_text.len(),
            "2026-12-02T00:57:35.123456Z".len(),
            "{at_text}"
        );
        let at: jiff::Timestamp = at_text.parse().expect("RFC 3339 timestamp");
        assert!((jiff::Timestamp::now() - at).get_seconds().abs() < 5);
        assert_eq!(
            rest,
            " INFO keygate::access: request route=api method=GET status=200 outcome=forwarded \
             key_id=key_1 client_ip=192.0.2.7 latency_us=512"
        );
        assert!(
            lines[1].ends_with(
                "  WARN keygate::logging::format::tests: flush failed plain=\"a b\" bare=b empty=\"\" ok=true neg=-3 ratio=0.5"
            ),
            "{}",
            lines[1]
        );
    }

    #[test]
    fn no_value_can_break_a_text_line() {
        let lines = lines(LogFormat::Text, || {
            tracing::warn!(cause = %HOSTILE, "upstream said");
            tracing::warn!(quoted = HOSTILE, "upstream said");
        });
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(
            lines[0].ends_with("cause=bad \"thing\" \\ next\\nFAKE  INFO line\\r\\t\\u001b[31m")
        );
        assert!(lines[1].ends_with(
            "quoted=\"bad \\\"thing\\\" \\\\ next\\nFAKE  INFO line\\r\\t\\u001b[31m\""
        ));
    }

    #[test]
    fn json_lines_are_objects_with_typed_fields() {
        let lines = lines(LogFormat::Json, || {
            access_line();
            tracing::warn!(cause = %HOSTILE, text = HOSTILE, debug = ?"x", neg = -3i64, ok = true, nan = f64::NAN, "upstream said");
        });
        assert_eq!(lines.len(), 2, "{lines:?}");
        let access: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
        assert_eq!(
            access,
            serde_json::json!({
                "timestamp": access["timestamp"],
                "level": "INFO", "message": "request", "route": "api", "method": "GET",
                "status": 200, "outcome": "forwarded", "key_id": "key_1",
                "client_ip": "192.0.2.7", "latency_us": 512, "target": "keygate::access",
            })
        );
        let at: jiff::Timestamp = access["timestamp"].as_str().unwrap().parse().unwrap();
        assert!((jiff::Timestamp::now() - at).get_seconds().abs() < 5);
        let warn: serde_json::Value = serde_json::from_str(&lines[1]).unwrap();
        assert_eq!(warn["cause"], HOSTILE, "a string comes back as it was");
        assert_eq!(warn["text"], HOSTILE, "a &str too");
        assert_eq!(warn["debug"], "\"x\"");
        assert_eq!(warn["neg"], -3);
        assert_eq!(warn["ok"], true);
        assert!(warn["nan"].is_null());
        assert_eq!(warn["level"], "WARN");
    }
}
