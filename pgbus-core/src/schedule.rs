//! Recurring jobs: when a task's occurrences fall and which of them a scheduler enqueues.
//!
//! Times are UTC. Interval schedules are anchored at the Unix epoch (every 15 minutes means
//! :00, :15, :30, :45), so every scheduler process computes the same occurrence times and
//! an occurrence can be enqueued exactly once under its (task, time) key.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chrono::{DateTime, Datelike, NaiveDate, SubsecRound, Utc};

use crate::{Error, NewMessage, QueueName, Result};

/// The longest task name, in bytes.
pub const MAX_TASK_NAME_LEN: usize = 100;

/// The most missed occurrences one scheduler tick enqueues ([`MissedRuns::CatchUp`]): they
/// go in one transaction, so a week's downtime of a 10 ms task with an unbounded catch-up
/// would be one send of 60 million jobs held in memory.
pub const MAX_CATCH_UP: u32 = 10_000;

/// When a recurring task runs.
#[derive(Clone)]
pub struct Schedule(Kind);

#[derive(Clone)]
enum Kind {
    Cron(Box<croner::Cron>),
    Every(Duration),
}

impl Schedule {
    /// A cron expression: five fields (minute to weekday) or six with seconds first
    /// (`*/5 * * * * *` is every five seconds), evaluated in UTC.
    ///
    /// An expression that never occurs after now is refused: one with a field that matches
    /// no value (`,` as the hour), a date that doesn't exist (`0 0 30 2 *`), or only past
    /// years. croner would search for its occurrences on every tick until its own limits
    /// (up to 7 s of CPU for an empty field), so these are found here by cheaper means.
    pub fn cron(expression: &str) -> Result<Self> {
        Self::cron_at(expression, Utc::now())
    }

    fn cron_at(expression: &str, now: DateTime<Utc>) -> Result<Self> {
        let invalid = |why: &dyn fmt::Display| {
            Error::InvalidArgument(format!("invalid cron expression {expression:?}: {why}"))
        };
        let cron = croner::Cron::from_str(expression).map_err(|err| invalid(&err))?;
        let p = &cron.pattern;
        let fields = [
            (
                "second",
                (0..60).any(|v| p.second_match(v).unwrap_or(false)),
            ),
            (
                "minute",
                (0..60).any(|v| p.minute_match(v).unwrap_or(false)),
            ),
            ("hour", (0..24).any(|v| p.hour_match(v).unwrap_or(false))),
            ("month", (1..=12).any(|v| p.month_match(v).unwrap_or(false))),
        ];
        if let Some((field, _)) = fields.iter().find(|(_, matches_some)| !matches_some) {
            return Err(invalid(&format_args!("its {field} field matches no value")));
        }
        if !some_date_matches(&cron, now.year()) {
            return Err(invalid(&format_args!(
                "no date matches it in the next {DATE_SEARCH_YEARS} years it allows"
            )));
        }
        // A date exists within those years, so croner's search is short (it steps a day
        // at a time): it only fails for dates earlier this year of a last allowed year.
        if cron.find_next_occurrence(&now, false).is_err() {
            return Err(invalid(&"it never occurs after now"));
        }
        Ok(Self(Kind::Cron(Box::new(cron))))
    }

    /// A fixed interval of at least 10 ms, anchored at the Unix epoch.
    pub fn every(interval: Duration) -> Result<Self> {
        if interval < Duration::from_millis(10) {
            return Err(Error::InvalidArgument(
                "a schedule interval must be at least 10 ms".into(),
            ));
        }
        crate::check_delay("a schedule interval", interval)?;
        Ok(Self(Kind::Every(interval)))
    }

    /// The latest occurrence at or before `t`.
    pub fn latest_at_or_before(&self, t: SystemTime) -> Option<SystemTime> {
        self.step(t, true, false)
    }

    /// The first occurrence after `t`.
    pub fn next_after(&self, t: SystemTime) -> Option<SystemTime> {
        self.step(t, false, true)
    }

