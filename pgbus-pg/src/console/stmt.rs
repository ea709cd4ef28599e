//! A console statement with its parameters, built once and either run or explained: the
//! `EXPLAIN` test sees exactly the SQL and values the real call sends.

use std::borrow::Cow;

use tokio_postgres::types::Json;
use tokio_postgres::{GenericClient, Row};

use crate::query::{Param, Typed};

/// SQL, its owned parameters, and a name for reports.
pub(super) struct Stmt {
    /// What it is, e.g. `list ready newest group`.
    pub(super) name: String,
    sql: Cow<'static, str>,
    params: Vec<Box<dyn Param + Send>>,
}

impl Stmt {
    pub(super) fn new(name: impl Into<String>, sql: impl Into<Cow<'static, str>>) -> Self {
        Self {
            name: name.into(),
            sql: sql.into(),
            params: Vec::new(),
        }
    }

    /// Adds the next parameter (`$1`, `$2`, ... in order).
    pub(super) fn bind(mut self, value: impl Param + Send + 'static) -> Self {
        self.params.push(Box::new(value));
        self
    }

    fn params(&self) -> Vec<&dyn Param> {
        self.params.iter().map(|p| &**p as &dyn Param).collect()
    }

    /// Runs it.
    pub(super) async fn rows(
        &self,
        client: &(impl GenericClient + Sync),
    ) -> Result<Vec<Row>, tokio_postgres::Error> {
        client.q(&self.sql, &self.params()).await
    }

    /// Runs it for its one row.
    pub(super) async fn one(
        &self,
        client: &(impl GenericClient + Sync),
    ) -> Result<Row, tokio_postgres::Error> {
        client.q_one(&self.sql, &self.params()).await
    }

    /// Its plan as `EXPLAIN (FORMAT JSON)` gives it (without running it).
    pub(super) async fn explain(
        &self,
        client: &(impl GenericClient + Sync),
    ) -> Result<serde_json::Value, tokio_postgres::Error> {
        let sql = format!("EXPLAIN (FORMAT JSON) {}", self.sql);
        let row = client.q_one(&sql, &self.params()).await?;
        let Json(plan) = row.try_get::<_, Json<serde_json::Value>>(0)?;
        Ok(plan)
    }
}
