//! A connection's unsent bytes, and the count of what all the queues hold.
//!
//! Chunks are reference-counted so that one encoded broadcast frame is queued
//! to every member of a room without a copy. Writes are vectored: one `writev`
//! sends as many queued chunks as the socket takes. An empty queue holds no
//! heap memory, which keeps idle connections small.
//!
//! The count: every queue of the reactor thread adds to one total, kept as
//! chunks are queued, written and dropped ([`queued_bytes`]). A chunk queued
//! to many connections is counted once, while at least one queue holds it,
//! because it is held once; each queue's slots are counted too. A queue's own
//! [`OutBuf::len`] counts every chunk it holds in full: that is how much it
//! keeps alive, which is what the memory budget ranks connections by.
//! Used by every connection (`crate::reactor`) and, through `WsIo`, by
//! tungstenite for the bytes it writes itself.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};
use std::ops::Deref;
use std::rc::Rc;

/// Chunks handed to one `writev` call at most.
const MAX_IOVECS: usize = 64;
/// Several queued chunks up to this many bytes in all are copied into one
/// buffer and sent with a plain `write`: for a few small frames the copy is
/// cheaper than the kernel walking an iovec of tiny segments.
const GATHER_MAX: usize = 16 * 1024;
/// Bytes of one queue slot.
const SLOT: usize = std::mem::size_of::<Rc<Chunk>>();

thread_local! {
    /// The copy buffer of [`OutBuf::write_to`], one per thread (the reactor).
    static GATHER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    /// Bytes held by this thread's queues: distinct chunks, and slots.
    static QUEUED: Cell<usize> = const { Cell::new(0) };
}

/// Bytes held by all the queues of this thread: each distinct chunk once,
/// plus the queues' slots.
pub fn queued_bytes() -> usize {
    QUEUED.with(Cell::get)
}

fn count_up(n: usize) {
    QUEUED.with(|q| q.set(q.get() + n));
}

fn count_down(n: usize) {
    QUEUED.with(|q| q.set(q.get() - n));
}

/// Bytes to send, possibly to many connections.
pub struct Chunk {
    bytes: Box<[u8]>,
    /// Queues holding it (it is counted in [`queued_bytes`] while not 0).
    queues: Cell<usize>,
}

impl Chunk {
    pub fn new(bytes: impl Into<Box<[u8]>>) -> Rc<Chunk> {
        Rc::new(Chunk {
            bytes: bytes.into(),
            queues: Cell::new(0),
        })
    }

    fn enqueued(&self) {
        let n = self.queues.get();
        if n == 0 {
            count_up(self.bytes.len());
        }
        self.queues.set(n + 1);
    }

    fn dequeued(&self) {
        let n = self.queues.get() - 1;
        self.queues.set(n);
        if n == 0 {
            count_down(self.bytes.len());
        }
    }
}

/// A chunk kept outside a queue (a frame a joining member keeps until its
/// history is out), counted in [`queued_bytes`] as a queued one is: once,
/// however many keep it.
pub struct Kept(Rc<Chunk>);

impl Kept {
    pub fn new(chunk: Rc<Chunk>) -> Kept {
        chunk.enqueued();
        Kept(chunk)
    }

    /// The chunk, to be queued.
    pub fn chunk(&self) -> Rc<Chunk> {
        self.0.clone()
    }
}

impl Drop for Kept {
    fn drop(&mut self) {
        self.0.dequeued();
    }
}

impl Deref for Chunk {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.bytes
    }
}

#[derive(Default)]
pub struct OutBuf {
    chunks: VecDeque<Rc<Chunk>>,
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
    pub fn push(&mut self, chunk: Rc<Chunk>) {
        if chunk.is_empty() {
            return;
        }
        self.len += chunk.len();
        chunk.enqueued();
        let before = self.chunks.capacity();
        self.chunks.push_back(chunk);
        self.slots_changed(before);
    }

    /// Queue bytes owned by this connection alone.
    pub fn push_bytes(&mut self, bytes: &[u8]) {
        self.push(Chunk::new(bytes));
    }

    /// Count a change of the slots' capacity from `before`.
    fn slots_changed(&mut self, before: usize) {
        let after = self.chunks.capacity();
        if after > before {
            count_up((after - before) * SLOT);
        } else {
            count_down((before - after) * SLOT);
        }
    }

    /// Drop everything not yet started, keeping the rest of a chunk that is
    /// half written (the peer must get whole frames).
    pub fn discard_unstarted(&mut self) {
        let keep = usize::from(self.offset > 0);
        while self.chunks.len() > keep {
            if let Some(c) = self.chunks.pop_back() {
                self.len -= c.len();
                c.dequeued();
            }
        }
        if self.chunks.is_empty() {
            self.release();
        } else {
            let before = self.chunks.capacity();
            self.chunks.shrink_to_fit();
            self.slots_changed(before);
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
                if let Some(c) = self.chunks.pop_front() {
                    c.dequeued();
                }
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
            let before = self.chunks.capacity();
            self.chunks = VecDeque::new();
            self.slots_changed(before);
        }
    }
}

impl Drop for OutBuf {
    fn drop(&mut self) {
        for c in self.chunks.drain(..) {
            c.dequeued();
        }
        count_down(self.chunks.capacity() * SLOT);
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
        q.push(Chunk::new(&b"shared "[..]));
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
            q.push(Chunk::new(chunk));
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

    #[test]
    fn shared_chunks_count_once_and_everything_goes_back() {
        let shared = Chunk::new(vec![7u8; 1000]);
        let mut a = OutBuf::default();
        let mut b = OutBuf::default();
        a.push(shared.clone());
        b.push(shared.clone());
        b.push_bytes(&[1u8; 10]);
        let slots = (a.chunks.capacity() + b.chunks.capacity()) * SLOT;
        assert_eq!(queued_bytes(), 1000 + 10 + slots);
        assert_eq!((a.len(), b.len()), (1000, 1010));
        // Written out of one queue: still held by the other.
        let mut sink = Trickle {
            got: Vec::new(),
            step: usize::MAX,
            limit: usize::MAX,
        };
        assert!(a.write_to(&mut sink).unwrap());
        assert_eq!(queued_bytes(), 1000 + 10 + b.chunks.capacity() * SLOT);
        b.discard_unstarted();
        assert_eq!(queued_bytes(), 0);
        // Kept outside a queue (a joining member's frame), then queued: still
        // once.
        let kept = Kept::new(shared.clone());
        assert_eq!(queued_bytes(), 1000);
        b.push(kept.chunk());
        drop(kept);
        assert!(queued_bytes() > 1000);
        drop(b);
        drop(a);
        assert_eq!(queued_bytes(), 0);
        drop(shared);
    }
}
