//! The process registry on Postgres (`pgbus.processes`), on the pool or on a group
//! worker's recovery connection.

use std::time::Duration;

use pgbus_core::{
    ProcessId, ProcessInfo, ProcessRecord, ProcessRegistry, QueueName, QueueThroughput, Result,
};
use tokio_postgres::GenericClient;

use crate::error::db;
use crate::group::PgGroupRecovery;
use crate::query::Typed;
use crate::{sql, throughput, PgBackend};

fn int(n: u32) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

async fn register(client: &(impl GenericClient + Sync), info: &ProcessInfo) -> Result<ProcessId> {
    let queues: Vec<&str> = info.queues.iter().map(QueueName::as_str).collect();
    let row = client
        .q_one(
            sql::REGISTER_PROCESS,
            &[
                &info.hostname,
                &int(info.pid),
                &queues,
                &info.mode,
                &int(info.capacity),
            ],
        )
        .await
        .map_err(|e| db("registering a process", e))?;
    Ok(ProcessId(row.get(0)))
}

async fn heartbeat(client: &(impl GenericClient + Sync), id: ProcessId, busy: u32) -> Result<bool> {
    let updated = client
        .exec(sql::HEARTBEAT_PROCESS, &[&id.0, &int(busy)])
        .await
        .map_err(|e| db("recording a process heartbeat", e))?;
    Ok(updated == 1)
}

async fn deregister(client: &(impl GenericClient + Sync), id: ProcessId) -> Result<()> {
    client
        .exec(sql::DEREGISTER_PROCESS, &[&id.0])
        .await
        .map_err(|e| db("deregistering a process", e))?;
    Ok(())
}

async fn prune_stale(client: &(impl GenericClient + Sync), stale_after: Duration) -> Result<u64> {
    client
        .exec(sql::PRUNE_PROCESSES, &[&stale_after.as_secs_f64()])
        .await
        .map_err(|e| db("pruning stale processes", e))
}

async fn processes(client: &(impl GenericClient + Sync)) -> Result<Vec<ProcessRecord>> {
    let rows = client
        .q(sql::LIST_PROCESSES, &[])
        .await
        .map_err(|e| db("listing processes", e))?;
    rows.iter()
        .map(|row| {
            let queues = row
                .get::<_, Vec<String>>("queues")
                .into_iter()
                .map(QueueName::new)
                .collect::<Result<Vec<_>>>()?;
            let mut info = ProcessInfo::current(queues, row.get::<_, String>("mode"), 0);
            info.hostname = row.get("hostname");
            info.pid = row.get::<_, i32>("pid") as u32;
            info.capacity = row.get::<_, i32>("capacity") as u32;
            let mut record = ProcessRecord::new(ProcessId(row.get("id")), info);
            record.busy = row.get::<_, i32>("busy") as u32;
            record.started_at = row.get("started_at");
            record.heartbeat_at = row.get("heartbeat_at");
            Ok(record)
        })
        .collect()
}

impl ProcessRegistry for PgBackend {
    async fn register(&self, info: &ProcessInfo) -> Result<ProcessId> {
        register(&**self.conn().await?, info).await
    }
    async fn heartbeat(&self, id: ProcessId, busy: u32) -> Result<bool> {
        heartbeat(&**self.conn().await?, id, busy).await
    }
    async fn deregister(&self, id: ProcessId) -> Result<()> {
        deregister(&**self.conn().await?, id).await
    }
    async fn prune_stale(&self, stale_after: Duration) -> Result<u64> {
        prune_stale(&**self.conn().await?, stale_after).await
    }
    async fn processes(&self) -> Result<Vec<ProcessRecord>> {
        processes(&**self.conn().await?).await
    }
    async fn record_throughput(&self, counts: &[QueueThroughput]) -> Result<()> {
        throughput::record(&**self.conn().await?, counts).await
    }
}

impl ProcessRegistry for PgGroupRecovery {
    async fn register(&self, info: &ProcessInfo) -> Result<ProcessId> {
        register(self.client(), info).await
    }
    async fn heartbeat(&self, id: ProcessId, busy: u32) -> Result<bool> {
        heartbeat(self.client(), id, busy).await
    }
    async fn deregister(&self, id: ProcessId) -> Result<()> {
        deregister(self.client(), id).await
    }
    async fn prune_stale(&self, stale_after: Duration) -> Result<u64> {
        prune_stale(self.client(), stale_after).await
    }
    async fn processes(&self) -> Result<Vec<ProcessRecord>> {
        processes(self.client()).await
    }
    async fn record_throughput(&self, counts: &[QueueThroughput]) -> Result<()> {
        throughput::record(self.client(), counts).await
    }
}
