//! The console's JSON API end to end (`pgbus serve`, real HTTP, real Postgres): pages and
//! counts, one job, its payload as a download, actions and who did them, the OpenAPI
//! document, and bad input refused with one line of JSON (never a 500, nothing changed).

use std::time::Duration;

use reqwest::blocking::{Client, Response};
use reqwest::StatusCode;
use serde_json::{json, Value};

mod common;
use common::*;

fn client() -> Client {
    Client::builder()
        .timeout(Duration::from_secs(30))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("an HTTP client")
}

/// The status and JSON body of a response.
fn answer(response: Response) -> (StatusCode, Value) {
    let status = response.status();
    let text = response.text().expect("a body");
    let body = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("a {status} answer that is not JSON ({e}): {text}"));
    (status, body)
}

struct Api {
    served: Served,
    http: Client,
    token: Option<&'static str>,
}

impl Api {
    fn start(db: &Db, token: Option<&'static str>) -> Api {
        let extra: Vec<&str> = token.map_or_else(Vec::new, |t| vec!["--token", t]);
        Api {
            served: Served::start(db, free_port(), &extra, &[]),
            http: client(),
            token,
        }
    }

    fn authorize(
        &self,
        request: reqwest::blocking::RequestBuilder,
    ) -> reqwest::blocking::RequestBuilder {
        match self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    fn get(&self, path: &str) -> (StatusCode, Value) {
        let request = self.authorize(self.http.get(self.served.url(path)));
        answer(request.send().unwrap_or_else(|e| panic!("GET {path}: {e}")))
    }

    fn ok(&self, path: &str) -> Value {
        let (status, body) = self.get(path);
        assert_eq!(status, StatusCode::OK, "GET {path}: {body}");
        body
    }

    fn act(&self, body: &Value) -> (StatusCode, Value) {
        let request = self.authorize(
            self.http
                .post(self.served.url("/api/jobs/actions"))
                .json(body),
        );
        answer(request.send().expect("POST /api/jobs/actions"))
    }

    fn ids(&self, path: &str) -> Vec<i64> {
        self.ok(path)["jobs"]
            .as_array()
            .expect("jobs")
            .iter()
            .map(|j| j["id"].as_i64().expect("an id"))
            .collect()
    }

    fn stop(self) {
        assert!(self.served.stop().success());
    }
}

/// Asserts a 400 whose one-line error contains `why`.
#[track_caller]
fn refused((status, body): (StatusCode, Value), why: &str) {
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let error = body["error"].as_str().expect("an error text");
    assert!(
        error.contains(why) && !error.contains('\n'),
        "{error:?} should say {why:?}"
    );
    assert_eq!(body.as_object().map(|o| o.len()), Some(1), "{body}");
}

#[test]
fn pages_counts_and_a_job_as_the_console_reads_them() {
    let db = Db::new();
    db.ok(&["queue", "create", "orders"]);
    let ids: Vec<i64> = (0..5)
        .map(|n| {
            let group = if n % 2 == 0 { "even" } else { "odd" };
            let out = db.ok(&[
                "send",
                "orders",
                "--group",
                group,
                &json!({ "n": n, "customer": { "id": n * 10 } }).to_string(),
            ]);
            out.stdout.trim().parse().expect("an id")
        })
        .collect();
    let api = Api::start(&db, None);

    // Keyset pages: newest first, two at a time, until `next` is null.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            None => "/api/jobs?queue=orders&state=ready&limit=2".to_owned(),
            Some(c) => format!("/api/jobs?queue=orders&state=ready&limit=2&cursor={c}"),
        };
        let page = api.ok(&path);
        assert_eq!(page["counts"]["ready"], json!({ "n": 5, "exact": true }));
        assert_eq!(page["counts"]["dead"]["n"], 0);
        seen.extend(
            page["jobs"]
                .as_array()
                .expect("jobs")
                .iter()
                .map(|j| j["id"].as_i64().unwrap()),
        );
        match page["next"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
        assert!(seen.len() <= 5, "pages never end: {seen:?}");
    }
    let mut newest_first = ids.clone();
    newest_first.reverse();
    assert_eq!(seen, newest_first);
    assert_eq!(
        api.ids("/api/jobs?queue=orders&state=ready&order=oldest&group=odd"),
        [ids[1], ids[3]]
    );
    assert_eq!(
        api.ids("/api/jobs?queue=orders&state=ready&payload=customer.id=20"),
        [ids[2]]
    );
    assert_eq!(
        api.ids(&format!("/api/jobs?queue=orders&state=ready&id={}", ids[4])),
        [ids[4]]
    );

