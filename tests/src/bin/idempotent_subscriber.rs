//! The child process of the idempotent-consumer kill tests (`tests/tests/events_pg.rs`):
//! `idempotent_subscriber URL QUEUE finishes|hangs` runs the tests' idempotent subscriber
//! (pool connections `pgbus:child`) until it is killed.

use std::process::ExitCode;

use pgbus_tests::idempotent::{start_subscriber, Run, CHILD_ROLE};
use pgbus_tests::queue;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (url, q, run) = match args.as_slice() {
        [url, q, run] => match Run::parse(run) {
            Some(run) => (url, queue(q), run),
            None => return usage(),
        },
        _ => return usage(),
    };
    let outcome = start_subscriber(url, &q, CHILD_ROLE, run).await;
    eprintln!("idempotent_subscriber: the subscriber stopped before it was killed: {outcome:?}");
    ExitCode::FAILURE
}

fn usage() -> ExitCode {
    eprintln!("usage: idempotent_subscriber URL QUEUE finishes|hangs");
    ExitCode::from(2)
}
