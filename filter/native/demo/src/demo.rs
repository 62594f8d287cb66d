//! The demo filter: it uses every callback the session-affinity filter will
//! need, so tests/test_native_abi.py can prove each one in the real Envoy.
//!
//! Every request: `x-demo-route: ip:port` picks the upstream host (strict
//! unless `x-demo-strict: 0`), and the header is removed. With `"report":
//! false` in the config that is all (the pinned path the benchmark
//! measures). Otherwise the filter reports what it saw in `x-demo-*` response
//! headers, and some paths do more:
//!
//! | path | what the filter does |
//! |---|---|
//! | `/local` | answers 418 itself |
//! | `/delay/<ms>` | holds the request `<ms>` milliseconds (scheduler + timer) |
//! | `/delay-response/<ms>` | holds the response `<ms>` milliseconds |
//! | `/callout`, `/callout-slow`, `/callout-truncated` | asks the callout cluster's `/status` (or `/slow`, `/truncated`) first |
//! | `/callout-then-local` | answers 503 itself once the callout is done |
//! | `/callout-missing`, `/callout-empty` | callouts that cannot start |
//! | `/panic/headers`, `/panic/callout` | panics, to show the request still passes |
//!
//! Its `filter_config` is JSON: `{"callout_cluster": "sidecar",
//! "callout_timeout_ms": 1000, "report": true}`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::abi::{ConfigContext, Stream};
use crate::filter::{
    BodyStatus, CalloutError, CalloutFailure, CalloutId, CalloutResponse, Counter, FilterConfig, HeaderMap,
    HeadersStatus, Histogram, HttpFilter, LocalResponse, TrailersStatus,
};
use crate::timer;

const ROUTE_HEADER: &str = "x-demo-route";
/// Scheduler events: which way of the stream a delay holds back.
const REQUEST_DELAY: u64 = 0;
const RESPONSE_DELAY: u64 = 1;

/// Filters alive in this process, across workers: shows that Envoy destroys them.
static LIVE_FILTERS: AtomicU64 = AtomicU64::new(0);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DemoJson {
    callout_cluster: String,
    #[serde(default = "default_timeout_ms")]
    callout_timeout_ms: u64,
    /// False: only pick the host from `x-demo-route` (strict), nothing else.
    #[serde(default = "default_report")]
    report: bool,
}

fn default_report() -> bool {
    true
}

fn default_timeout_ms() -> u64 {
    1000
}

pub struct DemoConfig {
    settings: Arc<Settings>,
}

struct Settings {
    report: bool,
    workers: u32,
    callout_cluster: String,
    callout_timeout: Duration,
    metrics: Metrics,
}

#[derive(Clone, Copy)]
struct Metrics {
    requests: Counter,
    pinned: Counter,
    callouts: Counter,
    local_replies: Counter,
    request_body_chunks: Counter,
    response_body_chunks: Counter,
    response_trailers: Counter,
    streams_completed: Counter,
    callout_ms: Histogram,
}

impl FilterConfig for DemoConfig {
    type Filter = DemoFilter;

    fn new(name: &str, config: &[u8], context: &mut ConfigContext<'_>) -> Result<Self, String> {
        let json: DemoJson = serde_json::from_slice(config).map_err(|e| format!("filter_config: {e}"))?;
        if json.callout_cluster.is_empty() {
            return Err("filter_config.callout_cluster: name the cluster that callouts go to".into());
        }
        if json.callout_timeout_ms == 0 {
            return Err("filter_config.callout_timeout_ms: must be at least 1".into());
        }
        let mut counter = |name: &str| context.define_counter(name).map_err(|e| format!("counter {name}: {e:?}"));
        let metrics = Metrics {
            requests: counter("demo_requests")?,
            pinned: counter("demo_pinned")?,
            callouts: counter("demo_callouts")?,
            local_replies: counter("demo_local_replies")?,
            request_body_chunks: counter("demo_request_body_chunks")?,
            response_body_chunks: counter("demo_response_body_chunks")?,
            response_trailers: counter("demo_response_trailers")?,
            streams_completed: counter("demo_streams_completed")?,
            callout_ms: context.define_histogram("demo_callout_ms").map_err(|e| format!("histogram: {e:?}"))?,
        };
        log::info!(
            "session-affinity-native demo filter {name:?} configured: callouts to cluster {:?}",
            json.callout_cluster
        );
        let settings = Settings {
            report: json.report,
            workers: context.concurrency(),
            callout_cluster: json.callout_cluster,
            callout_timeout: Duration::from_millis(json.callout_timeout_ms),
            metrics,
        };
        Ok(Self { settings: Arc::new(settings) })
    }

