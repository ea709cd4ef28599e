//! Execution pools and the worker runtime for pgbus.

#![forbid(unsafe_code)]

mod handler;
mod pool;
mod worker;

pub use pool::{
    ExecError, ExecutionMode, ExecutionPool, Job, PoolMetadata, Refused, RefusedReason,
    StateChangeCallback,
};

mod async_pool;
mod slots;
mod threads;

pub use async_pool::AsyncPool;
pub use handler::{handler_fn, FnHandler, Handler, IntoOutcome, JobContext, Outcome};
pub use threads::ThreadPool;
pub use worker::{
    default_execution_mode, set_default_execution_mode, Worker, WorkerBuilder, WorkerMetadata,
    WorkerMonitor, WorkerReport,
};
