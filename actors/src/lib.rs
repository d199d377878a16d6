//! The fedbpt runtime: server, client, evaluator and data-loader actors (ractor on tokio)
//! exchanging typed messages, and a pool of forward-worker actors that own the model replicas and
//! serialize forward passes so that many simulated clients share one or several devices.
//!
//! The method (CMA-ES, aggregation, models) lives in the `fedbpt` crate; actors move messages
//! and own state.

pub mod client;
pub mod cluster;
pub mod data_loader;
pub mod evaluator;
pub mod exchange;
pub mod fault_plan;
pub mod federation;
pub mod messages;
pub mod pool;
pub mod profile;
pub mod remote_roster;
pub mod replay;
pub mod round;
pub mod run_dir;
pub mod server;
pub mod server_strategy;
pub mod supervisor;
pub mod transport;
pub mod wire;
