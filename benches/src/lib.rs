//! Benchmarks for pgbus (filled by the benchmarks issue).
