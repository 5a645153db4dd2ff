//! MongoDB for the tests: a FerretDB (MongoDB wire protocol, SQLite backend)
//! that the test binary starts itself, or a real MongoDB named by `MONGO_URI`.
//!
//! - [`mongo_uri`]: the database every test of this binary shares. With
//!   `MONGO_URI` set and non-empty in the test environment, that; otherwise a
//!   FerretDB started lazily, once per test binary, on a free port in a temp
//!   dir, killed when the test process exits (an `atexit` hook, and
//!   `PR_SET_PDEATHSIG` as a backstop should the process die otherwise).
//! - [`unique_db`]: a database name no other test uses, so tests can share one
//!   server, a FerretDB or a real MongoDB.
//! - [`FerretInstance`]: a FerretDB of a test's own that the test stops and
//!   starts again (same port, same data) for the fault tests. It always is a
//!   FerretDB, `MONGO_URI` or not: a shared MongoDB cannot be stopped.
//! - [`ReplyCutter`]: a relay in front of a server that loses the replies to
//!   chosen commands after the server carried them out.
//!
//! The FerretDB binary comes from `scripts/ferretdb.sh build` (cached; the
//! test script builds it beforehand). When it cannot be built or started the
//! tests fail with the reason: nothing is skipped.
//!
//! Every wait here is bounded.

#![allow(dead_code)]

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use mongodb::bson::{doc, Document};

use super::service::{random_u64, ServiceProcess, StartError};

/// How long a FerretDB may take to accept connections.
const FERRET_START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a FerretDB may take to exit after SIGTERM before it gets SIGKILL.
const FERRET_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `scripts/ferretdb.sh build` may take (a first build compiles Go).
const FERRET_BUILD_TIMEOUT: Duration = Duration::from_secs(900);

// ---------------------------------------------------------------------------
// Names and ports

static DB_COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A database name no other test (of this run or another) uses:
/// `cc_<tag>_<pid>_<n>_<random>`, valid for MongoDB and FerretDB alike.
pub fn unique_db(tag: &str) -> String {
    let n = DB_COUNTER.fetch_add(1, Ordering::Relaxed);
    let tag: String = tag
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
        .take(16)
        .collect();
    format!(
        "cc_{tag}_{}_{n}_{:08x}",
        std::process::id(),
        random_u64() & 0xffff_ffff
    )
}

pub use super::service::free_port;

// ---------------------------------------------------------------------------
// Spawning from a thread that never exits

struct SpawnReq {
    cmd: Command,
    reply: mpsc::Sender<std::io::Result<Child>>,
}

/// Spawn `cmd` from a dedicated thread that lives as long as the process.
/// The child gets `PR_SET_PDEATHSIG(SIGKILL)`, which fires when the thread
/// that forked it exits: a test thread would end it with the test, this one
/// only with the process.
fn spawn_tied_to_process(mut cmd: Command) -> std::io::Result<Child> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnReq>>> = OnceLock::new();
    let tx = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnReq>();
        thread::Builder::new()
            .name("ferretdb-spawner".into())
            .spawn(move || {
                while let Ok(req) = rx.recv() {
                    let mut cmd = req.cmd;
                    let _ = req.reply.send(cmd.spawn());
                }
                // The sender lives in a static, so this is never reached;
                // should it be, the thread still must not exit.
                loop {
                    thread::park();
                }
            })
            .expect("start the FerretDB spawner thread");
        Mutex::new(tx)
    });
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: only async-signal-safe calls (prctl, getppid, _exit) between
    // fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            // The parent died before prctl took effect: do not outlive it.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    let (reply_tx, reply_rx) = mpsc::channel();
    tx.lock()
        .unwrap_or_else(|p| p.into_inner())
        .send(SpawnReq {
            cmd,
            reply: reply_tx,
        })
        .map_err(|_| std::io::Error::other("the spawner thread is gone"))?;
    reply_rx
        .recv_timeout(Duration::from_secs(30))
        .map_err(|_| std::io::Error::other("the spawner thread did not answer"))?
}

// ---------------------------------------------------------------------------
// The FerretDB binary

fn script_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scripts")
        .join("ferretdb.sh")
}