    fn step(&self, t: SystemTime, inclusive: bool, forward: bool) -> Option<SystemTime> {
        match &self.0 {
            Kind::Every(interval) => {
                let since = t.duration_since(UNIX_EPOCH).ok()?.as_nanos();
                let every = interval.as_nanos();
                let at_or_before = since - since % every;
                let nanos = if forward {
                    at_or_before + every
                } else if inclusive || at_or_before < since {
                    at_or_before
                } else {
                    at_or_before.checked_sub(every)?
                };
                Some(UNIX_EPOCH + Duration::from_nanos(u64::try_from(nanos).ok()?))
            }
            Kind::Cron(cron) => {
                // Cron occurrences are whole seconds, but croner keeps the fraction of
                // the time it searches from in what it finds (from 12:00:01.5 the latest
                // `*/5` is 12:00:00.5): every tick of a scheduler would find a new
                // "occurrence". So search from the whole second at or before `t`; when `t`
                // had a fraction, that second itself is before `t` (so it counts going
                // back, and not going forward).
                let t: DateTime<Utc> = t.into();
                let whole = t.trunc_subsecs(0);
                let fraction = whole < t;
                let found = if forward {
                    cron.find_next_occurrence(&whole, inclusive && !fraction)
                } else {
                    cron.find_previous_occurrence(&whole, inclusive || fraction)
                };
                found.ok().map(SystemTime::from)
            }
        }
    }

    /// The occurrences after `last` and at or before `now` that the policy enqueues,
    /// oldest first.
    pub fn due(&self, last: SystemTime, now: SystemTime, missed: MissedRuns) -> Vec<SystemTime> {
        let keep = match missed {
            MissedRuns::Skip => 1,
            MissedRuns::CatchUp(max) => max.clamp(1, MAX_CATCH_UP) as usize,
        };
        let mut due = Vec::new();
        let mut at = self.latest_at_or_before(now);
        while let Some(t) = at {
            if t <= last || due.len() == keep {
                break;
            }
            due.push(t);
            at = self.step(t, false, false);
        }
        due.reverse();
        due
    }
}

/// How many of a pattern's allowed years [`some_date_matches`] looks through. A day of
/// the month on a weekday recurs within 40 years (a Monday 29 February: 28 years, 40 across
/// the 2100 that is no leap year).
const DATE_SEARCH_YEARS: usize = 60;

/// Whether a date of one of the pattern's first [`DATE_SEARCH_YEARS`] years from `year` on
/// matches its year, month, day-of-month and weekday fields (croner's own `day_match`, so
/// `L`, `W`, `#` and the OR or `+` AND of the two day fields count as croner counts them).
fn some_date_matches(cron: &croner::Cron, year: i32) -> bool {
    let p = &cron.pattern;
    let years = (year..=croner::YEAR_UPPER_LIMIT).filter(|&y| p.year_match(y).unwrap_or(false));
    for year in years.take(DATE_SEARCH_YEARS) {
        for month in (1..=12).filter(|&m| p.month_match(m).unwrap_or(false)) {
            let mut days =
                (1..=31).take_while(|&d| NaiveDate::from_ymd_opt(year, month, d).is_some());
            if days.any(|d| p.day_match(year, month, d).unwrap_or(false)) {
                return true;
            }
        }
    }
    false
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Kind::Cron(cron) => write!(f, "cron {}", cron.pattern),
            Kind::Every(interval) => write!(f, "every {interval:?}"),
        }
    }
}

impl fmt::Debug for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Schedule({self})")
    }
}

/// What a scheduler does with occurrences that passed while no scheduler ran (downtime,
/// or a leader's death before another took over).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum MissedRuns {
    /// Enqueue only the latest occurrence; the others are skipped.
    Skip,
    /// Enqueue the missed occurrences too, at most this many (the latest ones), and at
    /// most [`MAX_CATCH_UP`].
    CatchUp(u32),
}

/// A recurring job: a message enqueued to a queue at every occurrence of a schedule, with
/// the headers `pgbus-task` (the name) and `pgbus-scheduled-at` (the occurrence, RFC 3339).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RecurringTask {
    /// Unique name: `[a-z0-9_.:-]`, 1 to 100 bytes.
    pub name: String,
    /// Where its jobs go.
    pub queue: QueueName,
    /// When.
    pub schedule: Schedule,
    /// The job sent at each occurrence.
    pub message: NewMessage,
    /// Missed occurrences; default [`MissedRuns::Skip`].
    pub missed: MissedRuns,
}

impl RecurringTask {
    /// A task; the name is checked.
    pub fn new(
        name: impl Into<String>,
        queue: QueueName,
        schedule: Schedule,
        message: NewMessage,
    ) -> Result<Self> {
        let name = name.into();
        let valid = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "_.:-".contains(c);
        if name.is_empty() || name.len() > MAX_TASK_NAME_LEN || !name.chars().all(valid) {
            return Err(Error::InvalidArgument(format!(
                "invalid task name {name:?}: 1 to {MAX_TASK_NAME_LEN} bytes of [a-z0-9_.:-]"
            )));
        }
        Ok(Self {
            name,
            queue,
            schedule,
            message,
            missed: MissedRuns::Skip,
        })
    }

