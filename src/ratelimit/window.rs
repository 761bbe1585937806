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

/// Allowed requests of one window, as (slot number, count), oldest first, and their total.
/// Only slots that hold requests are kept, so an idle key costs almost nothing.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Slots {
    entries: Entries,
    total: u32,
}

/// Slots kept in place before a window's entries move to the heap.
const INLINE: usize = 2;

/// The entries of [`Slots`]: up to [`INLINE`] in place, more in a `VecDeque`.
///
/// A key that is used now and then holds a slot or two per window. In place, they are on the
/// cache lines of the key's state, which the request has already brought in: with a million
/// keys in use, each `VecDeque`'s buffer was one more random cache miss a request (two a
/// request, one per window) and 64 bytes a key.
#[derive(Debug, Clone)]
enum Entries {
    /// Oldest first: `items[..len]`.
    Inline {
        len: u8,
        items: [(u64, u32); INLINE],
    },
    Spilled(VecDeque<(u64, u32)>),
}

impl Default for Entries {
    fn default() -> Entries {
        Entries::Inline {
            len: 0,
            items: [(0, 0); INLINE],
        }
    }
}

impl PartialEq for Entries {
    fn eq(&self, other: &Entries) -> bool {
        self.iter().eq(other.iter())
    }
}

impl Eq for Entries {}

impl Entries {
    fn is_empty(&self) -> bool {
        match self {
            Entries::Inline { len, .. } => *len == 0,
            Entries::Spilled(deque) => deque.is_empty(),
        }
    }

    fn front(&self) -> Option<&(u64, u32)> {
        self.iter().next()
    }

    fn iter(&self) -> impl Iterator<Item = &(u64, u32)> {
        let (a, b) = match self {
            Entries::Inline { len, items } => (&items[..usize::from(*len)], &[][..]),
            Entries::Spilled(deque) => deque.as_slices(),
        };
        a.iter().chain(b)
    }

    fn pop_front(&mut self) {
        match self {
            Entries::Inline { len, items } => {
                if *len > 0 {
                    items.copy_within(1.., 0);
                    *len -= 1;
                }
            }
            Entries::Spilled(deque) => {
                deque.pop_front();
                // An emptied window gives its buffer back: the key may not be used again soon.
                if deque.is_empty() {
                    *self = Entries::default();
                }
            }
        }
    }

    fn back_mut(&mut self) -> Option<&mut (u64, u32)> {
        match self {
            Entries::Inline { len, items } => items[..usize::from(*len)].last_mut(),
            Entries::Spilled(deque) => deque.back_mut(),
        }
    }

    fn push_back(&mut self, entry: (u64, u32)) {
        match self {
            Entries::Inline { len, items } if usize::from(*len) < INLINE => {
                items[usize::from(*len)] = entry;
                *len += 1;
            }
            Entries::Inline { items, .. } => {
                let mut deque = VecDeque::with_capacity(2 * INLINE);
                deque.extend(*items);
                deque.push_back(entry);
                *self = Entries::Spilled(deque);
            }
            Entries::Spilled(deque) => deque.push_back(entry),
        }
    }
}

impl Slots {
    /// When the requests of `slot` stop counting: as if made at the slot's last microsecond,
    /// plus the window.
    fn expiry(span: Span, slot: u64) -> u64 {
        (slot + 1) * span.slot - 1 + span.window
    }

    fn prune(&mut self, span: Span, now: u64) {
        while let Some(&(slot, n)) = self.entries.front() {
            if Slots::expiry(span, slot) <= now {
                self.entries.pop_front();
                self.total -= n;
            } else {
                break;
            }
        }
    }

    fn count(&self) -> u32 {
        self.total
    }

    /// Microseconds until fewer than `limit` requests are counted.
    fn wait_below(&self, span: Span, limit: u32, now: u64) -> u64 {
        let mut excess = (self.count() + 1).saturating_sub(limit);
        for &(slot, n) in self.entries.iter() {
            if n >= excess {
                return Slots::expiry(span, slot).saturating_sub(now);
            }
            excess -= n;
        }
        0
    }

    /// Microseconds until the oldest counted request stops counting.
    fn next_release(&self, span: Span, now: u64) -> u64 {
        self.entries.front().map_or(0, |&(slot, _)| {
            Slots::expiry(span, slot).saturating_sub(now)
        })
    }

    fn add(&mut self, span: Span, now: u64) {
        let slot = now / span.slot;
        match self.entries.back_mut() {
            Some((last, n)) if *last == slot => *n += 1,
            _ => self.entries.push_back((slot, 1)),
        }
        self.total += 1;
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
        self.minute.entries.is_empty() && self.second.entries.is_empty()
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

    #[test]
    fn entries_keep_their_order_in_place_on_the_heap_and_back() {
        // Against a VecDeque, through growing past INLINE, shrinking to empty and growing again.
        let mut entries = Entries::default();
        let mut model = VecDeque::new();
        let ops = [3, 1, 0, 0, 5, 7, 2, 6, 0, 4, 1, 1];
        for (step, &pushes) in ops.iter().enumerate() {
            if pushes == 0 {
                entries.pop_front();
                model.pop_front();
            }
            for i in 0..pushes {
                let entry = (step as u64 * 10 + i, i as u32);
                entries.push_back(entry);
                model.push_back(entry);
            }
            if let (Some(a), Some(b)) = (entries.back_mut(), model.back_mut()) {
                a.1 += 1;
                b.1 += 1;
            }
            assert!(entries.iter().eq(model.iter()), "after step {step}");
            assert_eq!(entries.front(), model.front());
            assert_eq!(entries.is_empty(), model.is_empty());
        }
        while !model.is_empty() {
            entries.pop_front();
            model.pop_front();
            assert!(entries.iter().eq(model.iter()));
        }
        assert!(
            matches!(entries, Entries::Inline { len: 0, .. }),
            "{entries:?}"
        );
        // A key used now and then keeps its slots in place.
        let mut state = KeyWindows::default();
        for t in [0, 40 * S, 80 * S, 120 * S] {
            assert!(decide(&mut state, DEFAULTS, t).allowed());
            assert!(matches!(state.minute.entries, Entries::Inline { .. }));
            assert!(matches!(state.second.entries, Entries::Inline { .. }));
        }
    }

    #[test]
    fn idle_state_is_dropped() {
        let mut state = KeyWindows::default();
        decide(&mut state, DEFAULTS, 0);
        assert!(!state.is_idle(30 * S));
        assert!(state.is_idle(62 * S));
    }
}
