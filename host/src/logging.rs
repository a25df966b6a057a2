//! The log filter of nexus-host.

use tracing_subscriber::EnvFilter;

/// Libraries that log request contents at debug or trace level: SQL
/// parameters (message bodies among them) and WebSocket or Socket.IO
/// frames.
const CONTENT_LOGGING_TARGETS: [&str; 5] = [
    "tokio_postgres",
    "tungstenite",
    "tokio_tungstenite",
    "socketioxide",
    "engineioxide",
];

/// Builds the log filter from `spec`, the value of `RUST_LOG` (default
/// `info`). The libraries that log request contents stay at `info` unless
/// `spec` names them, so a general `debug` level writes no message bodies.
pub fn log_filter(spec: Option<&str>) -> EnvFilter {
    let spec = spec
        .filter(|spec| !spec.trim().is_empty())
        .unwrap_or("info");
    let mut filter = EnvFilter::try_new(spec).unwrap_or_else(|error| {
        eprintln!("RUST_LOG {spec:?} is invalid ({error}); logging at info");
        EnvFilter::new("info")
    });
    for target in CONTENT_LOGGING_TARGETS {
        let named = spec
            .split(',')
            .any(|directive| directive.trim().starts_with(target));
        if !named {
            if let Ok(directive) = format!("{target}=info").parse() {
                filter = filter.add_directive(directive);
            }
        }
    }
    filter
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_level_keeps_content_loggers_at_info() {
        let filter = log_filter(Some("debug")).to_string();
        for target in CONTENT_LOGGING_TARGETS {
            assert!(
                filter.contains(&format!("{target}=info")),
                "{target} not capped in {filter}"
            );
        }
    }

    #[test]
    fn named_content_logger_keeps_its_level() {
        let filter = log_filter(Some("info,tokio_postgres=debug")).to_string();
        assert!(filter.contains("tokio_postgres=debug"), "{filter}");
        assert!(!filter.contains("tokio_postgres=info"), "{filter}");
    }

    #[test]
    fn missing_or_invalid_spec_logs_at_info() {
        for spec in [None, Some(""), Some("nexus=[")] {
            let filter = log_filter(spec).to_string();
            assert!(filter.contains("info"), "{spec:?}: {filter}");
        }
    }
}
