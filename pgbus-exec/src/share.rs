//! How a [`MixedWorker`](crate::MixedWorker)'s slots are divided between its two loops:
//! the [`Share`], and the [`Kind`]s of loop it divides them between.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::Notify;

/// The two loops of a mixed worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Plain,
    Groups,
}

impl Kind {
    pub(crate) fn index(self) -> usize {
        match self {
            Kind::Plain => 0,
            Kind::Groups => 1,
        }
    }

    fn other(self) -> Kind {
        match self {
            Kind::Plain => Kind::Groups,
            Kind::Groups => Kind::Plain,
        }
    }
}

/// How a mixed worker's slots are divided between its plain and its group loop (see
/// [`MixedWorker`](crate::MixedWorker), "Fair shares"). The loops report whether they have
/// work waiting for a slot; while only one does, it may take every free slot; while both
/// do, each may hold half of them, the odd slot of an odd capacity going to each in turn.
pub(crate) struct Share {
    capacity: usize,
    /// Slots held by running groups (counted until a group gives its slot up or ends).
    groups: AtomicUsize,
    state: Mutex<ShareState>,
    /// Per loop: woken when the share moves its way.
    pub(crate) turn: [Arc<Notify>; 2],
}

struct ShareState {
    /// Per loop: it has work it has no slot for.
    waiting: [bool; 2],
    /// Whose half holds the odd slot of an odd capacity.
    odd: Kind,
}

impl Share {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            capacity,
            groups: AtomicUsize::new(0),
            state: Mutex::new(ShareState {
                waiting: [false; 2],
                odd: Kind::Plain,
            }),
            turn: [Arc::new(Notify::new()), Arc::new(Notify::new())],
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, ShareState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The slots `kind` may hold while the other loop waits too.
    fn entitled(&self, kind: Kind, state: &ShareState) -> usize {
        self.capacity / 2 + usize::from(self.capacity % 2 == 1 && state.odd == kind)
    }

    /// The slots `kind` holds, of `busy`.
    fn holding(&self, kind: Kind, busy: usize) -> usize {
        let groups = self.groups.load(Ordering::SeqCst).min(busy);
        match kind {
            Kind::Groups => groups,
            Kind::Plain => busy - groups,
        }
    }

    /// How many of the `free` slots `kind` may take now, `busy` being taken.
    pub(crate) fn allowance(&self, kind: Kind, free: usize, busy: usize) -> usize {
        let state = self.state();
        if !state.waiting[kind.other().index()] {
            return free;
        }
        self.entitled(kind, &state)
            .saturating_sub(self.holding(kind, busy))
            .min(free)
    }

    /// `kind` took slots (`busy` now taken): if that used the odd slot while the other
    /// waits, the odd slot is the other's next.
    pub(crate) fn took(&self, kind: Kind, busy: usize) {
        let mut state = self.state();
        let other = kind.other();
        if state.waiting[other.index()]
            && self.capacity % 2 == 1
            && state.odd == kind
            && self.holding(kind, busy) > self.capacity / 2
        {
            state.odd = other;
            drop(state);
            self.turn[other.index()].notify_one();
        }
    }

    /// Whether `kind` has work it has no slot for. When it stops waiting, the other loop is
    /// woken: it may take every free slot again.
    pub(crate) fn set_waiting(&self, kind: Kind, waiting: bool) {
        let mut state = self.state();
        if state.waiting[kind.index()] == waiting {
            return;
        }
        state.waiting[kind.index()] = waiting;
        drop(state);
        if !waiting {
            self.turn[kind.other().index()].notify_one();
        }
    }

    /// Counts a group's slot, until the returned guard gives it up or is dropped.
    pub(crate) fn hold_group(self: &Arc<Self>) -> GroupSlot {
        self.groups.fetch_add(1, Ordering::SeqCst);
        GroupSlot {
            share: Arc::clone(self),
            held: true,
        }
    }

    /// Asked by a group after each message: `true` (and the slot no longer counted as the
    /// groups') when it should give its slot up, because plain work waits and the groups
    /// hold more than their half.
    pub(crate) fn yield_group(&self, slot: &mut GroupSlot, busy: usize) -> bool {
        let state = self.state();
        let give_up = slot.held
            && state.waiting[Kind::Plain.index()]
            && self.holding(Kind::Groups, busy) > self.entitled(Kind::Groups, &state);
        if give_up {
            slot.release();
        }
        give_up
    }
}

/// A running group's slot, counted in [`Share`] until given up or dropped.
pub(crate) struct GroupSlot {
    share: Arc<Share>,
    held: bool,
}

