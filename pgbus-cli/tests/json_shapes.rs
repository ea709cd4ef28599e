//! The JSON the command and the HTTP API print, held to one documented schema: every
//! `--json` output and API answer of a system with something in every table is reduced to
//! its shape (keys and value types) and compared with `tests/golden/json_shapes.json`.
//!
//! In the golden file a type is `string`, `number`, `bool`, `null` or `[...]`/`{...}`; a
//! trailing `?` (`"string?"`) means the value may also be `null`. After a deliberate change,
//! `PGBUS_UPDATE_GOLDEN=1 cargo test -p pgbus-cli --test json_shapes` rewrites the file
//! (nullable marks are kept where the type did not change); review the diff.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Map, Value};

mod common;
use common::*;

fn golden_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/json_shapes.json")
}

/// The shape of a value: its type names, objects key by key, arrays by the merged shape
/// of their items. A `payload` is the sender's own JSON and an audit entry's `detail` the
/// action's (`any`); the keys of a throughput `series` are queue names (`<queue>`), those of
/// a job's `headers` header names (`<header>`).
fn shape(value: &Value) -> Value {
    match value {
        Value::Null => json!("null"),
        Value::Bool(_) => json!("bool"),
        Value::Number(_) => json!("number"),
        Value::String(_) => json!("string"),
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(shape)
                .reduce(|a, b| merge(&a, &b))
                .into_iter()
                .collect(),
        ),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| {
                    let shaped = match k.as_str() {
                        "payload" | "detail" => json!("any"),
                        "headers" => keyed_by(v, "<header>"),
                        "series" => keyed_by(v, "<queue>"),
                        _ => shape(v),
                    };
                    (k.clone(), shaped)
                })
                .collect::<Map<_, _>>(),
        ),
    }
}

/// An object whose keys are data (queue names, header names): one `placeholder` key with
/// the merged shape of its values.
fn keyed_by(value: &Value, placeholder: &str) -> Value {
    let values = value.as_object().into_iter().flat_map(|m| m.values());
    let merged = values.map(shape).reduce(|a, b| merge(&a, &b));
    Value::Object(
        merged
            .map(|s| (placeholder.to_owned(), s))
            .into_iter()
            .collect(),
    )
}

/// One shape for two items of a list: `null` and a type make the type nullable.
fn merge(a: &Value, b: &Value) -> Value {
    match (a, b) {
        (Value::String(x), Value::String(y)) if x == y => a.clone(),
        (Value::String(x), Value::String(y)) => {
            let (x, y) = (x.trim_end_matches('?'), y.trim_end_matches('?'));
            match (x, y) {
                ("null", t) | (t, "null") => json!(format!("{t}?")),
                _ if x == y => json!(format!("{x}?")),
                _ => json!(format!("{x}|{y}")),
            }
        }
        // A structure or null: `{"?": structure}`.
        (Value::String(n), other) | (other, Value::String(n)) if n == "null" => {
            if nullable_inner(other).is_some() {
                other.clone()
            } else {
                json!({ "?": other })
            }
        }
        (x, y) if nullable_inner(x).is_some() || nullable_inner(y).is_some() => {
            let inner = |v: &Value| nullable_inner(v).cloned().unwrap_or_else(|| v.clone());
            json!({ "?": merge(&inner(x), &inner(y)) })
        }
        (Value::Object(x), Value::Object(y)) => {
            let mut merged = x.clone();
            for (k, v) in y {
                let value = match x.get(k) {
                    Some(existing) => merge(existing, v),
                    None => v.clone(),
                };
                merged.insert(k.clone(), value);
            }
            Value::Object(merged)
        }
        (Value::Array(x), Value::Array(y)) => Value::Array(
            x.iter()
                .chain(y)
                .cloned()
                .reduce(|a, b| merge(&a, &b))
                .into_iter()
                .collect(),
        ),
        _ => a.clone(),
    }
}

/// The structure inside a nullable one (`{"?": structure}`).
fn nullable_inner(value: &Value) -> Option<&Value> {
    match value {
        Value::Object(map) if map.len() == 1 => map.get("?"),
        _ => None,
    }
}