/// The cached FerretDB binary (`scripts/ferretdb.sh build`), built at most
/// once per test process.
pub fn ferretdb_binary() -> Result<PathBuf, String> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(build_ferretdb).clone()
}

fn build_ferretdb() -> Result<PathBuf, String> {
    let script = script_path();
    let mut child = Command::new("bash")
        .arg(&script)
        .arg("build")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    let mut out = child.stdout.take().expect("stdout piped");
    let mut err = child.stderr.take().expect("stderr piped");
    let t_out = thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + FERRET_BUILD_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) => {}
            Err(e) => return Err(format!("waiting for {}: {e}", script.display())),
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "`{} build` did not finish within {FERRET_BUILD_TIMEOUT:?}",
                script.display()
            ));
        }
        thread::sleep(Duration::from_millis(50));
    };
    let stdout = t_out.join().unwrap_or_default();
    let stderr = t_err.join().unwrap_or_default();
    if !status.success() {
        return Err(format!(
            "`{} build` failed ({status}); FerretDB is needed for the MongoDB tests \
             (or set MONGO_URI to a MongoDB):\n{stderr}",
            script.display()
        ));
    }
    let path = stdout.lines().rev().find(|l| !l.trim().is_empty());
    let path = PathBuf::from(path.unwrap_or("").trim());
    if !path.is_file() {
        return Err(format!(
            "`{} build` printed {stdout:?}, which is not a file\n{stderr}",
            script.display()
        ));
    }
    Ok(path)
}

// ---------------------------------------------------------------------------
// One FerretDB process

fn log_tail(path: &Path, max: usize) -> String {
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) => return format!("(no log at {}: {e})", path.display()),
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(max as u64);
    let _ = f.seek(SeekFrom::Start(start));
    let mut s = Vec::new();
    let _ = f.read_to_end(&mut s);
    String::from_utf8_lossy(&s).into_owned()
}

fn log_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

fn log_since(path: &Path, offset: u64) -> String {
    let mut s = Vec::new();
    if let Ok(mut f) = File::open(path) {
        let _ = f.seek(SeekFrom::Start(offset));
        let _ = f.read_to_end(&mut s);
    }
    String::from_utf8_lossy(&s).into_owned()
}

/// Why a start attempt failed.
/// Spawn FerretDB on 127.0.0.1:`port` with its data in `dir` and wait
/// (bounded) until the port accepts connections.
fn spawn_ferretdb(bin: &Path, dir: &Path, port: u16) -> Result<Child, StartError> {
    let dir_s = dir
        .to_str()
        .ok_or_else(|| StartError::Other(format!("FerretDB dir {} is not UTF-8", dir.display())))?;
    if dir_s.contains(['?', '#', '%']) {
        return Err(StartError::Other(format!(
            "FerretDB dir {dir_s} must not contain '?', '#' or '%' (it goes into a file: URI)"
        )));
    }
    for sub in ["db", "state"] {
        std::fs::create_dir_all(dir.join(sub))
            .map_err(|e| StartError::Other(format!("create {}/{sub}: {e}", dir.display())))?;
    }
    let log_path = dir.join("ferretdb.log");
    let offset = log_len(&log_path);
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| StartError::Other(format!("open {}: {e}", log_path.display())))?;
    let log2 = log
        .try_clone()
        .map_err(|e| StartError::Other(format!("dup log fd: {e}")))?;

    let mut cmd = Command::new(bin);
    cmd.arg("--handler=sqlite")
        .arg(format!("--sqlite-url=file:{dir_s}/db/"))
        .arg(format!("--listen-addr=127.0.0.1:{port}"))
        .arg(format!("--state-dir={dir_s}/state"))
        .arg("--debug-addr=-")
        .arg("--telemetry=disable")
        .arg("--otel-traces-url=-")
        .arg("--log-level=INFO")
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log2))
        .env("DO_NOT_TRACK", "1");
    // FERRETDB_* variables would set flags: none from the caller's environment.
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("FERRETDB_") {
            cmd.env_remove(k);
        }
    }
    let mut child = spawn_tied_to_process(cmd)
        .map_err(|e| StartError::Other(format!("spawn {}: {e}", bin.display())))?;

    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + FERRET_START_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let text = log_since(&log_path, offset);
            if text.contains("address already in use") {
                return Err(StartError::PortTaken(text));
            }
            return Err(StartError::Other(format!(
                "FerretDB exited with {status} during start-up; its log ({}):\n{}",
                log_path.display(),
                tail_str(&text, 4000)
            )));
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok() {
            // Ours, not someone who took the port in between?
            thread::sleep(Duration::from_millis(50));
            if let Ok(None) = child.try_wait() {
                return Ok(child);
            }
            continue;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(StartError::Other(format!(
                "FerretDB did not accept connections on {addr} within {FERRET_START_TIMEOUT:?}; its log:\n{}",
                log_tail(&log_path, 4000)
            )));
        }
        thread::sleep(Duration::from_millis(50));
    }
}

