//! Server-side aggregation rules (like Flower's `Strategy`): which clients take part in a round,
//! what the server sends them, and how it folds their replies. Knows nothing of actors or
//! transport; this file is the whole of the server's method.
//!
//! Two rules: [`FedBpt`] (the paper's method: the client means form one population of a global
//! CMA-ES, ranked by the clients' fitness) and [`FedAvgBbt`] (the paper's baseline: plain
//! averaging of the client means).
//!
//! FedBPT's step size follows the reference server (NVFlare research/fed-bpt, `global_es.py`)
//! unless [`ServerSigma::ClientRms`] asks for the earlier rule of this project:
//!
//! 1. `s6 = sqrt(sum_k sum_j sigma_kj^2 / (K * mu_local))` over the `K` replies that arrived
//!    (paper Eq. 6; the reference divides by the configured client count, which shrinks it for
//!    every missing reply), `sigma_kj` the step size client `k` had before its `j`-th local ask
//!    and `mu_local` the parents of a local population;
//! 2. the global CMA-ES's sigma is set to `s6` and told the client means as injected points
//!    (each step clipped to the Mahalanobis length a sample could have, as pycma does);
//! 3. the sigma sent next round is `(sigma after the tell / s6) x` the sigma sent this round:
//!    `s6` only scales the tell; the global CMA-ES's own step-size control moves the sigma.
//!
//! The global CMA-ES is this crate's tutorial one unless `cma = "pycma"` ([`FedBpt::with_flavour`]):
//! then it is pycma's, with the reference's `popsize = CMA_mu =` clients per round, so the
//! round above is the reference's tell step for step (docs/pycma-flavour.md).
//!
//! What the server ranks the client means by ([`ServerFitness`]) and how it weighs the ranks
//! ([`ServerWeights`]) are the reference's unless configured: the variants test the mechanism
//! of FedBPT's non-iid collapse (a skewed shard's loss is low for a prompt that predicts its
//! majority class, so the most skewed clients rank first and pull the global mean hardest).

use std::collections::HashSet;

use rand::seq::index::sample;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use rand::seq::SliceRandom;

use crate::cmaes::{parents_for, ranking, CmaFlavour, Cmaes, CmaesOptions, Parents};
use crate::protocol::{pack_upper, ClientUpdate, SearchDistribution};
use crate::{Error, Result};

/// A server-side aggregation rule.
pub trait Aggregator: Send {
    /// Short name for logs and checkpoints.
    fn name(&self) -> &'static str;
    /// The distribution clients start from in `round`.
    fn configure(&self, round: usize) -> SearchDistribution;
    /// Fold the replies that arrived (any number >= 1; fewer than configured is normal under
    /// faults) and say how each was ranked and weighed, by client index. On error the state is
    /// left unchanged.
    fn aggregate(&mut self, round: usize, updates: &[ClientUpdate]) -> Result<Vec<Told>>;
    /// Current global mean.
    fn global_mean(&self) -> Vec<f32>;
    /// The step size clients search with next.
    fn sigma(&self) -> f64;
    /// Whole state for checkpoints.
    fn snapshot(&self) -> Result<serde_json::Value>;
    /// Restores a state produced by [`Aggregator::snapshot`] of the same rule and dimension.
    fn restore(&mut self, v: serde_json::Value) -> Result<()>;
}

/// What the server does with a round short of its quorum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum QuorumPolicy {
    /// Keep the global distribution and go on.
    #[default]
    Skip,
    /// Run the round again (up to `max_round_retries` times), then skip.
    Retry,
}

/// What the server does after one attempt at a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoundDecision {
    /// Enough replies: fold them.
    Aggregate,
    /// Too few: run the round again with the clients that are up by then.
    Retry,
    /// Too few, and no retry left: keep the global distribution and go on.
    Skip,
}

/// The round's rule: how many replies a round needs and what happens without them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuorumRule {
    /// Replies needed to aggregate (at least 1).
    pub min_clients: usize,
    pub policy: QuorumPolicy,
    pub max_retries: usize,
}

