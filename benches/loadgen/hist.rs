//! Latency histogram: log-linear buckets, 32 per power of two (about 3 %
//! resolution), mergeable across processes by adding counts.
//!
//! Worker processes record deliveries into one per ramp step and send it to
//! the coordinator in sparse form (`workers/`), which merges them (`ramp.rs`);
//! the login and REST scenarios record their round trips in one.

const SUB_BITS: u32 = 5;
const SUB: u64 = 1 << SUB_BITS;
const BUCKETS: usize = 64 * SUB as usize;

#[derive(Clone)]
pub struct Hist {
    counts: Vec<u64>,
    pub n: u64,
    pub max: u64,
}

impl Default for Hist {
    fn default() -> Hist {
        Hist {
            counts: vec![0; BUCKETS],
            n: 0,
            max: 0,
        }
    }
}

impl Hist {
    fn index(v: u64) -> usize {
        if v < SUB {
            v as usize
        } else {
            let e = 63 - v.leading_zeros();
            let sub = (v >> (e - SUB_BITS)) & (SUB - 1);
            ((e - SUB_BITS + 1) as u64 * SUB + sub) as usize
        }
    }

    /// A representative value (the middle) of bucket `i`.
    fn value(i: usize) -> u64 {
        let i = i as u64;
        if i < SUB {
            i
        } else {
            let e = (i / SUB) as u32 + SUB_BITS - 1;
            let low = (SUB + i % SUB) << (e - SUB_BITS);
            low + (1u64 << (e - SUB_BITS)) / 2
        }
    }

    pub fn record(&mut self, v: u64) {
        self.counts[Self::index(v)] += 1;
        self.n += 1;
        self.max = self.max.max(v);
    }

    pub fn merge(&mut self, o: &Hist) {
        for (a, b) in self.counts.iter_mut().zip(&o.counts) {
            *a += b;
        }
        self.n += o.n;
        self.max = self.max.max(o.max);
    }

    /// The `q` quantile (0..=1), or 0 when empty.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.n == 0 {
            return 0;
        }
        let want = ((q * self.n as f64).ceil() as u64).clamp(1, self.n);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= want {
                return Self::value(i).min(self.max);
            }
        }
        self.max
    }

    pub fn sparse(&self) -> Vec<(u32, u64)> {
        self.counts
            .iter()
            .enumerate()
            .filter(|(_, c)| **c > 0)
            .map(|(i, c)| (i as u32, *c))
            .collect()
    }

    pub fn from_sparse(s: &[(u32, u64)], max: u64) -> Hist {
        let mut h = Hist::default();
        for &(i, c) in s {
            if (i as usize) < BUCKETS {
                h.counts[i as usize] += c;
                h.n += c;
            }
        }
        h.max = max;
        h
    }
}

/// Microseconds to milliseconds, rounded to 0.01.
pub fn ms(us: u64) -> f64 {
    (us as f64 / 10.0).round() / 100.0
}
