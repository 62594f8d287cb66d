//! The binding to Envoy's dynamic-module C ABI (`abi.h` of Envoy 1.40, ABI
//! version v0.2.0), and the only module with `unsafe`.
//!
//! It holds the raw declarations of the callbacks this crate uses (ffi.rs),
//! the event hooks Envoy calls (`#[no_mangle]`), the safe handles the rest of
//! the crate uses instead ([`Stream`], [`ConfigContext`], [`Scheduler`]),
//! callouts as both of their owners see them (callout.rs), and the `log`
//! crate's logger that writes to Envoy's (logger.rs).
//! tests/test_native_abi.py checks every imported symbol against the `envoy`
//! binary and exercises each callback in it.
//!
//! The rules that make the handles safe:
//! - A [`Stream`] exists only while a hook runs, so the Envoy filter it points
//!   to is alive. Header and attribute views borrow the `Stream`; everything
//!   that can invalidate them takes `&mut Stream`.
//! - Envoy may call a hook while another hook of the same stream is on the
//!   stack (a callout that completes inside `http_callout`, a local reply
//!   that destroys the filter). A stream's filter is therefore borrowed only
//!   through its slot (hooks.rs), which refuses a second borrow and postpones its
//!   own destruction until the last hook frame returns. Calls that re-enter
//!   the filter chain on purpose (continue, local reply) run after the
//!   filter's code returns.
//! - Every hook catches panics and fails open: the stream continues as if
//!   the filter were absent.
//! - C enums cross the boundary as plain integers and are decoded with a
//!   fallback, so an unexpected value from Envoy can never be undefined
//!   behaviour.
#![allow(unsafe_code)]

mod callout;
mod config;
mod ffi;
mod hooks;
mod logger;
mod stream;

use std::ffi::{c_char, CStr};

pub use config::{ConfigContext, ConfigHandle, ConfigScheduler};
pub use stream::{Scheduler, Stream};

/// The ABI version this binding implements, returned from program init.
/// Envoy logs "Dynamic module ABI version v0.2.0 matched." when it is its own.
pub const ABI_VERSION: &CStr = c"v0.2.0";

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_program_init() -> *const c_char {
    logger::install();
    ABI_VERSION.as_ptr()
}
