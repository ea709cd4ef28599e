//! Transactional completion: a handler's writes and its ack in one transaction.

use bb8::PooledConnection;
use pgbus_core::{Lease, Result, TransactionalAck};
use tokio_postgres::Client;

use crate::backend::{lease_arrays, Manager};
use crate::error::{db, pool};
use crate::query::Typed;
use crate::{sql, PgBackend};

/// An open transaction on a pooled connection. Run your statements on
/// [`client`](Self::client); finish with [`TransactionalAck::ack_and_commit`] or
/// [`commit`](Self::commit). Dropped unfinished, it is rolled back before the connection
/// goes back to the pool.
pub struct PgTransaction {
    conn: Option<PooledConnection<'static, Manager>>,
}

impl std::fmt::Debug for PgTransaction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgTransaction").finish_non_exhaustive()
    }
}

impl PgTransaction {
    /// The connection, inside the open transaction.
    pub fn client(&self) -> &Client {
        self.conn
            .as_deref()
            .expect("transaction is open until consumed")
    }

    /// Commits without acking anything.
    pub async fn commit(mut self) -> Result<()> {
        self.finish("COMMIT").await
    }

    /// Rolls back.
    pub async fn rollback(mut self) -> Result<()> {
        self.finish("ROLLBACK").await
    }

    async fn finish(&mut self, statement: &str) -> Result<()> {
        let conn = self
            .conn
            .take()
            .expect("transaction is open until consumed");
        conn.batch_execute(statement)
            .await
            .map_err(|e| db("ending a transaction", e))
    }
}

impl Drop for PgTransaction {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        // The connection must not go back to the pool inside a transaction: roll back
        // first. If that fails the connection is broken and the pool discards it.
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    if let Err(err) = conn.batch_execute("ROLLBACK").await {
                        tracing::warn!(target: "pgbus::transaction", error = %err, "rollback of a dropped transaction failed");
                    }
                });
            }
            Err(_) => {
                tracing::warn!(target: "pgbus::transaction", "transaction dropped outside a runtime; its connection is left to the pool's health check")
            }
        }
    }
}

impl TransactionalAck for PgBackend {
    type Tx = PgTransaction;

    async fn begin(&self) -> Result<PgTransaction> {
        let conn = self.pool().get_owned().await.map_err(pool)?;
        conn.batch_execute("BEGIN")
            .await
            .map_err(|e| db("beginning a transaction", e))?;
        Ok(PgTransaction { conn: Some(conn) })
    }

    async fn ack_and_commit(&self, mut tx: PgTransaction, lease: &Lease) -> Result<bool> {
        let (ids, attempts) = lease_arrays(std::slice::from_ref(lease));
        let acked: i64 = tx
            .client()
            .q_one(sql::ACK, &[&ids, &attempts])
            .await
            .map_err(|e| db("acking inside a transaction", e))?
            .get(0);
        if acked == 1 {
            tx.finish("COMMIT").await?;
            Ok(true)
        } else {
            tx.finish("ROLLBACK").await?;
            Ok(false)
        }
    }
}
