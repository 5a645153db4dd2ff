//! The verdict of a rate ramp (fan-out, many rooms): which rate to try again
//! and which rate held.
//!
//! A step is decided by its few slowest passes, so one step alone says little
//! near the limit. The highest passing rate and the lowest failing rate above
//! it are tried until two trials agree; a tie does not pass. A trial that lost
//! deliveries or connections is a failure outright and is not tried again.

/// One step's outcome at a rate.
#[derive(Clone, Copy, Debug)]
pub struct Trial {
    pub rate: f64,
    /// p99 under the limit with nothing lost.
    pub ok: bool,
    /// Deliveries or connections were lost.
    pub broken: bool,
}

#[derive(Default)]
struct Tally {
    ok: u32,
    failed: u32,
    broken: bool,
}

impl Tally {
    fn decided(&self) -> bool {
        self.broken || self.ok >= 2 || self.failed >= 2
    }

    fn passes(&self) -> bool {
        !self.broken && self.ok > self.failed
    }

    fn may_pass(&self) -> bool {
        !self.broken && self.ok > 0 && self.ok >= self.failed
    }
}

/// The trials of every rate so far, by ascending rate.
fn by_rate(trials: &[Trial]) -> Vec<(f64, Tally)> {
    let mut by: Vec<(f64, Tally)> = Vec::new();
    for t in trials {
        let i = match by.iter().position(|(r, _)| *r == t.rate) {
            Some(i) => i,
            None => {
                by.push((t.rate, Tally::default()));
                by.len() - 1
            }
        };
        let tally = &mut by[i].1;
        if t.ok {
            tally.ok += 1;
        } else {
            tally.failed += 1;
        }
        tally.broken |= t.broken;
    }
    by.sort_by(|a, b| a.0.total_cmp(&b.0));
    by
}

/// The rate to try again: the highest rate that may pass while it is not
/// settled, then the lowest rate above it while that one is not.
pub fn next_trial(trials: &[Trial]) -> Option<f64> {
    let by = by_rate(trials);
    let top = by.iter().rposition(|(_, t)| t.may_pass());
    if let Some(i) = top {
        if !by[i].1.decided() {
            return Some(by[i].0);
        }
    }
    let above = top.map_or(0, |i| i + 1);
    by.get(above)
        .filter(|(_, t)| !t.decided())
        .map(|(rate, _)| *rate)
}

/// The highest rate that passed by majority.
pub fn sustained_rate(trials: &[Trial]) -> Option<f64> {
    by_rate(trials)
        .into_iter()
        .filter(|(_, t)| t.passes())
        .map(|(rate, _)| rate)
        .next_back()
}
