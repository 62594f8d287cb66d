//! Sends the `log` crate's records to Envoy's `dynamic_modules` logger, so
//! the filter's lines appear in Envoy's log with Envoy's level settings
//! (`--component-log-level dynamic_modules:debug`).

use super::ffi::*;

fn level_of(level: log::Level) -> u32 {
    match level {
        log::Level::Trace => LOG_LEVEL_TRACE,
        log::Level::Debug => LOG_LEVEL_DEBUG,
        log::Level::Info => LOG_LEVEL_INFO,
        log::Level::Warn => LOG_LEVEL_WARN,
        log::Level::Error => LOG_LEVEL_ERROR,
    }
}

/// Whether Envoy's `dynamic_modules` logger would print at `level`.
fn log_enabled(level: log::Level) -> bool {
    // SAFETY: a plain value in, a bool out; callable from any thread.
    unsafe { envoy_dynamic_module_callback_log_enabled(level_of(level)) }
}

/// Writes a line to Envoy's `dynamic_modules` logger.
fn log_message(level: log::Level, message: &str) {
    // SAFETY: Envoy copies the message during the call; callable from any thread.
    unsafe { envoy_dynamic_module_callback_log(level_of(level), RawBuffer::of(message.as_bytes())) }
}

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
