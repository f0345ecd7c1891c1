//! Per-client limits of the HTTPS API that no single client may exceed: event streams per caller, and
//! request bodies buffered before their signature is checked.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Event streams (`GET /events`) one caller (a console session, an access key) may hold open at once.
pub const STREAMS_PER_CALLER: usize = 8;

/// Bytes of signed request bodies being buffered, all callers together, before their signature is
/// checked (64 MiB): past that a signed request is answered 503 with `Retry-After` instead of buffered.
pub const UNAUTHENTICATED_BODY_BYTES: usize = 64 * 1024 * 1024;

/// The limits' shared state (one per server).
#[derive(Debug)]
pub struct Guards {
    streams: Arc<Mutex<HashMap<String, usize>>>,
    /// One permit per byte of unauthenticated body being buffered.
    pub unauthenticated_bodies: Arc<Semaphore>,
}

impl Default for Guards {
    fn default() -> Self {
        Self {
            streams: Arc::default(),
            unauthenticated_bodies: Arc::new(Semaphore::new(UNAUTHENTICATED_BODY_BYTES)),
        }
    }
}

/// A caller's place among its open streams; given back when dropped (the stream ends).
#[derive(Debug)]
pub struct StreamPlace {
    streams: Arc<Mutex<HashMap<String, usize>>>,
    caller: String,
}

impl Drop for StreamPlace {
    fn drop(&mut self) {
        let mut streams = self
            .streams
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = streams.get_mut(&self.caller) {
            *n -= 1;
            if *n == 0 {
                streams.remove(&self.caller);
            }
        }
    }
}

impl Guards {
    /// A place for one more stream of `caller`, or `None` when it holds [`STREAMS_PER_CALLER`] already.
    pub fn stream(&self, caller: &str) -> Option<StreamPlace> {
        let mut streams = self
            .streams
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = streams.entry(caller.to_owned()).or_default();
        if *n >= STREAMS_PER_CALLER {
            return None;
        }
        *n += 1;
        Some(StreamPlace {
            streams: self.streams.clone(),
            caller: caller.to_owned(),
        })
    }

    /// Room to buffer `bytes` of a body not yet authenticated, or `None` when the budget is spent.
    pub fn body(&self, bytes: usize) -> Option<OwnedSemaphorePermit> {
        let bytes = u32::try_from(bytes.min(UNAUTHENTICATED_BODY_BYTES)).ok()?;
        self.unauthenticated_bodies
            .clone()
            .try_acquire_many_owned(bytes)
            .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_places_are_counted_per_caller_and_given_back() {
        let guards = Guards::default();
        let held: Vec<_> = (0..STREAMS_PER_CALLER)
            .map(|_| guards.stream("a").unwrap())
            .collect();
        assert!(guards.stream("a").is_none());
        assert!(guards.stream("b").is_some());
        drop(held);
        assert!(guards.stream("a").is_some());
    }

    #[test]
    fn the_body_budget_is_shared_and_given_back() {
        let guards = Guards::default();
        let big = guards.body(UNAUTHENTICATED_BODY_BYTES).unwrap();
        assert!(guards.body(1).is_none());
        drop(big);
        assert!(guards.body(1).is_some());
    }
}
