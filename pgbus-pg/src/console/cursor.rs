//! Cursors and bounds as opaque text, and the filter's fingerprint both carry.
//!
//! A cursor is `c1.<state>.<order>.<fingerprint>.<id>`: the id where the next page starts
//! (the last row the previous page examined, not the last it returned, so a rare filter
//! still makes progress). A bound is `b1.<state>.<fingerprint>.<id>` (hot table, archive:
//! the newest id of the queue when the list was drawn) or `b1.dead.<fingerprint>.<micros>.<id>`
//! (dead letters: the latest `(failed_at, id)`), `-` for an empty table. The fingerprint
//! hashes the queue, state and every filter, so a cursor or bound of another listing is
//! refused rather than silently applied to this one.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pgbus_core::{Error, Result};
use serde_json::json;

use super::types::{Bound, Cursor, JobFilter, JobState, Order};

/// What a listing saw: nothing, or everything up to an id (and for dead letters, up to a
/// failure time, ties broken by id).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Seen {
    Nothing,
    UpTo { id: i64, at: Option<SystemTime> },
}

/// The filter as JSON: what the audit log records, and (serialized) what the fingerprint
/// hashes. Built field by field in a fixed order, so the same filter always gives the
/// same text.
pub(super) fn filter_json(filter: &JobFilter) -> serde_json::Value {
    json!({
        "queue": filter.queue.as_str(),
        "state": filter.state.as_str(),
        "id": filter.id.map(|id| id.0),
        "group_key": filter.group_key,
        "priority": filter.priority,
        "min_attempts": filter.min_attempts,
        "error_contains": filter.error_contains,
        "payload": filter.payload.as_ref().map(|p| json!({"path": p.path, "value": p.value})),
    })
}

/// FNV-1a (64 bits) of the filter's JSON: stable across builds and processes (the page
/// and the CLI may be different binaries), and enough to tell listings apart; not a
/// secret, so no keyed hash is needed.
fn fingerprint(filter: &JobFilter) -> u64 {
    let text = filter_json(filter).to_string();
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn order_code(order: Order) -> &'static str {
    match order {
        Order::NewestFirst => "n",
        Order::OldestFirst => "o",
    }
}

/// The cursor of the page after the row `id`.
pub(super) fn cursor(filter: &JobFilter, order: Order, id: i64) -> Cursor {
    Cursor(format!(
        "c1.{}.{}.{:016x}.{id}",
        filter.state.as_str(),
        order_code(order),
        fingerprint(filter)
    ))
}

/// The id a cursor continues after, if it was drawn for this filter and order.
pub(super) fn read_cursor(cursor: &Cursor, filter: &JobFilter, order: Order) -> Result<i64> {
    let malformed = || Error::InvalidArgument("bad cursor: not one a job listing gave".into());
    let parts: Vec<&str> = cursor.0.split('.').collect();
    let [version, state, order_text, hash, id] = parts[..] else {
        return Err(malformed());
    };
    if version != "c1" {
        return Err(malformed());
    }
    let id: i64 = id.parse().map_err(|_| malformed())?;
    let hash = u64::from_str_radix(hash, 16).map_err(|_| malformed())?;
    JobState::parse(state).map_err(|_| malformed())?;
    if state != filter.state.as_str()
        || order_text != order_code(order)
        || hash != fingerprint(filter)
    {
        return Err(Error::InvalidArgument(
            "bad cursor: it was drawn for another queue, state, order or filter".into(),
        ));
    }
    Ok(id)
}

/// The bound of a listing of `filter` that saw `seen`.
pub(super) fn bound(filter: &JobFilter, seen: Seen) -> Bound {
    let head = format!("b1.{}.{:016x}", filter.state.as_str(), fingerprint(filter));
    Bound(match seen {
        Seen::Nothing => format!("{head}.-"),
        Seen::UpTo { id, at: Some(at) } => format!("{head}.{}.{id}", micros(at)),
        Seen::UpTo { id, at: None } => format!("{head}.{id}"),
    })
}

