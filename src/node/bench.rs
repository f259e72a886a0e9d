//! Benchmarks of the node client.
