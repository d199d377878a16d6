//! Server-side aggregation rules (like Flower's `Strategy`): what the server sends each client at
//! the start of a round and how it folds the replies. Knows nothing of actors or transport.
//!
//! Two rules: [`FedBpt`] (the paper's method: the client means form one population of a global
//! CMA-ES) and [`FedAvgBbt`] (the paper's baseline: plain averaging of the client means). Both set
//! the next step size from the per-iteration step sizes the clients report.

use std::collections::HashSet;

use nalgebra::DMatrix;
use serde::{Deserialize, Serialize};

use crate::cmaes::{Cmaes, CmaesOptions, Parents};
use crate::{Error, Result};

/// What the server sends a client each round: the search distribution it needs.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SearchDistribution {
    /// Round this distribution starts.
    pub round: usize,
    /// Centre of the distribution (the global prompt vector z).
    pub mean: Vec<f32>,
    /// Step size.
    pub sigma: f64,
    /// Covariance; `None` means the identity.
    pub covariance: Option<PackedCovariance>,
}

/// A symmetric covariance as its upper triangle (row-major, diagonal included) in `f32`:
/// `dim * (dim + 1) / 2` values.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PackedCovariance {
    /// Rows (and columns) of the matrix.
    pub dim: usize,
    /// Upper triangle, row by row.
    pub upper: Vec<f32>,
}

impl PackedCovariance {
    /// Packs the upper triangle of a square matrix; errors if `c` is not square.
    pub fn pack(c: &DMatrix<f64>) -> Result<Self> {
        if !c.is_square() {
            return Err(Error::Optimizer(format!(
                "cannot pack a {}x{} covariance",
                c.nrows(),
                c.ncols()
            )));
        }
        Ok(pack_upper(c))
    }

    /// The full symmetric matrix. Errors if `upper` does not hold `dim * (dim + 1) / 2` values
    /// or holds non-finite ones.
    pub fn unpack(&self) -> Result<DMatrix<f64>> {
        let n = self.dim;
        let expected = n.checked_add(1).and_then(|m| n.checked_mul(m)).map(|v| v / 2);
        if expected != Some(self.upper.len()) {
            return Err(Error::Optimizer(format!(
                "packed covariance of dimension {n} has {} values, expected {n}*({n}+1)/2",
                self.upper.len()
            )));
        }
        if self.upper.iter().any(|v| !v.is_finite()) {
            return Err(Error::Optimizer("packed covariance has non-finite values".into()));
        }
        let mut c = DMatrix::zeros(n, n);
        let mut values = self.upper.iter();
        for i in 0..n {
            for j in i..n {
                // The length was checked above, so the iterator cannot run dry.
                let v = f64::from(values.next().copied().unwrap_or_default());
                c[(i, j)] = v;
                c[(j, i)] = v;
            }
        }
        Ok(c)
    }
}

/// Packs the upper triangle of the leading square block of `c` (callers ensure `c` is square).
fn pack_upper(c: &DMatrix<f64>) -> PackedCovariance {
    let n = c.nrows().min(c.ncols());
    let mut upper = Vec::with_capacity(n * (n + 1) / 2);
    for i in 0..n {
        upper.extend((i..n).map(|j| c[(i, j)] as f32));
    }
    PackedCovariance { dim: n, upper }
}

/// What a client returns: `d` floats, a fitness and its per-iteration step sizes (the 4 KB
/// upload).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ClientUpdate {
    /// Client index.
    pub client: usize,
    /// Round this update answers.
    pub round: usize,
    /// The client's final local mean.
    pub mean: Vec<f32>,
    /// Fitness of that mean on the client's data (lower is better).
    pub fitness: f64,
    /// Step size of each local CMA-ES iteration.
    pub sigmas: Vec<f64>,
    /// Training examples the client holds.
    pub n_examples: usize,
}

/// A server-side aggregation rule.
pub trait Aggregator: Send {
    /// Short name for logs and checkpoints.
    fn name(&self) -> &'static str;
    /// The distribution clients start from in `round`.
    fn configure(&self, round: usize) -> SearchDistribution;
    /// Fold the replies that arrived (any number >= 1; fewer than configured is normal under
    /// faults). On error the state is left unchanged.
    fn aggregate(&mut self, round: usize, updates: &[ClientUpdate]) -> Result<()>;
    /// Current global mean.
    fn global_mean(&self) -> Vec<f32>;
    /// Current global step size.
    fn sigma(&self) -> f64;
    /// Whole state for checkpoints.
    fn snapshot(&self) -> Result<serde_json::Value>;
    /// Restores a state produced by [`Aggregator::snapshot`] of the same rule and dimension.
    fn restore(&mut self, v: serde_json::Value) -> Result<()>;
}

