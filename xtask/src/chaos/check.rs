//! Checking a record against pgbus's promises: every message processed at least once,
//! duplicates only where a fault explains them, and ordered groups run one at a time, in
//! order.
//!
//! A *run* is one handler execution: a start line and, unless the handler was cut off, the
//! end line of the same worker and message. A run is *cut off* when its worker was
//! SIGKILLed before the run ended: the handler process outlives its worker (it is
//! re-parented), so its end line can come after another worker took the message, or the
//! group, when the dead worker's lease ran out. That is the one overlap at-least-once
//! delivery allows; every other pair of completed runs of one group must be disjoint.

use std::collections::{BTreeMap, HashMap};

use super::record::{Kind, Line};

/// Which message numbers are plain and which belong to which group: plain messages are
/// `0..plain`, then `groups` groups of `per_group` messages, group `g`'s sequence number
/// `s` being message `plain + g * per_group + s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Layout {
    pub(crate) plain: u64,
    pub(crate) groups: u64,
    pub(crate) per_group: u64,
}

impl Layout {
    pub(crate) fn total(&self) -> u64 {
        self.plain + self.groups * self.per_group
    }

    /// `(group, seq)` of a grouped message.
    pub(crate) fn group_of(&self, n: u64) -> Option<(u64, u64)> {
        if n < self.plain || n >= self.total() || self.per_group == 0 {
            return None;
        }
        let i = n - self.plain;
        Some((i / self.per_group, i % self.per_group))
    }

    /// The message number of `(group, seq)`.
    pub(crate) fn number(&self, group: u64, seq: u64) -> u64 {
        self.plain + group * self.per_group + seq
    }
}

/// The harness SIGKILLed `worker` at `at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Kill {
    pub(crate) worker: u32,
    pub(crate) at: u64,
}

/// A fault that hit every worker from `from` to `to` (a restart, a lock, terminated
/// connections): a completion then may lose its ack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Window {
    pub(crate) from: u64,
    pub(crate) to: u64,
}

/// One handler execution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Run {
    pub(crate) worker: u32,
    pub(crate) n: u64,
    pub(crate) start: u64,
    pub(crate) end: Option<u64>,
}

/// Pairs start and end lines into runs (per worker and message, first in first out), in
/// start order.
pub(crate) fn runs(lines: &[Line]) -> Vec<Run> {
    let mut sorted: Vec<&Line> = lines.iter().collect();
    sorted.sort_by_key(|l| (l.at, l.kind == Kind::End));
    let mut runs: Vec<Run> = Vec::new();
    let mut open: HashMap<(u32, u64), Vec<usize>> = HashMap::new();
    for line in sorted {
        match line.kind {
            Kind::Start => {
                open.entry((line.worker, line.n))
                    .or_default()
                    .push(runs.len());
                runs.push(Run {
                    worker: line.worker,
                    n: line.n,
                    start: line.at,
                    end: None,
                });
            }
            Kind::End => {
                if let Some(pending) = open.get_mut(&(line.worker, line.n)) {
                    if !pending.is_empty() {
                        let index = pending.remove(0);
                        runs[index].end = Some(line.at);
                    }
                }
            }
        }
    }
    runs
}

/// How the work a killed worker was running came back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KillRecovery {
    /// It was running nothing.
    Idle,
    /// Its last running message was completed elsewhere this long (ns) after the kill.
    Recovered(u64),
    /// A message it was running was never completed by another worker.
    Never,
}

