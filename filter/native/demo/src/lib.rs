//! The demo filter as an Envoy dynamic module (see [`demo`]). It links the
//! product's ABI binding and filter traits unchanged, by path, so what it
//! proves in the real Envoy is the code the session-affinity module ships.
//! Linux only, like the product.
#![cfg(target_os = "linux")]
#![deny(unsafe_code)]

#[cfg(panic = "abort")]
compile_error!(
    "session-affinity-native-demo must unwind so that a panic fails open instead of aborting Envoy: \
     build it with `cargo build --profile native -p session-affinity-native-demo`"
);

#[path = "../../src/abi/mod.rs"]
mod abi;
mod demo;
#[path = "../../src/filter.rs"]
mod filter;
#[path = "../../src/timer.rs"]
mod timer;

// Public as in the product crate, so the binding is compiled as a whole.
pub use abi::{ConfigContext, ConfigHandle, ConfigScheduler, Scheduler, Stream};
pub use filter::*;

/// The filter configuration that Envoy's `filter_config` creates.
type Module = demo::DemoConfig;