fn tail_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

// ---------------------------------------------------------------------------
// The shared database of this test binary

static SHARED_PID: AtomicI32 = AtomicI32::new(0);
static SHARED_DIR: OnceLock<PathBuf> = OnceLock::new();

extern "C" fn kill_shared_ferretdb() {
    let pid = SHARED_PID.swap(0, Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill/waitpid on our own child.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            let mut status = 0;
            libc::waitpid(pid, &mut status, 0);
        }
    }
    if let Some(dir) = SHARED_DIR.get() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// The MongoDB URI every test of this binary uses: `MONGO_URI` from the test
/// environment when set and non-empty, otherwise the URI of this binary's own
/// FerretDB (started on first use). Panics, failing the test, when FerretDB
/// cannot be built or started.
pub fn mongo_uri() -> String {
    static URI: OnceLock<Result<String, String>> = OnceLock::new();
    match URI.get_or_init(init_shared) {
        Ok(uri) => uri.clone(),
        Err(e) => panic!("no MongoDB for the tests: {e}"),
    }
}

/// True when the tests run against a MongoDB named by `MONGO_URI` rather than
/// their own FerretDB.
pub fn external_mongo() -> bool {
    std::env::var("MONGO_URI").is_ok_and(|v| !v.trim().is_empty())
}

