//! Password hashing on its own small pool of threads.
//!
//! An argon2id hash takes tens of milliseconds of CPU and ~19 MiB of memory. On tokio's shared blocking
//! pool, a flood of sign-ins ran hundreds at once (gigabytes of memory) and made file reads for downloads
//! and static files wait behind them. Here a fixed number of threads (`threads`, default 1) hash one
//! password each, with at most `queue` more waiting; past that the caller gets [`Error::Busy`] at once,
//! so the cost of a flood is bounded by the pool, never by the flood.

use std::sync::Mutex;
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};
use std::time::Duration;

use crate::{Error, Result};

type Job = Box<dyn FnOnce() + Send>;

/// A fixed pool of threads for password hashing and verification.
#[derive(Debug)]
pub struct HashPool {
    jobs: Mutex<SyncSender<Job>>,
}

/// What a caller refused by a full pool is told to wait.
const RETRY_AFTER: Duration = Duration::from_secs(1);

impl HashPool {
    /// `threads` hashing threads with `queue` jobs waiting at most.
    ///
    /// # Panics
    /// When the operating system refuses to start a thread.
    #[must_use]
    pub fn new(threads: usize, queue: usize) -> Self {
        let (tx, rx) = sync_channel::<Job>(queue);
        let rx = std::sync::Arc::new(Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("updraft-hash-{i}"))
                .spawn(move || {
                    loop {
                        // The lock is held only to take a job, never while running it.
                        let job = match rx.lock() {
                            Ok(rx) => rx.recv(),
                            Err(_) => return,
                        };
                        match job {
                            Ok(job) => job(),
                            Err(_) => return,
                        }
                    }
                })
                .expect("starting a password hashing thread");
        }
        Self {
            jobs: Mutex::new(tx),
        }
    }

    /// Runs `f` on the pool and waits for its result.
    ///
    /// # Errors
    /// [`Error::Busy`] when every thread is working and the queue is full; [`Error::Internal`] when the
    /// job panicked.
    pub async fn run<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        let sent = self
            .jobs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .try_send(job);
        match sent {
            Ok(()) => rx
                .await
                .map_err(|_| Error::Internal("password hashing job failed".to_owned())),
            Err(TrySendError::Full(_)) => Err(Error::Busy {
                what: "password checks",
                retry_after: RETRY_AFTER,
            }),
            Err(TrySendError::Disconnected(_)) => {
                Err(Error::Internal("password hashing pool stopped".to_owned()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_pool_refuses_at_once_and_frees_up_again() {
        let pool = HashPool::new(1, 1);
        let (started_tx, started) = tokio::sync::oneshot::channel();
        let (release, wait) = std::sync::mpsc::channel::<()>();
        // The one thread runs a job blocked until released...
        let mut running = std::pin::pin!(pool.run(move || {
            started_tx.send(()).unwrap();
            wait.recv().unwrap();
        }));
        assert!(futures::poll!(running.as_mut()).is_pending());
        started.await.unwrap();
        // ...one more waits in the queue (queued by its first poll)...
        let mut queued = std::pin::pin!(pool.run(|| 2));
        assert!(futures::poll!(queued.as_mut()).is_pending());
        // ...and the next is refused without waiting.
        let refused = pool.run(|| 3).await;
        assert!(matches!(refused, Err(Error::Busy { .. })), "{refused:?}");
        release.send(()).unwrap();
        running.await.unwrap();
        assert_eq!(queued.await.unwrap(), 2);
        assert_eq!(pool.run(|| 7).await.unwrap(), 7);
    }
}
