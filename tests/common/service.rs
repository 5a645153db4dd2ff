//! What the test services (FerretDB in `mongo.rs`, Redis in `redis.rs`)
//! have in common: a free port to put them on, and a child process on a
//! fixed 127.0.0.1 port that a test starts (retrying while the port is still
//! taken), kills as a crash would, and asks about. Killed on drop.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Child;
use std::thread;
use std::time::{Duration, Instant};

/// A number that differs between calls and processes (not for secrets).
pub fn random_u64() -> u64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    h.finish()
}

/// A TCP port on 127.0.0.1 where nothing listens right now, below Linux's
/// default ephemeral range (so outgoing connections do not take it
/// meanwhile). Someone else can still take it before it is bound; callers
/// that can tell retry with another.
pub fn free_port() -> u16 {
    for _ in 0..200 {
        let port = 20_000 + (random_u64() % 12_000) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok()
            && TcpStream::connect_timeout(
                &SocketAddr::from(([127, 0, 0, 1], port)),
                Duration::from_millis(200),
            )
            .is_err()
        {
            return port;
        }
    }
    // Fall back on whatever the kernel hands out.
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr").port()
}

/// Why a service did not start.
pub enum StartError {
    /// Someone else listens on the port (the service's log says so).
    PortTaken(String),
    Other(String),
}

/// A service's process on 127.0.0.1:`port`, while it runs.
pub struct ServiceProcess {
    name: &'static str,
    port: u16,
    child: Option<Child>,
}

impl ServiceProcess {
    /// `name` (for messages) on `port`, not started yet.
    pub fn new(name: &'static str, port: u16) -> ServiceProcess {
        ServiceProcess {
            name,
            port,
            child: None,
        }
    }

    /// `name` on `port`, already started as `child`.
    pub fn running(name: &'static str, port: u16, child: Child) -> ServiceProcess {
        ServiceProcess {
            name,
            port,
            child: Some(child),
        }
    }

    /// Start it with `spawn` (given the port), trying again while the port
    /// is still taken, for up to `retry`. Panics with the reason otherwise.
    pub fn start(
        &mut self,
        retry: Duration,
        mut spawn: impl FnMut(u16) -> Result<Child, StartError>,
    ) {
        assert!(self.child.is_none(), "{} is already running", self.name);
        let deadline = Instant::now() + retry;
        loop {
            match spawn(self.port) {
                Ok(child) => {
                    self.child = Some(child);
                    return;
                }
                Err(StartError::PortTaken(log)) => {
                    assert!(
                        Instant::now() < deadline,
                        "{}: port {} stays taken for {retry:?}:\n{log}",
                        self.name,
                        self.port
                    );
                    thread::sleep(Duration::from_millis(100));
                }
                Err(StartError::Other(e)) => panic!("{} did not start: {e}", self.name),
            }
        }
    }

    /// The process, taken out (to be stopped some other way than a kill).
    pub fn take(&mut self) -> Option<Child> {
        self.child.take()
    }

    /// Stop it at once with SIGKILL (a crash) and wait for it to be gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