impl QuorumRule {
    /// The decision after an attempt that got `replies` replies, `retries_done` retries in.
    pub fn decide(&self, replies: usize, retries_done: usize) -> RoundDecision {
        if replies >= self.min_clients.max(1) {
            RoundDecision::Aggregate
        } else if self.policy == QuorumPolicy::Retry && retries_done < self.max_retries {
            RoundDecision::Retry
        } else {
            RoundDecision::Skip
        }
    }
}

/// One client's part in an aggregation, for the round's record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Told {
    pub client: usize,
    /// 1 for the best of the round.
    pub rank: usize,
    /// Its recombination weight (the weights of a round sum to 1).
    pub weight: f64,
    /// The value the server ranked it by (its fitness unless [`ServerFitness`] says otherwise).
    pub ranked_by: f64,
}

/// What the FedBPT server ranks the client means by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ServerFitness {
    /// Each client's fitness on its own shard (the reference's).
    #[default]
    Loss,
    /// The reported fitnesses permuted across the clients each round (seeded): the control
    /// that keeps the weights, mueff, Eq. 6, the clip and the step-size control and cuts the
    /// rank from the shard's skew.
    Permuted,
    /// How much the client's search lowered its fitness: final minus that of the mean it
    /// received (scored first on the same shard, one more candidate per round), so a skewed
    /// shard's low loss level no longer ranks it first.
    Improvement,
}

/// How the FedBPT server weighs the ranked client means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ServerWeights {
    /// Positive rank-decreasing weights for all clients (the reference's `CMA_mu` = clients).
    #[default]
    Rank,
    /// The same weight for every client mean.
    Equal,
}

/// How the FedBPT server sets the step size it sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ServerSigma {
    /// The reference's rule (see the module doc): Eq. 6 scales a clipped tell and the global
    /// CMA-ES's step-size factor moves the sigma from round to round.
    #[default]
    Reference,
    /// The earlier rule of this project, kept to measure the difference: the client means are
    /// told unclipped with the sigma they searched with, and the next sigma is the root mean
    /// square of the clients' reported sigmas. Local searches restarted with fresh paths almost
    /// always shrink sigma, so this sigma decays on a schedule whatever the progress.
    ClientRms,
}

/// FedBPT's server: a global CMA-ES over z whose population each round is the client means.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FedBpt {
    /// Its sigma between rounds is the one sent to clients.
    es: Cmaes,
    send_covariance: bool,
    rule: ServerSigma,
    /// Parents of one local population (`mu_local` of Eq. 6).
    local_parents: usize,
    #[serde(default)]
    fitness: ServerFitness,
    #[serde(default)]
    weights: ServerWeights,
    /// Seed of the permutations of [`ServerFitness::Permuted`].
    #[serde(default)]
    seed: u64,
}

impl FedBpt {
    /// A global CMA-ES over `dim` coordinates centred on zero with step size `sigma0`.
    /// `send_covariance` ships its covariance to clients (`d(d+1)/2` floats per client per
    /// round); without it clients search with the identity, as in the paper's 4 KB budget.
    /// `local_popsize` is the clients' population (for `mu_local`).
    pub fn new(
        dim: usize,
        sigma0: f64,
        seed: u64,
        send_covariance: bool,
        rule: ServerSigma,
        local_popsize: usize,
    ) -> Result<Self> {
        let opts = CmaesOptions { popsize: None, seed, bounds: None, ..Default::default() };
        let mut es = Cmaes::new(vec![0.0; dim], sigma0, opts)?;
        // Every client that replies gets a positive, rank-decreasing weight, as in the
        // reference server (pycma with CMA_mu = number of clients).
        es.set_parents(Parents::All);
        let local_parents = parents_for(local_popsize);
        let (fitness, weights) = (ServerFitness::Loss, ServerWeights::Rank);
        Ok(Self { es, send_covariance, rule, local_parents, fitness, weights, seed })
    }