    fn new_filter(&self) -> DemoFilter {
        LIVE_FILTERS.fetch_add(1, Ordering::Relaxed);
        DemoFilter {
            settings: Arc::clone(&self.settings),
            report: Vec::new(),
            reporting: false,
            callout: None,
            delayed_since: None,
            response_delay: None,
            reply_after_callout: false,
            panic_in_callout: false,
        }
    }
}

pub struct DemoFilter {
    settings: Arc<Settings>,
    /// Response headers that report what the filter saw.
    report: Vec<(&'static str, String)>,
    reporting: bool,
    callout: Option<(CalloutId, Instant)>,
    delayed_since: Option<Instant>,
    response_delay: Option<Duration>,
    reply_after_callout: bool,
    panic_in_callout: bool,
}

impl Drop for DemoFilter {
    fn drop(&mut self) {
        LIVE_FILTERS.fetch_sub(1, Ordering::Relaxed);
    }
}

impl HttpFilter for DemoFilter {
    fn on_request_headers(&mut self, stream: &mut Stream<'_>, _end_of_stream: bool) -> HeadersStatus {
        if !self.settings.report {
            // The pinned path alone, as the benchmark measures it.
            self.pin(stream, true);
            return HeadersStatus::Continue;
        }
        stream.increment(self.settings.metrics.requests, 1);
        let strict = stream.header(HeaderMap::RequestHeaders, "x-demo-strict") != Some(b"0");
        if let Some(accepted) = self.pin(stream, strict) {
            self.note("x-demo-override", if accepted { "set" } else { "rejected" });
        }
        self.reporting = true;
        self.report_request(stream);
        let path = stream.header(HeaderMap::RequestHeaders, ":path").map(text).unwrap_or_default();
        self.act_on_path(stream, &path)
    }
    fn on_request_body(&mut self, stream: &mut Stream<'_>, _end_of_stream: bool) -> BodyStatus {
        if !self.settings.report {
            return BodyStatus::Continue;
        }
        stream.increment(self.settings.metrics.request_body_chunks, 1);
        BodyStatus::Continue
    }

    fn on_callout_done(
        &mut self,
        stream: &mut Stream<'_>,
        callout: CalloutId,
        response: Result<CalloutResponse<'_>, CalloutFailure>,
    ) {
        let Some((expected, started)) = self.callout.take() else {
            return;
        };
        if callout != expected {
            return;
        }
        let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        stream.record(self.settings.metrics.callout_ms, elapsed_ms);
        match response {
            Ok(response) => {
                let status = response.status().map_or_else(|| "none".to_owned(), |s| s.to_string());
                self.note("x-demo-callout", &status);
                self.note("x-demo-callout-header", &response.header("x-sidecar").map(text).unwrap_or_default());
                self.note("x-demo-callout-body-bytes", &response.body().len().to_string());
            }
            Err(failure) => self.note("x-demo-callout", failure_name(failure)),
        }
        if self.panic_in_callout {
            deliberate_panic("on_callout_done");
        }
        if self.reply_after_callout {
            stream.send_response(LocalResponse {
                status: 503,
                headers: vec![("x-demo-local".into(), b"after-callout".to_vec())],
                body: b"answered after the callout\n".to_vec(),
                details: "demo_after_callout".into(),
            });
        } else {
            stream.continue_decoding();
        }
    }

    fn on_scheduled(&mut self, stream: &mut Stream<'_>, event_id: u64) {
        let Some(since) = self.delayed_since.take() else {
            return;
        };
        let elapsed_ms = since.elapsed().as_millis().to_string();
        if event_id == RESPONSE_DELAY {
            // The response is held back, so its headers can still change.
            stream.set_header(HeaderMap::ResponseHeaders, "x-demo-response-delayed-ms", elapsed_ms.as_bytes());
            stream.continue_encoding();
        } else {
            self.note("x-demo-delayed-ms", &elapsed_ms);
            stream.continue_decoding();
        }
    }

