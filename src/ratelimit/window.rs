//! The pure per-key decision over the minute and second windows.

use std::collections::VecDeque;

use super::{Limits, Window};

/// Length and slot width of one window, in microseconds.
#[derive(Debug, Clone, Copy)]
struct Span {
    window: u64,
    slot: u64,
}

const MINUTE: Span = Span {
    window: 60_000_000,
    slot: 1_000_000,
};
/// 1 ms slots: at most 1,000 entries per key whatever `per_second` is, and fine enough that a
/// burst's `Retry-After` is 1 s, not 2, unless its first request was in the same millisecond.
const SECOND: Span = Span {
    window: 1_000_000,
    slot: 1_000,
};

/// One slot's allowed requests, packed in 8 bytes: the slot's number in the high 44 bits, its
/// count in the low 20. 44 bits of millisecond slots last 557 years from the clock's origin
/// (the process's start). A slot that counts [`Entry::MAX_COUNT`] requests (a million in one
/// slot) goes on in a second entry of the same number.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Entry(u64);

impl Entry {
    const COUNT_BITS: u32 = 20;
    const MAX_COUNT: u32 = (1 << Entry::COUNT_BITS) - 1;

    fn first(slot: u64) -> Entry {
        debug_assert!(slot < 1 << (64 - Entry::COUNT_BITS), "slot {slot}");
        Entry(slot << Entry::COUNT_BITS | 1)
    }

    fn slot(self) -> u64 {
        self.0 >> Entry::COUNT_BITS
    }

    fn count(self) -> u32 {
        (self.0 & u64::from(Entry::MAX_COUNT)) as u32
    }

    /// Counts one more request of `slot`; false when this entry is of another slot or full.
    fn bump(&mut self, slot: u64) -> bool {
        let fits = self.slot() == slot && self.count() < Entry::MAX_COUNT;
        if fits {
            self.0 += 1;
        }
        fits
    }
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}×{}", self.slot(), self.count())
    }
}

/// Slots kept in place before a window's entries move to the heap.
const INLINE: usize = 2;

/// Allowed requests of one window, by slot, oldest first. Only slots that hold requests are
/// kept, so an idle key costs almost nothing.
///
/// A key that is used now and then holds a slot or two per window: up to [`INLINE`] stay in
/// place, on the cache lines of the key's state, which the request has already brought in.
/// With a million keys in use, a buffer on the heap was one more random cache miss a request
/// per window, and 64 bytes a key. More (a busy key) move to a `VecDeque`, boxed so that a
/// window takes 24 bytes: a key's state, windows included, then fits in the 128 bytes of two
/// cache lines.
#[derive(Debug, Clone)]
#[expect(
    clippy::box_collection,
    reason = "boxed, the deque is 8 bytes in place instead of 32"
)]
enum Slots {
    /// `items[..len]`; their total is summed when asked, from two entries at most.
    Inline { len: u8, items: [Entry; INLINE] },
    Spilled {
        total: u32,
        entries: Box<VecDeque<Entry>>,
    },
}

impl Default for Slots {
    fn default() -> Slots {
        Slots::Inline {
            len: 0,
            items: [Entry(0); INLINE],
        }
    }
}

impl PartialEq for Slots {
    fn eq(&self, other: &Slots) -> bool {
        self.iter().eq(other.iter())
    }
}

impl Eq for Slots {}

impl Slots {
    fn is_empty(&self) -> bool {
        match self {
            Slots::Inline { len, .. } => *len == 0,
            Slots::Spilled { entries, .. } => entries.is_empty(),
        }
    }

    fn front(&self) -> Option<Entry> {
        self.iter().next()
    }