    /// Runs the global CMA-ES in `flavour`. For [`CmaFlavour::Pycma`] its popsize is `clients`
    /// (the clients of a round), as the reference's `popsize = CMA_mu = m`; the tutorial flavour
    /// keeps the default popsize (either way a tell of another count uses that count's weights).
    pub fn with_flavour(mut self, flavour: CmaFlavour, clients: usize) -> Result<Self> {
        let popsize = match flavour {
            CmaFlavour::Tutorial => None,
            CmaFlavour::Pycma => Some(clients.max(2)),
        };
        let opts = CmaesOptions { popsize, seed: self.seed, bounds: None, flavour };
        let mut es = Cmaes::new(self.es.mean().to_vec(), self.es.sigma(), opts)?;
        es.set_parents(self.es.parents());
        self.es = es;
        Ok(self)
    }

    /// Ranks by `fitness` and weighs by `weights` instead of the reference's loss and ranks.
    pub fn with_ranking(mut self, fitness: ServerFitness, weights: ServerWeights) -> Self {
        self.fitness = fitness;
        self.weights = weights;
        self.es.set_parents(match weights {
            ServerWeights::Rank => Parents::All,
            ServerWeights::Equal => Parents::Equal,
        });
        self
    }

    /// What each client (by client index) is ranked by this round.
    fn ranked_by(&self, round: usize, sorted: &[&ClientUpdate]) -> Result<Vec<f64>> {
        let reported = sorted.iter().map(|u| u.fitness);
        match self.fitness {
            ServerFitness::Loss => Ok(reported.collect()),
            ServerFitness::Permuted => {
                let mut f: Vec<f64> = reported.collect();
                let seed = crate::seeds::derive(
                    self.seed,
                    &[crate::seeds::tag::SERVER_PERMUTATION, round as u64],
                );
                f.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
                Ok(f)
            }
            ServerFitness::Improvement => sorted
                .iter()
                .map(|u| match u.start_fitness {
                    Some(start) => Ok(u.fitness - start),
                    None => Err(Error::Optimizer(format!(
                        "round {round}, client {}: no fitness of the received mean, which \
                         server_fitness = \"improvement\" ranks by",
                        u.client
                    ))),
                })
                .collect(),
        }
    }

    /// The global CMA-ES.
    pub fn strategy(&self) -> &Cmaes {
        &self.es
    }

    /// The reference's round (module doc, steps 1-3), on a copy committed only on success.
    fn aggregate_reference(
        &mut self,
        candidates: &[Vec<f64>],
        fitness: &[f64],
        s6: Option<f64>,
    ) -> Result<()> {
        let sent = self.es.sigma();
        let s6 = s6.unwrap_or(sent);
        let mut es = self.es.clone();
        es.set_sigma(s6)?;
        es.tell_injected(candidates, fitness)?;
        es.set_sigma(es.sigma() / s6 * sent)?;
        self.es = es;
        Ok(())
    }

    /// [`ServerSigma::ClientRms`], on a copy committed only on success.
    fn aggregate_client_rms(
        &mut self,
        candidates: &[Vec<f64>],
        fitness: &[f64],
        rms: Option<f64>,
    ) -> Result<()> {
        let mut es = self.es.clone();
        let before = es.sigma();
        es.tell(candidates, fitness)?;
        es.set_sigma(rms.unwrap_or(before))?;
        self.es = es;
        Ok(())
    }

    /// Moves the step size one ulp up: the difference another build's rounding could make
    /// (fault injection for replicas, [`crate::replay::Replayable::nudge`]).
    pub(crate) fn nudge_sigma(&mut self) -> Result<()> {
        let s = self.es.sigma();
        self.es.set_sigma(s.next_up())
    }
}

/// The client means as candidates, by client index: replies arrive in any order, and the
/// aggregate must not depend on it.
fn means(sorted: &[&ClientUpdate]) -> Vec<Vec<f64>> {
    sorted.iter().map(|u| u.mean.iter().map(|&v| f64::from(v)).collect()).collect()
}