    fn on_response_headers(&mut self, stream: &mut Stream<'_>, _end_of_stream: bool) -> HeadersStatus {
        if !self.reporting {
            return HeadersStatus::Continue;
        }
        let upstream = stream.upstream_address().unwrap_or_default();
        let flags = stream.response_flags().map_or_else(String::new, |f| f.to_string());
        let code = stream.response_code().map_or_else(String::new, |c| c.to_string());
        let backend = stream.header(HeaderMap::ResponseHeaders, "x-backend-id").map(text).unwrap_or_default();
        self.note("x-demo-upstream", &upstream);
        self.note("x-demo-flags", &flags);
        self.note("x-demo-code", &code);
        self.note("x-demo-saw-backend", &backend);
        for (name, value) in &self.report {
            stream.set_header(HeaderMap::ResponseHeaders, name, value.as_bytes());
        }
        stream.add_header(HeaderMap::ResponseHeaders, "x-demo-added", b"first");
        stream.add_header(HeaderMap::ResponseHeaders, "x-demo-added", b"second");
        stream.remove_header(HeaderMap::ResponseHeaders, "x-backend-remove-me");
        match self.response_delay.take() {
            Some(delay) => self.delay(stream, delay, RESPONSE_DELAY),
            None => HeadersStatus::Continue,
        }
    }

    fn on_response_body(&mut self, stream: &mut Stream<'_>, _end_of_stream: bool) -> BodyStatus {
        if !self.settings.report {
            return BodyStatus::Continue;
        }
        stream.increment(self.settings.metrics.response_body_chunks, 1);
        BodyStatus::Continue
    }

    fn on_response_trailers(&mut self, stream: &mut Stream<'_>) -> TrailersStatus {
        stream.increment(self.settings.metrics.response_trailers, 1);
        let seen = stream.header(HeaderMap::ResponseTrailers, "x-backend-trailer").map(text).unwrap_or_default();
        stream.set_header(HeaderMap::ResponseTrailers, "x-demo-trailer", format!("saw-{seen}").as_bytes());
        stream.remove_header(HeaderMap::ResponseTrailers, "x-backend-trailer-remove");
        TrailersStatus::Continue
    }

    fn on_stream_complete(&mut self, stream: &mut Stream<'_>) {
        if !self.settings.report {
            return;
        }
        stream.increment(self.settings.metrics.streams_completed, 1);
        log::debug!(
            "demo stream complete: code {:?}, flags {:?}, upstream {:?}",
            stream.response_code(),
            stream.response_flags(),
            stream.upstream_address()
        );
    }
}

impl DemoFilter {
    /// What the demo paths do beyond reporting (see the table at the top).
    fn act_on_path(&mut self, stream: &mut Stream<'_>, path: &str) -> HeadersStatus {
        let settings = Arc::clone(&self.settings);
        let sidecar = settings.callout_cluster.as_str();
        match path {
            "/local" => {
                stream.increment(self.settings.metrics.local_replies, 1);
                stream.send_response(LocalResponse {
                    status: 418,
                    headers: vec![("x-demo-local".into(), b"1".to_vec())],
                    body: b"local reply from the native module\n".to_vec(),
                    details: "demo_local_reply".into(),
                });
                HeadersStatus::StopIteration
            }
            "/callout" => self.start_callout(stream, sidecar, "/status"),
            "/callout-slow" => self.start_callout(stream, sidecar, "/slow"),
            "/callout-truncated" => self.start_callout(stream, sidecar, "/truncated"),
            "/callout-then-local" => {
                self.reply_after_callout = true;
                self.start_callout(stream, sidecar, "/status")
            }
            "/callout-missing" => self.start_callout(stream, "no-such-cluster", "/status"),
            "/callout-empty" => self.start_callout(stream, "empty", "/status"),
            "/panic/headers" => deliberate_panic("on_request_headers"),
            "/panic/callout" => {
                self.panic_in_callout = true;
                self.start_callout(stream, sidecar, "/status")
            }
            _ => {
                if let Some(Ok(ms)) = path.strip_prefix("/delay-response/").map(str::parse::<u64>) {
                    self.response_delay = Some(Duration::from_millis(ms));
                }
                match path.strip_prefix("/delay/").map(str::parse::<u64>) {
                    Some(Ok(ms)) => self.delay(stream, Duration::from_millis(ms), REQUEST_DELAY),
                    _ => HeadersStatus::Continue,
                }
            }
        }
    }

