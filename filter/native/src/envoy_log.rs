//! Sends the `log` crate's records to Envoy's `dynamic_modules` logger, so
//! the filter's lines appear in Envoy's log with Envoy's level settings
//! (`--component-log-level dynamic_modules:debug`).

use crate::abi::{log_enabled, log_message};

struct EnvoyLogger;

impl log::Log for EnvoyLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        log_enabled(metadata.level())
    }

    fn log(&self, record: &log::Record<'_>) {
        // Formats only what Envoy will print.
        if log_enabled(record.level()) {
            log_message(record.level(), &record.args().to_string());
        }
    }

    fn flush(&self) {}
}

static LOGGER: EnvoyLogger = EnvoyLogger;

/// Installs the logger; Envoy's own level decides what is printed.
pub fn install() {
    // Fails only if a logger is installed already, which is then kept.
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(log::LevelFilter::Trace);
    }
}