impl GroupSlot {
    fn release(&mut self) {
        if std::mem::take(&mut self.held) {
            self.share.groups.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Drop for GroupSlot {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use futures_util::FutureExt;

    use super::*;

    fn woken(share: &Share, kind: Kind) -> bool {
        share.turn[kind.index()].notified().now_or_never().is_some()
    }

    #[test]
    fn a_loop_alone_takes_every_free_slot() {
        let share = Arc::new(Share::new(8));
        let _groups: Vec<GroupSlot> = (0..6).map(|_| share.hold_group()).collect();
        // Groups hold 6 of 8; plain waits, but the groups do not: plain may take both.
        share.set_waiting(Kind::Plain, true);
        assert_eq!(share.allowance(Kind::Plain, 2, 6), 2);
        // The groups are not waiting either when plain is not.
        share.set_waiting(Kind::Plain, false);
        assert_eq!(share.allowance(Kind::Groups, 2, 6), 2);
    }

    #[test]
    fn both_waiting_each_holds_half() {
        let share = Arc::new(Share::new(8));
        share.set_waiting(Kind::Plain, true);
        share.set_waiting(Kind::Groups, true);
        let mut groups: Vec<GroupSlot> = (0..7).map(|_| share.hold_group()).collect();
        // Groups hold 7, plain 1 (busy 8): nothing more for the groups; plain up to 3 more.
        assert_eq!(share.allowance(Kind::Groups, 0, 8), 0);
        assert_eq!(share.allowance(Kind::Plain, 0, 8), 0, "no slot is free");
        // Three groups finish a message: three give their slots up, the fourth keeps it.
        let gave_up: Vec<bool> = groups
            .iter_mut()
            .take(4)
            .map(|slot| share.yield_group(slot, 8))
            .collect();
        assert_eq!(gave_up, [true, true, true, false]);
        // Their slots free: plain may take them, the groups none.
        assert_eq!(share.allowance(Kind::Plain, 3, 5), 3);
        assert_eq!(share.allowance(Kind::Groups, 3, 5), 0);
        groups.drain(..3);
        assert_eq!(
            share.allowance(Kind::Groups, 3, 5),
            0,
            "groups hold their 4"
        );
        // Plain takes its three; then a group ends: its slot goes back to the groups, not
        // to plain, which holds its half.
        share.took(Kind::Plain, 8);
        drop(groups.pop());
        assert_eq!(share.allowance(Kind::Groups, 1, 7), 1);
        assert_eq!(share.allowance(Kind::Plain, 1, 7), 0);
    }

    #[test]
    fn one_slot_alternates_between_the_kinds() {
        let share = Arc::new(Share::new(1));
        share.set_waiting(Kind::Plain, true);
        share.set_waiting(Kind::Groups, true);
        // Plain has the odd slot first.
        assert_eq!(share.allowance(Kind::Groups, 1, 0), 0);
        assert_eq!(share.allowance(Kind::Plain, 1, 0), 1);
        share.took(Kind::Plain, 1);
        assert!(woken(&share, Kind::Groups), "the turn passed to the groups");
        // The plain job ends: the slot is the groups'.
        assert_eq!(share.allowance(Kind::Plain, 1, 0), 0);
        assert_eq!(share.allowance(Kind::Groups, 1, 0), 1);
        let mut slot = share.hold_group();
        share.took(Kind::Groups, 1);
        // After its message the group gives the slot up to waiting plain work.
        assert!(share.yield_group(&mut slot, 1));
        drop(slot);
        assert_eq!(share.allowance(Kind::Plain, 1, 0), 1);
        assert_eq!(share.allowance(Kind::Groups, 1, 0), 0);
    }

    #[test]
    fn a_group_keeps_its_slot_while_no_plain_work_waits() {
        let share = Arc::new(Share::new(2));
        share.set_waiting(Kind::Groups, true);
        let mut slots = [share.hold_group(), share.hold_group()];
        assert!(!share.yield_group(&mut slots[0], 2));
        share.set_waiting(Kind::Plain, true);
        assert!(share.yield_group(&mut slots[0], 2));
        assert!(
            !share.yield_group(&mut slots[0], 2),
            "a slot is given up once"
        );
        assert!(!share.yield_group(&mut slots[1], 2), "the groups' half");
    }

    #[test]
    fn a_loop_that_stops_waiting_wakes_the_other() {
        let share = Share::new(4);
        share.set_waiting(Kind::Groups, true);
        assert!(!woken(&share, Kind::Plain));
        share.set_waiting(Kind::Groups, true);
        share.set_waiting(Kind::Groups, false);
        assert!(woken(&share, Kind::Plain));
        assert!(!woken(&share, Kind::Groups));
    }
}
