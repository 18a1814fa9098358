//! A hashed timer wheel keyed by slab entries.
//!
//! Arm, cancel and fire are O(1) amortized: an entry lives in the slot of its
//! deadline tick, and knows its index there, so cancelling is a `swap_remove`
//! (cancelled timers never pile up). Deadlines more than one turn away stay in
//! their slot and are skipped until their turn comes.

use std::time::{Duration, Instant};

use slab::Slab;

// Wheel resolution: one tick is one millisecond (`tick_of`, `instant_of`).
/// Slots per turn (a power of two): one turn is about one second.
const SLOTS: usize = 1024;

/// Identifies an armed timer; stale keys are harmless to cancel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TimerKey {
    index: usize,
    tick: u64,
}

#[derive(Debug)]
struct Entry<T> {
    tick: u64,
    pos: usize,
    data: T,
}

#[derive(Debug)]
pub(crate) struct Wheel<T> {
    origin: Instant,
    /// Every tick up to and including this one has been fired.
    done: u64,
    slots: Vec<Vec<usize>>,
    entries: Slab<Entry<T>>,
    /// A lower bound on the earliest armed tick (may be stale, never late).
    earliest: Option<u64>,
}

impl<T> Wheel<T> {
    pub(crate) fn new() -> Self {
        Wheel {
            origin: Instant::now(),
            done: 0,
            slots: (0..SLOTS).map(|_| Vec::new()).collect(),
            entries: Slab::new(),
            earliest: None,
        }
    }

    fn tick_of(&self, at: Instant) -> u64 {
        let d = at.saturating_duration_since(self.origin);
        // Round up, so a timer never fires before its deadline (u64 math: no
        // 128-bit division on the hot path).
        let ms = d.as_secs().saturating_mul(1000);
        ms.saturating_add(u64::from(d.subsec_nanos()).div_ceil(1_000_000))
    }