    let job = api.ok(&format!("/api/jobs/{}", ids[2]));
    assert_eq!(
        (&job["id"], &job["queue"], &job["state"], &job["group"]),
        (
            &json!(ids[2]),
            &json!("orders"),
            &json!("ready"),
            &json!("even")
        )
    );
    assert!(job["payload"]
        .as_str()
        .is_some_and(|p| p.contains("\"customer\"")));
    let (status, body) = api.get("/api/jobs/999999");
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body, json!({ "error": "no job 999999" }));

    // The whole payload, to save.
    let response = client()
        .get(api.served.url(&format!("/api/jobs/{}/payload", ids[2])))
        .send()
        .expect("the payload");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "application/json");
    assert_eq!(
        response.headers()["content-disposition"],
        format!("attachment; filename=\"job-{}.json\"", ids[2]).as_str()
    );
    let bytes: Value = response.json().expect("JSON bytes");
    assert_eq!(bytes, json!({ "n": 2, "customer": { "id": 20 } }));
    assert_eq!(api.get("/api/jobs/999999/payload").0, StatusCode::NOT_FOUND);

    // The document of it all.
    let document = api.ok("/api/openapi.json");
    assert_eq!(document["openapi"], "3.1.0");
    assert!(document["paths"]["/api/jobs"]["get"].is_object());
    api.stop();
}

#[test]
fn a_large_payload_is_cut_in_the_detail_and_whole_in_the_download() {
    let db = Db::new();
    db.ok(&["queue", "create", "big"]);
    let text = "x".repeat(100 * 1024);
    let id = db.send("big", &json!({ "blob": text }));
    let api = Api::start(&db, None);
    let job = api.ok(&format!("/api/jobs/{id}"));
    assert_eq!(job["payload_truncated"], true);
    assert!(job["payload"].as_str().expect("text").len() <= 64 * 1024);
    assert!(job["payload_bytes"].as_u64().expect("a size") > 100 * 1024);
    let whole: Value = client()
        .get(api.served.url(&format!("/api/jobs/{id}/payload")))
        .send()
        .and_then(|r| r.json())
        .expect("the whole payload");
    assert_eq!(whole["blob"].as_str().map(str::len), Some(100 * 1024));
    api.stop();
}

