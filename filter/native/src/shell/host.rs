//! The core's host interface over Envoy's native ABI, for a stream's hooks
//! on a worker and for the configuration's own hooks on the main thread.

use std::borrow::Cow;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use session_affinity::headers::HeaderMap;
use session_affinity::host::{HttpHost, SharedData, WorkerHost};
use session_affinity::store::StoreCall;

use super::random;
use super::shared_data::ProcessShared;
use crate::abi::{ConfigHandle, Stream};
use crate::filter::{self, CalloutError, CalloutId, LocalResponse};
use crate::timer;

/// The scheduler event of a stream's timer (`HttpHost::set_timer`).
pub const TIMER_EVENT: u64 = 1;
/// `%RESPONSE_CODE_DETAILS%` of the filter's local replies.
const LOCAL_REPLY_DETAILS: &str = "session_affinity";

/// The proxy, as the core sees it, during one hook: of a stream on a worker
/// (`C` = [`Stream`], the whole [`HttpHost`]), or of the configuration on
/// the main thread (`C` = [`ConfigHandle`]: store calls that outlive their
/// stream, whose answers come to the configuration).
pub struct Host<'h, C> {
    caller: &'h mut C,
    /// The core asked for its worker's queued calls to be sent.
    pub wake: bool,
}

pub type StreamHost<'h, 's> = Host<'h, Stream<'s>>;

impl<'h, C> Host<'h, C> {
    pub fn new(caller: &'h mut C) -> Self {
        Host { caller, wake: false }
    }
}

/// Who makes a store call: a stream (cancelled with it) or the configuration.
pub trait Caller {
    fn http_callout(
        &mut self,
        cluster: &str,
        headers: &[(&str, &[u8])],
        body: &[u8],
        timeout: Duration,
    ) -> Result<CalloutId, CalloutError>;
}

impl Caller for Stream<'_> {
    fn http_callout(
        &mut self,
        cluster: &str,
        headers: &[(&str, &[u8])],
        body: &[u8],
        timeout: Duration,
    ) -> Result<CalloutId, CalloutError> {
        Stream::http_callout(self, cluster, headers, body, timeout)
    }
}

impl Caller for ConfigHandle<'_> {
    fn http_callout(
        &mut self,
        cluster: &str,
        headers: &[(&str, &[u8])],
        body: &[u8],
        timeout: Duration,
    ) -> Result<CalloutId, CalloutError> {
        ConfigHandle::http_callout(self, cluster, headers, body, timeout)
    }
}

impl<C> SharedData for Host<'_, C> {
    fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        ProcessShared.get(key)
    }
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> bool {
        ProcessShared.set(key, value, cas)
    }
}

impl<C: Caller> WorkerHost for Host<'_, C> {
    fn dispatch(&mut self, call: &StoreCall) -> Option<u64> {
        let headers: Vec<(&str, &[u8])> = call.headers.iter().map(|(name, value)| (*name, value.as_bytes())).collect();
        match self.caller.http_callout(&call.cluster, &headers, &call.body, call.timeout) {
            Ok(id) => Some(id.0),
            Err(error) => {
                log::warn!(
                    "session-affinity-native: store call to cluster {:?} failed to start: {error:?}",
                    call.cluster
                );
                None
            }
        }
    }

    fn now_ms(&self) -> u64 {
        SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    fn random(&mut self) -> Option<[u8; 16]> {
        random::bytes16()
    }
}

impl<'s> StreamHost<'_, 's> {
    pub fn stream(&self) -> &Stream<'s> {
        self.caller
    }

    /// A header map in the core's form, from one `get_headers` call (a
    /// `get_header` per name would cost more: filter/native/README.md).
    fn header_map(&self, map: filter::HeaderMap) -> HeaderMap {
        HeaderMap::from_pairs(self.caller.headers(map).iter())
    }
}

impl HttpHost for StreamHost<'_, '_> {
    fn request_headers(&mut self) -> HeaderMap {
        self.header_map(filter::HeaderMap::RequestHeaders)
    }

    fn add_request_header(&mut self, name: &str, value: &str) {
        self.caller.add_header(filter::HeaderMap::RequestHeaders, name, value.as_bytes());
    }

    fn remove_request_header(&mut self, name: &str) {
        self.caller.remove_header(filter::HeaderMap::RequestHeaders, name);
    }

    /// Envoy's own host override, strict: a host the cluster does not have
    /// (or not in a status its `override_host_status` allows) is a local 503
    /// with flag UH, which the core turns into a failover.
    fn route_to(&mut self, upstream: &str) {
        if !self.caller.set_upstream_override_host(upstream, true) {
            log::warn!("session-affinity-native: Envoy refused the upstream override {upstream:?}");
        }
    }

    fn cluster_name(&mut self) -> Cow<'_, str> {
        Cow::Borrowed(self.caller.cluster_name().unwrap_or_default())
    }

    fn response_headers(&mut self) -> HeaderMap {
        self.header_map(filter::HeaderMap::ResponseHeaders)
    }

    fn add_response_header(&mut self, name: &str, value: &str) {
        self.caller.add_header(filter::HeaderMap::ResponseHeaders, name, value.as_bytes());
    }

    fn remove_response_header(&mut self, name: &str) {
        self.caller.remove_header(filter::HeaderMap::ResponseHeaders, name);
    }

    fn request_trailers(&mut self) -> HeaderMap {
        self.header_map(filter::HeaderMap::RequestTrailers)
    }

    fn remove_request_trailer(&mut self, name: &str) {
        self.caller.remove_header(filter::HeaderMap::RequestTrailers, name);
    }

    fn response_trailers(&mut self) -> HeaderMap {
        self.header_map(filter::HeaderMap::ResponseTrailers)
    }

    fn remove_response_trailer(&mut self, name: &str) {
        self.caller.remove_header(filter::HeaderMap::ResponseTrailers, name);
    }

    fn upstream_address(&mut self) -> Option<String> {
        self.caller.upstream_address().filter(|a| !a.is_empty())
    }

    fn response_flags(&mut self) -> u64 {
        self.caller.response_flags().unwrap_or(0)
    }

    fn send_response(&mut self, status: u32, headers: &[(&str, &str)], body: &str) {
        self.caller.send_response(LocalResponse {
            status,
            headers: headers.iter().map(|(k, v)| ((*k).to_owned(), v.as_bytes().to_vec())).collect(),
            body: body.as_bytes().to_vec(),
            details: LOCAL_REPLY_DETAILS.to_owned(),
        });
    }

    /// A scheduler for this stream, committed by the module's timer thread.
    fn set_timer(&mut self, after_ms: u64) -> bool {
        let Some(scheduler) = self.caller.scheduler() else { return false };
        timer::schedule(Duration::from_millis(after_ms), move || scheduler.commit(TIMER_EVENT));
        true
    }

    fn wake_worker(&mut self) {
        self.wake = true;
    }

    fn resume_request(&mut self) {
        self.caller.continue_decoding();
    }

    fn resume_response(&mut self) {
        self.caller.continue_encoding();
    }
}