    fn iter(&self) -> impl Iterator<Item = Entry> + '_ {
        let (a, b) = match self {
            Slots::Inline { len, items } => (&items[..usize::from(*len)], &[][..]),
            Slots::Spilled { entries, .. } => entries.as_slices(),
        };
        a.iter().chain(b).copied()
    }

    /// Requests counted, all slots together.
    fn count(&self) -> u32 {
        match self {
            Slots::Inline { .. } => self.iter().map(Entry::count).sum(),
            Slots::Spilled { total, .. } => *total,
        }
    }

    fn pop_front(&mut self) {
        match self {
            Slots::Inline { len, items } => {
                if *len > 0 {
                    items.copy_within(1.., 0);
                    *len -= 1;
                }
            }
            Slots::Spilled { total, entries } => {
                if let Some(gone) = entries.pop_front() {
                    *total -= gone.count();
                }
                // An emptied window gives its buffer back: the key may not be used again soon.
                if entries.is_empty() {
                    *self = Slots::default();
                }
            }
        }
    }

    /// Counts one request of `slot`, in the last entry if it is of that slot.
    fn count_one(&mut self, slot: u64) {
        match self {
            Slots::Inline { len, items } => {
                let n = usize::from(*len);
                if n > 0 && items[n - 1].bump(slot) {
                    return;
                }
                if n < INLINE {
                    items[n] = Entry::first(slot);
                    *len += 1;
                    return;
                }
                let mut entries = VecDeque::with_capacity(2 * INLINE);
                entries.extend(*items);
                entries.push_back(Entry::first(slot));
                *self = Slots::Spilled {
                    total: entries.iter().copied().map(Entry::count).sum(),
                    entries: Box::new(entries),
                };
            }
            Slots::Spilled { total, entries } => {
                if !entries.back_mut().is_some_and(|last| last.bump(slot)) {
                    entries.push_back(Entry::first(slot));
                }
                *total += 1;
            }
        }
    }

    /// When the requests of `slot` stop counting: as if made at the slot's last microsecond,
    /// plus the window.
    fn expiry(span: Span, slot: u64) -> u64 {
        (slot + 1) * span.slot - 1 + span.window
    }

    fn prune(&mut self, span: Span, now: u64) {
        while let Some(entry) = self.front() {
            if Slots::expiry(span, entry.slot()) <= now {
                self.pop_front();
            } else {
                break;
            }
        }
    }

    /// Microseconds until fewer than `limit` requests are counted.
    fn wait_below(&self, span: Span, limit: u32, now: u64) -> u64 {
        let mut excess = (self.count() + 1).saturating_sub(limit);
        for entry in self.iter() {
            if entry.count() >= excess {
                return Slots::expiry(span, entry.slot()).saturating_sub(now);
            }
            excess -= entry.count();
        }
        0
    }

    /// Microseconds until the oldest counted request stops counting.
    fn next_release(&self, span: Span, now: u64) -> u64 {
        self.front().map_or(0, |entry| {
            Slots::expiry(span, entry.slot()).saturating_sub(now)
        })
    }

    fn add(&mut self, span: Span, now: u64) {
        self.count_one(now / span.slot);
    }
}

/// The state of one key's two windows.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct KeyWindows {
    minute: Slots,
    second: Slots,
}

impl KeyWindows {
    /// True when nothing is counted any more at `now`: the state can be dropped.
    pub fn is_idle(&mut self, now: u64) -> bool {
        self.minute.prune(MINUTE, now);
        self.second.prune(SECOND, now);
        self.minute.is_empty() && self.second.is_empty()
    }
}

/// The outcome of one decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// `None` when allowed; else the window that refused (the minute one when both did).
    pub refused_by: Option<Window>,
    /// Whole seconds, rounded up and at least 1, until the same request would be allowed.
    pub retry_after_secs: u64,
    /// `per_minute` minus the requests counted in the minute window.
    pub remaining: u32,
    /// Whole seconds, rounded up, until the minute window frees one more request.
    pub reset_secs: u64,
}

impl Verdict {
    pub fn allowed(&self) -> bool {
        self.refused_by.is_none()
    }
}

fn secs_up(us: u64) -> u64 {
    us.div_ceil(1_000_000)
}

