//! The payload codec: encoding and decoding a typical job payload, in MessagePack (the
//! default) and JSON, as `NewMessage::encode` and `Message::decode` do.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput};
use pgbus_core::ContentType;
use serde::{Deserialize, Serialize};

/// A job payload of the usual shape: a few strings, numbers and a list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Email {
    to: String,
    subject: String,
    body: String,
    account_id: u64,
    attempt_budget: u32,
    tags: Vec<String>,
}

fn payload() -> Email {
    Email {
        to: "someone@example.com".to_owned(),
        subject: "Your invoice for March".to_owned(),
        body: "Hello,\n\nplease find your invoice attached.\n".repeat(4),
        account_id: 1_234_567,
        attempt_budget: 5,
        tags: vec!["billing".to_owned(), "monthly".to_owned()],
    }
}

fn codec(c: &mut Criterion) {
    let value = payload();
    let mut group = c.benchmark_group("codec");
    group.throughput(Throughput::Elements(1));
    for content_type in [ContentType::MessagePack, ContentType::Json] {
        let name = content_type.mime().trim_start_matches("application/");
        let bytes = content_type.encode(&value).expect("encodes");
        assert_eq!(
            content_type.decode::<Email>(&bytes).expect("decodes"),
            value
        );
        group.bench_with_input(BenchmarkId::new("encode", name), &value, |b, value| {
            b.iter(|| content_type.encode(black_box(value)).expect("encodes"));
        });
        group.bench_with_input(
            BenchmarkId::new("decode", format!("{name}_{}_bytes", bytes.len())),
            &bytes,
            |b, bytes| {
                b.iter(|| {
                    content_type
                        .decode::<Email>(black_box(bytes))
                        .expect("decodes")
                });
            },
        );
    }
    group.finish();
}

// What `criterion_group!`/`criterion_main!` expand to, written out because the generated
// `pub fn` would trip the workspace's `missing_docs` lint.
fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    codec(&mut criterion);
    criterion.final_summary();
}
