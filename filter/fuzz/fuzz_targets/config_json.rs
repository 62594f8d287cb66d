//! `Config::parse` on arbitrary bytes (seeded with valid configs; use the
//! dictionary dict/config.dict for mutated JSON).
//!
//! Also `config::json_path_at`, the scanner that names the field of a JSON
//! error, at positions in and past the text.
//!
//! Properties: no panic; a valid config keeps every guarantee the filter relies
//! on, an error names a field, and no secret or password (inline or from the
//! environment) appears in an error or in Debug (see `sa_fuzz::config_checks`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use sa_fuzz::config_checks;
use session_affinity::config::{self, Config};

fuzz_target!(|data: &[u8]| {
    config_checks::check(data, &Config::parse(data, &|_| None));
    config_checks::check(data, &Config::parse(data, &config_checks::env));
    config_checks::check_secrets(data);
    // The error-path scanner, at positions in and past the text.
    let at = |i: usize| usize::from(data.get(i).copied().unwrap_or(0));
    for (line, column) in [(1, data.len()), (at(0), at(1) * at(2)), (0, 0), (usize::MAX, usize::MAX), (2, usize::MAX - 1)] {
        let _ = config::json_path_at(data, line, column);
    }
});
