//! Typed event subscribers on the in-memory backend: routing to handlers by pattern, the
//! envelope, the job retry rules, idempotent consumers.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgbus_core::{
    DeadLetters, Event, EventId, MemoryBackend, NewEvent, NewMessage, Producer, QueueAdmin,
    QueueName, QueueOptions, RetryPolicy, Stats, Topics,
};
use pgbus_exec::CancellationToken;
use pgbus_exec::{JobContext, Outcome, Subscription, Worker, WorkerReport};

const DEADLINE: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct Paid {
    order: u64,
}

type Ctx = JobContext<MemoryBackend>;

async fn setup(max_attempts: u32) -> (MemoryBackend, QueueName) {
    let backend = MemoryBackend::new();
    let queue = QueueName::new("billing").unwrap();
    let retry = RetryPolicy::builder()
        .base(Duration::from_millis(5))
        .cap(Duration::from_millis(20))
        .jitter(0.0)
        .max_attempts(max_attempts)
        .build()
        .unwrap();
    backend
        .create_queue(&queue, &QueueOptions::default().retry(retry))
        .await
        .unwrap();
    (backend, queue)
}

async fn until(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    while !done().await {
        assert!(start.elapsed() < DEADLINE, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Runs the worker until its bindings exist, then `publish`, then until the queue is empty
/// (dead letters aside); returns the report.
async fn run_until_settled(
    backend: &MemoryBackend,
    worker: Worker<MemoryBackend>,
    bindings: usize,
    publish: impl AsyncFnOnce(),
) -> WorkerReport {
    let stop = CancellationToken::new();
    let running = tokio::spawn(worker.run(stop.clone()));
    until("the subscription's bindings exist", async || {
        backend.bindings().await.unwrap().len() == bindings
    })
    .await;
    publish().await;
    until("the queue is settled", async || {
        backend.stats().await.unwrap()[0].depth() == 0
    })
    .await;
    stop.cancel();
    running.await.unwrap().unwrap()
}

#[tokio::test]
async fn events_reach_the_handler_of_the_first_matching_pattern_with_their_envelope() {
    let (backend, queue) = setup(3).await;
    let paid: Arc<Mutex<Vec<Event<Paid>>>> = Arc::default();
    let other: Arc<Mutex<Vec<String>>> = Arc::default();
    let (paid2, other2) = (paid.clone(), other.clone());
    let subscription = Subscription::new(queue.clone())
        .on(
            "order.paid".parse().unwrap(),
            move |_: Ctx, e: Event<Paid>| {
                let paid = paid2.clone();
                async move { paid.lock().unwrap().push(e) }
            },
        )
        .on("order.#".parse().unwrap(), move |_: Ctx, e: Event<Paid>| {
            let other = other2.clone();
            async move { other.lock().unwrap().push(e.routing_key.to_string()) }
        });
    let worker = Worker::builder(backend.clone())
        .subscribe(subscription)
        .build()
        .unwrap();
    let mut sent = None;
    let report = run_until_settled(&backend, worker, 2, async || {
        let event = NewEvent::encode("order.paid", &Paid { order: 7 })
            .unwrap()
            .header("trace", "t1");
        sent = Some(event.id);
        backend.publish(event).await.unwrap();
        let refunded = NewEvent::json("order.eu.refunded", &Paid { order: 8 });
        backend.publish(refunded.unwrap()).await.unwrap();
        let elsewhere = NewEvent::json("invoice.sent", &1).unwrap();
        assert_eq!(backend.publish(elsewhere).await.unwrap().copies, 0);
    })
    .await;
    assert_eq!(report.acked, 2);
    let paid = paid.lock().unwrap();
    assert_eq!(paid.len(), 1);
    assert_eq!(paid[0].id, sent.unwrap());
    assert_eq!(paid[0].routing_key.as_str(), "order.paid");
    assert_eq!(paid[0].payload, Paid { order: 7 });
    assert_eq!(paid[0].headers.get("trace").map(String::as_str), Some("t1"));
    assert_eq!(*other.lock().unwrap(), ["order.eu.refunded"]);
}

#[tokio::test]
async fn subscribers_follow_the_job_retry_and_dead_letter_rules() {
    let (backend, queue) = setup(3).await;
    let attempts: Arc<Mutex<Vec<u32>>> = Arc::default();
    let seen = attempts.clone();
    let subscription = Subscription::new(queue.clone()).on(
        "order.*".parse().unwrap(),
        move |ctx: Ctx, _: Event<Paid>| {
            let seen = seen.clone();
            async move {
                seen.lock().unwrap().push(ctx.attempt());
                if ctx.attempt() < 2 {
                    Outcome::retry("not yet")
                } else {
                    Outcome::Ack
                }
            }
        },
    );
    let worker = Worker::builder(backend.clone())
        .subscribe(subscription)
        .build()
        .unwrap();
    let report = run_until_settled(&backend, worker, 1, async || {
        backend
            .publish(NewEvent::encode("order.paid", &Paid { order: 1 }).unwrap())
            .await
            .unwrap();
        // A payload of the wrong type, and a plain message that is no event at all.
        backend
            .publish(NewEvent::encode("order.bad", &"text").unwrap())
            .await
            .unwrap();
        backend
            .send(&queue, NewMessage::encode(&Paid { order: 2 }).unwrap())
            .await
            .unwrap();
    })
    .await;
    assert_eq!(*attempts.lock().unwrap(), [1, 2]);
    assert_eq!(
        (report.acked, report.retried, report.dead_lettered),
        (1, 1, 2)
    );
    let dead = backend.list_dead(&queue, 10).await.unwrap();
    let reasons: Vec<&str> = dead.iter().map(|d| d.error.as_str()).collect();
    assert!(reasons.iter().any(|r| r.contains("decode")), "{reasons:?}");
    assert!(
        reasons.iter().any(|r| r.contains("not an event")),
        "{reasons:?}"
    );
}

#[tokio::test]
async fn an_idempotent_subscriber_runs_a_redelivered_event_once() {
    let (backend, queue) = setup(3).await;
    let runs: Arc<Mutex<Vec<EventId>>> = Arc::default();
    let seen = runs.clone();
    let subscription = Subscription::new(queue.clone())
        .on("order.*".parse().unwrap(), move |_: Ctx, e: Event<Paid>| {
            let seen = seen.clone();
            async move { seen.lock().unwrap().push(e.id) }
        })
        .idempotent();
    let worker = Worker::builder(backend.clone())
        .subscribe(subscription)
        .build()
        .unwrap();
    let first = NewEvent::encode("order.paid", &Paid { order: 1 }).unwrap();
    let (id, again) = (first.id, first.clone());
    let report = run_until_settled(&backend, worker, 1, async || {
        backend.publish(first).await.unwrap();
        // The same event published again (as an at-least-once relay may): one more copy.
        until("the first copy is handled", async || {
            !runs.lock().unwrap().is_empty()
        })
        .await;
        backend.publish(again).await.unwrap();
    })
    .await;
    assert_eq!(report.acked, 2, "both copies acked");
    assert_eq!(*runs.lock().unwrap(), [id], "the handler ran once");
}
