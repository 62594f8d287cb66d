//! The demo filter as an Envoy dynamic module (see [`demo`]). It links the
//! product's ABI binding and filter traits unchanged, by path, so what it
//! proves in the real Envoy is the code the session-affinity module ships.
#![deny(unsafe_code)]

#[cfg(all(target_os = "linux", panic = "abort"))]
compile_error!(
    "session-affinity-native-demo must unwind so that a panic fails open instead of aborting Envoy: \
     build it with `cargo build --profile native -p session-affinity-native-demo`"
);

#[cfg(target_os = "linux")]
#[path = "../../src/abi/mod.rs"]
mod abi;
#[cfg(target_os = "linux")]
mod demo;
#[cfg(target_os = "linux")]
#[path = "../../src/filter.rs"]
mod filter;
#[cfg(target_os = "linux")]
#[path = "../../src/timer.rs"]
mod timer;

// Public as in the product crate, so the binding is compiled as a whole.
#[cfg(target_os = "linux")]
pub use abi::{ConfigContext, ConfigHandle, ConfigScheduler, Scheduler, Stream};
#[cfg(target_os = "linux")]
pub use filter::*;

/// The filter configuration that Envoy's `filter_config` creates.
#[cfg(target_os = "linux")]
type Module = demo::DemoConfig;
