//! A lean WebSocket client for load generation (and the load smoke test).
//!
//! It speaks just enough of RFC 6455 for a chat client: the upgrade request,
//! masked text frames out, unmasked frames in (text, close, ping), with one
//! read buffer per connection and no task or allocation per frame. Frames
//! are parsed straight out of the read buffer, so one `read` that brings a
//! hundred frames costs one syscall and a hundred cheap header decodes.
//!
//! Everything is bounded: the upgrade answer must fit in 16 KiB, a frame
//! in 16 MiB, and callers wrap every await in a timeout.

#![allow(dead_code)]

use std::io;
use std::net::SocketAddr;
use std::sync::LazyLock;

use memchr::memmem;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Largest upgrade answer accepted.
const MAX_HEAD: usize = 16 * 1024;
/// Largest frame accepted.
const MAX_FRAME: usize = 16 << 20;
/// Bytes asked of the kernel per read.
const READ_CHUNK: usize = 64 * 1024;

/// `CLOCK_MONOTONIC` in nanoseconds: the same clock in every process of the
/// machine, so a send time written by one process can be compared with a
/// receive time taken in another.
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own; CLOCK_MONOTONIC
    // always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Percent-encode a path segment or query value (all but unreserved bytes).
pub fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// The path of a chat WebSocket: `/ws/{room}?username={user}`.
pub fn ws_path(room: &str, user: &str) -> String {
    format!("/ws/{}?username={}", enc(room), enc(user))
}

/// An upgrade answered with something else than `101`: the answer's status
/// code (0 when the status line could not be read) and its status line. It
/// travels inside the `io::Error` of `connect`; `refused_status` finds it.
#[derive(Debug)]
pub struct Refused {
    pub status: u16,
    pub line: String,
}

impl Refused {
    fn from_status_line(line: &str) -> Refused {
        let status = line
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        Refused {
            status,
            line: line.to_string(),
        }
    }
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "upgrade refused: {}", self.line)
    }
}

impl std::error::Error for Refused {}

/// The status code of an upgrade the server refused (any answer but `101`),
/// or `None` when `e` is another kind of failure (connect, reset, EOF).
pub fn refused_status(e: &io::Error) -> Option<u16> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<Refused>())
        .map(|r| r.status)
}

/// One frame decoded from the read buffer.
pub struct Frame<'a> {
    pub opcode: u8,
    pub payload: &'a [u8],
}

/// A connected, upgraded WebSocket.
pub struct WsConn {
    pub stream: TcpStream,
    buf: Vec<u8>,
    pos: usize,
    mask: u32,
    /// Close code received from the server, if any.
    pub close_code: Option<u16>,
}

/// Connect to `addr` and upgrade `path`. Bytes that follow the `101` answer
/// (the server may send history at once) stay in the read buffer.
pub async fn connect(addr: SocketAddr, path: &str) -> io::Result<WsConn> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let mut conn = WsConn {
        stream,
        buf: Vec::with_capacity(4096),
        pos: 0,
        mask: 0x9e37_79b9 ^ (mono_ns() as u32),
        close_code: None,
    };
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    conn.stream.write_all(req.as_bytes()).await?;
    loop {
        if let Some(end) = find(&conn.buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&conn.buf[..end]).into_owned();
            let status = head.lines().next().unwrap_or("").to_string();
            if !status.starts_with("HTTP/1.1 101") {
                return Err(io::Error::other(Refused::from_status_line(&status)));
            }
            conn.pos = end + 4;
            return Ok(conn);
        }
        if conn.buf.len() >= MAX_HEAD {
            return Err(io::Error::other("upgrade answer too long"));
        }
        conn.buf.reserve(4096);
        let n = conn.stream.read_buf(&mut conn.buf).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed during the upgrade",
            ));
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    memmem::find(hay, needle)
}