/// What a record says about one scenario.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Analysis {
    /// Messages with at least one completed run.
    pub(crate) processed: u64,
    /// Completed runs beyond the first, over all messages.
    pub(crate) duplicates: u64,
    /// Duplicates that no kill or fault window explains.
    pub(crate) unexplained_duplicates: u64,
    /// Per kill: the duplicates it explains (messages its worker had not acked).
    pub(crate) kill_duplicates: Vec<u64>,
    /// Messages never completed.
    pub(crate) lost: Vec<u64>,
    /// Grouped messages that started before their predecessor had completed once.
    pub(crate) order_violations: Vec<String>,
    /// Completed, not cut-off runs of one group that overlapped.
    pub(crate) overlaps: Vec<String>,
    /// Per kill: how long until the messages the killed worker was running had all been
    /// completed by other workers.
    pub(crate) kill_recoveries: Vec<KillRecovery>,
    /// Runs left out of the overlap check because their worker was killed under them.
    pub(crate) cut_off: u64,
}

/// Margin around a fault inside which a completion may lose its ack (acks are retried
/// for about a second and a half before a worker gives up).
pub(crate) const ACK_SLACK_NS: u64 = 3_000_000_000;

/// The faults of a run, as the checks need them.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Faults<'a> {
    /// Every worker pid the harness started: a run naming another pid was started by a
    /// handler whose worker had already died (it names the orphan reaper).
    pub(crate) workers: &'a [u32],
    pub(crate) kills: &'a [Kill],
    pub(crate) windows: &'a [Window],
}

impl Faults<'_> {
    fn orphan(&self, run: &Run) -> bool {
        !self.workers.contains(&run.worker)
    }

    /// The kill that explains a lost ack of `run`: its worker's, when the run had not
    /// ended long before it; for an orphan, a kill just before it started.
    fn kill_of(&self, run: &Run) -> Option<usize> {
        if self.orphan(run) {
            return self.kills.iter().position(|k| {
                k.at <= run.start + ACK_SLACK_NS && run.start <= k.at + ACK_SLACK_NS
            });
        }
        self.kills.iter().position(|k| {
            k.worker == run.worker && run.end.is_none_or(|end| end + ACK_SLACK_NS >= k.at)
        })
    }

    /// Whether the run's worker died under it, so its end says nothing about exclusivity.
    fn cut_off(&self, run: &Run) -> bool {
        self.orphan(run)
            || self
                .kills
                .iter()
                .any(|k| k.worker == run.worker && run.end.is_none_or(|end| end > k.at))
    }

    fn in_window(&self, run: &Run) -> bool {
        run.end.is_some_and(|end| {
            self.windows
                .iter()
                .any(|w| end + ACK_SLACK_NS >= w.from && end <= w.to + ACK_SLACK_NS)
        })
    }
}

/// Checks `lines` of a run of `layout` in which `faults` happened.
pub(crate) fn analyze(layout: &Layout, lines: &[Line], faults: &Faults<'_>) -> Analysis {
    let runs = runs(lines);
    let mut by_message: BTreeMap<u64, Vec<&Run>> = BTreeMap::new();
    for run in &runs {
        by_message.entry(run.n).or_default().push(run);
    }
    let mut analysis = Analysis {
        kill_duplicates: vec![0; faults.kills.len()],
        ..Analysis::default()
    };
    for n in 0..layout.total() {
        let completed: Vec<&&Run> = by_message
            .get(&n)
            .map(|runs| runs.iter().filter(|r| r.end.is_some()).collect())
            .unwrap_or_default();
        if completed.is_empty() {
            analysis.lost.push(n);
            continue;
        }
        analysis.processed += 1;
        let duplicates = completed.len() as u64 - 1;
        analysis.duplicates += duplicates;
        // One completion is the one that was acked; every other must have lost its ack
        // to a fault.
        let mut unexplained = 0u64;
        let mut attributed = 0u64;
        for run in &completed {
            match faults.kill_of(run) {
                Some(kill) if attributed < duplicates => {
                    analysis.kill_duplicates[kill] += 1;
                    attributed += 1;
                }
                Some(_) => {}
                None if faults.in_window(run) => {}
                None => unexplained += 1,
            }
        }
        analysis.unexplained_duplicates += unexplained.saturating_sub(1);
    }

    for (index, kill) in faults.kills.iter().enumerate() {
        let running: Vec<u64> = runs
            .iter()
            .filter(|r| {
                let own = r.worker == kill.worker
                    && r.start < kill.at
                    && r.end.is_none_or(|end| end > kill.at);
                own || (faults.orphan(r) && faults.kill_of(r) == Some(index))
            })
            .map(|r| r.n)
            .collect();
        let recovered = running.iter().map(|n| {
            by_message.get(n).and_then(|runs| {
                runs.iter()
                    .filter(|r| r.worker != kill.worker && !faults.orphan(r))
                    .filter_map(|r| r.end)
                    .filter(|&end| end > kill.at)
                    .min()
                    .map(|end| end - kill.at)
            })
        });
        analysis
            .kill_recoveries
            .push(match recovered.collect::<Option<Vec<u64>>>() {
                None => KillRecovery::Never,
                Some(all) => all
                    .into_iter()
                    .max()
                    .map_or(KillRecovery::Idle, KillRecovery::Recovered),
            });
    }

    analysis.cut_off = runs.iter().filter(|r| faults.cut_off(r)).count() as u64;
    for group in 0..layout.groups {
        check_group(
            layout,
            group,
            &by_message,
            &|r| faults.cut_off(r),
            &mut analysis,
        );
    }
    analysis
}

