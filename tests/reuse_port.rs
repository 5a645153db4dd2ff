//! `REUSE_PORT`: several server processes listening on one HOST:PORT
//! (SO_REUSEPORT), as `scripts/cluster.sh` runs them, with the kernel
//! spreading connections over them; and a port taken by a process that did
//! not ask to share it refusing the newcomer with a clear error.

mod common;

use std::collections::HashMap;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::service::free_port;
use common::*;

const HEALTHZ: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n";

/// The process among `pids` holding the server end of the connection
/// `client` made to `server_port` on 127.0.0.1, found through
/// `/proc/net/tcp` (the socket's inode) and `/proc/PID/fd`.
fn owner_of(server_port: u16, client: &TcpStream, pids: &[u32]) -> Option<u32> {
    let client_port = client.local_addr().ok()?.port();
    let port_of = |field: &str| {
        let hex = field.rsplit(':').next()?;
        u16::from_str_radix(hex, 16).ok()
    };
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let inode = table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let ours = f.len() > 9
            && port_of(f[1]) == Some(server_port)
            && port_of(f[2]) == Some(client_port)
            && f[9] != "0";
        ours.then(|| f[9].to_string())
    })?;
    let link = format!("socket:[{inode}]");
    pids.iter().copied().find(|pid| {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t.to_str() == Some(&link)))
    })
}

fn assert_healthz(c: &mut RawHttp, what: &str) {
    c.send(HEALTHZ);
    let r = c
        .read_response(WAIT)
        .unwrap_or_else(|e| panic!("{what}: /healthz: {e}"));
    assert_eq!(r.status, 200, "{what}: /healthz: {r:?}");
    assert_eq!(r.json()["status"], "ok", "{what}: {r:?}");
}

#[test]
fn two_servers_with_reuse_port_share_one_port() {
    let port = free_port();
    let port_s = port.to_string();
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let data = data.to_str().expect("utf-8 path");
    let env = [
        ("PORT", port_s.as_str()),
        ("REUSE_PORT", "true"),
        ("DATA_DIR", data),
        ("TOKEN_SECRET", "one secret for both processes"),
    ];
    let mut a = Server::start_with(&env);
    let b = Server::start_with(&env);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    assert_eq!(a.addr(), addr, "{}", a.log_text());
    assert_eq!(b.addr(), addr, "{}", b.log_text());
    let pids = [a.pid(), b.pid()];

    // Connections to the port reach both processes, and both answer. Each
    // connection is kept open until the end, so that its server end can be
    // found; the kernel picks the process by a hash of the connection's
    // addresses, so 64 connections all landing on one is a 1 in 2^63 event.
    let mut answered: HashMap<u32, usize> = HashMap::new();
    let mut held = Vec::new();
    for i in 0..64 {
        let mut c = RawHttp::connect(addr);
        assert_healthz(&mut c, &format!("connection {i}"));
        let owner = owner_of(port, &c.stream, &pids)
            .unwrap_or_else(|| panic!("connection {i}: neither {pids:?} holds its server end"));
        *answered.entry(owner).or_default() += 1;
        held.push(c);
        if answered.len() == 2 && held.len() >= 8 {
            break;
        }
    }
    assert_eq!(
        answered.len(),
        2,
        "every connection went to one process: {answered:?}\n--- a ---\n{}\n--- b ---\n{}",
        a.log_text(),
        b.log_text()
    );
    // A connection stays with its process: ask each again.
    for c in &mut held {
        assert_healthz(c, "a kept connection");
    }
    drop(held);

    // One process stopping leaves the port to the other.
    a.sigterm();
    let status = a.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "exit {status}\n{}", a.log_text());
    for i in 0..8 {
        let mut c = RawHttp::connect(addr);
        assert_healthz(&mut c, &format!("after the stop, connection {i}"));
        assert_eq!(owner_of(port, &c.stream, &pids), Some(pids[1]));
    }
}

/// Starts a server on `port` with `env` and expects it to refuse to start
/// because the port is taken; returns what it printed.
fn refused_start(port: u16, env: &[(&str, &str)]) -> String {
    let port_s = port.to_string();
    let mut all = vec![("PORT", port_s.as_str())];
    all.extend_from_slice(env);
    let (status, out, err) = run_binary(&[], &all, Duration::from_secs(20));
    let text = format!("{out}{err}");
    assert!(!status.success(), "started on a taken port:\n{text}");
    assert!(!text.contains("listening on"), "{text}");
    assert!(text.contains("cannot listen"), "{text}");
    assert!(
        text.contains(&format!("127.0.0.1:{port} is already in use")),
        "{text}"
    );
    text
}

#[test]
fn a_server_without_reuse_port_on_a_taken_port_fails_to_start() {
    let port = free_port();
    let port_s = port.to_string();
    let holder = Server::start_with(&[("PORT", &port_s), ("REUSE_PORT", "true")]);
    assert_eq!(holder.addr().port(), port);

    let text = refused_start(port, &[]);
    assert!(
        text.contains("every process sharing a port needs REUSE_PORT=true"),
        "{text}"
    );
    // The holder is not disturbed.
    assert_eq!(holder.get("/healthz").status, 200);
}

#[test]
fn reuse_port_cannot_take_a_port_held_without_it() {
    let port = free_port();
    let port_s = port.to_string();
    let holder = Server::start_with(&[("PORT", &port_s), ("REUSE_PORT", "false")]);
    assert_eq!(holder.addr().port(), port);

    let text = refused_start(port, &[("REUSE_PORT", "true")]);
    assert!(text.contains("did not set REUSE_PORT=true"), "{text}");
    assert_eq!(holder.get("/healthz").status, 200);
}

#[test]
fn an_invalid_reuse_port_value_is_refused_at_start() {
    let (status, out, err) = run_binary(&[], &[("REUSE_PORT", "maybe")], Duration::from_secs(20));
    let text = format!("{out}{err}");
    assert!(!status.success(), "started with REUSE_PORT=maybe:\n{text}");
    assert!(
        text.contains("REUSE_PORT") || text.contains("--reuse-port"),
        "{text}"
    );
    assert!(text.contains("maybe"), "{text}");
}
