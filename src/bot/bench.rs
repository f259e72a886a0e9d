//! Benchmark of update handling (filled in below).
