//! fedbpt: federated black-box prompt tuning (FedBPT, Sun et al. 2023) of frozen language models.
//!
//! This crate is the method: assets, data and tasks, model backends with soft-prompt injection,
//! the random projection, objectives, CMA-ES and the aggregation strategies. It knows nothing of
//! actors; the runtime (`fedbpt-actors`) moves messages and calls into it.

pub mod assets;
pub mod bbt;
pub mod cmaes;
pub mod config;
pub mod data;
pub mod error;
pub mod experiment;
pub mod kernels;
pub mod local_search;
pub mod machine;
pub mod models;
pub mod objective;
pub mod peak;
pub mod projection;
pub mod protocol;
pub mod replay;
pub mod seeds;
pub mod strategy;
pub mod task;

pub use error::{Error, Result};
