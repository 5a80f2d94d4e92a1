//! Breakwater's test bench: kube-sim (a simulated kube-apiserver with
//! faithful list/watch semantics), certificates for it, and the load
//! generators and benchmarks behind the `loadtest` binary.
//!
//! This crate never links the proxy: benchmarks run the real `breakwater`
//! binary as a child process, black-box, as an operator would.

pub mod bench;
pub mod error;
pub mod pki;
pub mod proc;
pub mod sim;
pub mod storm;
