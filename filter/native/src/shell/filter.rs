//! One stream: its hooks run the core's `Flow` with a [`StreamHost`], then
//! hand Envoy what the flow left pending (counts, calls for the main thread).

use std::rc::Rc;
use std::sync::Arc;

use session_affinity::flow::Flow;
use session_affinity::host::Action;

use super::host::{StreamHost, TIMER_EVENT};
use super::threads::{self, ThreadState};
use super::{answer, Shared};
use crate::abi::Stream;
use crate::filter::{
    BodyStatus, CalloutFailure, CalloutId, CalloutResponse, HeadersStatus, HttpFilter, TrailersStatus,
};

pub struct SessionFilter {
    shared: Arc<Shared>,
    /// `None` if this thread could not compile the configuration: the stream
    /// then passes as if the filter were absent.
    state: Option<(Flow, Rc<ThreadState>)>,
}

impl SessionFilter {
    pub fn new(shared: &Arc<Shared>) -> SessionFilter {
        let state = threads::this_thread(shared).map(|thread| {
            let flow = Flow::new(thread.next_stream(), Rc::clone(&thread.config), Rc::clone(&thread.worker));
            (flow, thread)
        });
        SessionFilter { shared: Arc::clone(shared), state }
    }

    /// Runs one flow callback, then hands Envoy the counts it made and the
    /// main thread the store calls it queued.
    fn run<T>(
        &mut self,
        stream: &mut Stream<'_>,
        callback: impl FnOnce(&mut Flow, &mut StreamHost<'_, '_>) -> T,
    ) -> Option<T> {
        let (flow, thread) = self.state.as_mut()?;
        let mut host = StreamHost::new(stream);
        let result = callback(flow, &mut host);
        if host.wake {
            self.shared.hand_over(&thread.worker);
        }
        self.shared.metrics.flush(&thread.worker, host.stream());
        Some(result)
    }

    fn holds(&self, hold: impl FnOnce(&Flow) -> bool) -> bool {
        self.state.as_ref().is_some_and(|(flow, _)| hold(flow))
    }
}

fn headers_status(action: Option<Action>) -> HeadersStatus {
    match action {
        Some(Action::Pause) => HeadersStatus::StopAllIterationAndBuffer,
        Some(Action::Continue) | None => HeadersStatus::Continue,
    }
}

/// Body data waits (buffered) while its direction waits for the store.
fn body_status(hold: bool) -> BodyStatus {
    if hold {
        BodyStatus::StopIterationAndBuffer
    } else {
        BodyStatus::Continue
    }
}

impl HttpFilter for SessionFilter {
    fn on_request_headers(&mut self, stream: &mut Stream<'_>, _end_of_stream: bool) -> HeadersStatus {
        if let Some((_, thread)) = &self.state {
            thread.refresh_gone();
        }
        headers_status(self.run(stream, |flow, host| flow.on_request_headers(host)))
    }

    fn on_request_body(&mut self, _stream: &mut Stream<'_>, _end_of_stream: bool) -> BodyStatus {
        body_status(self.holds(Flow::holds_request_body))
    }

    fn on_response_headers(&mut self, stream: &mut Stream<'_>, _end_of_stream: bool) -> HeadersStatus {
        headers_status(self.run(stream, |flow, host| flow.on_response_headers(host)))
    }

    fn on_response_body(&mut self, _stream: &mut Stream<'_>, _end_of_stream: bool) -> BodyStatus {
        body_status(self.holds(Flow::holds_response_body))
    }

    fn on_request_trailers(&mut self, stream: &mut Stream<'_>) -> TrailersStatus {
        match self.run(stream, |flow, host| flow.on_request_trailers(host)) {
            Some(Action::Pause) => TrailersStatus::StopIteration,
            Some(Action::Continue) | None => TrailersStatus::Continue,
        }
    }

    fn on_response_trailers(&mut self, stream: &mut Stream<'_>) -> TrailersStatus {
        match self.run(stream, |flow, host| flow.on_response_trailers(host)) {
            Some(Action::Pause) => TrailersStatus::StopIteration,
            Some(Action::Continue) | None => TrailersStatus::Continue,
        }
    }

    fn on_callout_done(
        &mut self,
        stream: &mut Stream<'_>,
        callout: CalloutId,
        response: Result<CalloutResponse<'_>, CalloutFailure>,
    ) {
        let (status, body) = answer(response);
        self.run(stream, |flow, host| flow.on_store_response(host, callout.0, status, &body));
    }

    fn on_scheduled(&mut self, stream: &mut Stream<'_>, event_id: u64) {
        if event_id == TIMER_EVENT {
            self.run(stream, |flow, host| flow.on_timer(host));
        }
    }
}