/// FedBPT's server: a global CMA-ES over z whose population each round is the client means.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FedBpt {
    es: Cmaes,
    send_covariance: bool,
}

impl FedBpt {
    /// A global CMA-ES over `dim` coordinates centred on zero with step size `sigma0`.
    /// `send_covariance` ships its covariance to clients (`d(d+1)/2` floats per client per
    /// round); without it clients search with the identity, as in the paper's 4 KB budget.
    pub fn new(dim: usize, sigma0: f64, seed: u64, send_covariance: bool) -> Result<Self> {
        let opts = CmaesOptions { popsize: None, seed, bounds: None };
        let mut es = Cmaes::new(vec![0.0; dim], sigma0, opts)?;
        // Every client that replies gets a positive, rank-decreasing weight, as in the
        // reference server (pycma with CMA_mu = number of clients).
        es.set_parents(Parents::All);
        Ok(Self { es, send_covariance })
    }

    /// The global CMA-ES.
    pub fn strategy(&self) -> &Cmaes {
        &self.es
    }
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

    /// Ranks the client means by fitness and tells them to the global CMA-ES as one population
    /// of exactly the replies that arrived, then sets sigma by [`rms_sigma`] (keeping the
    /// sigma the clients searched with if none reported any).
    fn aggregate(&mut self, round: usize, updates: &[ClientUpdate]) -> Result<()> {
        validate(self.es.dim(), round, updates)?;
        // Computed before `tell` so that nothing is mutated if it fails.
        let sigma = rms_sigma(updates)?;
        let candidates: Vec<Vec<f64>> =
            updates.iter().map(|u| u.mean.iter().map(|&v| f64::from(v)).collect()).collect();
        let fitness: Vec<f64> = updates.iter().map(|u| u.fitness).collect();
        let before = self.es.sigma();
        self.es.tell(&candidates, &fitness)?;
        // The global step-size adaptation of `tell` is discarded either way: sigma comes from
        // the clients, or stays what they searched with.
        self.es.set_sigma(sigma.unwrap_or(before))
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
        *self = restored;
        Ok(())
    }
}

/// FedAvg-BBT, the paper's baseline: the global mean is the unweighted average of the client
/// means; clients always search with the identity covariance.
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
}

