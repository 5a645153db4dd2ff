//! A connection's unsent bytes.
//!
//! Chunks are reference-counted so that one encoded broadcast frame is queued
//! to every member of a room without a copy. Writes are vectored: one `writev`
//! sends as many queued chunks as the socket takes. An empty queue holds no
//! heap memory, which keeps idle connections small.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};
use std::rc::Rc;

/// Chunks handed to one `writev` call at most.
const MAX_IOVECS: usize = 64;
/// Several queued chunks up to this many bytes in all are copied into one
/// buffer and sent with a plain `write`: for a few small frames the copy is
/// cheaper than the kernel walking an iovec of tiny segments.
const GATHER_MAX: usize = 16 * 1024;

thread_local! {
    /// The copy buffer of [`OutBuf::write_to`], one per thread (the reactor).
    static GATHER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

#[derive(Default)]
pub struct OutBuf {
    chunks: VecDeque<Rc<[u8]>>,
    /// Bytes of the front chunk already written.
    offset: usize,
    /// Unsent bytes in all chunks.
    len: usize,
}

impl OutBuf {
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Unsent bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Queue a shared chunk.
    pub fn push(&mut self, chunk: Rc<[u8]>) {
        if chunk.is_empty() {
            return;
        }
        self.len += chunk.len();
        self.chunks.push_back(chunk);
    }

    /// Queue bytes owned by this connection alone.
    pub fn push_bytes(&mut self, bytes: &[u8]) {
        self.push(Rc::from(bytes));
    }

    /// Drop everything not yet started, keeping the rest of a chunk that is
    /// half written (the peer must get whole frames).
    pub fn discard_unstarted(&mut self) {
        let keep = usize::from(self.offset > 0);
        while self.chunks.len() > keep {
            if let Some(c) = self.chunks.pop_back() {
                self.len -= c.len();
            }
        }
        if self.chunks.is_empty() {
            self.release();
        }
    }

    /// Write as much as the socket takes. Returns `Ok(true)` once everything
    /// is written, `Ok(false)` when the socket would block first.
    pub fn write_to<W: Write>(&mut self, sink: &mut W) -> io::Result<bool> {
        while !self.chunks.is_empty() {
            let result = if self.chunks.len() > 1 && self.len <= GATHER_MAX {
                GATHER.with(|buf| {
                    let mut buf = buf.borrow_mut();
                    buf.clear();
                    for (i, chunk) in self.chunks.iter().enumerate() {
                        let start = if i == 0 { self.offset } else { 0 };
                        buf.extend_from_slice(&chunk[start..]);
                    }
                    sink.write(&buf)
                })
            } else {
                let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
                let mut n = 0;
                for (i, chunk) in self.chunks.iter().take(MAX_IOVECS).enumerate() {
                    let start = if i == 0 { self.offset } else { 0 };
                    slices[i] = IoSlice::new(&chunk[start..]);
                    n += 1;
                }
                // One segment is a plain write: the kernel skips the iovec copy.
                if n == 1 {
                    sink.write(&slices[0])
                } else {
                    sink.write_vectored(&slices[..n])
                }
            };
            match result {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(written) => self.consume(written),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.release();
        Ok(true)
    }

    fn consume(&mut self, mut written: usize) {
        self.len -= written;
        while written > 0 {
            let Some(front) = self.chunks.front() else {
                break;
            };
            let rest = front.len() - self.offset;
            if written >= rest {
                written -= rest;
                self.offset = 0;
                self.chunks.pop_front();
            } else {
                self.offset += written;
                written = 0;
            }
        }
    }

    /// Give the queue's memory back once it is empty.
    fn release(&mut self) {
        self.offset = 0;
        if self.chunks.capacity() > 0 {
            self.chunks = VecDeque::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink that takes at most `step` bytes per call, then blocks after `limit`.
    struct Trickle {
        got: Vec<u8>,
        step: usize,
        limit: usize,
    }

    impl Write for Trickle {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.got.len() >= self.limit {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = buf.len().min(self.step).min(self.limit - self.got.len());
            self.got.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn partial_writes_keep_order_and_resume() {
        let mut q = OutBuf::default();
        q.push_bytes(b"hello ");
        q.push(Rc::from(&b"shared "[..]));
        q.push_bytes(b"world");
        let mut sink = Trickle {
            got: Vec::new(),
            step: 4,
            limit: 9,
        };
        assert!(!q.write_to(&mut sink).unwrap());
        assert_eq!(q.len(), 18 - 9);
        sink.limit = 100;
        assert!(q.write_to(&mut sink).unwrap());
        assert_eq!(sink.got, b"hello shared world");
        assert!(q.is_empty());
        assert_eq!(q.chunks.capacity(), 0);
    }

    #[test]
    fn big_queues_and_small_queues_come_out_whole() {
        // More than GATHER_MAX queued: vectored writes first; once under it,
        // the rest is gathered. Every byte arrives once, in order.
        let mut q = OutBuf::default();
        let mut want = Vec::new();
        for i in 0..40u8 {
            let chunk: Vec<u8> = (0..1000).map(|j| i.wrapping_mul(31) ^ (j as u8)).collect();
            want.extend_from_slice(&chunk);
            q.push(Rc::from(chunk));
        }
        let mut sink = Trickle {
            got: Vec::new(),
            step: 2999,
            limit: 30_001,
        };
        assert!(!q.write_to(&mut sink).unwrap());
        assert_eq!(q.len(), 40_000 - 30_001);
        sink.limit = usize::MAX;
        assert!(q.write_to(&mut sink).unwrap());
        assert_eq!(sink.got, want);
        assert!(q.is_empty());
    }

    #[test]
    fn discard_keeps_half_written_chunk() {
        let mut q = OutBuf::default();
        q.push_bytes(b"abcdef");
        q.push_bytes(b"ghij");
        let mut sink = Trickle {
            got: Vec::new(),
            step: 3,
            limit: 3,
        };
        assert!(!q.write_to(&mut sink).unwrap());
        q.discard_unstarted();
        assert_eq!(q.len(), 3);
        q.push_bytes(b"Z");
        sink.limit = 100;
        assert!(q.write_to(&mut sink).unwrap());
        assert_eq!(sink.got, b"abcdefZ");
    }
}
