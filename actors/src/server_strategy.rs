//! The server's aggregation rule as the rounds hold it: shipped as a distribution, or replayed
//! by the clients from a digest log (`traffic`).

use fedbpt::config::{Config, Traffic};
use fedbpt::strategy::Aggregator;

use crate::replay::server::ReplayServer;

/// The server's aggregation rule, and with `traffic = "replay"` the digest log that lets the
/// clients' replicas follow it.
pub enum ServerStrategy {
    /// `traffic = "distribution"`: the rule as `experiment::aggregator_for` builds it.
    Shipped(Box<dyn Aggregator>),
    /// `traffic = "replay"`: the rule as one type a replica can hold, and the log.
    Replayed(Box<ReplayServer>),
}

impl ServerStrategy {
    /// The configured rule at its starting state, for the configured traffic.
    pub fn for_config(cfg: &Config) -> fedbpt::Result<Self> {
        Ok(match cfg.traffic {
            Traffic::Distribution => Self::Shipped(fedbpt::experiment::aggregator_for(cfg)?),
            Traffic::Replay => Self::Replayed(Box::new(ReplayServer::from_config(cfg)?)),
        })
    }

    pub fn aggregator(&self) -> &dyn Aggregator {
        match self {
            Self::Shipped(a) => a.as_ref(),
            Self::Replayed(r) => r.strategy(),
        }
    }

    pub fn aggregator_mut(&mut self) -> &mut dyn Aggregator {
        match self {
            Self::Shipped(a) => a.as_mut(),
            Self::Replayed(r) => r.strategy_mut(),
        }
    }

    pub fn replay(&self) -> Option<&ReplayServer> {
        match self {
            Self::Shipped(_) => None,
            Self::Replayed(r) => Some(r),
        }
    }

    pub fn replay_mut(&mut self) -> Option<&mut ReplayServer> {
        match self {
            Self::Shipped(_) => None,
            Self::Replayed(r) => Some(r),
        }
    }
}
