//! The worker threads that do everything that may block.
//!
//! A [`Pool`] is a few threads reading jobs from one bounded queue. A job is a
//! closure that gets the store and returns a completion; the completion goes
//! back to the reactor over an unbounded channel and a [`mio::Waker`] wakes the
//! loop. The reactor submits with [`Pool::try_submit`], which never blocks: a
//! full queue hands the job back so the caller can answer `503` or retry later.
//!
//! The server runs two pools ("lanes"): one for password hashing, which is
//! pure CPU and slow on purpose, and one for store calls, so that a login
//! storm never delays a chat message waiting to be stored. Hashing threads
//! run at a lower scheduling priority than the reactor for the same reason.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use mio::Waker;

use crate::store::Store;

/// Work for a thread of the pool.
pub type Job<T> = Box<dyn FnOnce(&dyn Store) -> T + Send + 'static>;

pub struct Pool<T: Send + 'static> {
    name: &'static str,
    jobs: Option<Sender<Job<T>>>,
    queue: Receiver<Job<T>>,
    threads: Vec<JoinHandle<()>>,
}

impl<T: Send + 'static> Pool<T> {
    /// Start `threads` threads named `name-N`. `nice` is added to their
    /// scheduling priority (0 leaves it as it is).
    pub fn new(
        name: &'static str,
        threads: usize,
        capacity: usize,
        nice: i32,
        store: Arc<dyn Store>,
        done: Sender<T>,
        waker: Arc<Waker>,
    ) -> std::io::Result<Pool<T>> {
        let (tx, rx) = crossbeam_channel::bounded::<Job<T>>(capacity);
        let mut handles = Vec::with_capacity(threads);
        for i in 0..threads {
            let rx = rx.clone();
            let store = store.clone();
            let done = done.clone();
            let waker = waker.clone();
            let handle = std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || {
                    if nice != 0 {
                        lower_priority(nice);
                    }
                    for job in rx.iter() {
                        let out = job(store.as_ref());
                        if done.send(out).is_err() {
                            break; // the reactor is gone
                        }
                        if let Err(err) = waker.wake() {
                            log::error!("worker cannot wake the reactor: {err}");
                        }
                    }
                })?;
            handles.push(handle);
        }
        Ok(Pool {
            name,
            jobs: Some(tx),
            queue: rx,
            threads: handles,
        })
    }

    /// Queue a job, or give it back when the queue is full.
    pub fn try_submit(&self, job: Job<T>) -> Result<(), Job<T>> {
        let Some(tx) = &self.jobs else {
            return Err(job);
        };
        match tx.try_send(job) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(job)) | Err(TrySendError::Disconnected(job)) => Err(job),
        }
    }

    /// Jobs waiting for a thread.
    pub fn depth(&self) -> usize {
        self.queue.len()
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Let the threads finish the queued jobs and join them, but wait no
    /// later than `deadline`: a job stuck on an unreachable database or an
    /// absurdly costly hash must not hold the process past its shutdown
    /// timeout. Threads still busy then are left to end with the process.
    pub fn shutdown(mut self, deadline: Instant) {
        self.jobs = None;
        while self.threads.iter().any(|h| !h.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let (done, busy): (Vec<_>, Vec<_>) = self.threads.drain(..).partition(|h| h.is_finished());
        for handle in done {
            if handle.join().is_err() {
                log::error!("a {} worker panicked", self.name);
            }
        }
        if !busy.is_empty() {
            log::warn!(
                "{} {} worker(s) still busy at the shutdown deadline ({} jobs queued); not waiting for them",
                busy.len(),
                self.name,
                self.queue.len()
            );
        }
    }
}

/// Raise this thread's nice value (Linux schedules threads individually).
fn lower_priority(nice: i32) {
    // SAFETY: setpriority with PRIO_PROCESS and who = 0 acts on the calling
    // thread on Linux; it takes no pointers.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
    if rc != 0 {
        log::debug!(
            "could not lower worker priority: {}",
            std::io::Error::last_os_error()
        );
    }
}
