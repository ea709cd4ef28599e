//! Recurring-task configs: arbitrary text through `tasks_from_json` (the file `pgbus cron
//! run` reads), and structured configs with arbitrary cron expressions and intervals.
//! Either an `InvalidArgument`-style error or tasks whose schedules answer next and latest
//! occurrences without panicking.
#![no_main]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use libfuzzer_sys::fuzz_target;
use pgbus_core::{tasks_from_json, MissedRuns};

fn exercise(config: &str) {
    let Ok(tasks) = tasks_from_json(config) else {
        return;
    };
    let now = SystemTime::now();
    let long_ago = UNIX_EPOCH + Duration::from_secs(1);
    for task in &tasks {
        let schedule = &task.schedule;
        let _ = schedule.next_after(now);
        let _ = schedule.latest_at_or_before(now);
        for at in schedule.due(long_ago, now, MissedRuns::CatchUp(3)) {
            let _ = task.message_for(at);
        }
        let _ = schedule.to_string();
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    exercise(text);
    // The text as a cron expression, and its leading number as an interval.
    let cron = serde_json::to_string(text).unwrap_or_default();
    exercise(&format!(
        r#"[{{"name": "t", "queue": "q", "cron": {cron}, "payload": null}}]"#
    ));
    let number: String = text
        .chars()
        .take_while(|c| c.is_ascii_digit() || "+-.eE".contains(*c))
        .collect();
    if !number.is_empty() {
        exercise(&format!(
            r#"[{{"name": "t", "queue": "q", "every_secs": {number}, "payload": null}}]"#
        ));
    }
});
