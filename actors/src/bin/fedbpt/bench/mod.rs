//! The benchmarks: forwards against their peers, tracing, the wire, many clients.

pub mod cluster;
pub mod forward;
pub mod peers;
pub mod scale;
pub mod trace;