/// Decides one request at `now` (microseconds on any monotonic clock): allowed only if
/// fewer than `per_second` were allowed in the last second and fewer than `per_minute` in
/// the last 60 seconds. Both windows count an allowed request; a refused one is not counted.
pub fn decide(state: &mut KeyWindows, limits: Limits, now: u64) -> Verdict {
    state.minute.prune(MINUTE, now);
    state.second.prune(SECOND, now);
    let minute_count = state.minute.count();
    let second_count = state.second.count();
    let minute_full = minute_count >= limits.per_minute;
    let second_full = second_count >= limits.per_second;

    if minute_full || second_full {
        let mut wait = 0;
        if minute_full {
            wait = state.minute.wait_below(MINUTE, limits.per_minute, now);
        }
        if second_full {
            wait = wait.max(state.second.wait_below(SECOND, limits.per_second, now));
        }
        return Verdict {
            refused_by: Some(if minute_full {
                Window::Minute
            } else {
                Window::Second
            }),
            retry_after_secs: secs_up(wait).max(1),
            remaining: limits.per_minute.saturating_sub(minute_count),
            reset_secs: secs_up(state.minute.next_release(MINUTE, now)),
        };
    }

    state.minute.add(MINUTE, now);
    state.second.add(SECOND, now);
    Verdict {
        refused_by: None,
        retry_after_secs: 0,
        remaining: limits.per_minute - minute_count - 1,
        reset_secs: secs_up(state.minute.next_release(MINUTE, now)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULTS: Limits = Limits {
        per_minute: 100,
        per_second: 10,
    };
    const S: u64 = 1_000_000;
    const MS: u64 = 1_000;

    /// Sends requests at the given times (µs) and returns each verdict.
    fn run(limits: Limits, times: impl IntoIterator<Item = u64>) -> Vec<(u64, Verdict)> {
        let mut state = KeyWindows::default();
        times
            .into_iter()
            .map(|t| (t, decide(&mut state, limits, t)))
            .collect()
    }

    /// The table of cases: (what, limits, request times, which are allowed, Retry-After of the last).
    #[test]
    fn table() {
        struct Case {
            what: &'static str,
            limits: Limits,
            times: Vec<u64>,
            allowed: usize,
            last_retry_after: Option<u64>,
        }
        let cases = vec![
            Case {
                what: "11 within 10 ms: the 11th is refused by the second window for 1 s",
                limits: DEFAULTS,
                times: (0..11).map(|i| 5 * S + i * MS).collect(),
                allowed: 10,
                last_retry_after: Some(1),
            },
            Case {
                what: "just under 10 per second for 10 s, then the 101st: refused for about 50 s",
                limits: DEFAULTS,
                times: (0..101).map(|i| i * 102 * MS).collect(),
                allowed: 100,
                last_retry_after: Some(51),
            },
            Case {
                what: "a refusal is not counted: 20 at once then one after a second passes",
                limits: DEFAULTS,
                times: [vec![0; 20], vec![S + 20 * MS]].concat(),
                allowed: 11,
                last_retry_after: None,
            },
            Case {
                what: "per_second above per_minute: the minute window rules",
                limits: Limits {
                    per_minute: 3,
                    per_second: 10,
                },
                times: vec![0, 0, 0, 0],
                allowed: 3,
                last_retry_after: Some(61),
            },
            Case {
                what: "a full minute window frees up after the window plus one slot",
                limits: Limits {
                    per_minute: 2,
                    per_second: 10,
                },
                times: vec![0, 0, 61 * S],
                allowed: 3,
                last_retry_after: None,
            },
            Case {
                what: "one slot short of the window is still refused",
                limits: Limits {
                    per_minute: 2,
                    per_second: 10,
                },
                times: vec![0, 0, 60 * S],
                allowed: 2,
                last_retry_after: Some(1),
            },
        ];
        for case in cases {
            let verdicts = run(case.limits, case.times);
            let allowed = verdicts.iter().filter(|(_, v)| v.allowed()).count();
            assert_eq!(allowed, case.allowed, "{}", case.what);
            let last = verdicts.last().unwrap().1;
            match case.last_retry_after {
                Some(secs) => {
                    assert!(!last.allowed(), "{}", case.what);
                    assert_eq!(last.retry_after_secs, secs, "{}", case.what);
                }
                None => assert!(last.allowed(), "{}", case.what),
            }
        }
    }

    #[test]
    fn retry_after_is_honest() {
        // Waiting exactly Retry-After seconds is enough, and a moment less is not (to a slot).
        let limits = DEFAULTS;
        let mut state = KeyWindows::default();
        let mut t = 0;
        for _ in 0..100 {
            assert!(decide(&mut state, limits, t).allowed());
            t += 102 * MS;
        }
        let refused = decide(&mut state, limits, t);
        assert!(!refused.allowed());
        assert_eq!(refused.refused_by, Some(Window::Minute));
        assert_eq!(refused.remaining, 0);
        let mut probe = state.clone();
        assert!(!decide(&mut probe, limits, t + (refused.retry_after_secs - 1) * S).allowed());
        assert!(decide(&mut state, limits, t + refused.retry_after_secs * S).allowed());
    }

    #[test]
    fn remaining_and_reset_describe_the_minute_window() {
        let mut state = KeyWindows::default();
        let v = decide(&mut state, DEFAULTS, 0);
        assert_eq!(v.remaining, 99);
        assert_eq!(v.reset_secs, 61);
        let v = decide(&mut state, DEFAULTS, 19 * S + 500 * MS);
        assert_eq!(v.remaining, 98);
        assert_eq!(v.reset_secs, 42);
    }

    #[test]
    fn no_window_ever_holds_more_than_its_limit() {
        // A client hammering every 7 ms for 3 minutes: check every 60 s and 1 s span.
        let limits = Limits {
            per_minute: 100,
            per_second: 10,
        };
        let allowed: Vec<u64> = run(limits, (0..180_000 / 7).map(|i| i * 7 * MS))
            .into_iter()
            .filter(|(_, v)| v.allowed())
            .map(|(t, _)| t)
            .collect();
        assert!(
            allowed.len() >= 300,
            "the limiter must not starve: {}",
            allowed.len()
        );
        for (i, &start) in allowed.iter().enumerate() {
            let in_minute = allowed[i..]
                .iter()
                .take_while(|&&t| t < start + 60 * S)
                .count();
            let in_second = allowed[i..].iter().take_while(|&&t| t < start + S).count();
            assert!(in_minute <= 100, "{in_minute} in the minute from {start}");
            assert!(in_second <= 10, "{in_second} in the second from {start}");
        }
    }

    /// `slots` holds the model's (slot, count) entries in its order, and their total.
    fn assert_matches_model(slots: &Slots, model: &VecDeque<(u64, u32)>, when: &str) {
        let seen: Vec<_> = slots.iter().map(|e| (e.slot(), e.count())).collect();
        assert!(seen.iter().eq(model.iter()), "{when}: {seen:?}");
        assert_eq!(
            slots.count(),
            model.iter().map(|e| e.1).sum::<u32>(),
            "{when}"
        );
        assert_eq!(slots.is_empty(), model.is_empty(), "{when}");
    }

    #[test]
    fn slots_keep_their_order_and_count_in_place_on_the_heap_and_back() {
        // Against a VecDeque of (slot, count), through growing past INLINE, shrinking to empty
        // and growing again; each step counts `n` requests in each of `slots` new slots.
        let mut slots = Slots::default();
        let mut model: VecDeque<(u64, u32)> = VecDeque::new();
        let ops = [
            (3, 1),
            (1, 2),
            (0, 0),
            (0, 0),
            (5, 1),
            (7, 3),
            (2, 1),
            (6, 2),
            (0, 0),
        ];
        let mut slot = 100;
        for (step, &(new_slots, n)) in ops.iter().enumerate() {
            if new_slots == 0 {
                slots.pop_front();
                model.pop_front();
            }
            for _ in 0..new_slots {
                slot += 1 + step as u64;
                for _ in 0..n {
                    slots.count_one(slot);
                }
                model.push_back((slot, n));
            }
            assert_matches_model(&slots, &model, &format!("after step {step}"));
        }
        assert!(matches!(slots, Slots::Spilled { .. }), "{slots:?}");
        while !model.is_empty() {
            slots.pop_front();
            model.pop_front();
            assert_matches_model(&slots, &model, "draining");
        }
        assert!(matches!(slots, Slots::Inline { len: 0, .. }), "{slots:?}");
        // A key used now and then keeps its slots in place.
        let mut state = KeyWindows::default();
        for t in [0, 40 * S, 80 * S, 120 * S] {
            assert!(decide(&mut state, DEFAULTS, t).allowed());
            assert!(matches!(state.minute, Slots::Inline { .. }));
            assert!(matches!(state.second, Slots::Inline { .. }));
        }
    }

    #[test]
    fn a_full_slot_goes_on_in_a_second_entry_of_the_same_slot() {
        let mut slots = Slots::default();
        for _ in 0..Entry::MAX_COUNT {
            slots.count_one(7);
        }
        slots.count_one(7);
        slots.count_one(7);
        let seen: Vec<_> = slots.iter().map(|e| (e.slot(), e.count())).collect();
        assert_eq!(seen, [(7, Entry::MAX_COUNT), (7, 2)]);
        assert_eq!(slots.count(), Entry::MAX_COUNT + 2);
        slots.pop_front();
        assert_eq!(slots.count(), 2);
    }

    #[test]
    fn a_window_takes_24_bytes() {
        assert_eq!(std::mem::size_of::<Slots>(), 24);
        assert_eq!(std::mem::size_of::<KeyWindows>(), 48);
    }

    #[test]
    fn idle_state_is_dropped() {
        let mut state = KeyWindows::default();
        decide(&mut state, DEFAULTS, 0);
        assert!(!state.is_idle(30 * S));
        assert!(state.is_idle(62 * S));
    }
}