/// Where `actual` departs from `golden`, as `path: expected, got` lines.
fn differences(path: &str, golden: &Value, actual: &Value, out: &mut Vec<String>) {
    if let Some(inner) = nullable_inner(golden) {
        if actual != "null" {
            differences(path, inner, nullable_inner(actual).unwrap_or(actual), out);
        }
        return;
    }
    match (golden, actual) {
        (Value::String(expected), Value::String(got)) => {
            let nullable = expected.strip_suffix('?');
            let fits = expected == got
                || (nullable.is_some() && (got == "null" || Some(got.as_str()) == nullable));
            if !fits {
                out.push(format!("{path}: {expected}, got {got}"));
            }
        }
        (Value::String(expected), got) if expected.ends_with('?') => {
            // A nullable field that holds a structure this time.
            let _ = got;
            out.push(format!("{path}: {expected}, got a structure"));
        }
        (Value::Array(expected), Value::Array(got)) => match (expected.first(), got.first()) {
            (Some(e), Some(g)) => differences(&format!("{path}[]"), e, g, out),
            (_, None) => {}
            (None, Some(_)) => out.push(format!(
                "{path}: an empty list in the golden file, got items"
            )),
        },
        (Value::Object(expected), Value::Object(got)) => {
            for (key, e) in expected {
                match got.get(key) {
                    Some(g) => differences(&format!("{path}.{key}"), e, g, out),
                    None => out.push(format!("{path}.{key}: missing")),
                }
            }
            for key in got.keys().filter(|k| !expected.contains_key(*k)) {
                out.push(format!("{path}.{key}: not in the golden file"));
            }
        }
        (e, g) => out.push(format!("{path}: {e}, got {g}")),
    }
}

/// `actual` with the nullable marks of `golden` kept where the type is unchanged.
fn keep_marks(golden: Option<&Value>, actual: &Value) -> Value {
    match (golden, actual) {
        (Some(Value::String(e)), Value::String(g))
            if e.strip_suffix('?').is_some_and(|t| t == g || g == "null") =>
        {
            json!(e)
        }
        (Some(e), _) if nullable_inner(e).is_some() => {
            let inner = nullable_inner(actual).unwrap_or(actual);
            if actual == "null" {
                e.clone()
            } else {
                json!({ "?": keep_marks(nullable_inner(e), inner) })
            }
        }
        (Some(Value::Object(e)), Value::Object(g)) => Value::Object(
            g.iter()
                .map(|(k, v)| (k.clone(), keep_marks(e.get(k), v)))
                .collect(),
        ),
        (Some(Value::Array(e)), Value::Array(g)) => match g.first() {
            Some(item) => json!([keep_marks(e.first(), item)]),
            None => Value::Array(e.clone()),
        },
        _ => actual.clone(),
    }
}