fn init_shared() -> Result<String, String> {
    if let Ok(uri) = std::env::var("MONGO_URI") {
        if !uri.trim().is_empty() {
            return Ok(uri.trim().to_string());
        }
    }
    let bin = ferretdb_binary()?;
    let dir = tempfile::Builder::new()
        .prefix("chatconnect-ferretdb-")
        .tempdir()
        .map_err(|e| format!("create a temp dir for FerretDB: {e}"))?
        .keep();
    let _ = SHARED_DIR.set(dir.clone());
    let mut last = String::new();
    for _ in 0..5 {
        let port = free_port();
        match spawn_ferretdb(&bin, &dir, port) {
            Ok(child) => {
                SHARED_PID.store(child.id() as i32, Ordering::SeqCst);
                // The Child handle is dropped here; atexit (or pdeathsig) ends it.
                // SAFETY: registering a plain extern "C" function.
                unsafe {
                    libc::atexit(kill_shared_ferretdb);
                }
                let uri = format!("mongodb://127.0.0.1:{port}/");
                wait_until_answers(&uri, Duration::from_secs(20))?;
                return Ok(uri);
            }
            Err(StartError::PortTaken(text)) => last = text,
            Err(StartError::Other(e)) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Err(format!(
        "FerretDB found no free port in 5 attempts; last log:\n{}",
        tail_str(&last, 4000)
    ))
}

/// Wait until a `ping` through the driver succeeds.
pub fn wait_until_answers(uri: &str, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    while Instant::now() < deadline {
        match client_with_timeout(uri, Duration::from_secs(2)) {
            Ok(c) => match c.database("admin").run_command(doc! {"ping": 1}).run() {
                Ok(_) => return Ok(()),
                Err(e) => last = e.to_string(),
            },
            Err(e) => last = e,
        }
        thread::sleep(Duration::from_millis(100));
    }
    Err(format!(
        "MongoDB at {uri} did not answer a ping within {timeout:?}: {last}"
    ))
}

// ---------------------------------------------------------------------------
// A FerretDB a test stops and starts

/// A FerretDB of a test's own, on a fixed port and data directory, that the
/// test can stop and start again. Killed on drop.
pub struct FerretInstance {
    bin: PathBuf,
    dir: PathBuf,
    proc: ServiceProcess,
}

impl FerretInstance {
    /// Start on 127.0.0.1:`port` with its data in `dir`. Panics with the
    /// reason (and FerretDB's log) when it cannot.
    pub fn start(dir: &Path, port: u16) -> FerretInstance {
        let bin = ferretdb_binary().unwrap_or_else(|e| panic!("no FerretDB binary: {e}"));
        let mut inst = FerretInstance {
            bin,
            dir: dir.to_path_buf(),
            proc: ServiceProcess::new("FerretDB", port),
        };
        inst.start_again();
        inst
    }

    /// Start again after [`stop`](Self::stop): same port, same data.
    pub fn start_again(&mut self) {
        // The port may linger for a moment after a stop: retry briefly.
        let (bin, dir) = (&self.bin, &self.dir);
        self.proc.start(Duration::from_secs(10), |port| {
            spawn_ferretdb(bin, dir, port).map_err(|e| match e {
                StartError::PortTaken(text) => {
                    StartError::PortTaken(tail_str(&text, 4000).to_string())
                }
                other => other,
            })
        });
        if let Err(e) = wait_until_answers(&self.uri(), Duration::from_secs(20)) {
            panic!("{e}\n--- FerretDB log ---\n{}", self.log_tail());
        }
    }

    /// Stop it: SIGTERM, then SIGKILL if it has not exited within 10 s.
    /// Returns once the process is gone and the port refuses connections.
    pub fn stop(&mut self) {
        let Some(mut child) = self.proc.take() else {
            return;
        };
        // SAFETY: kill(2) on our own child.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + FERRET_STOP_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
            }
        }
        let addr = self.proc.addr();
        let deadline = Instant::now() + Duration::from_secs(5);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            assert!(
                Instant::now() < deadline,
                "port {} still accepts connections after FerretDB stopped",
                self.port()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn uri(&self) -> String {
        format!("mongodb://127.0.0.1:{}/", self.port())
    }

    pub fn log_tail(&self) -> String {
        log_tail(&self.dir.join("ferretdb.log"), 4000)
    }
}

/// `kill`, `is_running`, `pid`, `port` and `addr` are the process's
/// (`service::ServiceProcess`).
impl std::ops::Deref for FerretInstance {
    type Target = ServiceProcess;
    fn deref(&self) -> &ServiceProcess {
        &self.proc
    }
}

impl std::ops::DerefMut for FerretInstance {
    fn deref_mut(&mut self) -> &mut ServiceProcess {
        &mut self.proc
    }
}

// ---------------------------------------------------------------------------
// Direct access for seeding and checking

/// A sync driver client whose calls fail after `timeout` when the server is
/// unreachable.
pub fn client_with_timeout(uri: &str, timeout: Duration) -> Result<mongodb::sync::Client, String> {
    let mut opts = mongodb::options::ClientOptions::parse(uri)
        .run()
        .map_err(|e| format!("parse {uri}: {e}"))?;
    opts.server_selection_timeout = Some(timeout);
    opts.connect_timeout = Some(timeout);
    mongodb::sync::Client::with_options(opts).map_err(|e| format!("client for {uri}: {e}"))
}

/// A database handle for seeding and inspecting (10 s timeouts).
pub fn database(uri: &str, db: &str) -> mongodb::sync::Database {
    client_with_timeout(uri, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}"))
        .database(db)
}

/// A collection of untyped documents.
pub fn collection(uri: &str, db: &str, name: &str) -> mongodb::sync::Collection<Document> {
    database(uri, db).collection::<Document>(name)
}

/// Every document of a collection matching `filter`, sorted by `sort`.
pub fn find_all(
    coll: &mongodb::sync::Collection<Document>,
    filter: Document,
    sort: Document,
) -> Vec<Document> {
    coll.find(filter)
        .sort(sort)
        .run()
        .unwrap_or_else(|e| panic!("find in {}: {e}", coll.name()))
        .collect::<Result<Vec<_>, _>>()
        .unwrap_or_else(|e| panic!("reading {}: {e}", coll.name()))
}

/// The key documents of a collection's indexes, with their `unique` flag.
pub fn try_index_keys(
    coll: &mongodb::sync::Collection<Document>,
) -> Result<Vec<(Document, bool)>, String> {
    let cursor = coll
        .list_indexes()
        .run()
        .map_err(|e| format!("list_indexes on {}: {e}", coll.name()))?;
    let mut out = Vec::new();
    for m in cursor {
        let m = m.map_err(|e| format!("reading indexes of {}: {e}", coll.name()))?;
        let unique = m.options.as_ref().and_then(|o| o.unique).unwrap_or(false);
        out.push((m.keys, unique));
    }
    Ok(out)
}

/// Like [`try_index_keys`], panicking on failure.
pub fn index_keys(coll: &mongodb::sync::Collection<Document>) -> Vec<(Document, bool)> {
    try_index_keys(coll).unwrap_or_else(|e| panic!("{e}"))
}

/// The field names of an index key document, in order.
pub fn key_fields(keys: &Document) -> Vec<String> {
    keys.keys().cloned().collect()
}

/// What is missing of the indexes the issue asks for: unique
/// `users.username`, unique `rooms.name`, and on `messages` one starting with
/// (room_id, seq) and one starting with (room_id, timestamp). Empty when all
/// are there.
pub fn missing_indexes(db: &mongodb::sync::Database) -> Vec<String> {
    let mut missing = Vec::new();
    let list = |c: &str| try_index_keys(&db.collection::<Document>(c)).unwrap_or_default();
    let users = list("users");
    if !users
        .iter()
        .any(|(k, u)| *u && key_fields(k) == ["username"])
    {
        missing.push(format!("unique users {{username: 1}} (have {users:?})"));
    }
    let rooms = list("rooms");
    if !rooms.iter().any(|(k, u)| *u && key_fields(k) == ["name"]) {
        missing.push(format!("unique rooms {{name: 1}} (have {rooms:?})"));
    }
    let messages = list("messages");
    let starts = |a: &str, b: &str| {
        messages.iter().any(|(k, _)| {
            let f = key_fields(k);
            f.len() >= 2 && f[0] == a && f[1] == b
        })
    };
    if !starts("room_id", "seq") {
        missing.push(format!("messages (room_id, seq) (have {messages:?})"));
    }
    if !starts("room_id", "timestamp") {
        missing.push(format!("messages (room_id, timestamp) (have {messages:?})"));
    }
    missing
}

/// Assert every index of [`missing_indexes`] is there.
pub fn assert_required_indexes(db: &mongodb::sync::Database) {
    let missing = missing_indexes(db);
    assert!(missing.is_empty(), "missing indexes: {missing:#?}");
}

/// A test's own database, dropped (best effort) when the guard goes.
pub struct TestDb {
    pub uri: String,
    pub name: String,
}

impl TestDb {
    /// A fresh database on the shared server.
    pub fn new(tag: &str) -> TestDb {
        TestDb {
            uri: mongo_uri(),
            name: unique_db(tag),
        }
    }

    pub fn db(&self) -> mongodb::sync::Database {
        database(&self.uri, &self.name)
    }

    pub fn coll(&self, name: &str) -> mongodb::sync::Collection<Document> {
        self.db().collection::<Document>(name)
    }

    /// The environment a server needs to use this database.
    pub fn server_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("MONGO_URI", self.uri.clone()),
            ("MONGO_DB", self.name.clone()),
            ("MONGO_TIMEOUT", "2s".to_string()),
        ]
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Ok(c) = client_with_timeout(&self.uri, Duration::from_secs(3)) {
            let _ = c.database(&self.name).drop().run();
        }
    }
}

