//! The configured server strategy as one concrete type, for the runtime to keep replicas of
//! (a [`super::Replica`] needs the type; the runtime holds a `Box<dyn Aggregator>`).

use serde::{Deserialize, Serialize};

use crate::config::{Aggregation, Config};
use crate::protocol::{ClientUpdate, SearchDistribution};
use crate::seeds::{derive, tag};
use crate::strategy::{Aggregator, FedAvgBbt, FedBpt, Told};
use crate::Result;

use super::{ReplayContext, Replayable};

/// FedBPT's or FedAvg-BBT's server, as `aggregation` says (FedBPT's boxed: it is the large one).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum GlobalStrategy {
    FedBpt(Box<FedBpt>),
    FedAvgBbt(FedAvgBbt),
}

impl GlobalStrategy {
    /// The configured server rule at its starting state (`experiment::aggregator_for` is this,
    /// as the runtime's trait object).
    pub fn from_config(cfg: &Config) -> Result<Self> {
        Ok(match cfg.aggregation {
            Aggregation::Fedbpt => Self::FedBpt(Box::new(
                FedBpt::new(
                    cfg.intrinsic_dim,
                    cfg.sigma,
                    derive(cfg.seed, &[tag::SERVER]),
                    true,
                    cfg.server_sigma,
                    cfg.local_popsize,
                )?
                .with_flavour(cfg.cma, clients_per_round(cfg))?
                .with_ranking(cfg.server_fitness, cfg.server_weights),
            )),
            Aggregation::Fedavg => Self::FedAvgBbt(FedAvgBbt::new(cfg.intrinsic_dim, cfg.sigma)?),
        })
    }

    /// The strategy as the runtime's trait object.
    pub fn into_aggregator(self) -> Box<dyn Aggregator> {
        match self {
            Self::FedBpt(s) => s,
            Self::FedAvgBbt(s) => Box::new(s),
        }
    }

    fn inner(&self) -> &dyn Aggregator {
        match self {
            Self::FedBpt(s) => s.as_ref(),
            Self::FedAvgBbt(s) => s,
        }
    }

    fn inner_mut(&mut self) -> &mut dyn Aggregator {
        match self {
            Self::FedBpt(s) => s.as_mut(),
            Self::FedAvgBbt(s) => s,
        }
    }
}

/// Clients taking part in each round: `clients_per_round`, or all of them when it is 0.
fn clients_per_round(cfg: &Config) -> usize {
    match cfg.clients_per_round {
        0 => cfg.num_users,
        k => k.min(cfg.num_users),
    }
}

impl ReplayContext {
    /// The local search every client of the configured run replays.
    pub fn from_config(cfg: &Config) -> Self {
        Self {
            run_seed: cfg.seed,
            popsize: cfg.local_popsize,
            iterations: cfg.local_iter,
            flavour: cfg.cma,
        }
    }
}

/// Delegates to the configured rule: the same names, distributions, rounds and snapshots.
impl Aggregator for GlobalStrategy {
    fn name(&self) -> &'static str {
        self.inner().name()
    }

    fn configure(&self, round: usize) -> SearchDistribution {
        self.inner().configure(round)
    }

    fn aggregate(&mut self, round: usize, updates: &[ClientUpdate]) -> Result<Vec<Told>> {
        self.inner_mut().aggregate(round, updates)
    }

    fn global_mean(&self) -> Vec<f32> {
        self.inner().global_mean()
    }

    fn sigma(&self) -> f64 {
        self.inner().sigma()
    }

    fn snapshot(&self) -> Result<serde_json::Value> {
        self.inner().snapshot()
    }

    fn restore(&mut self, v: serde_json::Value) -> Result<()> {
        self.inner_mut().restore(v)
    }
}

impl Replayable for GlobalStrategy {
    fn nudge(&mut self) -> Result<()> {
        match self {
            Self::FedBpt(s) => s.nudge(),
            Self::FedAvgBbt(s) => s.nudge(),
        }
    }
}
