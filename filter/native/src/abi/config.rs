//! Filter configurations: created and destroyed on Envoy's main thread.

use std::marker::PhantomData;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr;

use super::ffi::*;
use crate::filter::{Counter, FilterConfig, Histogram, MetricError};
use crate::Module;

/// Envoy's side of a filter configuration while it is created, on the main
/// thread: metrics can be defined only now (Envoy freezes metric creation
/// once `on_http_filter_config_new` returns).
pub struct ConfigContext<'a> {
    envoy: EnvoyConfigPtr,
    _during_config_new: PhantomData<&'a mut ()>,
}

type DefineMetric = unsafe extern "C" fn(EnvoyConfigPtr, RawBuffer, *mut RawBuffer, usize, *mut usize) -> u32;

impl ConfigContext<'_> {
    pub fn define_counter(&mut self, name: &str) -> Result<Counter, MetricError> {
        self.define(envoy_dynamic_module_callback_http_filter_config_define_counter, name).map(Counter)
    }

    pub fn define_histogram(&mut self, name: &str) -> Result<Histogram, MetricError> {
        self.define(envoy_dynamic_module_callback_http_filter_config_define_histogram, name).map(Histogram)
    }

    /// The number of Envoy worker threads (`--concurrency`), for sizing
    /// per-worker state (see [`Stream::worker_index`]). Envoy answers only on
    /// its main thread, where configurations are created.
    pub fn concurrency(&self) -> u32 {
        // SAFETY: no arguments; ConfigContext exists only in on_http_filter_config_new,
        // which Envoy calls on the main thread (off it, Envoy logs a bug and returns 0).
        unsafe { envoy_dynamic_module_callback_get_concurrency() }
    }

    fn define(&mut self, define: DefineMetric, name: &str) -> Result<usize, MetricError> {
        let mut id = 0;
        // SAFETY: `self.envoy` is the configuration being created (a ConfigContext
        // lives only inside on_http_filter_config_new); no labels; Envoy copies the name.
        let result = unsafe { define(self.envoy, RawBuffer::of(name.as_bytes()), ptr::null_mut(), 0, &mut id) };
        match result {
            METRICS_SUCCESS => Ok(id),
            1 => Err(MetricError::NotFound),
            2 => Err(MetricError::InvalidLabels),
            3 => Err(MetricError::Frozen),
            other => Err(MetricError::Other(other)),
        }
    }
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_new(
    envoy: EnvoyConfigPtr,
    name: RawBuffer,
    config: RawBuffer,
) -> ModulePtr {
    // SAFETY: Envoy passes views of the filter name and config bytes that live for this call.
    let (name, config) = unsafe { (bytes(name), bytes(config)) };
    let created = catch_unwind(AssertUnwindSafe(|| {
        let name = std::str::from_utf8(name).map_err(|_| "filter_name: must be UTF-8".to_owned())?;
        let mut context = ConfigContext { envoy, _during_config_new: PhantomData };
        Module::new(name, config, &mut context)
    }));
    match created {
        Ok(Ok(module)) => Box::into_raw(Box::new(module)).cast_const().cast(),
        Ok(Err(message)) => {
            log::error!("session-affinity-native: the filter configuration is rejected: {message}");
            ptr::null()
        }
        Err(_) => {
            log::error!("session-affinity-native: creating the filter configuration panicked; it is rejected");
            ptr::null()
        }
    }
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(config: ModulePtr) {
    if config.is_null() {
        return;
    }
    // SAFETY: `config` came from Box::into_raw in on_http_filter_config_new, and Envoy
    // destroys a configuration once, after the last filter made from it.
    let _ = catch_unwind(|| drop(unsafe { Box::from_raw(config.cast::<Module>().cast_mut()) }));
}