// ---------------------------------------------------------------------------
// A relay that loses a reply

/// A TCP relay in front of a MongoDB server for the fault tests. It is armed
/// with a plan: commands to wait for, in order, each to be let through or
/// cut. A cut command reaches the server, which does the work, but its reply
/// never comes back: the relay closes that connection instead. Everything
/// not in the plan passes untouched.
///
/// A command is matched by its name and collection as they appear in the
/// OP_MSG body (`{insert: "messages", ...}` is the BSON string element
/// `insert` = `"messages"`). The driver does not compress by default, so the
/// bytes are plain.
pub struct ReplyCutter {
    port: u16,
    plan: Arc<Mutex<Vec<Step>>>,
    cuts: Arc<AtomicUsize>,
}

/// One command of a [`ReplyCutter`]'s plan.
pub enum Step {
    /// Let the next such command through.
    Pass(Vec<u8>),
    /// Let the next such command reach the server and lose its reply.
    Cut(Vec<u8>),
}

impl Step {
    fn bytes(&self) -> &[u8] {
        match self {
            Step::Pass(b) | Step::Cut(b) => b,
        }
    }
}

/// The bytes of a command `{name: "collection", ...}` in a wire message.
pub fn command_bytes(name: &str, collection: &str) -> Vec<u8> {
    let mut b = vec![0x02];
    b.extend_from_slice(name.as_bytes());
    b.push(0);
    b.extend_from_slice(&(collection.len() as i32 + 1).to_le_bytes());
    b.extend_from_slice(collection.as_bytes());
    b.push(0);
    b
}