impl Aggregator for FedAvgBbt {
    fn name(&self) -> &'static str {
        "fedavg-bbt"
    }

    fn configure(&self, round: usize) -> SearchDistribution {
        SearchDistribution { round, mean: to_f32(&self.mean), sigma: self.sigma, covariance: None }
    }

    /// Plain (unweighted) average of the client means, then sigma by [`rms_sigma`].
    fn aggregate(&mut self, round: usize, updates: &[ClientUpdate]) -> Result<()> {
        validate(self.mean.len(), round, updates)?;
        let sigma = rms_sigma(updates)?;
        let k = updates.len() as f64;
        let mut mean = vec![0.0; self.mean.len()];
        for u in updates {
            for (m, &v) in mean.iter_mut().zip(&u.mean) {
                *m += f64::from(v);
            }
        }
        mean.iter_mut().for_each(|m| *m /= k);
        self.mean = mean;
        if let Some(s) = sigma {
            self.sigma = s;
        }
        Ok(())
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

/// A client's local CMA-ES started from the server's distribution with fresh evolution paths.
///
/// `seed` should differ between clients and rounds (the reference reseeded every client
/// identically, so all clients drew the same samples).
pub fn client_search(dist: &SearchDistribution, popsize: usize, seed: u64) -> Result<Cmaes> {
    let mean: Vec<f64> = dist.mean.iter().map(|&v| f64::from(v)).collect();
    let opts = CmaesOptions { popsize: Some(popsize), seed, bounds: None };
    let mut es = Cmaes::new(mean, dist.sigma, opts)?;
    if let Some(packed) = &dist.covariance {
        if packed.dim != es.dim() {
            return Err(Error::Optimizer(format!(
                "covariance of dimension {} for a mean of dimension {}",
                packed.dim,
                es.dim()
            )));
        }
        es.set_covariance(packed.unpack()?)?;
    }
    Ok(es)
}

/// The next global step size: the root mean square of every per-iteration sigma reported by the
/// replies that arrived, `sqrt(sum_k sum_j sigma_kj^2 / sum_k n_k)` with `n_k` the number of
/// sigmas client `k` reported. `None` (keep the current sigma) if no reply reported any.
///
/// This deliberately deviates from the reference, which divided by the configured number of
/// clients times the local `mu` (paper Eq. 6: by lambda): with dropouts that denominator
/// shrinks sigma for every missing reply, and it is not a mean of the reported sigmas at all.
pub fn rms_sigma(updates: &[ClientUpdate]) -> Result<Option<f64>> {
    let (sum_sq, count) =
        updates.iter().flat_map(|u| &u.sigmas).fold((0.0, 0usize), |(s, c), v| (s + v * v, c + 1));
    if count == 0 {
        return Ok(None);
    }
    let sigma = (sum_sq / count as f64).sqrt();
    if sigma.is_finite() && sigma > 0.0 {
        Ok(Some(sigma))
    } else {
        Err(Error::Optimizer(format!("aggregated sigma is {sigma}")))
    }
}

/// Checks the replies of `round` for a `dim`-dimensional search.
fn validate(dim: usize, round: usize, updates: &[ClientUpdate]) -> Result<()> {
    if updates.is_empty() {
        return Err(Error::Optimizer(format!("round {round}: no client updates to aggregate")));
    }
    let mut seen = HashSet::with_capacity(updates.len());
    for u in updates {
        let who = format!("round {round}, client {}", u.client);
        if u.round != round {
            return Err(Error::Optimizer(format!("{who}: update is for round {}", u.round)));
        }
        if !seen.insert(u.client) {
            return Err(Error::Optimizer(format!("{who}: duplicate update")));
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
        if let Some(s) = u.sigmas.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
            return Err(Error::Optimizer(format!("{who}: reported sigma {s}")));
        }
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
mod tests {
    use super::*;

    fn update(client: usize, round: usize, mean: Vec<f32>, fitness: f64) -> ClientUpdate {
        ClientUpdate { client, round, mean, fitness, sigmas: vec![0.5; 4], n_examples: 40 }
    }

    #[test]
    fn fedavg_averages_exactly() {
        let mut agg = FedAvgBbt::new(3, 1.0).unwrap();
        let ups = [
            update(0, 0, vec![1.0, 2.0, 3.0], 0.3),
            update(1, 0, vec![3.0, -2.0, 0.0], 0.1),
            update(2, 0, vec![2.0, 3.0, 0.0], 0.9),
        ];
        agg.aggregate(0, &ups).unwrap();
        assert_eq!(agg.global_mean(), vec![2.0, 1.0, 1.0]);
        let dist = agg.configure(1);
        assert_eq!(dist.round, 1);
        assert_eq!(dist.mean, vec![2.0, 1.0, 1.0]);
        assert_eq!(dist.covariance, None);
        assert!((agg.sigma() - 0.5).abs() < 1e-15);
    }

    #[test]
    fn fedbpt_moves_toward_better_clients() {
        let mut agg = FedBpt::new(4, 1.0, 0, true).unwrap();
        let mut better = vec![0.0; 4];
        better[0] = 1.0;
        let mut worse = vec![0.0; 4];
        worse[0] = -1.0;
        agg.aggregate(0, &[update(7, 0, worse, 2.0), update(3, 0, better, 1.0)]).unwrap();
        let m = agg.global_mean();
        assert!(m[0] > 0.0, "mean {m:?}");
        assert!(m[1..].iter().all(|v| *v == 0.0));
        let dist = agg.configure(1);
        let cov = dist.covariance.expect("send_covariance").unpack().unwrap();
        assert_eq!(cov.shape(), (4, 4));
        // The client step was along axis 0: that is where the covariance grew.
        assert!(cov[(0, 0)] > cov[(1, 1)]);
    }

    #[test]
    fn sigma_is_rms_of_reported_sigmas() {
        let mut ups = vec![update(0, 5, vec![0.0; 2], 1.0), update(1, 5, vec![0.0; 2], 2.0)];
        ups[0].sigmas = vec![1.0, 2.0, 3.0];
        ups[1].sigmas = vec![4.0];
        let mut silent = update(2, 5, vec![1.0; 2], 0.5);
        silent.sigmas.clear();
        ups.push(silent);
        let expected = ((1.0 + 4.0 + 9.0 + 16.0) / 4.0f64).sqrt();
        let mut bpt = FedBpt::new(2, 1.0, 0, false).unwrap();
        bpt.aggregate(5, &ups).unwrap();
        assert!((bpt.sigma() - expected).abs() < 1e-12);
        let mut avg = FedAvgBbt::new(2, 1.0).unwrap();
        avg.aggregate(5, &ups).unwrap();
        assert!((avg.sigma() - expected).abs() < 1e-12);

        // Nobody reported a sigma: keep it.
        let mut quiet = update(0, 6, vec![0.0; 2], 1.0);
        quiet.sigmas.clear();
        bpt.aggregate(6, &[quiet]).unwrap();
        assert!((bpt.sigma() - expected).abs() < 1e-12);
    }

    #[test]
    fn fewer_replies_than_clients() {
        let mut bpt = FedBpt::new(3, 1.0, 1, true).unwrap();
        let mut avg = FedAvgBbt::new(3, 1.0).unwrap();
        for round in 0..5 {
            // Ten clients configured, between one and three reply.
            let ups: Vec<ClientUpdate> = (0..1 + round % 3)
                .map(|k| update(k, round, vec![0.1 * k as f32; 3], k as f64))
                .collect();
            bpt.aggregate(round, &ups).unwrap();
            avg.aggregate(round, &ups).unwrap();
        }
        assert_eq!(bpt.strategy().generation(), 5);
        assert!(bpt.global_mean().iter().all(|v| v.is_finite()));
    }

    #[test]
    fn rejects_bad_updates() {
        let mut bpt = FedBpt::new(3, 1.0, 1, false).unwrap();
        let mut avg = FedAvgBbt::new(3, 1.0).unwrap();
        let good = update(0, 2, vec![0.0; 3], 1.0);
        let mut bad_dim = good.clone();
        bad_dim.mean.pop();
        let mut nan_mean = good.clone();
        nan_mean.mean[1] = f32::NAN;
        let mut nan_fit = good.clone();
        nan_fit.fitness = f64::NAN;
        let mut bad_sigma = good.clone();
        bad_sigma.sigmas[2] = f64::INFINITY;
        let mut stale = good.clone();
        stale.round = 1;
        let cases: Vec<Vec<ClientUpdate>> = vec![
            vec![],
            vec![bad_dim],
            vec![nan_mean],
            vec![nan_fit],
            vec![bad_sigma],
            vec![stale],
            vec![good.clone(), good.clone()],
        ];
        for ups in &cases {
            assert!(bpt.aggregate(2, ups).is_err(), "{ups:?}");
            assert!(avg.aggregate(2, ups).is_err(), "{ups:?}");
        }
        // Nothing was folded.
        assert_eq!(bpt.strategy().generation(), 0);
        assert_eq!(avg.global_mean(), vec![0.0; 3]);
        assert!(FedBpt::new(0, 1.0, 0, false).is_err());
        assert!(FedAvgBbt::new(3, 0.0).is_err());
    }

    #[test]
    fn packed_covariance_round_trip() {
        let c =
            DMatrix::from_row_slice(3, 3, &[2.0, 0.5, -0.25, 0.5, 1.0, 0.125, -0.25, 0.125, 3.0]);
        let p = PackedCovariance::pack(&c).unwrap();
        assert_eq!(p.dim, 3);
        assert_eq!(p.upper, vec![2.0, 0.5, -0.25, 1.0, 0.125, 3.0]);
        assert_eq!(p.unpack().unwrap(), c);
        assert!(PackedCovariance::pack(&DMatrix::zeros(2, 3)).is_err());
        let short = PackedCovariance { dim: 3, upper: vec![1.0; 5] };
        assert!(short.unpack().is_err());
        let huge = PackedCovariance { dim: usize::MAX, upper: vec![] };
        assert!(huge.unpack().is_err());
    }

    #[test]
    fn snapshot_restore_gives_identical_configure() {
        let mut a = FedBpt::new(5, 0.8, 3, true).unwrap();
        for round in 0..3 {
            let ups: Vec<ClientUpdate> = (0..4)
                .map(|k| update(k, round, vec![0.3 * k as f32 - 0.4; 5], (k as f64 - 1.5).abs()))
                .collect();
            a.aggregate(round, &ups).unwrap();
        }
        let snap = a.snapshot().unwrap();
        let mut b = FedBpt::new(5, 1.0, 99, true).unwrap();
        b.restore(snap.clone()).unwrap();
        assert_eq!(a.configure(3), b.configure(3));
        // And they keep agreeing.
        let ups: Vec<ClientUpdate> =
            (0..3).map(|k| update(k, 3, vec![k as f32; 5], k as f64)).collect();
        a.aggregate(3, &ups).unwrap();
        b.aggregate(3, &ups).unwrap();
        assert_eq!(a.configure(4), b.configure(4));

        let mut avg = FedAvgBbt::new(5, 1.0).unwrap();
        avg.aggregate(0, &[update(0, 0, vec![1.0; 5], 0.0)]).unwrap();
        let mut avg2 = FedAvgBbt::new(5, 1.0).unwrap();
        avg2.restore(avg.snapshot().unwrap()).unwrap();
        assert_eq!(avg.configure(1), avg2.configure(1));

        // Wrong rule or dimension.
        assert!(avg2.restore(snap.clone()).is_err());
        assert!(FedBpt::new(6, 1.0, 0, true).unwrap().restore(snap).is_err());
    }

    /// Four clients, each minimizing a sphere centred on its own optimum (each 0.71 away from
    /// their average, the federated optimum, which lies 6.3 away from the start). Each round
    /// every client runs 4 local iterations of popsize 6 from the server's distribution; returns
    /// the global mean's distance to the average optimum before and after 30 rounds.
    fn federated_sphere(agg: &mut dyn Aggregator) -> (f64, f64) {
        let dim = 10;
        let optima: Vec<Vec<f64>> = (0..4)
            .map(|k| (0..dim).map(|i| 2.0 + 0.2 * (((k + i) % 4) as f64 - 1.5)).collect())
            .collect();
        let target: Vec<f64> =
            (0..dim).map(|i| optima.iter().map(|o| o[i]).sum::<f64>() / 4.0).collect();
        let dist_to_target = |m: &[f32]| -> f64 {
            m.iter().zip(&target).map(|(a, b)| (f64::from(*a) - b).powi(2)).sum::<f64>().sqrt()
        };
        let start = dist_to_target(&agg.global_mean());
        for round in 0..30 {
            let dist = agg.configure(round);
            let mut ups = Vec::new();
            for (k, o) in optima.iter().enumerate() {
                let f = |x: &[f64]| x.iter().zip(o).map(|(a, b)| (a - b).powi(2)).sum::<f64>();
                let seed = (round * 4 + k) as u64;
                let mut es = client_search(&dist, 6, seed).unwrap();
                let mut sigmas = Vec::new();
                for _ in 0..4 {
                    let xs = es.ask();
                    let fs: Vec<f64> = xs.iter().map(|x| f(x)).collect();
                    es.tell(&xs, &fs).unwrap();
                    sigmas.push(es.sigma());
                }
                ups.push(ClientUpdate {
                    client: k,
                    round,
                    mean: to_f32(es.mean()),
                    fitness: f(es.mean()),
                    sigmas,
                    n_examples: 40,
                });
            }
            agg.aggregate(round, &ups).unwrap();
        }
        (start, dist_to_target(&agg.global_mean()))
    }

    #[test]
    fn federated_sphere_converges() {
        // FedBPT ranks client means by their own (heterogeneous) losses, so it settles within
        // the clients' spread, nearer the clients it favours; FedAvg-BBT lands closer.
        let mut bpt = FedBpt::new(10, 1.0, 0, true).unwrap();
        let (start, end) = federated_sphere(&mut bpt);
        assert!(end < 0.1 * start, "fedbpt: {start} -> {end}");
        let mut avg = FedAvgBbt::new(10, 1.0).unwrap();
        let (start, end) = federated_sphere(&mut avg);
        assert!(end < 0.05 * start, "fedavg-bbt: {start} -> {end}");
        assert!(avg.sigma() < 0.1, "sigma should shrink near the optimum: {}", avg.sigma());
    }

    #[test]
    fn client_update_fits_the_upload_budget() {
        let local_iter = 8;
        let u = ClientUpdate {
            client: 9,
            round: 199,
            mean: vec![0.123; 500],
            fitness: 0.5432,
            sigmas: vec![0.9; local_iter],
            n_examples: 40,
        };
        let bytes = bincode::serde::encode_to_vec(&u, bincode::config::standard()).unwrap();
        assert!(bytes.len() <= 500 * 4 + 8 * local_iter + 64, "{} bytes", bytes.len());
    }

    #[test]
    fn client_search_starts_from_the_distribution() {
        let mut bpt = FedBpt::new(3, 0.7, 0, true).unwrap();
        bpt.aggregate(0, &[update(0, 0, vec![1.0, 0.0, 0.0], 0.0)]).unwrap();
        let dist = bpt.configure(1);
        let es = client_search(&dist, 5, 1).unwrap();
        assert_eq!(es.popsize(), 5);
        assert_eq!(es.sigma(), dist.sigma);
        assert_eq!(to_f32(es.mean()), dist.mean);
        let cov = dist.covariance.clone().unwrap().unpack().unwrap();
        assert_eq!(es.covariance(), &cov);
        let mut bad = dist.clone();
        bad.covariance = Some(PackedCovariance { dim: 2, upper: vec![1.0, 0.0, 1.0] });
        assert!(client_search(&bad, 5, 1).is_err());
        assert!(client_search(&dist, 1, 1).is_err());
    }
}
