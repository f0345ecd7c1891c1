//! A sliding-window throttle for failed logins.
//!
//! Pure: the caller passes `now`, so lockouts are tested on a manual clock. Memory is bounded: failures
//! older than the window are dropped, and when more than `max_keys` keys are tracked the stalest go.
//!
//! Concurrent attempts use [`Throttle::begin`], which checks and records in one step: the attempt counts
//! as a failure from the moment it starts, and a success takes it back ([`Throttle::forgive`] or
//! [`Throttle::record_success`]). Checking first and recording after the slow password check would let
//! any number of simultaneous attempts through the same check.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use crate::Timestamp;

/// Counts failures per key (a user name, a client address...) within a window.
#[derive(Debug)]
pub struct Throttle {
    max_failures: usize,
    window: Duration,
    max_keys: usize,
    failures: HashMap<String, VecDeque<Timestamp>>,
}

/// The key is locked out; it may try again after this long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryAfter(pub Duration);

impl Throttle {
    /// Allows `max_failures` failures per `window` per key, tracking at most `max_keys` keys.
    #[must_use]
    pub fn new(max_failures: usize, window: Duration, max_keys: usize) -> Self {
        Self {
            max_failures: max_failures.max(1),
            window,
            max_keys: max_keys.max(1),
            failures: HashMap::new(),
        }
    }

    /// Whether `key` may try now.
    ///
    /// # Errors
    /// [`RetryAfter`] while `key` has used up its failures in the window.
    pub fn check(&self, key: &str, now: Timestamp) -> Result<(), RetryAfter> {
        let Some(times) = self.failures.get(key) else {
            return Ok(());
        };
        let recent: Vec<_> = times
            .iter()
            .filter(|t| now.since(**t) < self.window)
            .collect();
        if recent.len() < self.max_failures {
            return Ok(());
        }
        // The key frees up when the oldest failure that still counts leaves the window.
        let oldest_counted = *recent[recent.len() - self.max_failures];
        Err(RetryAfter(
            self.window.saturating_sub(now.since(oldest_counted)),
        ))
    }

    /// Checks `key` and, when it may try, records this attempt as a failure at `now` in the same step.
    ///
    /// # Errors
    /// [`RetryAfter`] while `key` has used up its failures in the window (nothing is recorded then).
    pub fn begin(&mut self, key: &str, now: Timestamp) -> Result<(), RetryAfter> {
        self.check(key, now)?;
        self.record_failure(key, now);
        Ok(())
    }

    /// Takes back one attempt of `key` begun at `at` (it succeeded); other failures of `key` still count.
    pub fn forgive(&mut self, key: &str, at: Timestamp) {
        if let Some(times) = self.failures.get_mut(key) {
            if let Some(i) = times.iter().rposition(|t| *t == at) {
                times.remove(i);
            }
            if times.is_empty() {
                self.failures.remove(key);
            }
        }
    }

    /// Records a failure of `key` at `now`.
    pub fn record_failure(&mut self, key: &str, now: Timestamp) {
        if !self.failures.contains_key(key) && self.failures.len() >= self.max_keys {
            self.evict(now);
        }
        let window = self.window;
        let times = self.failures.entry(key.to_owned()).or_default();
        times.retain(|t| now.since(*t) < window);
        times.push_back(now);
        while times.len() > self.max_failures {
            times.pop_front();
        }
    }

    /// Forgets `key`'s failures (after a successful login).
    pub fn record_success(&mut self, key: &str) {
        self.failures.remove(key);
    }

    /// How many keys are tracked.
    #[must_use]
    pub fn tracked_keys(&self) -> usize {
        self.failures.len()
    }

    fn evict(&mut self, now: Timestamp) {
        let window = self.window;
        self.failures
            .retain(|_, times| times.back().is_some_and(|t| now.since(*t) < window));
        while self.failures.len() >= self.max_keys {
            let stalest = self
                .failures
                .iter()
                .min_by_key(|(_, times)| times.back().copied())
                .map(|(k, _)| k.clone());
            match stalest {
                Some(k) => self.failures.remove(&k),
                None => break,
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    fn at(minutes: i64) -> Timestamp {
        Timestamp::from_millis(minutes * 60_000)
    }

    #[test]
    fn locks_out_after_the_allowed_failures_until_the_window_passes() {
        let mut t = Throttle::new(3, 15 * MIN, 100);
        for m in 0..3 {
            assert!(t.check("admin", at(m)).is_ok());
            t.record_failure("admin", at(m));
        }
        assert_eq!(t.check("admin", at(3)), Err(RetryAfter(12 * MIN)));
        assert!(t.check("someone-else", at(3)).is_ok());
        // The first failure (minute 0) leaves the window at minute 15.
        assert_eq!(t.check("admin", at(14)), Err(RetryAfter(MIN)));
        assert!(t.check("admin", at(15)).is_ok());
    }

    #[test]
    fn success_clears_the_count() {
        let mut t = Throttle::new(2, 15 * MIN, 100);
        t.record_failure("admin", at(0));
        t.record_failure("admin", at(1));
        assert!(t.check("admin", at(2)).is_err());
        t.record_success("admin");
        assert!(t.check("admin", at(2)).is_ok());
    }

    #[test]
    fn begun_attempts_count_until_forgiven() {
        let mut t = Throttle::new(3, 15 * MIN, 100);
        // Three attempts in flight at once use up the key; the fourth is refused before it starts.
        for _ in 0..3 {
            assert!(t.begin("admin", at(0)).is_ok());
        }
        assert!(t.begin("admin", at(0)).is_err());
        // One of them succeeded: its place comes back, the two failures still count.
        t.forgive("admin", at(0));
        assert!(t.begin("admin", at(0)).is_ok());
        assert!(t.begin("admin", at(0)).is_err());
        t.forgive("nobody", at(0));
        assert_eq!(t.tracked_keys(), 1);
    }

    #[test]
    fn memory_is_bounded_by_max_keys() {
        let mut t = Throttle::new(2, 15 * MIN, 10);
        for i in 0..1000 {
            t.record_failure(&format!("k{i}"), at(i));
        }
        assert!(t.tracked_keys() <= 10);
        // The most recent key survives eviction.
        t.record_failure("k999", at(1000));
        assert!(t.check("k999", at(1000)).is_err());
    }
}
