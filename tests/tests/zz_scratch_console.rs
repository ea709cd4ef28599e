use pgbus_core::QueueName;
use pgbus_pg::console::{Console, JobFilter, JobState, Order, Sample};
use pgbus_pg::{connect, PgBackend};
use pgbus_tests::fresh_backend;
use std::time::Instant;

#[tokio::test]
async fn scratch() {
    let (backend, url) = fresh_backend(4).await;
    let console = Console::new(backend.clone());
    console.seed_sample(Sample::FULL, true).await.unwrap();
    let sql = connect(&url, "test").await.unwrap();
    let db: String = sql
        .query_one("SELECT current_database()", &[])
        .await
        .unwrap()
        .get(0);
    let dir: String = sql
        .query_one("SELECT current_setting('data_directory')", &[])
        .await
        .unwrap()
        .get(0);
    eprintln!("DATA {dir}");
    sql.batch_execute(&format!(
        "ALTER DATABASE {db} SET session_preload_libraries = 'auto_explain';
        ALTER DATABASE {db} SET auto_explain.log_min_duration = '30ms';
        ALTER DATABASE {db} SET auto_explain.log_analyze = on;
        ALTER DATABASE {db} SET auto_explain.log_buffers = on;"
    ))
    .await
    .unwrap();
    let backend2 = PgBackend::builder(&url).build().unwrap();
    let console = Console::new(backend2);
    for q in 0..3 {
        let mut filter = JobFilter::new(QueueName::new(format!("q{q}")).unwrap(), JobState::Ready);
        filter.error_contains = Some("boom 1234".into());
        let mut cursor = None;
        let mut n = 0;
        loop {
            let t = Instant::now();
            let page = console
                .list(&filter, Order::NewestFirst, cursor.as_ref(), 50)
                .await
                .unwrap();
            eprintln!("q{q} page {n}: {} jobs {:?}", page.jobs.len(), t.elapsed());
            n += 1;
            cursor = page.next;
            if cursor.is_none() {
                break;
            }
        }
    }
}
