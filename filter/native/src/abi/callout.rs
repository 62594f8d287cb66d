//! Callouts as both kinds of owner see them (a stream on its worker, a
//! configuration on the main thread): Envoy's result codes decoded, the
//! response lent as views, and the one queue for a callout that completes
//! inside `http_callout` itself.

use std::cell::RefCell;

use super::ffi::*;
use crate::filter::{CalloutError, CalloutFailure, CalloutId, CalloutResponse};

/// A callout response as views: its headers and its body chunks.
type ResponseViews<'a> = (Vec<(&'a [u8], &'a [u8])>, Vec<&'a [u8]>);

/// Views of a callout's response headers and body chunks.
///
/// # Safety
/// Both arrays (null when empty) and every view in them live for `'a`.
pub(super) unsafe fn completion_views<'a>(
    headers: *const RawHeader,
    headers_size: usize,
    body_chunks: *const RawBuffer,
    body_chunks_size: usize,
) -> ResponseViews<'a> {
    // SAFETY: by the contract above.
    let (headers, body_chunks) = unsafe { (array(headers, headers_size), array(body_chunks, body_chunks_size)) };
    // SAFETY: as above, for each header's name and value.
    let headers = headers.iter().map(|header| unsafe { header_parts(header) }).collect();
    // SAFETY: as above, for each body chunk.
    let body = body_chunks.iter().map(|chunk| unsafe { bytes(*chunk) }).collect();
    (headers, body)
}

/// The id of a started callout, or why it did not start.
pub(super) fn callout_started(result: u32, id: u64) -> Result<CalloutId, CalloutError> {
    match result {
        CALLOUT_INIT_SUCCESS => Ok(CalloutId(id)),
        CALLOUT_INIT_MISSING_REQUIRED_HEADERS => Err(CalloutError::MissingRequiredHeaders),
        CALLOUT_INIT_CLUSTER_NOT_FOUND => Err(CalloutError::ClusterNotFound),
        CALLOUT_INIT_DUPLICATE_CALLOUT_ID => Err(CalloutError::DuplicateCalloutId),
        CALLOUT_INIT_CANNOT_CREATE_REQUEST => Err(CalloutError::CannotCreateRequest),
        other => Err(CalloutError::Other(other)),
    }
}

/// A finished callout's response, or why there is none.
pub(super) fn callout_outcome<'a>(
    result: u32,
    (headers, body): ResponseViews<'a>,
) -> Result<CalloutResponse<'a>, CalloutFailure> {
    match result {
        CALLOUT_SUCCESS => Ok(CalloutResponse::new(headers, body)),
        CALLOUT_RESET => Err(CalloutFailure::Reset),
        CALLOUT_EXCEED_RESPONSE_BUFFER_LIMIT => Err(CalloutFailure::ResponseTooLarge),
        other => Err(CalloutFailure::Other(other)),
    }
}

/// A callout's completion, copied: Envoy's views end with its call.
struct Completion {
    id: u64,
    result: u32,
    headers: Vec<(Vec<u8>, Vec<u8>)>,
    body: Vec<Vec<u8>>,
}

impl Completion {
    fn views(&self) -> ResponseViews<'_> {
        (self.headers.iter().map(|(k, v)| (&k[..], &v[..])).collect(), self.body.iter().map(|c| &c[..]).collect())
    }
}

/// Callouts that Envoy completed inside `http_callout` (while a hook of their
/// owner runs), kept to be delivered once that hook's own code returns.
#[derive(Default)]
pub(super) struct Deferred {
    queue: RefCell<Vec<Completion>>,
}

impl Deferred {
    /// Keeps a copy of a completion that cannot be delivered now.
    pub(super) fn push(&self, id: u64, result: u32, (headers, body): &ResponseViews<'_>) {
        self.queue.borrow_mut().push(Completion {
            id,
            result,
            headers: headers.iter().map(|(k, v)| (k.to_vec(), v.to_vec())).collect(),
            body: body.iter().map(|chunk| chunk.to_vec()).collect(),
        });
    }

    /// How many completions are kept, to [`forget_since`](Self::forget_since) later.
    pub(super) fn mark(&self) -> usize {
        self.queue.borrow().len()
    }

    /// Forgets what was kept after `mark`: a callout that did not start has
    /// no completion to deliver.
    pub(super) fn forget_since(&self, mark: usize) {
        self.queue.borrow_mut().truncate(mark);
    }

    /// Delivers every kept completion, and those that the deliveries
    /// themselves cause, while `owner_alive` holds.
    pub(super) fn deliver(
        &self,
        owner_alive: impl Fn() -> bool,
        mut deliver: impl FnMut(CalloutId, Result<CalloutResponse<'_>, CalloutFailure>),
    ) {
        loop {
            let kept = std::mem::take(&mut *self.queue.borrow_mut());
            if kept.is_empty() {
                return;
            }
            for done in kept {
                if !owner_alive() {
                    return;
                }
                deliver(CalloutId(done.id), callout_outcome(done.result, done.views()));
            }
        }
    }
}
