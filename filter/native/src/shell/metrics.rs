//! The core's counters and store-latency histogram as Envoy metrics, with the
//! names the wasm build uses (`Counter::ALL`, `STORE_LATENCY`).
//!
//! The core counts into its per-worker [`Metrics`]; after each hook the shell
//! adds what is pending to Envoy's counters. Each addition is one call that
//! finds the counter by index and adds to it atomically (about a hundred
//! instructions, filter/native/README.md), so there is nothing to gain from
//! batching them on a timer, which the ABI does not offer a worker anyway.

use session_affinity::flow::Worker;
use session_affinity::metrics::{Counter, STORE_LATENCY};

use crate::abi::{ConfigContext, ConfigHandle, Stream};
use crate::filter;

/// Envoy's ids of the module's metrics.
pub struct MetricIds {
    /// In `Counter::ALL` order.
    counters: Vec<filter::Counter>,
    latency: filter::Histogram,
}

impl MetricIds {
    pub fn define(context: &mut ConfigContext<'_>) -> Result<MetricIds, String> {
        let counters = Counter::ALL
            .iter()
            .map(|c| {
                context.define_counter(c.name()).map_err(|e| format!("metric {}: Envoy refused it ({e:?})", c.name()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let latency = context
            .define_histogram(STORE_LATENCY)
            .map_err(|e| format!("metric {STORE_LATENCY}: Envoy refused it ({e:?})"))?;
        Ok(MetricIds { counters, latency })
    }

    /// Hands the worker's pending counts and latency samples to Envoy.
    pub fn flush(&self, worker: &Worker, sink: &impl Sink) {
        worker.metrics.flush(
            |counter, delta| {
                if let Some(id) = self.counters.get(counter as usize) {
                    sink.increment(*id, delta);
                }
            },
            |millis| sink.record(self.latency, millis),
        );
    }
}

/// Where metrics go: a stream on a worker, or the configuration on the main thread.
pub trait Sink {
    fn increment(&self, counter: filter::Counter, by: u64);
    fn record(&self, histogram: filter::Histogram, value: u64);
}

impl Sink for Stream<'_> {
    fn increment(&self, counter: filter::Counter, by: u64) {
        Stream::increment(self, counter, by);
    }
    fn record(&self, histogram: filter::Histogram, value: u64) {
        Stream::record(self, histogram, value);
    }
}

impl Sink for ConfigHandle<'_> {
    fn increment(&self, counter: filter::Counter, by: u64) {
        ConfigHandle::increment(self, counter, by);
    }
    fn record(&self, histogram: filter::Histogram, value: u64) {
        ConfigHandle::record(self, histogram, value);
    }
}
