//! The backend's connection pool: bb8 over tokio-postgres clients that keep the statements
//! prepared on them, so a hot statement is parsed and planned once per connection instead
//! of on every call.

use std::collections::HashMap;
use std::ops::{Deref, DerefMut};
use std::sync::Mutex;

use tokio_postgres::types::Type;
use tokio_postgres::{Client, Config, Statement};

use crate::connect::open;

/// A pooled connection: its client, and the statements prepared on it by their text.
pub(crate) struct PooledClient {
    client: Client,
    prepared: Mutex<HashMap<&'static str, Statement>>,
}

impl PooledClient {
    /// `sql` (with parameters of `types`) prepared on this connection: on first use, then
    /// from the cache.
    pub(crate) async fn prepared(
        &self,
        sql: &'static str,
        types: &[Type],
    ) -> Result<Statement, tokio_postgres::Error> {
        if let Some(statement) = self.prepared.lock().expect("prepared statements").get(sql) {
            return Ok(statement.clone());
        }
        let statement = self.client.prepare_typed(sql, types).await?;
        self.prepared
            .lock()
            .expect("prepared statements")
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

/// Opens the pool's connections, named `pgbus:<role>` by `config`.
#[derive(Debug)]
pub(crate) struct Manager {
    config: Config,
    role: String,
}

impl Manager {
    pub(crate) fn new(config: Config, role: String) -> Self {
        Self { config, role }
    }
}

impl bb8::ManageConnection for Manager {
    type Connection = PooledClient;
    type Error = tokio_postgres::Error;

    async fn connect(&self) -> Result<PooledClient, tokio_postgres::Error> {
        let client = open(&self.config, &self.role).await?;
        Ok(PooledClient {
            client,
            prepared: Mutex::default(),
        })
    }

    async fn is_valid(&self, conn: &mut PooledClient) -> Result<(), tokio_postgres::Error> {
        conn.simple_query("").await.map(|_| ())
    }

    fn has_broken(&self, conn: &mut PooledClient) -> bool {
        conn.is_closed()
    }
}