/// Each client's rank and weight when ranked by `ranked_by` (by client index) with `weights`
/// per rank, as the tell ranks them.
fn told(sorted: &[&ClientUpdate], ranked_by: &[f64], weights: &[f64]) -> Vec<Told> {
    let mut out: Vec<Told> = sorted
        .iter()
        .zip(ranked_by)
        .map(|(u, &f)| Told { client: u.client, rank: 0, weight: 0.0, ranked_by: f })
        .collect();
    for (rank, k) in ranking(ranked_by).into_iter().enumerate() {
        out[k].rank = rank + 1;
        out[k].weight = weights.get(rank).copied().unwrap_or(0.0);
    }
    out
}

fn by_client(updates: &[ClientUpdate]) -> Vec<&ClientUpdate> {
    let mut sorted: Vec<&ClientUpdate> = updates.iter().collect();
    sorted.sort_by_key(|u| u.client);
    sorted
}

impl Aggregator for FedBpt {
    fn name(&self) -> &'static str {
        "fedbpt"
    }

    fn configure(&self, round: usize) -> SearchDistribution {
        SearchDistribution {
            round,
            mean: to_f32(self.es.mean()),
            sigma: self.es.sigma(),
            covariance: self.send_covariance.then(|| pack_upper(self.es.covariance())),
        }
    }

    fn aggregate(&mut self, round: usize, updates: &[ClientUpdate]) -> Result<Vec<Told>> {
        validate(self.es.dim(), round, updates)?;
        let sorted = by_client(updates);
        let ranked_by = self.ranked_by(round, &sorted)?;
        let told = told(&sorted, &ranked_by, &self.es.rank_weights(sorted.len()));
        let candidates = means(&sorted);
        match self.rule {
            ServerSigma::Reference => {
                let s6 = eq6_sigma(updates, self.local_parents)?;
                self.aggregate_reference(&candidates, &ranked_by, s6)?
            }
            ServerSigma::ClientRms => {
                let rms = rms_sigma(updates)?;
                self.aggregate_client_rms(&candidates, &ranked_by, rms)?
            }
        }
        Ok(told)
    }

    fn global_mean(&self) -> Vec<f32> {
        to_f32(self.es.mean())
    }

    fn sigma(&self) -> f64 {
        self.es.sigma()
    }

    fn snapshot(&self) -> Result<serde_json::Value> {
        snapshot_of(self.name(), self)
    }

    fn restore(&mut self, v: serde_json::Value) -> Result<()> {
        let restored: Self = restore_of(self.name(), v)?;
        check_restored_dim(self.es.dim(), restored.es.dim())?;
        restored.es.check_consistent()?;
        if restored.rule != self.rule {
            return Err(Error::Optimizer(format!(
                "snapshot uses server_sigma {:?}, this run {:?}",
                restored.rule, self.rule
            )));
        }
        if restored.es.flavour() != self.es.flavour() {
            return Err(Error::Optimizer(format!(
                "snapshot runs the {:?} CMA-ES, this run the {:?} one",
                restored.es.flavour(),
                self.es.flavour()
            )));
        }
        if (restored.fitness, restored.weights) != (self.fitness, self.weights) {
            return Err(Error::Optimizer(format!(
                "snapshot ranks by {:?} with {:?} weights, this run by {:?} with {:?}",
                restored.fitness, restored.weights, self.fitness, self.weights
            )));
        }
        *self = restored;
        Ok(())
    }
}

/// FedAvg-BBT, the paper's baseline: the global mean is the unweighted average of the client
/// means; clients always search with the identity covariance, and the next sigma is the root
/// mean square of the clients' reported sigmas ([`rms_sigma`]).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FedAvgBbt {
    mean: Vec<f64>,
    sigma: f64,
}

impl FedAvgBbt {
    /// Starts from the zero vector in `dim` coordinates with step size `sigma0`.
    pub fn new(dim: usize, sigma0: f64) -> Result<Self> {
        if dim == 0 {
            return Err(Error::Optimizer("dimension must be positive".into()));
        }
        if !(sigma0.is_finite() && sigma0 > 0.0) {
            return Err(Error::Optimizer(format!(
                "sigma0 must be finite and positive, got {sigma0}"
            )));
        }
        Ok(Self { mean: vec![0.0; dim], sigma: sigma0 })
    }