/// What the listing with this bound saw, if it listed this filter.
pub(super) fn read_bound(bound: &Bound, filter: &JobFilter) -> Result<Seen> {
    let malformed = || Error::InvalidArgument("bad bound: not one a job listing gave".into());
    let parts: Vec<&str> = bound.0.split('.').collect();
    let (version, state, hash, rest) = match parts[..] {
        [version, state, hash, ref rest @ ..] => (version, state, hash, rest),
        _ => return Err(malformed()),
    };
    if version != "b1" {
        return Err(malformed());
    }
    let hash = u64::from_str_radix(hash, 16).map_err(|_| malformed())?;
    let state = JobState::parse(state).map_err(|_| malformed())?;
    let number = |text: &str| text.parse::<i64>().map_err(|_| malformed());
    let seen = match (state, rest) {
        (_, ["-"]) => Seen::Nothing,
        (JobState::Dead, [at, id]) => Seen::UpTo {
            id: number(id)?,
            at: Some(from_micros(number(at)?)),
        },
        (JobState::Dead, _) => return Err(malformed()),
        (_, [id]) => Seen::UpTo {
            id: number(id)?,
            at: None,
        },
        _ => return Err(malformed()),
    };
    if state != filter.state || hash != fingerprint(filter) {
        return Err(Error::InvalidArgument(
            "bad bound: it was drawn for another queue, state or filter".into(),
        ));
    }
    Ok(seen)
}

/// Microseconds since the Unix epoch (PostgreSQL's precision, so a round trip is exact).
fn micros(t: SystemTime) -> i64 {
    let saturate = |d: Duration| i64::try_from(d.as_micros()).unwrap_or(i64::MAX);
    match t.duration_since(UNIX_EPOCH) {
        Ok(after) => saturate(after),
        Err(before) => -saturate(before.duration()),
    }
}

fn from_micros(micros: i64) -> SystemTime {
    let span = Duration::from_micros(micros.unsigned_abs());
    if micros >= 0 {
        UNIX_EPOCH + span
    } else {
        UNIX_EPOCH - span
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgbus_core::QueueName;

    fn filter(state: JobState) -> JobFilter {
        JobFilter::new(QueueName::new("jobs").unwrap(), state)
    }

    #[test]
    fn cursors_round_trip_only_for_their_listing() {
        let f = filter(JobState::Ready);
        let c = cursor(&f, Order::NewestFirst, 42);
        assert_eq!(read_cursor(&c, &f, Order::NewestFirst).unwrap(), 42);
        assert!(read_cursor(&c, &f, Order::OldestFirst).is_err());
        let mut grouped = f.clone();
        grouped.group_key = Some("g".into());
        assert!(read_cursor(&c, &grouped, Order::NewestFirst).is_err());
        assert!(read_cursor(&c, &filter(JobState::Dead), Order::NewestFirst).is_err());
        for bad in [
            "",
            "c1",
            "c1.ready.n.zz.1",
            "c2.ready.n.00.1",
            "c1.ready.n.00.x.y",
        ] {
            assert!(read_cursor(&Cursor(bad.into()), &f, Order::NewestFirst).is_err());
        }
    }

    #[test]
    fn bounds_round_trip_only_for_their_filter() {
        let dead = filter(JobState::Dead);
        let at = UNIX_EPOCH + Duration::from_micros(1_765_000_000_123_456);
        let seen = Seen::UpTo {
            id: 7,
            at: Some(at),
        };
        assert_eq!(read_bound(&bound(&dead, seen), &dead).unwrap(), seen);
        assert_eq!(
            read_bound(&bound(&dead, Seen::Nothing), &dead).unwrap(),
            Seen::Nothing
        );
        let ready = filter(JobState::Ready);
        let seen = Seen::UpTo { id: 9, at: None };
        assert_eq!(read_bound(&bound(&ready, seen), &ready).unwrap(), seen);
        assert!(read_bound(&bound(&ready, seen), &dead).is_err());
        assert!(read_bound(&Bound("b1.dead.00.5".into()), &dead).is_err());
        assert_eq!(
            from_micros(micros(UNIX_EPOCH - Duration::from_secs(3))),
            UNIX_EPOCH - Duration::from_secs(3)
        );
    }
}
