//! WebSocket pieces the reactor uses: the stream adapter that lets tungstenite
//! read from the socket but write into our own queue, server frame encoding,
//! the wire format of chat messages, and the per-connection rate limiter.
//!
//! tungstenite decodes every incoming frame (masking, fragmentation, UTF-8,
//! size limits) and answers pings and close frames. Outgoing data frames are
//! encoded here once per broadcast and shared by every member's queue; the
//! bytes tungstenite writes itself (pongs, close replies) land in the same
//! queue through [`WsIo`], so nothing is ever interleaved on the socket.

use std::io::{self, Read, Write};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mio::net::TcpStream;
use serde::Serialize;
use tungstenite::protocol::WebSocketConfig;

use crate::outbuf::OutBuf;
use crate::store::{Millis, StoredMessage};
use crate::ws_input::InputTally;

/// Initial read buffer of a WebSocket. It grows for a large frame; idle
/// connections keep only this much.
pub const READ_BUFFER: usize = 512;

/// What tungstenite sees as its stream.
pub struct WsIo {
    pub sock: TcpStream,
    pub out: OutBuf,
    /// What tungstenite holds of the input (`crate::ws_input`).
    pub input: InputTally,
}

impl WsIo {
    /// The stream of a connection just upgraded; `early` is what the client
    /// sent after its upgrade request, which tungstenite is given first.
    pub fn new(sock: TcpStream, out: OutBuf, early: &[u8]) -> WsIo {
        let mut input = InputTally::default();
        input.fed(early);
        WsIo { sock, out, input }
    }
}

impl Read for WsIo {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.sock.read(buf)?;
        self.input.fed(&buf[..n]);
        Ok(n)
    }
}

impl Write for WsIo {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.out.push_bytes(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// tungstenite settings sized for many idle sockets: a small read buffer,
/// and no write buffering of its own (we queue frames ourselves).
pub fn config(max_message: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(0)
        .max_write_buffer_size(usize::MAX)
        .max_message_size(Some(max_message))
        .max_frame_size(Some(max_message))
}

pub const OP_TEXT: u8 = 0x1;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;

/// One unfragmented, unmasked server frame.
pub fn encode_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 10);
    encode_frame_into(&mut out, opcode, payload);
    out
}

pub fn encode_frame_into(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    out.push(0x80 | opcode);
    let len = payload.len();
    if len < 126 {
        out.push(len as u8);
    } else if len <= u16::MAX as usize {
        out.push(126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(payload);
}

/// A close frame with a code and a reason (cut to the 123 bytes allowed).
pub fn close_frame(code: u16, reason: &str) -> Vec<u8> {
    let mut payload = code.to_be_bytes().to_vec();
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    encode_frame(OP_CLOSE, &payload)
}

/// An empty server ping.
pub const PING_FRAME: [u8; 2] = [0x80 | OP_PING, 0];

/// Close codes the server sends.
pub mod close {
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL: u16 = 1002;
    pub const UNSUPPORTED: u16 = 1003;
    pub const INVALID_DATA: u16 = 1007;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const INTERNAL: u16 = 1011;
    pub const ROOM_DELETED: u16 = 4404;
}

/// A chat message as clients see it, over WebSocket and REST alike.
#[derive(Serialize)]
pub struct WireMessage<'a> {
    pub room_id: &'a str,
    pub username: &'a str,
    pub content: &'a str,
    pub timestamp: String,
    pub seq: i64,
}

impl<'a> From<&'a StoredMessage> for WireMessage<'a> {
    fn from(m: &'a StoredMessage) -> Self {
        WireMessage {
            room_id: &m.room_id,
            username: &m.username,
            content: &m.content,
            timestamp: rfc3339_millis(m.timestamp),
            seq: m.seq,
        }
    }
}

/// The text frame carrying `m`.
pub fn message_frame_into(out: &mut Vec<u8>, m: &StoredMessage) {
    let json = serde_json::to_vec(&WireMessage::from(m)).unwrap_or_default();
    encode_frame_into(out, OP_TEXT, &json);
}

/// The error frame sent to one client: `{"error": ..., "code": ...}`.
pub fn error_frame(code: &str, text: &str) -> Vec<u8> {
    let json =
        serde_json::to_vec(&serde_json::json!({ "error": text, "code": code })).unwrap_or_default();
    encode_frame(OP_TEXT, &json)
}

/// The `Sec-WebSocket-Accept` answer for a client key.
pub fn accept_key(key: &str) -> String {
    tungstenite::handshake::derive_accept_key(key.as_bytes())
}

/// Now, in milliseconds since the epoch.
pub fn now_millis() -> Millis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as Millis)
        .unwrap_or(0)
}

/// `2025-11-21T12:00:00.123Z`.
pub fn rfc3339_millis(ms: Millis) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

/// `2025-11-21T12:00:00Z`.
pub fn rfc3339_seconds(ms: Millis) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// A token bucket: `rate` messages per second, up to `burst` at once.
pub struct Bucket {
    tokens: f32,
    last: Instant,
}

impl Bucket {
    pub fn new(burst: f64, now: Instant) -> Bucket {
        Bucket {
            tokens: burst as f32,
            last: now,
        }
    }

    /// Take one token if there is one. A rate of 0 means no limit.
    pub fn allow(&mut self, now: Instant, rate: f64, burst: f64) -> bool {
        if rate <= 0.0 {
            return true;
        }
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens as f64 + elapsed * rate).min(burst.max(1.0)) as f32;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_lengths() {
        assert_eq!(encode_frame(OP_TEXT, b"hi"), vec![0x81, 2, b'h', b'i']);
        let mid = encode_frame(OP_TEXT, &[0u8; 300]);
        assert_eq!(&mid[..4], &[0x81, 126, 1, 44]);
        let big = encode_frame(OP_TEXT, &vec![0u8; 70_000]);
        assert_eq!(big[1], 127);
        assert_eq!(big.len(), 70_000 + 10);
        let c = close_frame(4404, "room deleted");
        assert_eq!(&c[..4], &[0x88, 14, 0x11, 0x34]);
    }

    #[test]
    fn times() {
        assert_eq!(
            rfc3339_millis(1_763_726_400_123),
            "2025-11-21T12:00:00.123Z"
        );
        assert_eq!(rfc3339_seconds(1_763_726_400_123), "2025-11-21T12:00:00Z");
    }

    #[test]
    fn bucket_limits_and_refills() {
        let t0 = Instant::now();
        let mut b = Bucket::new(3.0, t0);
        assert!((0..3).all(|_| b.allow(t0, 10.0, 3.0)));
        assert!(!b.allow(t0, 10.0, 3.0));
        assert!(b.allow(t0 + Duration::from_millis(150), 10.0, 3.0));
        assert!(b.allow(t0, 0.0, 3.0));
    }
}