    /// The job for the occurrence at `at`: the task's message with its headers.
    pub fn message_for(&self, at: SystemTime) -> NewMessage {
        let at: DateTime<Utc> = at.into();
        self.message
            .clone()
            .header("pgbus-task", self.name.clone())
            .header(
                "pgbus-scheduled-at",
                at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            )
    }

    /// The policy as text (`skip`, `catch-up 10`).
    pub fn missed_text(&self) -> String {
        match self.missed {
            MissedRuns::Skip => "skip".into(),
            MissedRuns::CatchUp(max) => format!("catch-up {max}"),
        }
    }

    /// Sets the missed-occurrence policy.
    pub fn missed(mut self, missed: MissedRuns) -> Self {
        self.missed = missed;
        self
    }
}

/// One task of a config file (see [`tasks_from_json`]).
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TaskSpec {
    name: String,
    queue: String,
    cron: Option<String>,
    every_secs: Option<f64>,
    payload: serde_json::Value,
    #[serde(default)]
    headers: crate::Headers,
    #[serde(default)]
    priority: i16,
    #[serde(default)]
    catch_up: Option<u32>,
}

/// Reads recurring tasks from a JSON config file: an array of objects with `name`,
/// `queue`, either `cron` (an expression) or `every_secs` (an interval), `payload` (any
/// JSON, sent as a JSON job), and optionally `headers`, `priority` and `catch_up` (the
/// most missed occurrences to enqueue; without it missed ones are skipped).
///
/// ```
/// let tasks = pgbus_core::tasks_from_json(r#"[
///     {"name": "nightly", "queue": "reports", "cron": "0 3 * * *", "payload": {"kind": "daily"}},
///     {"name": "poll", "queue": "feeds", "every_secs": 30, "payload": null, "catch_up": 2}
/// ]"#).unwrap();
/// assert_eq!(tasks.len(), 2);
/// ```
pub fn tasks_from_json(text: &str) -> Result<Vec<RecurringTask>> {
    let specs: Vec<TaskSpec> = serde_json::from_str(text)
        .map_err(|err| Error::InvalidArgument(format!("invalid recurring task config: {err}")))?;
    specs
        .into_iter()
        .map(|spec| {
            let schedule = match (&spec.cron, spec.every_secs) {
                (Some(cron), None) => Schedule::cron(cron)?,
                (None, Some(secs)) if secs > 0.0 => {
                    let interval = Duration::try_from_secs_f64(secs).map_err(|_| {
                        Error::InvalidArgument(format!(
                            "recurring task {:?}: `every_secs` {secs} is not a usable interval",
                            spec.name
                        ))
                    })?;
                    Schedule::every(interval)?
                }
                _ => {
                    return Err(Error::InvalidArgument(format!(
                        "recurring task {:?} needs either `cron` or a positive `every_secs`",
                        spec.name
                    )))
                }
            };
            let mut message = NewMessage::json(&spec.payload)?.priority(spec.priority);
            message.headers = spec.headers;
            let task =
                RecurringTask::new(spec.name, QueueName::new(spec.queue)?, schedule, message)?;
            Ok(match spec.catch_up {
                Some(max) if max > MAX_CATCH_UP => {
                    return Err(Error::InvalidArgument(format!(
                        "recurring task {:?}: `catch_up` {max} is more than {MAX_CATCH_UP}",
                        task.name
                    )))
                }
                Some(max) => task.missed(MissedRuns::CatchUp(max)),
                None => task,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn intervals_are_anchored_at_the_epoch() {
        let s = Schedule::every(Duration::from_secs(10)).unwrap();
        assert_eq!(s.latest_at_or_before(at(125)), Some(at(120)));
        assert_eq!(s.latest_at_or_before(at(120)), Some(at(120)));
        assert_eq!(s.next_after(at(120)), Some(at(130)));
        assert_eq!(s.next_after(at(125)), Some(at(130)));
        assert!(Schedule::every(Duration::from_millis(1)).is_err());
        assert!(Schedule::every(Duration::MAX).is_err());
    }

    #[test]
    fn unusable_intervals_in_a_config_are_errors_not_panics() {
        for every in ["1e20", "1e300", "0", "-1", "0.001"] {
            let config = format!(
                r#"[{{"name": "t", "queue": "q", "every_secs": {every}, "payload": null}}]"#
            );
            let err = tasks_from_json(&config).unwrap_err().to_string();
            assert!(
                err.contains("every_secs") || err.contains("interval"),
                "{every}: {err}"
            );
        }
    }

    #[test]
    fn cron_with_and_without_seconds() {
        let minutely = Schedule::cron("* * * * *").unwrap();
        assert_eq!(minutely.next_after(at(61)), Some(at(120)));
        let every_5s = Schedule::cron("*/5 * * * * *").unwrap();
        assert_eq!(every_5s.next_after(at(61)), Some(at(65)));
        assert_eq!(every_5s.latest_at_or_before(at(64)), Some(at(60)));
        assert!(Schedule::cron("not cron").is_err());
        assert_eq!(minutely.to_string(), "cron * * * * *");
    }

    /// 1 March 2023: in the only year `... 2023` allows, after its 1 January.
    fn in_2023() -> DateTime<Utc> {
        at(1_677_628_800).into()
    }

    #[test]
    fn cron_expressions_that_never_occur_are_refused() {
        // An empty seconds field cost croner 7 s per search; the fuzzer found the hour one.
        for (expression, why) in [
            (", * * * *", "minute field matches no value"),
            (", * * * * *", "second field matches no value"),
            ("* * , * * *", "hour field matches no value"),
            ("0 0 * , *", "month field matches no value"),
            ("0 0 30 2 *", "no date matches"),
            ("0 0 31 2 +1", "no date matches"),
            ("0 0 , * ,", "no date matches"),
            // The fuzzer's second: an empty day of the month, any weekday.
            ("8 4 , 2 *", "no date matches"),
            ("0 0 0 * * * 2020", "no date matches"),
            ("0 0 0 1 1 * 2023", "never occurs after now"),
        ] {
            let err = Schedule::cron_at(expression, in_2023())
                .unwrap_err()
                .to_string();
            assert!(err.contains(why), "{expression}: {err}");
        }
        // Rare but real: a leap day that is a Monday, the last day of February.
        for rare in [
            "0 0 29 2 +1",
            "0 0 L 2 *",
            "0 0 * 2 1#5",
            "0 0 0 * * * 4999",
        ] {
            assert!(Schedule::cron_at(rare, in_2023()).is_ok(), "{rare}");
        }
    }

    /// Expressions with seconds, steps, ranges and lists (and five-field ones), each
    /// checked against the occurrences `croner` itself computes.
    const EXPRESSIONS: [&str; 10] = [
        "*/5 * * * * *",
        "*/3 * * * * *",
        "10-20 * * * * *",
        "0,15,40 * * * * *",
        "5-50/7 */2 * * * *",
        "0 */5 * * * *",
        "30 0 12 * * MON-FRI",
        "* * * * *",
        "*/7 3-5 * * *",
        "0 3 * * *",
    ];

    /// A start with a fraction of a second, as the database clock gives it.
    fn fractional_start() -> SystemTime {
        at(1_700_000_000) + Duration::from_millis(33)
    }

    /// croner's occurrences after `from` (a whole second), one search after the other,
    /// while `more` holds for the last one. (Not croner 3.0's `iter_after`: it steps one
    /// second too far after each occurrence, so it skips `11` after `10` in `10-20`.)
    fn croner_after(
        expression: &str,
        from: SystemTime,
        mut more: impl FnMut(&[SystemTime]) -> bool,
    ) -> Vec<SystemTime> {
        let cron = croner::Cron::from_str(expression).unwrap();
        let mut t: DateTime<Utc> = from.into();
        let mut found = Vec::new();
        while more(&found) {
            t = cron.find_next_occurrence(&t, false).unwrap();
            found.push(t.into());
        }
        found
    }

    fn whole_seconds(t: SystemTime) -> bool {
        t.duration_since(UNIX_EPOCH).unwrap().subsec_nanos() == 0
    }

    #[test]
    fn cron_occurrences_are_crons_own_whole_seconds() {
        let start = fractional_start();
        let whole = at(1_700_000_000);
        for expression in EXPRESSIONS {
            let schedule = Schedule::cron(expression).unwrap();
            let expected = croner_after(expression, whole, |found| found.len() < 20);
            let mut found = Vec::new();
            let mut t = start;
            while found.len() < expected.len() {
                t = schedule.next_after(t).unwrap();
                found.push(t);
            }
            assert_eq!(found, expected, "{expression}");
            assert!(found.iter().copied().all(whole_seconds), "{expression}");
            // The latest at or before a time between two occurrences (with a fraction) is
            // the earlier one; at an occurrence exactly, that occurrence.
            for pair in expected.windows(2) {
                let between = pair[0] + Duration::from_millis(500);
                assert_eq!(
                    schedule.latest_at_or_before(between),
                    Some(pair[0]),
                    "{expression}"
                );
                assert_eq!(
                    schedule.latest_at_or_before(pair[1]),
                    Some(pair[1]),
                    "{expression}"
                );
                assert_eq!(schedule.next_after(between), Some(pair[1]), "{expression}");
            }
        }
    }

    #[test]
    fn a_scheduler_ticking_off_the_second_enqueues_each_cron_occurrence_once() {
        // A leader ticks every 250 ms, off the whole second, for three minutes, keeping
        // its cursor as the scheduler does; it must enqueue exactly croner's occurrences.
        let start = fractional_start();
        let end = start + Duration::from_secs(180);
        for expression in EXPRESSIONS {
            let schedule = Schedule::cron(expression).unwrap();
            for missed in [MissedRuns::Skip, MissedRuns::CatchUp(100)] {
                let mut last = start;
                let mut enqueued = Vec::new();
                let mut now = start;
                while now < end {
                    now += Duration::from_millis(250);
                    let due = schedule.due(last, now, missed);
                    if let Some(&latest) = due.last() {
                        last = latest;
                    }
                    enqueued.extend(due);
                }
                let mut expected = croner_after(expression, at(1_700_000_000), |found| {
                    found.last().is_none_or(|&t| t <= now)
                });
                expected.pop(); // the first one after `now`
                assert_eq!(enqueued, expected, "{expression} {missed:?}");
            }
        }
    }

    #[test]
    fn missed_runs_skip_or_catch_up_bounded() {
        let s = Schedule::every(Duration::from_secs(1)).unwrap();
        assert_eq!(
            s.due(at(100), at(100), MissedRuns::Skip),
            Vec::<SystemTime>::new()
        );
        assert_eq!(s.due(at(100), at(101), MissedRuns::Skip), [at(101)]);
        assert_eq!(s.due(at(100), at(105), MissedRuns::Skip), [at(105)]);
        assert_eq!(
            s.due(at(100), at(105), MissedRuns::CatchUp(10)),
            [at(101), at(102), at(103), at(104), at(105)]
        );
        assert_eq!(
            s.due(at(100), at(105), MissedRuns::CatchUp(2)),
            [at(104), at(105)]
        );
        // A day of 10 ms occurrences, with a catch-up beyond the cap: the cap's latest.
        let often = Schedule::every(Duration::from_millis(10)).unwrap();
        let due = often.due(at(0), at(86_400), MissedRuns::CatchUp(u32::MAX));
        assert_eq!(due.len(), MAX_CATCH_UP as usize);
        assert_eq!(due.last(), Some(&at(86_400)));
    }

    #[test]
    fn config_files_are_checked() {
        let tasks = tasks_from_json(
            r#"[{"name": "a", "queue": "q", "every_secs": 0.5, "payload": 1, "catch_up": 3}]"#,
        )
        .unwrap();
        assert_eq!(tasks[0].schedule.to_string(), "every 500ms");
        assert_eq!(tasks[0].missed, MissedRuns::CatchUp(3));
        for bad in [
            r#"[{"name": "a", "queue": "q", "payload": 1}]"#,
            r#"[{"name": "a", "queue": "q", "cron": "* * * * *", "every_secs": 1, "payload": 1}]"#,
            r#"[{"name": "a", "queue": "Q", "every_secs": 1, "payload": 1}]"#,
            r#"[{"name": "a", "queue": "q", "every_secs": 1, "payload": 1, "typo": 1}]"#,
            r#"{"name": "a"}"#,
            r#"[{"name": "a", "queue": "q", "every_secs": 1, "payload": 1, "catch_up": 10001}]"#,
        ] {
            assert!(tasks_from_json(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn task_names_are_checked() {
        let q = QueueName::new("q").unwrap();
        let s = Schedule::every(Duration::from_secs(1)).unwrap();
        let m = NewMessage::json(&1).unwrap();
        assert!(RecurringTask::new("nightly:report-1", q.clone(), s.clone(), m.clone()).is_ok());
        assert!(RecurringTask::new("Bad Name", q.clone(), s.clone(), m.clone()).is_err());
        assert!(RecurringTask::new("", q, s, m).is_err());
    }
}
