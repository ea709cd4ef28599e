//! The process registry on Postgres (`pgbus.processes`).

use std::time::Duration;

use pgbus_core::{ProcessId, ProcessInfo, ProcessRecord, ProcessRegistry, QueueName, Result};

use crate::error::db;
use crate::{sql, PgBackend};

impl ProcessRegistry for PgBackend {
    async fn register(&self, info: &ProcessInfo) -> Result<ProcessId> {
        let queues: Vec<&str> = info.queues.iter().map(QueueName::as_str).collect();
        let row = self
            .conn()
            .await?
            .query_one(
                sql::REGISTER_PROCESS,
                &[
                    &info.hostname,
                    &i32::try_from(info.pid).unwrap_or(i32::MAX),
                    &queues,
                    &info.mode,
                    &i32::try_from(info.capacity).unwrap_or(i32::MAX),
                ],
            )
            .await
            .map_err(|e| db("registering a process", e))?;
        Ok(ProcessId(row.get(0)))
    }

    async fn heartbeat(&self, id: ProcessId, busy: u32) -> Result<bool> {
        let updated = self
            .conn()
            .await?
            .execute(
                sql::HEARTBEAT_PROCESS,
                &[&id.0, &i32::try_from(busy).unwrap_or(i32::MAX)],
            )
            .await
            .map_err(|e| db("recording a process heartbeat", e))?;
        Ok(updated == 1)
    }

    async fn deregister(&self, id: ProcessId) -> Result<()> {
        self.conn()
            .await?
            .execute(sql::DEREGISTER_PROCESS, &[&id.0])
            .await
            .map_err(|e| db("deregistering a process", e))?;
        Ok(())
    }

    async fn prune_stale(&self, stale_after: Duration) -> Result<u64> {
        self.conn()
            .await?
            .execute(sql::PRUNE_PROCESSES, &[&stale_after.as_secs_f64()])
            .await
            .map_err(|e| db("pruning stale processes", e))
    }

    async fn processes(&self) -> Result<Vec<ProcessRecord>> {
        let rows = self
            .conn()
            .await?
            .query(sql::LIST_PROCESSES, &[])
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
}
