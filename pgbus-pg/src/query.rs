//! How statements are sent. Every statement goes as an unnamed statement with its
//! parameter types (parse, bind and execute in one round trip, no named statement left on
//! the session), so any connection works behind a transaction-mode pooler, where the next
//! transaction may run on another server session. The few statements a dedicated
//! connection runs in a loop are [`Reused`]: prepared once per connection, unless a
//! transaction-mode pooler sits in between.

use std::time::SystemTime;

use tokio_postgres::types::{Json, ToSql, Type};
use tokio_postgres::{Client, Error, GenericClient, Row, Statement};

/// What sits between pgbus and PostgreSQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Pooler {
    /// Every connection is a server session of its own: a direct connection, or a pooler
    /// in session mode. The default.
    #[default]
    Session,
    /// A pooler in transaction mode (PgBouncer's `pool_mode = transaction`): consecutive
    /// transactions of one connection may run on different server sessions, so pgbus keeps
    /// no session state: no prepared statements, no session settings, no session advisory
    /// locks (ordered groups use [`GroupLocks::Lease`](crate::GroupLocks::Lease)), and no
    /// LISTEN (give listeners a direct URL, or workers poll).
    Transaction,
}

/// The PostgreSQL type a Rust value is sent as.
pub(crate) trait PgType {
    const TYPE: Type;
}

/// A statement parameter: a value and the type it is sent as.
pub(crate) trait Param: Sync {
    fn value(&self) -> &(dyn ToSql + Sync);
    fn pg_type(&self) -> Type;
}

impl<T: PgType + ToSql + Sync> Param for T {
    fn value(&self) -> &(dyn ToSql + Sync) {
        self
    }
    fn pg_type(&self) -> Type {
        T::TYPE
    }
}

macro_rules! pg_types {
    ($($rust:ty => $scalar:ident, $array:ident;)*) => {$(
        impl PgType for $rust {
            const TYPE: Type = Type::$scalar;
        }
        impl PgType for Vec<$rust> {
            const TYPE: Type = Type::$array;
        }
        impl PgType for Vec<Option<$rust>> {
            const TYPE: Type = Type::$array;
        }
        impl PgType for &[$rust] {
            const TYPE: Type = Type::$array;
        }
    )*};
}

pg_types! {
    bool => BOOL, BOOL_ARRAY;
    i16 => INT2, INT2_ARRAY;
    i32 => INT4, INT4_ARRAY;
    i64 => INT8, INT8_ARRAY;
    f64 => FLOAT8, FLOAT8_ARRAY;
    String => TEXT, TEXT_ARRAY;
    &str => TEXT, TEXT_ARRAY;
    SystemTime => TIMESTAMPTZ, TIMESTAMPTZ_ARRAY;
    Vec<u8> => BYTEA, BYTEA_ARRAY;
    &[u8] => BYTEA, BYTEA_ARRAY;
    serde_json::Value => JSONB, JSONB_ARRAY;
}

impl<T: serde::Serialize + std::fmt::Debug> PgType for Json<T> {
    const TYPE: Type = Type::JSONB;
}

impl<T: serde::Serialize + std::fmt::Debug> PgType for Vec<Json<T>> {
    const TYPE: Type = Type::JSONB_ARRAY;
}

impl<T: PgType> PgType for Option<T> {
    const TYPE: Type = T::TYPE;
}

impl<T: PgType + ?Sized> PgType for &T {
    const TYPE: Type = T::TYPE;
}

/// Parameters with their types, as `query_typed` takes them.
pub(crate) fn typed<'a>(params: &'a [&'a dyn Param]) -> Vec<(&'a (dyn ToSql + Sync), Type)> {
    params.iter().map(|p| (p.value(), p.pg_type())).collect()
}

/// Parameters without types, for a prepared statement (whose types the server chose).
fn untyped<'a>(params: &'a [&'a dyn Param]) -> Vec<&'a (dyn ToSql + Sync)> {
    params.iter().map(|p| p.value()).collect()
}

/// Statements with typed parameters on any client, pooled, dedicated or a transaction.
pub(crate) trait Typed: GenericClient + Sync {
    /// The rows of `sql`.
    fn q(
        &self,
        sql: &str,
        params: &[&dyn Param],
    ) -> impl std::future::Future<Output = Result<Vec<Row>, Error>> + Send {
        async move { self.query_typed(sql, &typed(params)).await }
    }

    /// The one row of `sql` (an error unless there is exactly one).
    fn q_one(
        &self,
        sql: &str,
        params: &[&dyn Param],
    ) -> impl std::future::Future<Output = Result<Row, Error>> + Send {
        async move { self.query_typed_one(sql, &typed(params)).await }
    }

    /// The row of `sql`, if any (an error if there are more).
    fn q_opt(
        &self,
        sql: &str,
        params: &[&dyn Param],
    ) -> impl std::future::Future<Output = Result<Option<Row>, Error>> + Send {
        async move { self.query_typed_opt(sql, &typed(params)).await }
    }

    /// Runs `sql`; the number of rows it changed.
    fn exec(
        &self,
        sql: &str,
        params: &[&dyn Param],
    ) -> impl std::future::Future<Output = Result<u64, Error>> + Send {
        async move { self.execute_typed(sql, &typed(params)).await }
    }
}

impl<C: GenericClient + Sync> Typed for C {}

/// A statement a dedicated connection runs again and again: prepared once on it (parsed
/// and planned once), or sent unnamed each time behind a transaction-mode pooler, where a
/// prepared statement would not be there in the next transaction.
#[derive(Debug)]
pub(crate) enum Reused {
    Prepared(Statement),
    Unnamed(&'static str),
}

impl Reused {
    /// Prepares `sql` on `client` unless `pooler` forbids it.
    pub(crate) async fn prepare(
        client: &Client,
        sql: &'static str,
        pooler: Pooler,
    ) -> Result<Self, Error> {
        match pooler {
            Pooler::Session => Ok(Self::Prepared(client.prepare(sql).await?)),
            Pooler::Transaction => Ok(Self::Unnamed(sql)),
        }
    }

    /// The rows of the statement.
    pub(crate) async fn query(
        &self,
        client: &(impl GenericClient + Sync),
        params: &[&dyn Param],
    ) -> Result<Vec<Row>, Error> {
        match self {
            Self::Prepared(statement) => client.query(statement, &untyped(params)).await,
            Self::Unnamed(sql) => client.query_typed(sql, &typed(params)).await,
        }
    }

    /// The one row of the statement.
    pub(crate) async fn query_one(
        &self,
        client: &(impl GenericClient + Sync),
        params: &[&dyn Param],
    ) -> Result<Row, Error> {
        match self {
            Self::Prepared(statement) => client.query_one(statement, &untyped(params)).await,
            Self::Unnamed(sql) => client.query_typed_one(sql, &typed(params)).await,
        }
    }
}
