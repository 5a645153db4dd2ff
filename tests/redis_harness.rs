//! The Redis test harness (`tests/common/redis.rs`) against a real
//! `redis-server`: it starts on a free port and answers, its raw RESP client
//! reads every kind of reply, a kill takes it away and `start_again` brings
//! it back on the same port, and dropping it ends the process.

mod common;

use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use common::redis::*;

#[test]
fn starts_on_a_free_port_and_answers() {
    let redis = Redis::start();
    assert_ne!(redis.port(), 0);
    assert_eq!(redis.url(), format!("redis://127.0.0.1:{}", redis.port()));
    assert!(ping(redis.addr()), "no PONG\n{}", redis.log_tail());
    assert_eq!(redis.cmd(&["PING"]), "+PONG\r\n");
    assert_eq!(redis.cmd(&["SET", "k", "v a l"]), "+OK\r\n");
    assert_eq!(redis.cmd(&["GET", "k"]), "$5\r\nv a l\r\n");
    assert_eq!(redis.cmd(&["GET", "missing"]), "$-1\r\n");
    assert_eq!(redis.cmd(&["INCR", "n"]), ":1\r\n");
    assert!(redis.cmd(&["NOSUCHCOMMAND"]).starts_with("-ERR"));
    assert_eq!(
        redis.cmd(&["PUBSUB", "NUMSUB", "x"]),
        "*2\r\n$1\r\nx\r\n:0\r\n"
    );
    // Nothing on disk: the tests' Redis keeps its data in memory only.
    let save = redis.cmd(&["CONFIG", "GET", "save"]);
    assert_eq!(save, "*2\r\n$4\r\nsave\r\n$0\r\n\r\n");
    let aof = redis.cmd(&["CONFIG", "GET", "appendonly"]);
    assert_eq!(aof, "*2\r\n$10\r\nappendonly\r\n$2\r\nno\r\n");
}

#[test]
fn two_instances_get_different_ports() {
    let a = Redis::start();
    let b = Redis::start();
    assert_ne!(a.port(), b.port());
    a.cmd(&["SET", "who", "a"]);
    assert_eq!(b.cmd(&["GET", "who"]), "$-1\r\n");
}

#[test]
fn a_subscriber_sees_what_is_published() {
    let redis = Redis::start();
    let mut sub = Subscriber::new(redis.addr(), &["chat"]);
    assert_eq!(
        redis.cmd(&["PUBSUB", "NUMSUB", "chat"]),
        "*2\r\n$4\r\nchat\r\n:1\r\n"
    );
    assert_eq!(redis.cmd(&["PUBLISH", "chat", "hello"]), ":1\r\n");
    let push = sub.next_raw(Duration::from_secs(5)).expect("a message");
    assert_eq!(push, "*3\r\n$7\r\nmessage\r\n$4\r\nchat\r\n$5\r\nhello\r\n");
}

#[test]
fn kill_then_start_again_on_the_same_port() {
    let mut redis = Redis::start();
    let port = redis.port();
    let first_pid = redis.pid().expect("running");
    redis.cmd(&["SET", "k", "before"]);

    redis.kill();
    assert!(!redis.is_running());
    assert!(redis.pid().is_none());
    assert!(!ping(redis.addr()), "PONG after the kill");
    assert!(
        TcpStream::connect_timeout(&redis.addr(), Duration::from_secs(1)).is_err(),
        "port {port} still accepts connections after the kill"
    );
    assert!(redis.try_cmd(&["PING"]).is_err());
    assert!(!Path::new(&format!("/proc/{first_pid}")).exists());

    redis.start_again();
    assert_eq!(redis.port(), port);
    assert!(redis.is_running());
    assert_ne!(redis.pid(), Some(first_pid));
    assert_eq!(redis.cmd(&["PING"]), "+PONG\r\n");
    // A crash loses everything: nothing was saved.
    assert_eq!(redis.cmd(&["GET", "k"]), "$-1\r\n");

    // And once more, to be sure a restart leaves it restartable.
    redis.kill();
    redis.start_again();
    assert_eq!(redis.port(), port);
    assert_eq!(redis.cmd(&["PING"]), "+PONG\r\n");
}

#[test]
fn drop_kills_the_process() {
    let redis = Redis::start();
    let pid = redis.pid().expect("running");
    let addr = redis.addr();
    let dir = redis.dir().to_path_buf();
    drop(redis);
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "pid {pid} lives on"
    );
    assert!(!ping(addr), "something still answers on {addr}");
    assert!(!dir.exists(), "{} was left behind", dir.display());
}

#[test]
fn a_missing_redis_server_is_a_clear_error() {
    let empty = tempfile::tempdir().expect("temp dir");
    let err = find_redis_server(Some(empty.path().as_os_str().to_owned()))
        .expect_err("no redis-server in an empty directory");
    assert!(err.contains("scripts/test.sh"), "{err}");
    assert!(err.contains("redis-server"), "{err}");
    assert!(find_redis_server(None).is_err());
}
