//! Breakwater: a rate-limiting L7 reverse proxy for the Kubernetes API server.
//!
//! The request path is in [`proxy`]; the listener, TLS and shutdown in
//! [`server`]; the upstream pool in [`upstream`]. `main.rs` only parses
//! arguments and calls [`server::start`] (or [`demo::run`]).

pub mod accept;
pub mod admin;
pub mod admin_client;
pub mod admit;
pub mod blockctl;
pub mod brake;
pub mod check;
pub mod classify;
pub mod config;
#[cfg(feature = "demo")]
pub mod demo;
pub mod error;
pub mod global;
pub mod identity;
pub mod logsink;
pub mod pacing;
pub mod proxy;
pub mod reload;
pub mod selector;
pub mod server;
pub mod slo;
pub mod status;
pub mod tasks;
pub mod tls;
pub mod top;
pub mod upstream;
pub mod watch;
