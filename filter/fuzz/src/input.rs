//! How a structure-aware target reads its input.
//!
//! An input that starts with `{` and parses as the target's input type is a
//! JSON scenario: that is what `seeds/` and `regressions/` hold, so they stay
//! readable, and keep their meaning when the input types change. Anything
//! else is the raw bytes libFuzzer mutates, decoded by `arbitrary`.
//!
//! `SA_FUZZ_STRICT=1` (set by `run` while it replays seeds and regressions)
//! makes a JSON scenario that no longer parses a failure instead of noise.
//! `SA_FUZZ_SHOW=1` prints each input as a JSON scenario (to turn a crash
//! into a regression file).

use std::sync::OnceLock;

use arbitrary::{Arbitrary, Unstructured};
use serde::de::DeserializeOwned;
use serde::Serialize;

fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.is_empty() && v != "0")
}

fn strict() -> bool {
    static STRICT: OnceLock<bool> = OnceLock::new();
    *STRICT.get_or_init(|| env_flag("SA_FUZZ_STRICT"))
}

/// Whether inputs are to be printed (`SA_FUZZ_SHOW=1`).
pub fn show() -> bool {
    static SHOW: OnceLock<bool> = OnceLock::new();
    *SHOW.get_or_init(|| env_flag("SA_FUZZ_SHOW"))
}

/// The input in `data`: a JSON scenario, or arbitrary bytes.
pub fn read<T>(data: &[u8]) -> Option<T>
where
    T: for<'a> Arbitrary<'a> + DeserializeOwned + Serialize,
{
    let scenario = match data.first() {
        Some(b'{') => match serde_json::from_slice::<T>(data) {
            Ok(input) => Some(input),
            Err(e) if strict() => panic!("[scenario] not a scenario of this target ({e}): {}", String::from_utf8_lossy(data)),
            Err(_) => None,
        },
        _ => None,
    };
    let input = match scenario {
        Some(input) => input,
        None => T::arbitrary_take_rest(Unstructured::new(data)).ok()?,
    };
    if show() {
        eprintln!("scenario: {}", serde_json::to_string(&input).unwrap_or_default());
    }
    Some(input)
}

/// Whether the finding `name` is listed in SA_FUZZ_ALLOW (comma-separated), so
/// a campaign can go on past a known bug.
pub fn allowed(name: &str) -> bool {
    static ALLOW: OnceLock<Vec<String>> = OnceLock::new();
    ALLOW
        .get_or_init(|| std::env::var("SA_FUZZ_ALLOW").unwrap_or_default().split(',').map(|s| s.trim().to_string()).collect())
        .iter()
        .any(|a| !a.is_empty() && a == name)
}
