//! The conformance suite on the in-memory reference backend.

use pgbus_core::MemoryBackend;

async fn fresh_backend() -> MemoryBackend {
    MemoryBackend::new()
}

pgbus_core::conformance_tests!(fresh_backend);
pgbus_core::conformance_tests!(@streams fresh_backend);
