//! The backend's connection pool: bb8 over tokio-postgres clients. A pooled connection
//! keeps the hot statements it prepared (see [`Reused`]), so they are parsed and planned
//! once per connection, unless a transaction-mode pooler rules prepared statements out.

use std::collections::HashMap;
use std::ops::{Deref, DerefMut};
use std::sync::Mutex;

use tokio_postgres::Client;

use crate::connect::ConnectOptions;
use crate::query::{Pooler, Reused};
use crate::telemetry::CountedConnection;

/// A pooled connection: its client, and the statements prepared on it by their text.
pub(crate) struct PooledClient {
    client: Client,
    pooler: Pooler,
    prepared: Mutex<HashMap<&'static str, std::sync::Arc<Reused>>>,
    /// Its place in the `pgbus_connections` gauge, given back when the pool drops it.
    _counted: CountedConnection,
}

impl PooledClient {
    /// `sql` ready to run on this connection: prepared on first use, then from the cache.
    pub(crate) async fn reused(
        &self,
        sql: &'static str,
    ) -> Result<std::sync::Arc<Reused>, tokio_postgres::Error> {
        let cached = self
            .prepared
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(sql)
            .cloned();
        if let Some(statement) = cached {
            return Ok(statement);
        }
        let statement = std::sync::Arc::new(Reused::prepare(&self.client, sql, self.pooler).await?);
        self.prepared
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(sql, statement.clone());
        Ok(statement)
    }
}

impl Deref for PooledClient {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.client
    }
}

impl DerefMut for PooledClient {
    fn deref_mut(&mut self) -> &mut Client {
        &mut self.client
    }
}

/// Opens the pool's connections, named `pgbus:<role>`.
#[derive(Debug)]
pub(crate) struct Manager {
    target: ConnectOptions,
    role: String,
    pooler: Pooler,
}

impl Manager {
    pub(crate) fn new(target: ConnectOptions, role: String, pooler: Pooler) -> Self {
        Self {
            target,
            role,
            pooler,
        }
    }
}

impl bb8::ManageConnection for Manager {
    type Connection = PooledClient;
    type Error = tokio_postgres::Error;

    async fn connect(&self) -> Result<PooledClient, tokio_postgres::Error> {
        let client = self.target.open(&self.role).await?;
        Ok(PooledClient {
            client,
            pooler: self.pooler,
            prepared: Mutex::default(),
            _counted: CountedConnection::opened(&self.role),
        })
    }

    /// No round trip on checkout (it would double the cost of a one-statement send): a
    /// connection the driver saw close (terminated, server restarted) is refused here, its
    /// statement failing at once without reaching the network, and the pool opens
    /// another. One that died unseen fails its next statement with a transient error.
    async fn is_valid(&self, conn: &mut PooledClient) -> Result<(), tokio_postgres::Error> {
        if conn.is_closed() {
            conn.simple_query("").await.map(|_| ())
        } else {
            Ok(())
        }
    }

    fn has_broken(&self, conn: &mut PooledClient) -> bool {
        conn.is_closed()
    }
}
