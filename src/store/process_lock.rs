//! Who else serves from one SQLite data directory, told by the kernel.
//!
//! Every server process on the directory holds a shared (read) lock on the
//! file `chatserver.lock` beside the database for as long as it announces
//! itself; asking whether an exclusive lock could be taken (`F_GETLK`) then
//! names another process holding one, if any. The kernel drops a process's
//! lock when it ends, however it ends, so there is nothing to expire. POSIX
//! record locks are per process, which is what is asked here: the threads of
//! this process never conflict with each other.
//!
//! Used by `sqlite.rs` for `Store::announce` and `Store::withdraw`, which
//! `crate::presence` calls.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Mutex;

use super::{StoreError, StoreResult};

pub struct ProcessLock {
    path: PathBuf,
    /// The open lock file and the id it was announced under.
    held: Mutex<Option<(File, String)>>,
}

fn lock_range(kind: libc::c_int) -> libc::flock {
    // SAFETY: flock is a plain C struct; all-zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = 0;
    fl.l_len = 1;
    fl
}

fn os_error(what: &str) -> StoreError {
    StoreError::Unavailable(format!("{what}: {}", std::io::Error::last_os_error()))
}

impl ProcessLock {
    pub fn new(path: PathBuf) -> ProcessLock {
        ProcessLock {
            path,
            held: Mutex::new(None),
        }
    }

    /// Hold the shared lock as `me` (taken on the first call), and list
    /// `me` with any other process holding one. Another process's counter
    /// is this call's `beat`: it is there as long as its lock is.
    pub fn announce(&self, me: &str, beat: i64) -> StoreResult<Vec<(String, i64)>> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if held.is_none() {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .read(true)
                .open(&self.path)
                .map_err(|e| {
                    StoreError::Unavailable(format!("cannot open {}: {e}", self.path.display()))
                })?;
            let fl = lock_range(libc::F_RDLCK);
            // SAFETY: F_SETLK reads the flock struct passed by pointer.
            if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLK, &fl) } != 0 {
                return Err(os_error("cannot take the process lock"));
            }
            *held = Some((file, me.to_owned()));
        }
        let Some((file, _)) = held.as_ref() else {
            return Err(StoreError::Unavailable("process lock not held".into()));
        };
        let mut probe = lock_range(libc::F_WRLCK);
        // SAFETY: F_GETLK fills the flock struct passed by pointer.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETLK, &mut probe) } != 0 {
            return Err(os_error("cannot look at the process lock"));
        }
        let mut all = vec![(me.to_owned(), beat)];
        if probe.l_type != libc::F_UNLCK as libc::c_short {
            all.push((format!("pid-{}", probe.l_pid), beat));
        }
        Ok(all)
    }

    /// Let the lock go if `id` is the one that holds it.
    pub fn withdraw(&self, id: &str) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if held.as_ref().is_some_and(|(_, me)| me == id) {
            *held = None; // closing the file drops the lock
        }
    }
}