    fn instant_of(&self, tick: u64) -> Instant {
        let d = Duration::from_millis(tick);
        self.origin.checked_add(d).unwrap_or_else(|| far_future(self.origin))
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Arms a timer that fires at or after `deadline`.
    pub(crate) fn insert(&mut self, deadline: Instant, data: T) -> TimerKey {
        let tick = self.tick_of(deadline).max(self.done + 1);
        let slot = (tick as usize) & (SLOTS - 1);
        let pos = self.slots[slot].len();
        let index = self.entries.insert(Entry { tick, pos, data });
        self.slots[slot].push(index);
        self.earliest = Some(self.earliest.map_or(tick, |e| e.min(tick)));
        TimerKey { index, tick }
    }

    /// Disarms a timer, returning its data if it was still armed.
    pub(crate) fn cancel(&mut self, key: TimerKey) -> Option<T> {
        match self.entries.get(key.index) {
            Some(e) if e.tick == key.tick => {}
            _ => return None,
        }
        let entry = self.entries.remove(key.index);
        self.unlink(entry.tick, entry.pos);
        Some(entry.data)
    }

    fn unlink(&mut self, tick: u64, pos: usize) {
        let slot = &mut self.slots[(tick as usize) & (SLOTS - 1)];
        slot.swap_remove(pos);
        if let Some(&moved) = slot.get(pos) {
            self.entries[moved].pos = pos;
        } else if slot.is_empty() && slot.capacity() > 16 {
            // A burst left this slot large: give the memory back.
            *slot = Vec::new();
        }
        if self.entries.is_empty() {
            self.earliest = None;
        }
    }

    /// When the next timer may fire: a lower bound, never later than the truth.
    pub(crate) fn next_deadline(&mut self) -> Option<Instant> {
        if self.entries.is_empty() {
            self.earliest = None;
            return None;
        }
        let mut earliest = self.earliest.unwrap_or(self.done + 1);
        if earliest <= self.done {
            // The cached bound has passed: find the first non-empty slot.
            earliest = self.done + SLOTS as u64;
            for t in self.done + 1..=self.done + SLOTS as u64 {
                let slot = &self.slots[(t as usize) & (SLOTS - 1)];
                if let Some(min) = slot.iter().map(|&i| self.entries[i].tick).min() {
                    if min <= t {
                        earliest = min;
                        break;
                    }
                    earliest = earliest.min(min);
                }
            }
            self.earliest = Some(earliest);
        }
        Some(self.instant_of(earliest))
    }

    /// Fires every timer whose deadline is at or before `now`, pushing their
    /// data to `out` in no particular order.
    pub(crate) fn expire(&mut self, now: Instant, out: &mut Vec<T>) {
        let now_tick = self.tick_of(now).saturating_sub(1).max(self.done);
        if now_tick == self.done || self.entries.is_empty() {
            self.done = now_tick;
            return;
        }
        let span = (now_tick - self.done).min(SLOTS as u64);
        for t in now_tick + 1 - span..=now_tick {
            let slot = (t as usize) & (SLOTS - 1);
            let mut i = 0;
            while i < self.slots[slot].len() {
                let index = self.slots[slot][i];
                if self.entries[index].tick <= now_tick {
                    let entry = self.entries.remove(index);
                    self.unlink(entry.tick, entry.pos);
                    out.push(entry.data);
                } else {
                    i += 1;
                }
            }
        }
        self.done = now_tick;
    }
}

/// A time no timer will reach, for deadlines beyond what `Instant` can hold.
pub(crate) fn far_future(from: Instant) -> Instant {
    from + Duration::from_secs(100 * 365 * 86400)
}

/// `Instant::now() + d`, saturating instead of panicking on absurd durations.
pub(crate) fn after(d: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(d).unwrap_or_else(|| far_future(now))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fires_in_time_and_cancels() {
        let mut w = Wheel::new();
        let t0 = w.origin;
        let a = w.insert(t0 + Duration::from_millis(5), 'a');
        let _b = w.insert(t0 + Duration::from_millis(2500), 'b');
        let c = w.insert(t0 + Duration::from_millis(5), 'c');
        assert_eq!(w.cancel(c), Some('c'));
        assert_eq!(w.cancel(c), None);
        let mut out = Vec::new();
        w.expire(t0 + Duration::from_millis(4), &mut out);
        assert!(out.is_empty());
        assert!(w.next_deadline().unwrap() <= t0 + Duration::from_millis(5));
        w.expire(t0 + Duration::from_millis(6), &mut out);
        assert_eq!(out, vec!['a']);
        assert_eq!(w.cancel(a), None);
        w.expire(t0 + Duration::from_millis(2000), &mut out);
        assert_eq!(out, vec!['a']);
        let next = w.next_deadline().unwrap();
        assert!(next <= t0 + Duration::from_millis(2500));
        w.expire(t0 + Duration::from_millis(2501), &mut out);
        assert_eq!(out, vec!['a', 'b']);
        assert_eq!(w.len(), 0);
        assert_eq!(w.next_deadline(), None);
    }

    #[test]
    fn deadlines_after_49_days_are_not_clamped() {
        let mut w = Wheel::new();
        let far = w.origin + Duration::from_secs(60 * 86400);
        w.insert(far, ());
        assert!(w.next_deadline().unwrap() >= far - Duration::from_millis(1));
    }

    #[test]
    fn many_cancelled_timers_leave_nothing_behind() {
        let mut w = Wheel::new();
        let t0 = w.origin;
        for round in 0..10 {
            let keys: Vec<_> = (0..10_000).map(|i| w.insert(t0 + Duration::from_millis(i % 3000), round)).collect();
            for k in keys {
                assert!(w.cancel(k).is_some());
            }
        }
        assert_eq!(w.len(), 0);
        assert!(w.slots.iter().all(|s| s.is_empty()));
        // A burst on one tick: once cancelled, its slot gives the memory back.
        let keys: Vec<_> = (0..1000).map(|_| w.insert(t0 + Duration::from_millis(7), 0)).collect();
        for k in keys {
            assert!(w.cancel(k).is_some());
        }
        assert!(w.slots.iter().all(|s| s.capacity() <= 16), "a slot kept its burst capacity");
    }
}
