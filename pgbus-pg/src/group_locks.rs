//! How ordered groups are locked: a setting of the backend (`backend.rs`) that group
//! sessions (`group.rs`) act on.

use std::time::Duration;

/// How group locks are held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum GroupLocks {
    /// A session advisory lock per group, held by the group's own connection (released by
    /// the server when the connection closes). The default.
    #[default]
    Advisory,
    /// A row lease per group in `pgbus.group_leases` (owner token, expiry), taken and
    /// renewed in one statement, with every write fenced by the token so an owner whose
    /// lease expired cannot write. For deployments behind a transaction-mode pooler, where
    /// session advisory locks are unsafe. A dead owner's groups come back when the lease
    /// (`ttl`) expires.
    Lease {
        /// How long a lease lasts without renewal; renewed with every claim and lease
        /// heartbeat.
        ttl: Duration,
    },
}