fn check_group(
    layout: &Layout,
    group: u64,
    by_message: &BTreeMap<u64, Vec<&Run>>,
    cut_off: &dyn Fn(&Run) -> bool,
    analysis: &mut Analysis,
) {
    let runs_of = |seq: u64| -> &[&Run] {
        by_message
            .get(&layout.number(group, seq))
            .map_or(&[], Vec::as_slice)
    };
    // Order: a message starts only after its predecessor completed at least once.
    for seq in 1..layout.per_group {
        let Some(first_start) = runs_of(seq).iter().map(|r| r.start).min() else {
            continue;
        };
        let predecessor_done = runs_of(seq - 1)
            .iter()
            .filter_map(|r| r.end)
            .any(|end| end < first_start);
        if !predecessor_done {
            analysis.order_violations.push(format!(
                "group {group}: seq {seq} started at {} ms before seq {} had completed",
                first_start / 1_000_000,
                seq - 1
            ));
        }
    }
    // Exclusivity: completed runs that were not cut off by a kill never overlap.
    let mut complete: Vec<&Run> = (0..layout.per_group)
        .flat_map(|seq| runs_of(seq).iter().copied())
        .filter(|r| r.end.is_some() && !cut_off(r))
        .collect();
    complete.sort_by_key(|r| r.start);
    let mut latest: Option<&Run> = None;
    for run in complete {
        if let Some(previous) = latest {
            let previous_end = previous.end.unwrap_or(0);
            if run.start < previous_end {
                analysis.overlaps.push(format!(
                    "group {group}: message {} (worker {}, {}..{} ms) overlaps message {} (worker {}, {}..{} ms)",
                    previous.n,
                    previous.worker,
                    previous.start / 1_000_000,
                    previous_end / 1_000_000,
                    run.n,
                    run.worker,
                    run.start / 1_000_000,
                    run.end.unwrap_or(0) / 1_000_000,
                ));
            }
            if run.end > previous.end {
                latest = Some(run);
            }
        } else {
            latest = Some(run);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn line(kind: Kind, worker: u32, at_ms: u64, n: u64) -> Line {
        Line {
            kind,
            worker,
            at: at_ms * MS,
            n,
            attempt: 1,
        }
    }

    /// A run of message `n` by `worker` from `start` to `end` ms (no end: cut off).
    fn run(lines: &mut Vec<Line>, worker: u32, n: u64, start: u64, end: Option<u64>) {
        lines.push(line(Kind::Start, worker, start, n));
        if let Some(end) = end {
            lines.push(line(Kind::End, worker, end, n));
        }
    }

    const PLAIN: Layout = Layout {
        plain: 3,
        groups: 0,
        per_group: 0,
    };

    const PLAIN4: Layout = Layout {
        plain: 4,
        groups: 0,
        per_group: 0,
    };

    /// Workers 1..=3 and 1,001 are the harness's; anything else is an orphan.
    const WORKERS: [u32; 4] = [1_001, 2, 3, 4];

    fn faults<'a>(kills: &'a [Kill], windows: &'a [Window]) -> Faults<'a> {
        Faults {
            workers: &WORKERS,
            kills,
            windows,
        }
    }

    #[test]
    fn layout_numbers_groups_after_plain_messages() {
        let layout = Layout {
            plain: 10,
            groups: 3,
            per_group: 4,
        };
        assert_eq!(layout.total(), 22);
        assert_eq!(layout.group_of(9), None);
        assert_eq!(layout.group_of(10), Some((0, 0)));
        assert_eq!(layout.group_of(15), Some((1, 1)));
        assert_eq!(layout.group_of(22), None);
        assert_eq!(layout.number(1, 1), 15);
    }

    #[test]
    fn runs_pair_starts_and_ends_of_the_same_worker() {
        let mut lines = Vec::new();
        run(&mut lines, 1, 0, 10, Some(20));
        run(&mut lines, 2, 0, 15, None);
        run(&mut lines, 1, 0, 30, Some(40));
        let runs = runs(&lines);
        assert_eq!(
            runs.iter()
                .map(|r| (r.worker, r.start / MS, r.end.map(|e| e / MS)))
                .collect::<Vec<_>>(),
            [(1, 10, Some(20)), (2, 15, None), (1, 30, Some(40))]
        );
    }

    #[test]
    fn lost_and_duplicated_messages_are_counted() {
        let mut lines = Vec::new();
        run(&mut lines, 3, 0, 10, Some(20));
        // Message 1 started but never completed: lost.
        run(&mut lines, 3, 1, 10, None);
        // Message 2 completed twice with no fault anywhere: an unexplained duplicate.
        run(&mut lines, 3, 2, 10, Some(20));
        run(&mut lines, 2, 2, 30_000, Some(30_010));
        let analysis = analyze(&PLAIN, &lines, &faults(&[], &[]));
        assert_eq!(analysis.processed, 2);
        assert_eq!(analysis.lost, [1]);
        assert_eq!(analysis.duplicates, 1);
        assert_eq!(analysis.unexplained_duplicates, 1);
        // Had worker 3 been killed while running message 1, nobody took it over.
        let kills = [Kill {
            worker: 3,
            at: 15 * MS,
        }];
        let analysis = analyze(&PLAIN, &lines, &faults(&kills, &[]));
        assert_eq!(analysis.kill_recoveries, [KillRecovery::Never]);
    }

    #[test]
    fn duplicates_of_work_in_flight_at_a_kill_are_explained() {
        let mut lines = Vec::new();
        // Worker 1 completes message 0 just before it is killed (the ack was lost), its
        // orphaned handler completes message 1 after the kill, and a handler it had just
        // forked starts message 2 after its death (naming the reaper, pid 1).
        run(&mut lines, 1_001, 0, 10, Some(20));
        run(&mut lines, 1_001, 1, 15, Some(2_500));
        run(&mut lines, 1, 2, 31, Some(40));
        run(&mut lines, 2, 0, 2_100, Some(2_110));
        run(&mut lines, 2, 1, 2_100, Some(2_120));
        run(&mut lines, 2, 2, 2_100, Some(2_130));
        run(&mut lines, 2, 3, 2_100, Some(2_130));
        let kills = [Kill {
            worker: 1_001,
            at: 30 * MS,
        }];
        let analysis = analyze(&PLAIN4, &lines, &faults(&kills, &[]));
        assert_eq!(analysis.lost, Vec::<u64>::new());
        assert_eq!(analysis.duplicates, 3);
        assert_eq!(analysis.unexplained_duplicates, 0);
        assert_eq!(analysis.kill_duplicates, [3]);
        // Messages 1 and 2 were running at the kill; worker 2 completed the last of them
        // 2,100 ms later.
        assert_eq!(
            analysis.kill_recoveries,
            [KillRecovery::Recovered(2_100 * MS)]
        );

        // The same duplicates far from any kill or window are unexplained.
        let late = [Kill {
            worker: 1_001,
            at: 60_000 * MS,
        }];
        assert_eq!(
            analyze(&PLAIN4, &lines, &faults(&late, &[])).unexplained_duplicates,
            3
        );
        let window = [Window {
            from: 19 * MS,
            to: 2_500 * MS,
        }];
        assert_eq!(
            analyze(&PLAIN4, &lines, &faults(&[], &window)).unexplained_duplicates,
            0
        );
    }

    const GROUPS: Layout = Layout {
        plain: 0,
        groups: 1,
        per_group: 3,
    };

    #[test]
    fn groups_in_order_one_at_a_time_pass() {
        let mut lines = Vec::new();
        run(&mut lines, 1_001, 0, 10, Some(20));
        run(&mut lines, 2, 1, 25, Some(30));
        run(&mut lines, 1_001, 2, 31, Some(40));
        let analysis = analyze(&GROUPS, &lines, &faults(&[], &[]));
        assert_eq!(analysis.order_violations, Vec::<String>::new());
        assert_eq!(analysis.overlaps, Vec::<String>::new());
    }

    #[test]
    fn a_message_started_before_its_predecessor_completed_breaks_order() {
        let mut lines = Vec::new();
        run(&mut lines, 1_001, 0, 10, Some(20));
        run(&mut lines, 1_001, 2, 21, Some(22));
        run(&mut lines, 2, 1, 23, Some(24));
        let analysis = analyze(&GROUPS, &lines, &faults(&[], &[]));
        assert_eq!(analysis.order_violations.len(), 1, "{analysis:?}");
        assert!(
            analysis.order_violations[0].contains("seq 2"),
            "{analysis:?}"
        );
    }

    #[test]
    fn overlapping_completed_runs_break_exclusivity_unless_cut_off_by_a_kill() {
        let mut lines = Vec::new();
        // Worker 1 runs message 0 from 10 to 3,000 ms; worker 2 takes it over at 2,500
        // ms (the lease ran out) and goes on with message 1.
        run(&mut lines, 1_001, 0, 10, Some(3_000));
        run(&mut lines, 2, 0, 2_500, Some(2_600));
        run(&mut lines, 2, 1, 2_700, Some(2_800));
        run(&mut lines, 2, 2, 2_900, Some(3_100));
        let analysis = analyze(&GROUPS, &lines, &faults(&[], &[]));
        assert_eq!(analysis.overlaps.len(), 3, "{analysis:?}");

        // Killed at 100 ms: its run was cut off, the takeover is legitimate.
        let kills = [Kill {
            worker: 1_001,
            at: 100 * MS,
        }];
        let analysis = analyze(&GROUPS, &lines, &faults(&kills, &[]));
        assert_eq!(analysis.overlaps, Vec::<String>::new());
        assert_eq!(analysis.cut_off, 1);
        // Worker 2 completed message 0 at 2,600 ms.
        assert_eq!(
            analysis.kill_recoveries,
            [KillRecovery::Recovered(2_500 * MS)]
        );
        let idle = [Kill {
            worker: 3,
            at: 100 * MS,
        }];
        assert_eq!(
            analyze(&GROUPS, &lines, &faults(&idle, &[])).kill_recoveries,
            [KillRecovery::Idle]
        );
        assert_eq!(analysis.order_violations, Vec::<String>::new());
    }
}
