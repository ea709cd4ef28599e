//! Streams for pgbus: the stream dispatcher and the SSE endpoint.
//!
//! Not built yet: this crate is filled by the streams issue. It exists so the workspace
//! layout, and the rule that it never depends on `pgbus-pg`, are in place.
