//! Cross-crate integration tests for pgbus live in `tests/tests/`.