    /// As [`FedBpt::nudge_sigma`].
    pub(crate) fn nudge_sigma(&mut self) -> Result<()> {
        self.sigma = self.sigma.next_up();
        Ok(())
    }
}

impl Aggregator for FedAvgBbt {
    fn name(&self) -> &'static str {
        "fedavg-bbt"
    }

    fn configure(&self, round: usize) -> SearchDistribution {
        SearchDistribution { round, mean: to_f32(&self.mean), sigma: self.sigma, covariance: None }
    }

    fn aggregate(&mut self, round: usize, updates: &[ClientUpdate]) -> Result<Vec<Told>> {
        validate(self.mean.len(), round, updates)?;
        let sigma = rms_sigma(updates)?;
        let k = updates.len() as f64;
        let sorted = by_client(updates);
        let fitness: Vec<f64> = sorted.iter().map(|u| u.fitness).collect();
        let told = told(&sorted, &fitness, &vec![1.0 / k; sorted.len()]);
        let mut mean = vec![0.0; self.mean.len()];
        for u in sorted {
            for (m, &v) in mean.iter_mut().zip(&u.mean) {
                *m += f64::from(v);
            }
        }
        mean.iter_mut().for_each(|m| *m /= k);
        self.mean = mean;
        if let Some(s) = sigma {
            self.sigma = s;
        }
        Ok(told)
    }

    fn global_mean(&self) -> Vec<f32> {
        to_f32(&self.mean)
    }

    fn sigma(&self) -> f64 {
        self.sigma
    }

    fn snapshot(&self) -> Result<serde_json::Value> {
        snapshot_of(self.name(), self)
    }

    fn restore(&mut self, v: serde_json::Value) -> Result<()> {
        let restored: Self = restore_of(self.name(), v)?;
        check_restored_dim(self.mean.len(), restored.mean.len())?;
        *self = restored;
        Ok(())
    }
}

/// Paper Eq. 6 over the replies that arrived: `sqrt(sum_k sum_j sigma_kj^2 / (K * mu_local))`.
/// `None` if no reply reported a sigma.
pub fn eq6_sigma(updates: &[ClientUpdate], local_parents: usize) -> Result<Option<f64>> {
    let sum_sq: f64 = by_client(updates).into_iter().flat_map(|u| &u.sigmas).map(|s| s * s).sum();
    if updates.iter().all(|u| u.sigmas.is_empty()) {
        return Ok(None);
    }
    let sigma = (sum_sq / (updates.len() * local_parents.max(1)) as f64).sqrt();
    checked_sigma(sigma)
}

/// The root mean square of every per-iteration sigma reported by the replies that arrived,
/// `sqrt(sum_k sum_j sigma_kj^2 / sum_k n_k)` with `n_k` the number of sigmas client `k`
/// reported. `None` (keep the current sigma) if no reply reported any.
pub fn rms_sigma(updates: &[ClientUpdate]) -> Result<Option<f64>> {
    let (sum_sq, count) = by_client(updates)
        .into_iter()
        .flat_map(|u| &u.sigmas)
        .fold((0.0, 0usize), |(s, c), v| (s + v * v, c + 1));
    if count == 0 {
        return Ok(None);
    }
    checked_sigma((sum_sq / count as f64).sqrt())
}

fn checked_sigma(sigma: f64) -> Result<Option<f64>> {
    if sigma.is_finite() && sigma > 0.0 {
        Ok(Some(sigma))
    } else {
        Err(Error::Optimizer(format!("aggregated sigma is {sigma}")))
    }
}

/// The clients that take part in `round` (the reference's `frac`, Flower's `fraction_fit`):
/// `per_round` of the `n_clients`, drawn without replacement from a generator seeded by
/// `seed` and the round, in increasing order; all of them when `per_round` is 0 or at least
/// `n_clients`. The draw costs `O(per_round)`, not `O(n_clients)`.
pub fn sample_clients(seed: u64, round: usize, n_clients: usize, per_round: usize) -> Vec<usize> {
    if per_round == 0 || per_round >= n_clients {
        return (0..n_clients).collect();
    }
    let round_seed = crate::seeds::derive(seed, &[crate::seeds::tag::SAMPLING, round as u64]);
    let mut rng = ChaCha8Rng::seed_from_u64(round_seed);
    let mut chosen = sample(&mut rng, n_clients, per_round).into_vec();
    chosen.sort_unstable();
    chosen
}

