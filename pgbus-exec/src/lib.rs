//! Execution pools and the worker runtime for pgbus.

#![forbid(unsafe_code)]

mod pool;

pub use pool::{
    ExecError, ExecutionMode, ExecutionPool, Job, PoolMetadata, Refused, RefusedReason,
    StateChangeCallback,
};
