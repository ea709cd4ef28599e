//! Execution pools and the worker runtime for pgbus.

#![forbid(unsafe_code)]

mod pool;

pub use pool::{
    ExecError, ExecutionMode, ExecutionPool, Job, PoolMetadata, Refused, RefusedReason,
    StateChangeCallback,
};

mod async_pool;
mod slots;
mod threads;

pub use async_pool::AsyncPool;
pub use threads::ThreadPool;
