//! A keep-alive HTTP/1.1 client, just enough for the coordinator's own
//! requests: `POST /register` and `/login` (login scenario), `GET /rooms`
//! (rest scenario, when wrk is not installed), and `repeat`, the request
//! loops both scenarios load the server with.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::hist::Hist;
use crate::ws_client::mono_ns;

/// A keep-alive HTTP/1.1 client connection.
pub struct Http {
    stream: tokio::net::TcpStream,
    buf: Vec<u8>,
    host: String,
}

impl Http {
    pub async fn connect(addr: SocketAddr) -> std::io::Result<Http> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Http {
            stream,
            buf: Vec::with_capacity(4096),
            host: addr.to_string(),
        })
    }

    /// One request; the answer's status and body. `Err` if the connection
    /// broke (the caller reconnects).
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> std::io::Result<(u16, Vec<u8>)> {
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\n", self.host);
        if let Some(b) = body {
            req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                b.len()
            ));
        }
        req.push_str("\r\n");
        if let Some(b) = body {
            req.push_str(b);
        }
        self.stream.write_all(req.as_bytes()).await?;
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut resp = httparse::Response::new(&mut headers);
            match resp.parse(&self.buf) {
                Ok(httparse::Status::Complete(head)) => {
                    let status = resp.code.unwrap_or(0);
                    let len = resp
                        .headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                        .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse().ok())
                        .unwrap_or(0usize);
                    let close = resp.headers.iter().any(|h| {
                        h.name.eq_ignore_ascii_case("connection")
                            && h.value.eq_ignore_ascii_case(b"close")
                    });
                    while self.buf.len() < head + len {
                        self.read_more().await?;
                    }
                    let body = self.buf[head..head + len].to_vec();
                    self.buf.drain(..head + len);
                    if close {
                        let _ = self.stream.shutdown().await;
                    }
                    return Ok((status, body));
                }
                Ok(httparse::Status::Partial) => {
                    if self.buf.len() > 64 * 1024 {
                        return Err(std::io::Error::other("response head too long"));
                    }
                    self.read_more().await?;
                }
                Err(e) => return Err(std::io::Error::other(format!("bad response: {e}"))),
            }
        }
    }

    async fn read_more(&mut self) -> std::io::Result<()> {
        self.buf.reserve(16 * 1024);
        if self.stream.read_buf(&mut self.buf).await? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed",
            ));
        }
        Ok(())
    }
}

/// One request on a connection of its own, answered within 30 s.
pub async fn http_once(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<(u16, Vec<u8>), String> {
    let fut = async {
        let mut h = Http::connect(addr).await?;
        h.request(method, path, body).await
    };
    match tokio::time::timeout(Duration::from_secs(30), fut).await {
        Ok(r) => r.map_err(|e| format!("{method} {path}: {e}")),
        Err(_) => Err(format!("{method} {path}: no answer within 30 s")),
    }
}

/// One request that `repeat` sends again and again.
pub struct Request {
    pub method: &'static str,
    pub path: &'static str,
    pub body: Option<String>,
    /// Longest wait for one answer.
    pub limit: Duration,
}

/// What the loops of `repeat` got: answers 200 with their latency (µs),
/// and the requests that failed or were answered otherwise.
#[derive(Default)]
pub struct Tally {
    pub ok: u64,
    pub failed: u64,
    pub hist: Hist,
}

/// `conns` loops, each on a keep-alive connection of its own, sending `req`
/// as soon as the last answer came, for `secs`. A loop reconnects when its
/// connection breaks or a connect fails (5 s at most, then 50 ms apart).
pub fn repeat(
    rt: &tokio::runtime::Runtime,
    addr: SocketAddr,
    req: Request,
    conns: usize,
    secs: f64,
) -> Tally {
    let local = tokio::task::LocalSet::new();
    let req = Rc::new(req);
    let tally = Rc::new(RefCell::new(Tally::default()));
    let end = tokio::time::Instant::now() + Duration::from_secs_f64(secs);
    local.block_on(rt, async {
        let mut hs = Vec::new();
        for _ in 0..conns {
            hs.push(tokio::task::spawn_local(request_loop(
                addr,
                req.clone(),
                end,
                tally.clone(),
            )));
        }
        for h in hs {
            let _ = h.await;
        }
    });
    tally.take()
}

async fn request_loop(
    addr: SocketAddr,
    req: Rc<Request>,
    end: tokio::time::Instant,
    tally: Rc<RefCell<Tally>>,
) {
    let mut conn: Option<Http> = None;
    while tokio::time::Instant::now() < end {
        let mut h = match conn.take() {
            Some(h) => h,
            None => match tokio::time::timeout(Duration::from_secs(5), Http::connect(addr)).await {
                Ok(Ok(h)) => h,
                _ => {
                    tally.borrow_mut().failed += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let t = mono_ns();
        let r = tokio::time::timeout(
            req.limit,
            h.request(req.method, req.path, req.body.as_deref()),
        )
        .await;
        let mut s = tally.borrow_mut();
        match r {
            Ok(Ok((200, _))) => {
                s.ok += 1;
                s.hist.record((mono_ns() - t) / 1000);
                conn = Some(h);
            }
            Ok(Ok(_)) => {
                s.failed += 1;
                conn = Some(h);
            }
            _ => s.failed += 1,
        }
    }
}