/// Append one masked client frame to `out`.
pub fn encode_client_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8], mask: [u8; 4]) {
    out.push(0x80 | opcode);
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= u16::MAX as usize {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
}

impl WsConn {
    fn next_mask(&mut self) -> [u8; 4] {
        // xorshift: masks must vary, they need not be secret here.
        let mut x = self.mask;
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        self.mask = x;
        x.to_le_bytes()
    }

    /// Send one frame (masked, as a client must).
    pub async fn send(&mut self, opcode: u8, payload: &[u8]) -> io::Result<()> {
        let mut out = Vec::with_capacity(payload.len() + 14);
        let mask = self.next_mask();
        encode_client_frame(&mut out, opcode, payload, mask);
        self.stream.write_all(&out).await
    }

    pub async fn send_text(&mut self, text: &str) -> io::Result<()> {
        self.send(OP_TEXT, text.as_bytes()).await
    }

    /// Send a close frame with `code` (best effort).
    pub async fn close(&mut self, code: u16) -> io::Result<()> {
        self.send(OP_CLOSE, &code.to_be_bytes()).await
    }

    /// Read more bytes into the buffer. `Ok(0)` means the peer closed.
    pub async fn fill(&mut self) -> io::Result<usize> {
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        } else if self.pos > 0
            && (self.pos >= READ_CHUNK || self.buf.capacity() - self.buf.len() < 1024)
        {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.reserve(READ_CHUNK.min(MAX_FRAME));
        self.stream.read_buf(&mut self.buf).await
    }

    /// Free the read buffer when nothing is pending in it (idle sockets).
    pub fn release(&mut self) {
        if self.pos == self.buf.len() {
            self.buf = Vec::new();
            self.pos = 0;
        }
    }

    /// The next complete frame in the buffer, if any. An error means the
    /// stream cannot be decoded (oversized or fragmented frame).
    pub fn next_frame(&mut self) -> io::Result<Option<Frame<'_>>> {
        let b = &self.buf[self.pos..];
        if b.len() < 2 {
            return Ok(None);
        }
        let fin = b[0] & 0x80 != 0;
        let opcode = b[0] & 0x0f;
        let masked = b[1] & 0x80 != 0;
        let (len, mut at) = match b[1] & 0x7f {
            126 => {
                if b.len() < 4 {
                    return Ok(None);
                }
                (u16::from_be_bytes([b[2], b[3]]) as usize, 4)
            }
            127 => {
                if b.len() < 10 {
                    return Ok(None);
                }
                let mut l = [0u8; 8];
                l.copy_from_slice(&b[2..10]);
                let l = u64::from_be_bytes(l);
                if l > MAX_FRAME as u64 {
                    return Err(io::Error::other("frame too large"));
                }
                (l as usize, 10)
            }
            n => (n as usize, 2),
        };
        if !fin || opcode == 0 {
            return Err(io::Error::other("fragmented frames are not expected"));
        }
        if len > MAX_FRAME {
            return Err(io::Error::other("frame too large"));
        }
        let mut key = [0u8; 4];
        if masked {
            if b.len() < at + 4 {
                return Ok(None);
            }
            key.copy_from_slice(&b[at..at + 4]);
            at += 4;
        }
        if b.len() < at + len {
            return Ok(None);
        }
        let start = self.pos + at;
        self.pos = start + len;
        if masked {
            for (i, x) in self.buf[start..start + len].iter_mut().enumerate() {
                *x ^= key[i & 3];
            }
        }
        if opcode == OP_CLOSE && len >= 2 {
            self.close_code = Some(u16::from_be_bytes([self.buf[start], self.buf[start + 1]]));
        }
        Ok(Some(Frame {
            opcode,
            payload: &self.buf[start..start + len],
        }))
    }
}

/// Fields of a chat message frame, found without a JSON parser: the server
/// writes `{"room_id":..,"username":..,"content":"..",..,"seq":N}` and the
/// load generator's contents never need escaping.
pub fn field_str<'a>(json: &'a [u8], name: &str) -> Option<&'a [u8]> {
    let at = if name == "content" {
        // The hot case (every delivery): a searcher built once, not per call.
        static CONTENT: LazyLock<memmem::Finder<'static>> =
            LazyLock::new(|| memmem::Finder::new(b"\"content\":\"").into_owned());
        CONTENT.find(json)? + CONTENT.needle().len()
    } else {
        let key = format!("\"{name}\":\"");
        find(json, key.as_bytes())? + key.len()
    };
    let rest = &json[at..];
    let end = memchr::memchr(b'"', rest)?;
    Some(&rest[..end])
}

/// The `seq` number of a message frame (the server writes it last).
pub fn field_seq(json: &[u8]) -> Option<i64> {
    const KEY: &[u8] = b"\"seq\":";
    // Usually the last `:` of the frame is seq's own; anything else (a frame
    // from another writer) takes the general search from the end.
    let at = match memchr::memrchr(b':', json) {
        Some(c) if json[..=c].ends_with(KEY) => c + 1,
        _ => memmem::rfind(json, KEY)? + KEY.len(),
    };
    let rest = &json[at..];
    let (neg, digits) = match rest.first() {
        Some(b'-') => (true, &rest[1..]),
        _ => (false, rest),
    };
    let n = digits.iter().take_while(|c| c.is_ascii_digit()).count();
    if n == 0 || n > 18 {
        return None;
    }
    let v = digits[..n]
        .iter()
        .fold(0i64, |v, c| v * 10 + i64::from(c - b'0'));
    Some(if neg { -v } else { v })
}
