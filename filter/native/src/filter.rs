//! What a native filter implements, and the plain values it exchanges with
//! Envoy. Nothing here touches Envoy; [`crate::abi`] does.

use crate::abi::{ConfigContext, ConfigHandle, Stream};

/// A filter configuration: one per `filter_config` in Envoy's config, shared
/// by every worker thread, making one [`HttpFilter`] per HTTP stream. Its
/// own events run on Envoy's main thread.
pub trait FilterConfig: Sized + Send + Sync + 'static {
    type Filter: HttpFilter;

    /// Parses `config` (the bytes of the `filter_config` value). The error
    /// names the field at fault and says what to fix; Envoy then rejects the
    /// configuration. Metrics can only be defined here, through `context`.
    fn new(name: &str, config: &[u8], context: &mut ConfigContext<'_>) -> Result<Self, String>;

    /// The filter for a new HTTP stream.
    fn new_filter(&self) -> Self::Filter;

    /// An event committed to the configuration's [`crate::ConfigScheduler`],
    /// on the main thread.
    fn on_scheduled(&self, _config: &mut ConfigHandle<'_>, _event_id: u64) {}

    /// A callout started by [`ConfigHandle::http_callout`] finished (on the main thread).
    fn on_callout_done(
        &self,
        _config: &mut ConfigHandle<'_>,
        _callout: CalloutId,
        _response: Result<CalloutResponse<'_>, CalloutFailure>,
    ) {
    }
}

/// One HTTP stream's filter. Envoy calls every method on the stream's worker
/// thread; dropping the filter is the stream's end. Each method has a
/// pass-through default.
///
/// A panic in any method is caught: the request goes on as if the filter
/// were absent (a paused stream is continued), and the filter is dropped.
pub trait HttpFilter: 'static {
    fn on_request_headers(&mut self, _stream: &mut Stream<'_>, _end_of_stream: bool) -> HeadersStatus {
        HeadersStatus::Continue
    }

    fn on_request_body(&mut self, _stream: &mut Stream<'_>, _end_of_stream: bool) -> BodyStatus {
        BodyStatus::Continue
    }

    fn on_request_trailers(&mut self, _stream: &mut Stream<'_>) -> TrailersStatus {
        TrailersStatus::Continue
    }

    fn on_response_headers(&mut self, _stream: &mut Stream<'_>, _end_of_stream: bool) -> HeadersStatus {
        HeadersStatus::Continue
    }

    fn on_response_body(&mut self, _stream: &mut Stream<'_>, _end_of_stream: bool) -> BodyStatus {
        BodyStatus::Continue
    }

    fn on_response_trailers(&mut self, _stream: &mut Stream<'_>) -> TrailersStatus {
        TrailersStatus::Continue
    }

    /// The stream is over (the response was sent or the stream was reset);
    /// stream info such as the response flags is final. Called before access logs.
    fn on_stream_complete(&mut self, _stream: &mut Stream<'_>) {}

    /// An HTTP callout started by [`Stream::http_callout`] finished.
    fn on_callout_done(
        &mut self,
        _stream: &mut Stream<'_>,
        _callout: CalloutId,
        _response: Result<CalloutResponse<'_>, CalloutFailure>,
    ) {
    }

    /// An event committed to a [`crate::Scheduler`] of this stream.
    fn on_scheduled(&mut self, _stream: &mut Stream<'_>, _event_id: u64) {}
}

/// What a headers hook tells Envoy (`FilterHeadersStatus`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadersStatus {
    Continue,
    /// Hold the headers back; body data still reaches this filter.
    StopIteration,
    /// Hold back headers, body and trailers until [`Stream::continue_decoding`]
    /// (or `continue_encoding`); Envoy buffers the body meanwhile. A filter
    /// waiting for a callout returns this.
    StopAllIterationAndBuffer,
}

/// What a body hook tells Envoy (`FilterDataStatus`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyStatus {
    Continue,
    StopIterationAndBuffer,
}

/// What a trailers hook tells Envoy (`FilterTrailersStatus`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrailersStatus {
    Continue,
    StopIteration,
}

/// Which of the stream's header maps a header call reads or changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderMap {
    RequestHeaders,
    RequestTrailers,
    ResponseHeaders,
    ResponseTrailers,
}

/// A reply that the filter sends instead of the upstream's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalResponse {
    pub status: u32,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
    /// Shown as `%RESPONSE_CODE_DETAILS%` in access logs, e.g. "store_unavailable".
    pub details: String,
}

/// Identifies a callout in [`HttpFilter::on_callout_done`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CalloutId(pub u64);

/// Why Envoy did not start a callout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CalloutError {
    /// The headers lack `:method`, `:path` or `host`.
    MissingRequiredHeaders,
    ClusterNotFound,
    DuplicateCalloutId,
    /// Envoy could not start the request, e.g. the cluster has no healthy host.
    CannotCreateRequest,
    /// A value this binding does not know (a newer Envoy).
    Other(u32),
}

/// Why a started callout has no response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CalloutFailure {
    /// Reset, including a timeout or a refused connection.
    Reset,
    /// The response was larger than Envoy's buffer limit.
    ResponseTooLarge,
    /// A value this binding does not know (a newer Envoy).
    Other(u32),
}

/// A counter defined in [`FilterConfig::new`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Counter(pub(crate) usize);

/// A histogram defined in [`FilterConfig::new`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Histogram(pub(crate) usize);

/// Why Envoy refused to define a metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricError {
    NotFound,
    InvalidLabels,
    /// Metrics can only be defined while the configuration is created.
    Frozen,
    Other(u32),
}

/// The response to an HTTP callout, as views valid during
/// [`HttpFilter::on_callout_done`].
pub struct CalloutResponse<'a> {
    headers: Vec<(&'a [u8], &'a [u8])>,
    body: Vec<&'a [u8]>,
}

impl<'a> CalloutResponse<'a> {
    pub(crate) fn new(headers: Vec<(&'a [u8], &'a [u8])>, body: Vec<&'a [u8]>) -> Self {
        Self { headers, body }
    }

    /// The `:status` header as a number.
    pub fn status(&self) -> Option<u16> {
        std::str::from_utf8(self.header(":status")?).ok()?.parse().ok()
    }

    /// The first value of a header; `name` in lower case.
    pub fn header(&self, name: &str) -> Option<&'a [u8]> {
        self.headers.iter().find(|(key, _)| *key == name.as_bytes()).map(|(_, value)| *value)
    }

    pub fn headers(&self) -> &[(&'a [u8], &'a [u8])] {
        &self.headers
    }

    /// The body in the chunks Envoy holds it in.
    pub fn body_chunks(&self) -> &[&'a [u8]] {
        &self.body
    }

    /// The body in one piece.
    pub fn body(&self) -> Vec<u8> {
        self.body.concat()
    }
}