impl ReplyCutter {
    /// Relay 127.0.0.1:(a free port) to `upstream`. The accepting thread
    /// lives as long as the test process.
    pub fn start(upstream: SocketAddr) -> ReplyCutter {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the relay");
        let port = listener.local_addr().expect("relay address").port();
        let plan: Arc<Mutex<Vec<Step>>> = Arc::default();
        let cuts = Arc::new(AtomicUsize::new(0));
        let (p, c) = (plan.clone(), cuts.clone());
        thread::Builder::new()
            .name("reply-cutter".into())
            .spawn(move || {
                for client in listener.incoming() {
                    let Ok(client) = client else { continue };
                    let Ok(server) = TcpStream::connect_timeout(&upstream, Duration::from_secs(5))
                    else {
                        continue;
                    };
                    relay_pair(client, server, p.clone(), c.clone());
                }
            })
            .expect("start the relay");
        ReplyCutter { port, plan, cuts }
    }

    /// A URI for the store: through the relay, to that one server.
    pub fn uri(&self) -> String {
        format!("mongodb://127.0.0.1:{}/?directConnection=true", self.port)
    }

    /// Wait for these commands, in this order.
    pub fn arm(&self, plan: Vec<Step>) {
        *self.plan.lock().unwrap() = plan;
    }

    /// Replies cut so far.
    pub fn cuts(&self) -> usize {
        self.cuts.load(Ordering::SeqCst)
    }
}

/// One wire message (its length prefix included), or None at end of stream.
fn read_wire_message(r: &mut TcpStream) -> Option<Vec<u8>> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).ok()?;
    let n = i32::from_le_bytes(len);
    if !(16..=64 << 20).contains(&n) {
        return None;
    }
    let mut msg = vec![0u8; n as usize];
    msg[..4].copy_from_slice(&len);
    r.read_exact(&mut msg[4..]).ok()?;
    Some(msg)
}

fn relay_pair(
    client: TcpStream,
    server: TcpStream,
    plan: Arc<Mutex<Vec<Step>>>,
    cuts: Arc<AtomicUsize>,
) {
    let cut_next = Arc::new(AtomicBool::new(false));
    let clones = (
        client.try_clone(),
        client.try_clone(),
        server.try_clone(),
        server.try_clone(),
    );
    let (Ok(mut from_client), Ok(mut to_client), Ok(mut from_server), Ok(mut to_server)) = clones
    else {
        return;
    };
    let cut = cut_next.clone();
    thread::spawn(move || {
        while let Some(msg) = read_wire_message(&mut from_client) {
            {
                let mut plan = plan.lock().unwrap();
                let hit = plan.first().is_some_and(|step| {
                    let want = step.bytes();
                    msg.windows(want.len()).any(|w| w == want)
                });
                if hit && matches!(plan.remove(0), Step::Cut(_)) {
                    // Set before the command goes out, so its reply cannot
                    // overtake the flag.
                    cut.store(true, Ordering::SeqCst);
                }
            }
            if to_server.write_all(&msg).is_err() {
                break;
            }
        }
        let _ = to_server.shutdown(Shutdown::Both);
    });
    thread::spawn(move || {
        while let Some(msg) = read_wire_message(&mut from_server) {
            if cut_next.load(Ordering::SeqCst) {
                cuts.fetch_add(1, Ordering::SeqCst);
                break;
            }
            if to_client.write_all(&msg).is_err() {
                break;
            }
        }
        let _ = to_client.shutdown(Shutdown::Both);
        let _ = from_server.shutdown(Shutdown::Both);
    });
}