/// More classes than a task could have: a reply that claims more is refused.
const MAX_CLASSES: usize = 1024;

/// Checks the replies of `round` for a `dim`-dimensional search.
fn validate(dim: usize, round: usize, updates: &[ClientUpdate]) -> Result<()> {
    if updates.is_empty() {
        return Err(Error::Optimizer(format!("round {round}: no client updates to aggregate")));
    }
    let mut seen = HashSet::with_capacity(updates.len());
    for u in updates {
        if !seen.insert(u.client) {
            let who = format!("round {round}, client {}", u.client);
            return Err(Error::Optimizer(format!("{who}: duplicate update")));
        }
        check_update(dim, round, u)?;
    }
    Ok(())
}

/// Whether one reply can enter the aggregation of `round` for a `dim`-dimensional search: of
/// that round, with a finite mean of that dimension, finite fitness and loss, positive sigmas.
/// The runtime checks each reply as it arrives (a bad one is excluded, not fatal).
pub fn check_update(dim: usize, round: usize, u: &ClientUpdate) -> Result<()> {
    let who = format!("round {round}, client {}", u.client);
    if u.round != round {
        return Err(Error::Optimizer(format!("{who}: update is for round {}", u.round)));
    }
    if u.mean.len() != dim {
        return Err(Error::Optimizer(format!(
            "{who}: mean has dimension {}, expected {dim}",
            u.mean.len()
        )));
    }
    if u.mean.iter().any(|v| !v.is_finite()) {
        return Err(Error::Optimizer(format!("{who}: mean has non-finite values")));
    }
    if !u.fitness.is_finite() {
        return Err(Error::Optimizer(format!("{who}: fitness is {}", u.fitness)));
    }
    if !u.loss.is_finite() {
        return Err(Error::Optimizer(format!("{who}: loss is {}", u.loss)));
    }
    if let Some(s) = u.sigmas.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
        return Err(Error::Optimizer(format!("{who}: reported sigma {s}")));
    }
    if let Some(f) = u.start_fitness.filter(|f| !f.is_finite()) {
        return Err(Error::Optimizer(format!("{who}: fitness of the received mean is {f}")));
    }
    if u.class_counts.len() > MAX_CLASSES {
        return Err(Error::Optimizer(format!(
            "{who}: {} class counts (at most {MAX_CLASSES})",
            u.class_counts.len()
        )));
    }
    Ok(())
}

fn to_f32(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

/// Wraps a state with the rule's name so a snapshot cannot be restored into another rule.
fn snapshot_of<T: Serialize>(name: &str, state: &T) -> Result<serde_json::Value> {
    let state = serde_json::to_value(state)
        .map_err(|e| Error::Optimizer(format!("{name}: cannot snapshot: {e}")))?;
    Ok(serde_json::json!({ "aggregator": name, "state": state }))
}

fn restore_of<T: for<'de> Deserialize<'de>>(name: &str, mut v: serde_json::Value) -> Result<T> {
    let found = v.get("aggregator").and_then(|a| a.as_str()).unwrap_or("<none>");
    if found != name {
        return Err(Error::Optimizer(format!(
            "snapshot of aggregator `{found}`, expected `{name}`"
        )));
    }
    let state = v.get_mut("state").map(serde_json::Value::take).unwrap_or_default();
    serde_json::from_value(state)
        .map_err(|e| Error::Optimizer(format!("{name}: bad snapshot: {e}")))
}

fn check_restored_dim(current: usize, restored: usize) -> Result<()> {
    if current == restored {
        Ok(())
    } else {
        Err(Error::Optimizer(format!(
            "snapshot has dimension {restored}, this run has dimension {current}"
        )))
    }
}

#[cfg(test)]
#[path = "strategy_tests.rs"]
mod tests;
