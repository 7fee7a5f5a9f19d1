//! Logging setup for the two programs, and how times appear in logs and messages.

/// How log lines are written (`--log-format`, `log_format`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, `message`, and each
    /// event's fields at the top level (`agent`, `host`, `peer`, `tunnel`, `conn`, ...).
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<LogFormat, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(format!("{s:?} is not a log format: use text or json")),
        }
    }
}

/// Logs to stderr at `default_level` (`info` for servers, `warn` for one-shot commands
/// whose result is their output) in `format`; `RUST_LOG` overrides the level.
pub fn init(default_level: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
}

/// RFC 3339 text of a Unix timestamp, in UTC.
pub fn rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix.to_string())
}

/// A list as one log field value: its items joined by commas (`a.example.com,b.example.com`),
/// or `-` when it is empty, so a line never carries Rust's `["…"]` shape.
pub fn list<T: std::fmt::Display>(items: impl IntoIterator<Item = T>) -> String {
    let mut out = String::new();
    for item in items {
        if !out.is_empty() {
            out.push(',');
        }
        out.push_str(&item.to_string());
    }
    if out.is_empty() {
        out.push('-');
    }
    out
}

/// A duration as one log field value: `30s`, `1.5s`, `250ms`.
pub fn duration(d: std::time::Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else if d < std::time::Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_list_reads_as_one_field_value() {
        assert_eq!(
            super::list(["a.example.com", "*.example.com"]),
            "a.example.com,*.example.com"
        );
        assert_eq!(super::list(Vec::<String>::new()), "-");
    }

    #[test]
    fn a_duration_reads_as_one_field_value() {
        use std::time::Duration;
        assert_eq!(super::duration(Duration::from_secs(30)), "30s");
        assert_eq!(super::duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(super::duration(Duration::from_millis(250)), "250ms");
    }
}