#[test]
fn every_json_output_and_api_answer_has_the_documented_shape() {
    let db = Db::new();
    db.ok(&[
        "queue",
        "create",
        "jobs",
        "--keep-history",
        "--breaker-failures",
        "3",
        "--breaker-backoff",
        "1m",
    ]);
    db.ok(&["queue", "create", "failing", "--max-attempts", "1"]);
    let dead_id = db.send("failing", &json!({ "n": 1 }));
    db.work(&["failing", "--exec", "exit 65", "--until-empty"]);
    db.ok(&["topic", "bind", "order.*", "jobs"]);
    db.ok(&["publish", "order.paid", r#"{"id": 1}"#]);

    // A scheduler declares a task; a worker holds a job while everything is read.
    let config = db.path("cron.json");
    std::fs::write(
        &config,
        r#"[{"name": "hourly", "queue": "jobs", "every_secs": 3600, "payload": {}}]"#,
    )
    .expect("writing the cron config");
    let (mut scheduler, _) =
        db.spawn(&["cron", "run", "--config", config.to_str().expect("utf-8")]);
    eventually("the task declared and led", SHORT, || {
        db.ok(&["cron", "list", "--json"]).json()[0]["next_at"].is_string()
    });
    terminate(&scheduler.0);
    wait_deadline(&mut scheduler.0, SHORT);
    scheduler.stop();
    db.ok(&["queue", "create", "slow"]);
    db.send("slow", &json!({ "sleep": true }));
    db.ok(&[
        "send",
        "slow",
        "--group",
        "customer_1",
        r#"{"sleep": true}"#,
    ]);
    let (mut worker, _) = db.spawn(&["work", "slow", "--exec", "sleep 600"]);
    eventually("a process with a job in flight", SHORT, || {
        let stats = db.ok(&["stats", "--json"]).json();
        stats["processes"].as_array().is_some_and(|p| !p.is_empty())
            && stats["queues"]
                .as_array()
                .is_some_and(|q| q.iter().any(|q| q["in_flight"] == 2))
    });

    // A console action, so the audit log has an entry.
    let dead = dead_id.to_string();
    db.ok(&["job", "priority", "--to", "1", &dead]);

    let mut shapes = Map::new();
    for (name, args) in [
        ("queue list --json", vec!["queue", "list", "--json"]),
        ("topic list --json", vec!["topic", "list", "--json"]),
        ("dlq list --json", vec!["dlq", "list", "failing", "--json"]),
        ("cron list --json", vec!["cron", "list", "--json"]),
        ("stats --json", vec!["stats", "--json"]),
        (
            "job list --json",
            vec!["job", "list", "failing", "--state", "dead", "--json"],
        ),
        ("job audit --json", vec!["job", "audit", "--json"]),
    ] {
        shapes.insert(name.into(), shape(&db.ok(&args).json()));
    }
    // One job's detail, merged over a dead letter with an error history and an event copy
    // with its envelope headers.
    let copy = db
        .ok(&["job", "list", "jobs", "--payload", "id=1", "--json"])
        .json()["jobs"][0]["id"]
        .to_string();
    let detail = |id: &str| shape(&db.ok(&["job", "show", id, "--json"]).json());
    shapes.insert(
        "job show --json".into(),
        merge(&detail(&dead), &detail(&copy)),
    );

    let served = Served::start(&db, free_port(), &[], &[]);
    let http = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("an HTTP client");
    let get = |path: &str| -> Value {
        http.get(served.url(path))
            .send()
            .and_then(|r| r.json())
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    };
    let post = |path: &str, body: Value| -> Value {
        http.post(served.url(path))
            .json(&body)
            .send()
            .and_then(|r| r.json())
            .unwrap_or_else(|e| panic!("POST {path}: {e}"))
    };
    eventually("the snapshot with the worker", SHORT, || {
        let overview = get("/api/overview");
        overview["processes"]
            .as_array()
            .is_some_and(|p| !p.is_empty())
            && overview["groups"].as_array().is_some_and(|g| !g.is_empty())
    });
    shapes.insert("GET /api/overview".into(), shape(&get("/api/overview")));
    // The console's: a listing of jobs in flight, and one shape of the details of a dead
    // letter (with its attempt history), an event copy and a job in flight.
    let in_flight = get("/api/jobs?queue=slow&state=in_flight");
    shapes.insert("GET /api/jobs".into(), shape(&in_flight));
    let copies = get("/api/jobs?queue=jobs&state=ready");
    let detail = [&in_flight, &copies]
        .into_iter()
        .flat_map(|page| page["jobs"].as_array().cloned().unwrap_or_default())
        .map(|job| job["id"].as_i64().expect("an id"))
        .chain([dead_id])
        .map(|id| shape(&get(&format!("/api/jobs/{id}"))))
        .reduce(|a, b| merge(&a, &b))
        .expect("jobs to show");
    shapes.insert("GET /api/jobs/{id}".into(), detail);
    shapes.insert(
        "POST /api/jobs/actions".into(),
        shape(&post(
            "/api/jobs/actions",
            json!({ "action": "priority", "ids": [dead_id], "priority": 1 }),
        )),
    );
    shapes.insert(
        "GET /api/queues/{q}/dead".into(),
        shape(&get("/api/queues/failing/dead")),
    );
    shapes.insert(
        "POST /api/queues/{q}/dead/retry".into(),
        shape(&post(
            "/api/queues/failing/dead/retry",
            json!({ "ids": [dead_id] }),
        )),
    );
    shapes.insert(
        "POST /api/queues/{q}/pause".into(),
        shape(&post("/api/queues/jobs/pause", json!({}))),
    );
    shapes.insert("GET /api/audit".into(), shape(&get("/api/audit")));
    shapes.insert(
        "an API error".into(),
        shape(&get("/api/queues/No%20Such/dead")),
    );
    assert!(served.stop().success());
    terminate(&worker.0);
    wait_deadline(&mut worker.0, SHORT);
    worker.stop();

    let actual = Value::Object(shapes);
    let golden: Option<Value> = std::fs::read_to_string(golden_path())
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok());
    if std::env::var_os("PGBUS_UPDATE_GOLDEN").is_some() {
        let updated = keep_marks(golden.as_ref(), &actual);
        let text = serde_json::to_string_pretty(&updated).expect("JSON") + "\n";
        std::fs::write(golden_path(), text).expect("writing the golden file");
        return;
    }
    let golden = golden.expect("tests/golden/json_shapes.json (PGBUS_UPDATE_GOLDEN=1 writes it)");
    let mut out = Vec::new();
    differences("", &golden, &actual, &mut out);
    assert!(
        out.is_empty(),
        "the JSON shapes changed (PGBUS_UPDATE_GOLDEN=1 rewrites the golden file; document the change):\n{}",
        out.join("\n")
    );
}
