//! How many bytes of a WebSocket's input tungstenite is holding.
//!
//! tungstenite reads the socket itself (through `WsIo`) and keeps what it
//! read until it has a whole message: a frame that is still arriving, the
//! fragments of a message, frames read ahead. It does not say how much that
//! is, and the memory budget needs an exact count. So the bytes it reads are
//! also passed through [`InputTally`], which finds the frame boundaries in
//! them (headers only; payloads are skipped by length) and knows which frame
//! ends a message tungstenite hands back: a control frame, or a data frame
//! with FIN. Each message the reactor takes releases the frames up to and
//! including the one that ended it.
//!
//! Used by `WsIo::read` (bytes in) and by `reactor::ws_conn` (a message out).

use std::collections::VecDeque;

/// A client frame's header is at most 14 bytes: 2, 8 of extended length,
/// 4 of mask.
const MAX_HEADER: usize = 14;

/// The count for one connection. An idle connection (nothing held) keeps
/// no state: one pointer, so that idle sockets stay small.
#[derive(Default)]
pub struct InputTally {
    state: Option<Box<Tally>>,
}

impl InputTally {
    /// Bytes tungstenite holds.
    pub fn held(&self) -> usize {
        self.state.as_ref().map_or(0, |t| t.held)
    }

    /// Bytes just handed to tungstenite.
    pub fn fed(&mut self, bytes: &[u8]) {
        if !bytes.is_empty() {
            self.state.get_or_insert_default().fed(bytes);
        }
    }

    /// tungstenite handed back a message: release the frames it was made of.
    pub fn message_taken(&mut self) {
        if let Some(t) = &mut self.state {
            t.message_taken();
            // Nothing held means no partial frame either: back to idle.
            if t.held == 0 {
                self.state = None;
            }
        }
    }
}

#[derive(Default)]
struct Tally {
    /// Bytes read and not yet released.
    held: usize,
    /// Bytes of each message read whole (its frames), oldest first:
    /// released one per message taken.
    messages: VecDeque<usize>,
    /// Whole data frames read since the last one with FIN.
    run: usize,
    /// The header being read.
    header: [u8; MAX_HEADER],
    header_len: usize,
    /// Payload bytes of the current frame still to come, once its header
    /// is complete.
    payload_left: u64,
    /// The current frame's size so far, its FIN bit, and whether it is a
    /// control frame (opcode 8 and up).
    frame_size: usize,
    fin: bool,
    control: bool,
    in_payload: bool,
}

impl Tally {
    fn fed(&mut self, mut bytes: &[u8]) {
        self.held += bytes.len();
        while !bytes.is_empty() {
            if self.in_payload {
                let take = (bytes.len() as u64).min(self.payload_left) as usize;
                self.payload_left -= take as u64;
                self.frame_size += take;
                bytes = &bytes[take..];
                if self.payload_left == 0 {
                    self.frame_done();
                }
                continue;
            }
            self.header[self.header_len] = bytes[0];
            self.header_len += 1;
            self.frame_size += 1;
            bytes = &bytes[1..];
            if let Some(payload) = self.header_complete() {
                self.in_payload = true;
                self.payload_left = payload;
                if payload == 0 {
                    self.frame_done();
                }
            }
        }
    }

    fn message_taken(&mut self) {
        if let Some(n) = self.messages.pop_front() {
            self.held -= n;
        }
    }

    /// The payload length once the header is whole.
    fn header_complete(&mut self) -> Option<u64> {
        let h = &self.header[..self.header_len];
        if h.len() < 2 {
            return None;
        }
        let masked = h[1] & 0x80 != 0;
        let (ext, len7) = match h[1] & 0x7f {
            126 => (2, None),
            127 => (8, None),
            n => (0, Some(u64::from(n))),
        };
        let need = 2 + ext + if masked { 4 } else { 0 };
        if h.len() < need {
            return None;
        }
        let len = len7.unwrap_or_else(|| {
            h[2..2 + ext]
                .iter()
                .fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
        });
        self.control = h[0] & 0x08 != 0;
        self.fin = h[0] & 0x80 != 0;
        Some(len)
    }

    /// A control frame is a message of its own, even between the fragments
    /// of a data message (which tungstenite keeps until the last one).
    fn frame_done(&mut self) {
        if self.control {
            self.messages.push_back(self.frame_size);
        } else {
            self.run += self.frame_size;
            if self.fin {
                self.messages.push_back(self.run);
                self.run = 0;
            }
        }
        self.frame_size = 0;
        self.header_len = 0;
        self.in_payload = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked client frame.
    fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![if fin { 0x80 } else { 0 } | opcode];
        let n = payload.len();
        if n < 126 {
            f.push(0x80 | n as u8);
        } else if n <= 0xffff {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        } else {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
        f.extend_from_slice(&[1, 2, 3, 4]);
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn whole_messages_are_released_one_by_one() {
        let mut t = InputTally::default();
        assert!(t.state.is_none());
        let a = frame(true, 1, b"hello");
        let b = frame(true, 1, &[b'x'; 300]);
        let ping = frame(true, 9, b"");
        let mut all = [a.clone(), b.clone(), ping.clone()].concat();
        let partial = frame(true, 1, &[b'y'; 70_000]);
        all.extend_from_slice(&partial[..1000]);
        // Fed in awkward pieces: boundaries fall inside headers and payloads.
        for piece in all.chunks(7) {
            t.fed(piece);
        }
        assert_eq!(t.held(), all.len());
        t.message_taken();
        assert_eq!(t.held(), all.len() - a.len());
        t.message_taken();
        t.message_taken();
        assert_eq!(t.held(), 1000);
        t.fed(&partial[1000..]);
        t.message_taken();
        assert_eq!(t.held(), 0);
        assert!(t.state.is_none(), "an idle connection keeps no state");
    }

    #[test]
    fn fragments_count_until_the_message_ends() {
        let mut t = InputTally::default();
        let first = frame(false, 1, b"par");
        let ping = frame(true, 9, b"p");
        let mid = frame(false, 0, b"ti");
        let last = frame(true, 0, b"al");
        for f in [&first, &ping, &mid, &last] {
            t.fed(f);
        }
        // The ping comes back first; the fragments stay held until the
        // message they make is taken.
        t.message_taken();
        assert_eq!(t.held(), first.len() + mid.len() + last.len());
        t.message_taken();
        assert_eq!(t.held(), 0);
    }
}
