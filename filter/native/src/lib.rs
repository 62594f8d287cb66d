//! The session-affinity filter as an Envoy dynamic module: a native shared
//! library that Envoy 1.40 loads with `envoy.filters.http.dynamic_modules`.
//! It runs the same core as the wasm build (the `session-affinity` crate).
//!
//! Layout:
//! - [`abi`]: the only module with `unsafe` (a directory). The raw declarations of
//!   Envoy 1.40's `abi.h`, the exported event hooks, and the safe handles
//!   ([`Stream`], [`ConfigContext`], [`ConfigHandle`], [`Scheduler`],
//!   [`ConfigScheduler`]) built on them.
//! - [`filter`]: the traits a filter implements and the plain types it uses.
//! - [`shell`]: the session-affinity core behind those traits.
//! - [`timer`]: running a stream's code later, on its own worker.
//!
//! The demo filter that proves each callback in the real Envoy is its own
//! crate (`filter/native/demo`), built from these `abi`, `filter` and `timer`
//! sources.
//!
//! Every hook catches panics and lets the request through: a panic that
//! crossed into Envoy would take the whole proxy down. That needs unwinding,
//! so the module is built with the workspace's `native` profile.
#![deny(unsafe_code)]

#[cfg(all(target_os = "linux", panic = "abort"))]
compile_error!(
    "session-affinity-native must unwind so that a panic fails open instead of aborting Envoy: \
     build it with `cargo build --profile native -p session-affinity-native`"
);

#[cfg(target_os = "linux")]
mod abi;
#[cfg(target_os = "linux")]
mod filter;
#[cfg(target_os = "linux")]
mod shell;
#[cfg(target_os = "linux")]
mod timer;

#[cfg(target_os = "linux")]
pub use abi::{ConfigContext, ConfigHandle, ConfigScheduler, Scheduler, Stream};
#[cfg(target_os = "linux")]
pub use filter::*;

/// The filter configuration that Envoy's `filter_config` creates.
#[cfg(target_os = "linux")]
type Module = shell::SessionAffinity;
