//! What goes over the broker: a room's stored batch (its seqs and the
//! WebSocket frames already encoded, so a receiving process queues them as
//! they are), and the deletion of a room. Binary, length-prefixed, with the
//! sending process's id so that a process skips what it sent itself.
//!
//! Used by `broker::threads` (decode what arrives) and the reactor's relay
//! (encode what it stored).

const BATCH: u8 = b'B';
const DELETED: u8 = b'D';

/// A batch another process stored: its frames back to back in `bytes`,
/// frame `i` ending at `ends[i]` with seq `seqs[i]` (rising), as the
/// reactor queues them.
pub struct Batch {
    pub from: u64,
    pub room: String,
    pub seqs: Vec<i64>,
    pub bytes: Vec<u8>,
    pub ends: Vec<usize>,
}

impl Batch {
    /// Frame `i`.
    pub fn frame(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.bytes[start..self.ends[i]]
    }
}

/// What a message on the broker says.
pub enum Notice {
    Batch(Batch),
    Deleted { from: u64, room: String },
}

/// A batch as published: `frames` yields (seq, frame), seqs rising.
pub fn encode_batch<'a>(
    from: u64,
    room: &str,
    frames: impl ExactSizeIterator<Item = (i64, &'a [u8])>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.push(BATCH);
    out.extend_from_slice(&from.to_be_bytes());
    put_str(&mut out, room);
    out.extend_from_slice(&(frames.len() as u32).to_be_bytes());
    for (seq, frame) in frames {
        out.extend_from_slice(&seq.to_be_bytes());
        out.extend_from_slice(&(frame.len() as u32).to_be_bytes());
        out.extend_from_slice(frame);
    }
    out
}

pub fn encode_deleted(from: u64, room: &str) -> Vec<u8> {
    let mut out = vec![DELETED];
    out.extend_from_slice(&from.to_be_bytes());
    put_str(&mut out, room);
    out
}

/// A message from the broker, or `None` for one this version cannot read.
pub fn decode(bytes: &[u8]) -> Option<Notice> {
    let mut r = Reader(bytes);
    let kind = r.take(1)?[0];
    let from = u64::from_be_bytes(r.take(8)?.try_into().ok()?);
    let room = r.string()?;
    match kind {
        BATCH => {
            let n = u32::from_be_bytes(r.take(4)?.try_into().ok()?) as usize;
            // Never trust a count to size an allocation: each frame takes
            // at least 12 bytes of what is left.
            if n > r.0.len() / 12 {
                return None;
            }
            let mut seqs = Vec::with_capacity(n);
            let mut ends = Vec::with_capacity(n);
            let mut frames = Vec::with_capacity(r.0.len() - 12 * n);
            for _ in 0..n {
                seqs.push(i64::from_be_bytes(r.take(8)?.try_into().ok()?));
                let len = u32::from_be_bytes(r.take(4)?.try_into().ok()?) as usize;
                frames.extend_from_slice(r.take(len)?);
                ends.push(frames.len());
            }
            let rising = seqs.windows(2).all(|w| w[0] < w[1]);
            (rising && r.0.is_empty() && n > 0).then_some(Notice::Batch(Batch {
                from,
                room,
                seqs,
                bytes: frames,
                ends,
            }))
        }
        DELETED => r.0.is_empty().then_some(Notice::Deleted { from, room }),
        _ => None,
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn string(&mut self) -> Option<String> {
        let len = u32::from_be_bytes(self.take(4)?.try_into().ok()?) as usize;
        String::from_utf8(self.take(len)?.to_vec()).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_and_deletes_come_back_as_sent() {
        let frames: Vec<(i64, &[u8])> = vec![(7, b"seven"), (8, b""), (9, b"nine")];
        let bytes = encode_batch(42, "Gäste", frames.iter().copied());
        let Some(Notice::Batch(b)) = decode(&bytes) else {
            panic!("not a batch");
        };
        assert_eq!((b.from, b.room.as_str()), (42, "Gäste"));
        assert_eq!(b.seqs, [7, 8, 9]);
        let got: Vec<&[u8]> = (0..3).map(|i| b.frame(i)).collect();
        assert_eq!(got, [&b"seven"[..], b"", b"nine"]);
        let Some(Notice::Deleted { from, room }) = decode(&encode_deleted(3, "r")) else {
            panic!("not a delete");
        };
        assert_eq!((from, room.as_str()), (3, "r"));
    }

    #[test]
    fn damaged_messages_are_refused() {
        let bytes = encode_batch(1, "r", [(1i64, &b"a"[..]), (2, b"b")].into_iter());
        for cut in 0..bytes.len() {
            assert!(decode(&bytes[..cut]).is_none(), "cut at {cut}");
        }
        let mut long = bytes.clone();
        long.push(0);
        assert!(decode(&long).is_none());
        let backwards = encode_batch(1, "r", [(2i64, &b"a"[..]), (1, b"b")].into_iter());
        assert!(decode(&backwards).is_none());
        assert!(decode(b"Xgarbage").is_none());
    }
}