    /// Picks the upstream host that `x-demo-route` names, and removes the
    /// header; whether Envoy accepted the host, if there was one.
    fn pin(&self, stream: &mut Stream<'_>, strict: bool) -> Option<bool> {
        let host = stream.header(HeaderMap::RequestHeaders, ROUTE_HEADER).and_then(|h| std::str::from_utf8(h).ok())?;
        let accepted = stream.set_upstream_override_host(host, strict);
        stream.remove_header(HeaderMap::RequestHeaders, ROUTE_HEADER);
        stream.increment(self.settings.metrics.pinned, 1);
        Some(accepted)
    }

    fn note(&mut self, header: &'static str, value: &str) {
        self.report.push((header, value.to_owned()));
    }

    /// Reads the request through every header call, and changes it.
    fn report_request(&mut self, stream: &mut Stream<'_>) {
        let cluster = stream.cluster_name().unwrap_or_default().to_owned();
        let names: Vec<String> = stream.headers(HeaderMap::RequestHeaders).iter().map(|(name, _)| text(name)).collect();
        let multi: Vec<String> = stream.header_values(HeaderMap::RequestHeaders, "x-demo-multi").map(text).collect();
        self.note("x-demo-cluster", &cluster);
        self.note("x-demo-request-headers", &names.join(","));
        self.note("x-demo-multi", &multi.join("|"));
        self.note("x-demo-live-filters", &LIVE_FILTERS.load(Ordering::Relaxed).to_string());
        self.note("x-demo-worker", &format!("{}/{}", stream.worker_index(), self.settings.workers));
        stream.set_header(HeaderMap::RequestHeaders, "x-demo-set", b"1");
        stream.remove_header(HeaderMap::RequestHeaders, "x-demo-remove");
    }

    fn start_callout(&mut self, stream: &mut Stream<'_>, cluster: &str, path: &str) -> HeadersStatus {
        let headers: [(&str, &[u8]); 3] = [(":method", b"GET"), (":path", path.as_bytes()), ("host", b"sidecar")];
        match stream.http_callout(cluster, &headers, b"", self.settings.callout_timeout) {
            Ok(id) => {
                stream.increment(self.settings.metrics.callouts, 1);
                self.callout = Some((id, Instant::now()));
                HeadersStatus::StopAllIterationAndBuffer
            }
            Err(error) => {
                self.note("x-demo-callout", error_name(error));
                HeadersStatus::Continue
            }
        }
    }

    /// Holds the request or the response back for `delay`.
    fn delay(&mut self, stream: &mut Stream<'_>, delay: Duration, event_id: u64) -> HeadersStatus {
        let Some(scheduler) = stream.scheduler() else {
            return HeadersStatus::Continue;
        };
        self.delayed_since = Some(Instant::now());
        timer::schedule(delay, move || scheduler.commit(event_id));
        HeadersStatus::StopAllIterationAndBuffer
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn error_name(error: CalloutError) -> &'static str {
    match error {
        CalloutError::MissingRequiredHeaders => "missing_required_headers",
        CalloutError::ClusterNotFound => "cluster_not_found",
        CalloutError::DuplicateCalloutId => "duplicate_callout_id",
        CalloutError::CannotCreateRequest => "cannot_create_request",
        CalloutError::Other(_) => "other",
    }
}

fn failure_name(failure: CalloutFailure) -> &'static str {
    match failure {
        CalloutFailure::Reset => "reset",
        CalloutFailure::ResponseTooLarge => "response_too_large",
        CalloutFailure::Other(_) => "other",
    }
}

/// Panics on purpose, so the tests can show that a panic fails open.
#[allow(clippy::panic)]
fn deliberate_panic(hook: &str) -> ! {
    panic!("demo: deliberate panic in {hook}")
}
