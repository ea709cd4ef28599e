//! Execution pools and the worker runtime for pgbus.
//!
//! Not built yet: this crate is filled by the execution-pool and worker issue. It exists so
//! the workspace layout, and the rule that it never depends on `pgbus-pg`, are in place.