#[test]
fn actions_are_bounded_by_the_listing_and_audited_with_who_asked() {
    let db = Db::new();
    db.ok(&["queue", "create", "mail", "--max-attempts", "1"]);
    let first: Vec<i64> = (0..3)
        .map(|n| db.send("mail", &json!({ "n": n })))
        .collect();
    db.work(&["mail", "--exec", "exit 1", "--until-empty"]);
    let api = Api::start(&db, Some("console-token-1234"));
    let listing = api.ok("/api/jobs?queue=mail&state=dead");
    assert_eq!(listing["jobs"].as_array().map(Vec::len), Some(3));
    let bound = listing["bound"].clone();

    // One arrives after the listing: the action by filter leaves it.
    let late = db.send("mail", &json!({ "n": "late" }));
    db.work(&["mail", "--exec", "exit 1", "--until-empty"]);
    let (status, body) = api.act(&json!({
        "action": "retry",
        "filter": { "queue": "mail", "state": "dead" },
        "bound": bound,
    }));
    assert_eq!(
        (status, body),
        (StatusCode::OK, json!({ "action": "retry", "count": 3 }))
    );
    assert_eq!(db.dead("mail").into_keys().collect::<Vec<_>>(), [late]);

    // By ids, with an argument.
    let (status, body) =
        api.act(&json!({ "action": "priority", "ids": [first[0]], "priority": 7 }));
    assert_eq!(
        (status, body),
        (StatusCode::OK, json!({ "action": "priority", "count": 1 }))
    );
    assert_eq!(api.ok(&format!("/api/jobs/{}", first[0]))["priority"], 7);
    let (status, body) = api.act(&json!({
        "action": "reschedule",
        "ids": [first[1]],
        "at": "2099-01-01T00:00:00Z",
    }));
    assert_eq!(
        (status, body),
        (
            StatusCode::OK,
            json!({ "action": "reschedule", "count": 1 })
        )
    );
    assert_eq!(
        api.ok(&format!("/api/jobs/{}", first[1]))["state"],
        "scheduled"
    );

    // A pause is audited too; every entry says the token did it.
    let paused = api
        .authorize(
            client()
                .post(api.served.url("/api/queues/mail/pause"))
                .json(&json!({})),
        )
        .send()
        .expect("a pause");
    assert_eq!(paused.status(), StatusCode::OK);
    let audit = api.ok("/api/audit");
    let entries: Vec<(String, String, u64)> = audit
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| {
            (
                e["actor"].as_str().unwrap_or_default().to_owned(),
                e["action"].as_str().unwrap_or_default().to_owned(),
                e["count"].as_u64().unwrap_or_default(),
            )
        })
        .collect();
    let by_token = |action: &str, count: u64| ("token".to_owned(), action.to_owned(), count);
    assert_eq!(
        entries,
        [
            by_token("pause", 0),
            by_token("reschedule", 1),
            by_token("priority", 1),
            by_token("retry", 3),
        ],
        "newest first"
    );
    assert_eq!(audit[3]["queue"], "mail");
    assert_eq!(audit[3]["detail"]["bound"], bound);
    let older = api.ok(&format!("/api/audit?limit=2&before={}", audit[1]["id"]));
    assert_eq!(older.as_array().map(Vec::len), Some(2));
    assert_eq!(older[0]["action"], "priority");
    api.stop();

    // Without a token (loopback only) the actor is `loopback`.
    let api = Api::start(&db, None);
    let (status, _) = api.act(&json!({ "action": "discard", "ids": [late] }));
    assert_eq!(status, StatusCode::OK);
    let newest = &api.ok("/api/audit?limit=1")[0];
    assert_eq!(
        (&newest["actor"], &newest["action"]),
        (&json!("loopback"), &json!("discard"))
    );
    api.stop();
}

