//! Breakwater's limits: the operator's limits file, rule matching, token
//! buckets, in-flight and concurrent-watch counters, priority lanes and hot
//! reload. No I/O besides reading the file.
//!
//! The engine lands with the limits issue; the file format it will accept is
//! `docker/limits.yaml`.