#[test]
fn bad_input_is_a_400_with_one_line_and_changes_nothing() {
    let db = Db::new();
    db.ok(&["queue", "create", "orders"]);
    let id = db.send("orders", &json!({ "n": 1 }));
    let api = Api::start(&db, None);
    let listing = api.ok("/api/jobs?queue=orders&state=ready");
    let bound = listing["bound"].clone();

    for (path, why) in [
        ("/api/jobs?queue=orders", "state is required"),
        ("/api/jobs?state=ready", "queue is required"),
        ("/api/jobs?queue=orders&state=stuck", "unknown job state"),
        ("/api/jobs?queue=Bad%20Name&state=ready", "queue"),
        ("/api/jobs?queue=orders&state=ready&order=sideways", "order"),
        (
            "/api/jobs?queue=orders&state=ready&cursor=garbage",
            "cursor",
        ),
        ("/api/jobs?queue=orders&state=ready&limit=0", "limit"),
        ("/api/jobs?queue=orders&state=ready&limit=many", "limit"),
        ("/api/jobs?queue=orders&state=ready&id=abc", "id"),
        (
            "/api/jobs?queue=orders&state=ready&priority=99999",
            "priority",
        ),
        (
            "/api/jobs?queue=orders&state=ready&min_attempts=-1",
            "min_attempts",
        ),
        (
            "/api/jobs?queue=orders&state=ready&payload=novalue",
            "PATH=VALUE",
        ),
        (
            "/api/jobs?queue=orders&state=ready&grup=a",
            "unknown filter parameter \"grup\"",
        ),
        ("/api/jobs/abc", "not a job id"),
        ("/api/jobs/abc/payload", "not a job id"),
        ("/api/audit?limit=x", "limit"),
        ("/api/audit?before=x", "before"),
        ("/api/audit?after=1", "unknown parameter"),
    ] {
        refused(api.get(path), why);
    }
    // A cursor of another listing is refused, not misread.
    let other = api.ok("/api/jobs?queue=orders&state=ready&limit=1&order=oldest");
    if let Some(cursor) = other["next"].as_str() {
        refused(
            api.get(&format!(
                "/api/jobs?queue=orders&state=dead&cursor={cursor}"
            )),
            "cursor",
        );
    }

    let too_many: Vec<i64> = (1..=10_001).collect();
    for (body, why) in [
        (
            json!({ "action": "explode", "ids": [id] }),
            "unknown action",
        ),
        (json!({ "ids": [id] }), "action"),
        (json!({ "action": "retry" }), "give either"),
        (json!({ "action": "retry", "ids": [] }), "ids is empty"),
        (
            json!({ "action": "retry", "ids": too_many }),
            "at most 10000",
        ),
        (
            json!({ "action": "retry", "ids": ["one"] }),
            "not an action request",
        ),
        (
            json!({ "action": "retry", "ids": [id], "filter": { "queue": "orders", "state": "ready" }, "bound": bound }),
            "give either",
        ),
        (
            json!({ "action": "retry", "filter": { "queue": "orders", "state": "ready" } }),
            "bound",
        ),
        (
            json!({ "action": "retry", "filter": { "queue": "orders", "state": "ready", "colour": "red" }, "bound": bound }),
            "unknown filter parameter",
        ),
        (
            json!({ "action": "retry", "filter": { "queue": "orders", "state": "ready", "group": ["a"] }, "bound": bound }),
            "string or a number",
        ),
        (
            json!({ "action": "retry", "filter": { "queue": "orders", "state": "dead" }, "bound": "forged" }),
            "bound",
        ),
        (
            json!({ "action": "reschedule", "ids": [id] }),
            "needs \"at\"",
        ),
        (
            json!({ "action": "reschedule", "ids": [id], "at": "tomorrow" }),
            "RFC 3339",
        ),
        (
            json!({ "action": "priority", "ids": [id] }),
            "needs \"priority\"",
        ),
        (
            json!({ "action": "priority", "ids": [id], "priority": 40000 }),
            "-32768",
        ),
        (
            json!({ "action": "retry", "ids": [id], "priority": 3 }),
            "priority action only",
        ),
        (
            json!({ "action": "cancel", "ids": [id], "at": "2099-01-01T00:00:00Z" }),
            "reschedule only",
        ),
        (
            json!({ "action": "retry", "ids": [id], "everything": true }),
            "unknown field",
        ),
    ] {
        refused(api.act(&body), why);
    }
    let not_json = client()
        .post(api.served.url("/api/jobs/actions"))
        .body("{\"action\": \"cancel\"")
        .header("content-type", "application/json")
        .send()
        .expect("a response");
    refused(answer(not_json), "not an action request");
    let form = client()
        .post(api.served.url("/api/jobs/actions"))
        .body("action=cancel")
        .header("content-type", "application/x-www-form-urlencoded")
        .send()
        .expect("a response");
    assert_eq!(form.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);

    // Nothing was changed, nothing was audited.
    assert_eq!(api.ids("/api/jobs?queue=orders&state=ready"), [id]);
    assert_eq!(api.ok(&format!("/api/jobs/{id}"))["priority"], 0);
    assert_eq!(api.ok("/api/audit"), json!([]));
    api.stop();
}
