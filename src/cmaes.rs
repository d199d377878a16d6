//! CMA-ES (covariance matrix adaptation evolution strategy) on nalgebra, for minimization.
//!
//! An own implementation of the algorithm as described in N. Hansen, "The CMA Evolution Strategy:
//! A Tutorial" (arXiv:1604.00772), with the tutorial's default parameters: full covariance,
//! rank-one and rank-mu updates, cumulative step-size adaptation (the change of log sigma capped
//! at 1 per generation) with the `h_sigma` stall, and a lazy eigendecomposition. The whole state,
//! random generator included, is serializable, so a run can be checkpointed and resumed bit for
//! bit.
//!
//! pycma (the reference's optimizer) starts from the same formulas but differs in three defaults:
//! it gives the worse half of the population negative weights (active CMA), multiplies `c1` by
//! `min(1, popsize / 6)`, and adds 1/4 to `mueff - 2 + 1/mueff` in `c_mu`. Its default popsize,
//! positive weights, `cc`, `cs`, `damps` and the weights of `CMA_mu = popsize` equal ours.
//!
//! Unlike most implementations, [`Cmaes::tell`] accepts any number of candidates: the FedBPT
//! server tells its global strategy with however many client replies arrived, so the recombination
//! weights and learning rates are recomputed for that count when it differs from the popsize.
//! [`Cmaes::tell_injected`] is the same update for points that were not sampled by
//! [`Cmaes::ask`] (the clients' means): like pycma, it first clips each step to the Mahalanobis
//! length a sample could plausibly have, so one far point cannot blow up the covariance.

use nalgebra::{DMatrix, DVector, SymmetricEigen};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Largest condition number the covariance may reach; beyond it the smallest eigenvalues are
/// lifted (pycma does the same) so the eigendecomposition stays meaningful.
const MAX_CONDITION: f64 = 1e14;

/// A covariance whose smallest eigenvalue is below `-INDEFINITE_TOL * largest` is rejected by
/// [`Cmaes::set_covariance`]; smaller negative values are rounding (a covariance that travelled
/// as `f32`) and are lifted like an ill-conditioned one.
const INDEFINITE_TOL: f64 = 1e-5;

/// Relative tolerance for the symmetry check in [`Cmaes::set_covariance`].
const SYMMETRY_TOL: f64 = 1e-6;

/// How to build a [`Cmaes`].
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CmaesOptions {
    /// Candidates per generation; `None` means the default `4 + floor(3 ln d)`.
    pub popsize: Option<usize>,
    /// Seed of the strategy's own random generator.
    pub seed: u64,
    /// Optional box `[lower, upper]` applied to every coordinate: sampled candidates are clipped
    /// into it (and the clipped points are what the update sees, as they are what gets told).
    pub bounds: Option<(f64, f64)>,
}

/// Which of the ranked candidates get a (positive) recombination weight.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Parents {
    /// The best `floor(n / 2)` of the `n` told candidates (the textbook default).
    #[default]
    BestHalf,
    /// All told candidates, with positive, rank-decreasing weights (pycma's `CMA_mu = popsize`,
    /// which the FedBPT reference server uses for its population of client means).
    All,
    /// All told candidates with the same weight: the mean moves to their (clipped) average and
    /// the ranking changes nothing but the record of who came first.
    Equal,
}

/// Strategy parameters that depend on the dimension and the number of told candidates.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Params {
    /// Number of candidates these parameters were computed for.
    lambda: usize,
    /// Normalized positive recombination weights of the best `weights.len()` candidates.
    weights: Vec<f64>,
    /// Variance-effective selection mass `1 / sum(w^2)`.
    mueff: f64,
    cc: f64,
    cs: f64,
    c1: f64,
    cmu: f64,
    damps: f64,
}

impl Params {
    fn new(n: usize, lambda: usize, parents: Parents) -> Self {
        let nf = n as f64;
        let mu = match parents {
            Parents::BestHalf => (lambda / 2).max(1),
            Parents::All | Parents::Equal => lambda.max(1),
        };
        // ln((lambda+1)/2) - ln(i) is the textbook choice for mu = lambda/2; with more parents it
        // would turn negative, so the offset grows to ln(mu + 1/2) to keep every weight positive.
        let offset = (mu as f64 + 0.5).max((lambda as f64 + 1.0) / 2.0).ln();
        let raw: Vec<f64> = match parents {
            Parents::Equal => vec![1.0; mu],
            _ => (1..=mu).map(|i| offset - (i as f64).ln()).collect(),
        };
        let total: f64 = raw.iter().sum();
        let weights: Vec<f64> = raw.iter().map(|w| w / total).collect();
        let mueff = 1.0 / weights.iter().map(|w| w * w).sum::<f64>();

        let cc = (4.0 + mueff / nf) / (nf + 4.0 + 2.0 * mueff / nf);
        let cs = (mueff + 2.0) / (nf + mueff + 5.0);
        let c1 = 2.0 / ((nf + 1.3).powi(2) + mueff);
        let cmu = (1.0 - c1).min(2.0 * (mueff - 2.0 + 1.0 / mueff) / ((nf + 2.0).powi(2) + mueff));
        let damps = 1.0 + 2.0 * (((mueff - 1.0) / (nf + 1.0)).sqrt() - 1.0).max(0.0) + cs;
        Self { lambda, weights, mueff, cc, cs, c1, cmu, damps }
    }

    /// Generations between two eigendecompositions: pycma's lazy gap of
    /// `0.5 * lambda / ((c1 + cmu) * d)` evaluations, i.e. `0.5 / ((c1 + cmu) * d)` generations.
    /// The covariance moves by about `c1 + cmu` per generation, so a basis that lags by this
    /// much costs little progress while saving most of the `O(d^3)` work in high dimension.
    fn eigen_gap(&self, n: usize) -> f64 {
        0.5 / ((self.c1 + self.cmu) * n as f64)
    }
}

/// A CMA-ES instance: the search distribution `N(mean, sigma^2 C)`, its evolution paths and
/// its random generator. Minimizes.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Cmaes {
    dim: usize,
    bounds: Option<(f64, f64)>,
    parents: Parents,
    /// Parameters for the configured popsize.
    params: Params,
    /// Expected norm of an `N(0, I)` vector.
    chi_n: f64,
    mean: DVector<f64>,
    sigma: f64,
    cov: DMatrix<f64>,
    /// Eigenbasis of `cov` as of the last decomposition (columns).
    basis: DMatrix<f64>,
    /// Square roots of the eigenvalues of `cov` as of the last decomposition.
    scales: DVector<f64>,
    /// Generations told since the last decomposition.
    since_eigen: usize,
    /// Evolution path for the covariance (rank-one update).
    pc: DVector<f64>,
    /// Conjugate evolution path for the step size.
    ps: DVector<f64>,
    /// Generations told since the paths were last reset (for the `h_sigma` bias correction).
    path_generations: usize,
    generation: usize,
    evaluations: usize,
    best: Option<(Vec<f64>, f64)>,
    rng: ChaCha8Rng,
}

impl Cmaes {
    /// A strategy centred on `mean` with step size `sigma` and identity covariance.
    ///
    /// Errors on an empty or non-finite mean, a `sigma` that is not finite and positive, a
    /// popsize below 2, invalid bounds, or a mean outside the bounds.
    pub fn new(mean: Vec<f64>, sigma: f64, opts: CmaesOptions) -> Result<Self> {
        let dim = mean.len();
        if dim == 0 {
            return Err(Error::Optimizer("mean must not be empty".into()));
        }
        check_sigma(sigma)?;
        check_finite("mean", &mean)?;
        let lambda = opts.popsize.unwrap_or_else(|| default_popsize(dim));
        if lambda < 2 {
            return Err(Error::Optimizer(format!("popsize must be at least 2, got {lambda}")));
        }
        if let Some((lo, hi)) = opts.bounds {
            if !(lo.is_finite() && hi.is_finite() && lo < hi) {
                return Err(Error::Optimizer(format!("invalid bounds [{lo}, {hi}]")));
            }
            check_in_bounds(&mean, lo, hi)?;
        }
        let nf = dim as f64;
        Ok(Self {
            dim,
            bounds: opts.bounds,
            parents: Parents::default(),
            params: Params::new(dim, lambda, Parents::default()),
            chi_n: nf.sqrt() * (1.0 - 1.0 / (4.0 * nf) + 1.0 / (21.0 * nf * nf)),
            mean: DVector::from_vec(mean),
            sigma,
            cov: DMatrix::identity(dim, dim),
            basis: DMatrix::identity(dim, dim),
            scales: DVector::from_element(dim, 1.0),
            since_eigen: 0,
            pc: DVector::zeros(dim),
            ps: DVector::zeros(dim),
            path_generations: 0,
            generation: 0,
            evaluations: 0,
            best: None,
            rng: ChaCha8Rng::seed_from_u64(opts.seed),
        })
    }

    /// Dimension of the search space.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Candidates returned by [`Cmaes::ask`].
    pub fn popsize(&self) -> usize {
        self.params.lambda
    }

    /// Number of successful [`Cmaes::tell`] calls.
    pub fn generation(&self) -> usize {
        self.generation
    }

    /// Number of candidates told so far.
    pub fn evaluations(&self) -> usize {
        self.evaluations
    }

    /// Which ranked candidates get recombination weight.
    pub fn parents(&self) -> Parents {
        self.parents
    }

    /// Chooses which ranked candidates get recombination weight (default [`Parents::BestHalf`]).
    pub fn set_parents(&mut self, parents: Parents) {
        self.parents = parents;
        self.params = Params::new(self.dim, self.params.lambda, parents);
    }

    /// Samples `popsize` candidates `mean + sigma * B D z`, `z ~ N(0, I)`, clipped into the
    /// bounds if there are any.
    pub fn ask(&mut self) -> Vec<Vec<f64>> {
        let (n, lambda) = (self.dim, self.params.lambda);
        let rng = &mut self.rng;
        let mut z = DMatrix::<f64>::from_fn(n, lambda, |_, _| rng.sample(StandardNormal));
        for (mut row, s) in z.row_iter_mut().zip(self.scales.iter()) {
            row *= *s;
        }
        let y = &self.basis * z;
        y.column_iter()
            .map(|yk| {
                let mut x: Vec<f64> =
                    yk.iter().zip(self.mean.iter()).map(|(y, m)| m + self.sigma * y).collect();
                if let Some((lo, hi)) = self.bounds {
                    x.iter_mut().for_each(|v| *v = v.clamp(lo, hi));
                }
                x
            })
            .collect()
    }

    /// Updates the distribution from evaluated candidates (lower fitness is better).
    ///
    /// Any number of candidates `>= 1` is accepted, not only the ones [`Cmaes::ask`] returned:
    /// the update sees `(x - mean) / sigma` of whatever is told. When the count differs from the
    /// popsize, weights, `mueff` and learning rates are recomputed for that count. On error the
    /// state is left unchanged.
    pub fn tell(&mut self, candidates: &[Vec<f64>], fitness: &[f64]) -> Result<()> {
        self.update(candidates, fitness, false)
    }

    /// [`Cmaes::tell`] for injected points, which were not drawn from `N(mean, sigma^2 C)`:
    /// each step `(x - mean) / sigma` longer than [`Cmaes::injection_limit`] in the metric of
    /// `C^-1` (the Mahalanobis length, as of the eigensystem the samples use) is shortened to it
    /// before the mean, path and covariance updates, as pycma does for unknown solutions
    /// (`repair_genotype`). Steps within the limit are used as they are, so told samples give
    /// exactly what [`Cmaes::tell`] gives.
    pub fn tell_injected(&mut self, candidates: &[Vec<f64>], fitness: &[f64]) -> Result<()> {
        self.update(candidates, fitness, true)
    }

    /// Longest Mahalanobis step an injected point keeps: `sqrt(d) + 2 d / (d + 2)`, pycma's
    /// bound (a sample's length is about `sqrt(d)`).
    pub fn injection_limit(&self) -> f64 {
        let d = self.dim as f64;
        d.sqrt() + 2.0 * d / (d + 2.0)
    }

    /// The recombination weight of each rank (best first) when `count` candidates are told:
    /// positive for the parents, zero for the rest.
    pub fn rank_weights(&self, count: usize) -> Vec<f64> {
        let p = if count == self.params.lambda {
            self.params.clone()
        } else {
            Params::new(self.dim, count, self.parents)
        };
        let mut w = p.weights;
        w.resize(count, 0.0);
        w
    }

    /// Mahalanobis length of the step from the mean to `x` in units of sigma:
    /// `|| D^-1 B^T (x - mean) || / sigma` with the current eigensystem.
    pub fn mahalanobis_step(&self, x: &[f64]) -> f64 {
        let dx = DVector::from_iterator(
            self.dim,
            x.iter().zip(self.mean.iter()).map(|(a, m)| (a - m) / self.sigma),
        );
        let mut t = self.basis.tr_mul(&dx);
        t.component_div_assign(&self.scales);
        t.norm()
    }

    fn update(&mut self, candidates: &[Vec<f64>], fitness: &[f64], injected: bool) -> Result<()> {
        let n = self.dim;
        let count = candidates.len();
        if count == 0 {
            return Err(Error::Optimizer("tell needs at least one candidate".into()));
        }
        if fitness.len() != count {
            return Err(Error::Optimizer(format!(
                "{count} candidates but {} fitness values",
                fitness.len()
            )));
        }
        for (k, x) in candidates.iter().enumerate() {
            if x.len() != n {
                return Err(Error::Optimizer(format!(
                    "candidate {k} has dimension {}, expected {n}",
                    x.len()
                )));
            }
            check_finite("candidate", x)?;
        }
        if let Some(k) = fitness.iter().position(|f| !f.is_finite()) {
            return Err(Error::Optimizer(format!("fitness {k} is {}", fitness[k])));
        }

        let recomputed;
        let p = if count == self.params.lambda {
            &self.params
        } else {
            recomputed = Params::new(n, count, self.parents);
            &recomputed
        };

        let order = ranking(fitness);
        let mu = p.weights.len();

        // Steps of the selected candidates in units of sigma, best first; an injected step is
        // shortened to the limit when longer (the factor is exactly 1 otherwise).
        let shrink: Vec<f64> = order[..mu]
            .iter()
            .map(|&k| {
                let limit = self.injection_limit();
                let len = if injected { self.mahalanobis_step(&candidates[k]) } else { 0.0 };
                if len > limit {
                    limit / len
                } else {
                    1.0
                }
            })
            .collect();
        let ys = DMatrix::from_fn(n, mu, |i, j| {
            let step = (candidates[order[j]][i] - self.mean[i]) / self.sigma;
            if shrink[j] == 1.0 {
                step
            } else {
                step * shrink[j]
            }
        });
        let yw = &ys * DVector::from_column_slice(&p.weights);
        let mean = &self.mean + &yw * self.sigma;

        // C^{-1/2} y_w with the current (possibly lagging) eigensystem, the one the samples used.
        let mut t = self.basis.tr_mul(&yw);
        t.component_div_assign(&self.scales);
        let c_inv_sqrt_yw = &self.basis * t;

        let ps = &self.ps * (1.0 - p.cs) + c_inv_sqrt_yw * (p.cs * (2.0 - p.cs) * p.mueff).sqrt();
        let path_generations = self.path_generations + 1;
        let ps_norm = ps.norm();
        // Stall the rank-one path while the step-size path is long (sigma is increasing fast),
        // correcting for the path's initial shortness after a reset.
        let bias = (1.0 - (1.0 - p.cs).powf(2.0 * path_generations as f64)).sqrt();
        let hsig = ps_norm / bias / self.chi_n < 1.4 + 2.0 / (n as f64 + 1.0);
        let mut pc = &self.pc * (1.0 - p.cc);
        if hsig {
            pc += &yw * (p.cc * (2.0 - p.cc) * p.mueff).sqrt();
        }

        // Rank-one and rank-mu update; the weights sum to one. When h_sigma stalls, the variance
        // the rank-one path lost is added back (the tutorial's delta(h_sigma) term).
        let lost = if hsig { 0.0 } else { p.c1 * p.cc * (2.0 - p.cc) };
        let mut cov = &self.cov * (1.0 - p.c1 - p.cmu + lost);
        cov.ger(p.c1, &pc, &pc, 1.0);
        let mut ys_weighted = ys.clone();
        for (mut col, w) in ys_weighted.column_iter_mut().zip(&p.weights) {
            col *= *w;
        }
        cov.gemm(p.cmu, &ys_weighted, &ys.transpose(), 1.0);
        symmetrize(&mut cov);

        let sigma = self.sigma * ((p.cs / p.damps) * (ps_norm / self.chi_n - 1.0)).min(1.0).exp();

        if !(sigma.is_finite() && sigma > 0.0) {
            return Err(Error::Optimizer(format!("step size became {sigma}")));
        }
        if mean.iter().chain(cov.iter()).chain(ps.iter()).chain(pc.iter()).any(|v| !v.is_finite()) {
            return Err(Error::Optimizer("update produced non-finite state".into()));
        }

        let since_eigen = self.since_eigen + 1;
        let eigen = if since_eigen as f64 >= p.eigen_gap(n) {
            Some(decompose(&mut cov, f64::NEG_INFINITY)?)
        } else {
            None
        };

        // Commit.
        let best_k = order[0];
        if self.best.as_ref().is_none_or(|(_, f)| fitness[best_k] < *f) {
            self.best = Some((candidates[best_k].clone(), fitness[best_k]));
        }
        self.mean = mean;
        self.sigma = sigma;
        self.cov = cov;
        self.ps = ps;
        self.pc = pc;
        self.path_generations = path_generations;
        match eigen {
            Some((basis, scales)) => {
                self.basis = basis;
                self.scales = scales;
                self.since_eigen = 0;
            }
            None => self.since_eigen = since_eigen,
        }
        self.generation += 1;
        self.evaluations += count;
        Ok(())
    }

    /// Centre of the search distribution.
    pub fn mean(&self) -> &[f64] {
        self.mean.as_slice()
    }

    /// Step size.
    pub fn sigma(&self) -> f64 {
        self.sigma
    }

    /// Replaces the mean. Errors on a wrong dimension, non-finite values or a point outside the
    /// bounds.
    pub fn set_mean(&mut self, m: Vec<f64>) -> Result<()> {
        if m.len() != self.dim {
            return Err(Error::Optimizer(format!(
                "mean has dimension {}, expected {}",
                m.len(),
                self.dim
            )));
        }
        check_finite("mean", &m)?;
        if let Some((lo, hi)) = self.bounds {
            check_in_bounds(&m, lo, hi)?;
        }
        self.mean = DVector::from_vec(m);
        Ok(())
    }

    /// Replaces the step size. Errors unless `s` is finite and positive.
    pub fn set_sigma(&mut self, s: f64) -> Result<()> {
        check_sigma(s)?;
        self.sigma = s;
        Ok(())
    }

    /// Covariance matrix `C` (the distribution is `N(mean, sigma^2 C)`).
    pub fn covariance(&self) -> &DMatrix<f64> {
        &self.cov
    }

    /// Replaces the covariance and decomposes it at once.
    ///
    /// `c` must be `d x d`, finite, symmetric (to a relative `1e-6`) and positive definite up to
    /// rounding: eigenvalues down to `-1e-5` times the largest are accepted as the noise of a
    /// matrix that travelled as `f32`, and, like any condition number above `1e14`, are lifted.
    pub fn set_covariance(&mut self, mut c: DMatrix<f64>) -> Result<()> {
        let n = self.dim;
        if c.shape() != (n, n) {
            return Err(Error::Optimizer(format!(
                "covariance is {}x{}, expected {n}x{n}",
                c.nrows(),
                c.ncols()
            )));
        }
        if c.iter().any(|v| !v.is_finite()) {
            return Err(Error::Optimizer("covariance has non-finite entries".into()));
        }
        let scale = c.amax();
        for i in 0..n {
            for j in 0..i {
                if (c[(i, j)] - c[(j, i)]).abs() > SYMMETRY_TOL * scale {
                    return Err(Error::Optimizer(format!(
                        "covariance is not symmetric at ({i}, {j})"
                    )));
                }
            }
        }
        symmetrize(&mut c);
        let (basis, scales) = decompose(&mut c, -INDEFINITE_TOL)?;
        self.cov = c;
        self.basis = basis;
        self.scales = scales;
        self.since_eigen = 0;
        Ok(())
    }

    /// Zeroes both evolution paths, as for a fresh start from the current distribution.
    pub fn reset_paths(&mut self) {
        self.pc.fill(0.0);
        self.ps.fill(0.0);
        self.path_generations = 0;
    }

    /// Best candidate told so far and its fitness.
    pub fn best(&self) -> Option<(&[f64], f64)> {
        self.best.as_ref().map(|(x, f)| (x.as_slice(), *f))
    }
}

/// The indices of `fitness` best first (lowest first; ties by index), as [`Cmaes::tell`] ranks.
pub fn ranking(fitness: &[f64]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..fitness.len()).collect();
    order.sort_by(|&a, &b| fitness[a].total_cmp(&fitness[b]).then(a.cmp(&b)));
    order
}

/// Parents (positively weighted candidates) of a default-configured generation of `popsize`:
/// `floor(popsize / 2)`, at least 1 (pycma's `mu` for the same popsize: 2 for 5).
pub fn parents_for(popsize: usize) -> usize {
    Params::new(1, popsize.max(1), Parents::BestHalf).weights.len()
}

/// pycma's default population size `4 + floor(3 ln d)`.
fn default_popsize(dim: usize) -> usize {
    4 + (3.0 * (dim as f64).ln()).floor() as usize
}

fn check_sigma(sigma: f64) -> Result<()> {
    if sigma.is_finite() && sigma > 0.0 {
        Ok(())
    } else {
        Err(Error::Optimizer(format!("sigma must be finite and positive, got {sigma}")))
    }
}

fn check_finite(what: &str, v: &[f64]) -> Result<()> {
    match v.iter().position(|x| !x.is_finite()) {
        Some(i) => Err(Error::Optimizer(format!("{what} has non-finite value {} at {i}", v[i]))),
        None => Ok(()),
    }
}

fn check_in_bounds(v: &[f64], lo: f64, hi: f64) -> Result<()> {
    match v.iter().position(|x| *x < lo || *x > hi) {
        Some(i) => Err(Error::Optimizer(format!("mean[{i}] = {} lies outside [{lo}, {hi}]", v[i]))),
        None => Ok(()),
    }
}

/// Makes `c` exactly symmetric by averaging it with its transpose.
fn symmetrize(c: &mut DMatrix<f64>) {
    let n = c.nrows();
    for i in 0..n {
        for j in 0..i {
            let v = 0.5 * (c[(i, j)] + c[(j, i)]);
            c[(i, j)] = v;
            c[(j, i)] = v;
        }
    }
}

/// Eigendecomposition `C = B diag(D^2) B^T`; returns `(B, D)`.
///
/// Eigenvalues below `min_relative` times the largest make it an error (not positive definite);
/// the others are lifted, by adding a multiple of the identity to `c` itself, until the condition
/// number is at most [`MAX_CONDITION`]: the shift leaves the basis unchanged.
fn decompose(c: &mut DMatrix<f64>, min_relative: f64) -> Result<(DMatrix<f64>, DVector<f64>)> {
    let n = c.nrows();
    // A generous cap: the implicit QR iteration needs a few sweeps per eigenvalue.
    let eig = SymmetricEigen::try_new(c.clone(), f64::EPSILON, 100 * n + 100)
        .ok_or_else(|| Error::Optimizer("eigendecomposition did not converge".into()))?;
    let mut values = eig.eigenvalues;
    let max = values.max();
    let min = values.min();
    if !(max.is_finite() && max > 0.0) || min < min_relative * max {
        return Err(Error::Optimizer(format!(
            "covariance is not positive definite (eigenvalues in [{min:e}, {max:e}])"
        )));
    }
    let floor = max / MAX_CONDITION;
    if min < floor {
        let shift = floor - min;
        for i in 0..n {
            c[(i, i)] += shift;
        }
        values.add_scalar_mut(shift);
    }
    Ok((eig.eigenvectors, values.map(f64::sqrt)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sphere(x: &[f64]) -> f64 {
        x.iter().map(|v| v * v).sum()
    }

    fn ellipsoid(x: &[f64]) -> f64 {
        let n = x.len() as f64;
        x.iter().enumerate().map(|(i, v)| 1e6f64.powf(i as f64 / (n - 1.0)) * v * v).sum()
    }

    fn rosenbrock(x: &[f64]) -> f64 {
        x.windows(2).map(|w| 100.0 * (w[1] - w[0] * w[0]).powi(2) + (1.0 - w[0]).powi(2)).sum()
    }

    /// Runs ask/tell until the best fitness of a generation reaches `target` or `max_evals`
    /// evaluations are spent; returns the best fitness seen.
    fn minimize(es: &mut Cmaes, f: impl Fn(&[f64]) -> f64, target: f64, max_evals: usize) -> f64 {
        while es.evaluations() < max_evals {
            let xs = es.ask();
            let fs: Vec<f64> = xs.iter().map(|x| f(x)).collect();
            es.tell(&xs, &fs).expect("tell");
            if es.best().expect("told").1 < target {
                break;
            }
        }
        es.best().expect("told").1
    }

    fn opts(seed: u64) -> CmaesOptions {
        CmaesOptions { popsize: None, seed, bounds: None }
    }

    #[test]
    fn default_parameters_match_pycma() {
        let es = Cmaes::new(vec![0.0; 10], 1.0, opts(0)).unwrap();
        assert_eq!(es.popsize(), 10);
        let p = &es.params;
        assert_eq!(p.weights.len(), 5);
        assert!((p.weights.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert!(p.weights.windows(2).all(|w| w[0] > w[1]));
        assert!((p.mueff - 3.1672).abs() < 1e-3, "mueff {}", p.mueff);
        assert!((es.chi_n - 3.0847).abs() < 1e-3);
        assert_eq!(Cmaes::new(vec![0.0; 500], 1.0, opts(0)).unwrap().popsize(), 22);
    }

    #[test]
    fn sphere_d10_converges() {
        let mut es = Cmaes::new(vec![1.0; 10], 0.5, opts(1)).unwrap();
        let f = minimize(&mut es, sphere, 1e-8, 3000);
        assert!(f < 1e-8, "sphere reached only {f:e} in {} evals", es.evaluations());
    }

    #[test]
    fn ellipsoid_d10_converges() {
        let mut es = Cmaes::new(vec![1.0; 10], 0.5, opts(2)).unwrap();
        let f = minimize(&mut es, ellipsoid, 1e-8, 10_000);
        assert!(f < 1e-8, "ellipsoid reached only {f:e} in {} evals", es.evaluations());
    }

    #[test]
    fn rosenbrock_d10_converges() {
        let mut es = Cmaes::new(vec![0.0; 10], 0.5, opts(3)).unwrap();
        let f = minimize(&mut es, rosenbrock, 1e-6, 15_000);
        assert!(f < 1e-6, "rosenbrock reached only {f:e} in {} evals", es.evaluations());
        let (x, _) = es.best().unwrap();
        assert!(x.iter().all(|v| (v - 1.0).abs() < 1e-2), "not the global optimum: {x:?}");
    }

    #[test]
    fn sphere_d500_makes_progress() {
        let mut es = Cmaes::new(vec![1.0; 500], 0.3, opts(4)).unwrap();
        let f0 = sphere(es.mean());
        let f = minimize(&mut es, sphere, f0 * 1e-3, 40_000);
        assert!(f < f0 * 1e-3, "sphere d=500: {f0} -> {f} in {} evals", es.evaluations());
    }

    #[test]
    fn same_seed_same_candidates() {
        let mut a = Cmaes::new(vec![0.5; 7], 0.3, opts(42)).unwrap();
        let mut b = Cmaes::new(vec![0.5; 7], 0.3, opts(42)).unwrap();
        let mut c = Cmaes::new(vec![0.5; 7], 0.3, opts(43)).unwrap();
        for _ in 0..20 {
            let (xa, xb, xc) = (a.ask(), b.ask(), c.ask());
            assert_eq!(xa, xb);
            assert_ne!(xa, xc);
            let fa: Vec<f64> = xa.iter().map(|x| ellipsoid(x)).collect();
            let fc: Vec<f64> = xc.iter().map(|x| ellipsoid(x)).collect();
            a.tell(&xa, &fa).unwrap();
            b.tell(&xb, &fa).unwrap();
            c.tell(&xc, &fc).unwrap();
        }
        assert_eq!(a.mean(), b.mean());
        assert_eq!(a.covariance(), b.covariance());
    }

    fn step(es: &mut Cmaes) -> Vec<Vec<f64>> {
        let xs = es.ask();
        let fs: Vec<f64> = xs.iter().map(|x| rosenbrock(x)).collect();
        es.tell(&xs, &fs).unwrap();
        xs
    }

    #[test]
    fn serde_round_trip_continues_identically() {
        let mut a = Cmaes::new(vec![0.0; 6], 0.5, opts(7)).unwrap();
        for _ in 0..15 {
            step(&mut a);
        }
        // Through serde_json::Value (what checkpoints hold): bit-exact.
        let mut b: Cmaes = serde_json::from_value(serde_json::to_value(&a).unwrap()).unwrap();
        // Through JSON text: serde_json's default float parser may be off by one ulp, so this
        // copy is checked to a tight tolerance only.
        let mut c: Cmaes = serde_json::from_str(&serde_json::to_string(&a).unwrap()).unwrap();
        for _ in 0..15 {
            let (xa, xb, xc) = (step(&mut a), step(&mut b), step(&mut c));
            assert_eq!(xa, xb);
            for (u, v) in xa.iter().flatten().zip(xc.iter().flatten()) {
                assert!((u - v).abs() <= 1e-9 * (1.0 + u.abs()), "{u} vs {v}");
            }
        }
        assert_eq!(a.generation(), b.generation());
        assert_eq!(a.best(), b.best());
    }

    #[test]
    fn tell_with_other_counts() {
        let mut es = Cmaes::new(vec![0.0; 4], 1.0, opts(5)).unwrap();
        let xs = es.ask();
        assert_eq!(xs.len(), 8);
        // Three of eight: the best one of them (mu = 1) becomes the mean.
        let fs: Vec<f64> = xs[..3].iter().map(|x| sphere(x)).collect();
        es.tell(&xs[..3], &fs).unwrap();
        let best = (0..3).min_by(|&a, &b| fs[a].total_cmp(&fs[b])).unwrap();
        for (m, x) in es.mean().iter().zip(&xs[best]) {
            assert!((m - x).abs() < 1e-12);
        }
        // A single candidate, and more than the popsize.
        es.tell(&[vec![0.1; 4]], &[0.04]).unwrap();
        let many: Vec<Vec<f64>> = es.ask().into_iter().chain(es.ask()).collect();
        let fs: Vec<f64> = many.iter().map(|x| sphere(x)).collect();
        es.tell(&many, &fs).unwrap();
        assert_eq!(es.evaluations(), 3 + 1 + 16);
        assert_eq!(es.generation(), 3);
        assert!(es.sigma() > 0.0);

        // All parents: every candidate pulls the mean, the better ones harder.
        let mut es = Cmaes::new(vec![0.0; 2], 1.0, opts(5)).unwrap();
        es.set_parents(Parents::All);
        es.tell(&[vec![1.0, 0.0], vec![-1.0, 0.0]], &[0.0, 1.0]).unwrap();
        assert!(es.mean()[0] > 0.0 && es.mean()[0] < 1.0, "{:?}", es.mean());
    }

    #[test]
    fn rejects_bad_input() {
        let mut es = Cmaes::new(vec![0.0; 3], 1.0, opts(0)).unwrap();
        let xs = es.ask();
        let mut fs: Vec<f64> = xs.iter().map(|x| sphere(x)).collect();
        fs[2] = f64::NAN;
        assert!(es.tell(&xs, &fs).is_err());
        fs[2] = f64::INFINITY;
        assert!(es.tell(&xs, &fs).is_err());
        assert!(es.tell(&[], &[]).is_err());
        assert!(es.tell(&xs, &fs[..2]).is_err());
        assert!(es.tell(&[vec![0.0; 2]], &[1.0]).is_err());
        assert!(es.tell(&[vec![0.0, f64::NAN, 0.0]], &[1.0]).is_err());
        // A failed tell leaves the state alone.
        assert_eq!(es.generation(), 0);
        assert_eq!(es.evaluations(), 0);
        assert!(es.best().is_none());

        assert!(Cmaes::new(vec![], 1.0, opts(0)).is_err());
        assert!(Cmaes::new(vec![0.0], 0.0, opts(0)).is_err());
        assert!(Cmaes::new(vec![0.0], f64::NAN, opts(0)).is_err());
        let small = CmaesOptions { popsize: Some(1), ..opts(0) };
        assert!(Cmaes::new(vec![0.0], 1.0, small).is_err());
        let bad_bounds = CmaesOptions { bounds: Some((1.0, -1.0)), ..opts(0) };
        assert!(Cmaes::new(vec![0.0], 1.0, bad_bounds).is_err());

        assert!(es.set_sigma(-1.0).is_err());
        assert!(es.set_mean(vec![0.0; 2]).is_err());
        assert!(es.set_covariance(DMatrix::identity(2, 2)).is_err());
        let mut asym = DMatrix::identity(3, 3);
        asym[(0, 1)] = 0.5;
        assert!(es.set_covariance(asym).is_err());
        let indefinite = DMatrix::from_diagonal(&DVector::from_vec(vec![1.0, -1.0, 1.0]));
        assert!(es.set_covariance(indefinite).is_err());
    }

    #[test]
    fn setters_shape_the_samples() {
        let mut es = Cmaes::new(vec![0.0; 2], 1.0, opts(9)).unwrap();
        es.set_mean(vec![10.0, -10.0]).unwrap();
        es.set_sigma(0.1).unwrap();
        let c = DMatrix::from_row_slice(2, 2, &[4.0, 0.0, 0.0, 0.01]);
        es.set_covariance(c.clone()).unwrap();
        assert_eq!(es.covariance(), &c);
        let mut xs = Vec::new();
        for _ in 0..500 {
            xs.extend(es.ask());
        }
        let n = xs.len() as f64;
        let var = |k: usize, m: f64| xs.iter().map(|x| (x[k] - m).powi(2)).sum::<f64>() / n;
        // Variances sigma^2 * C: 0.04 and 1e-4, to sampling error.
        assert!((var(0, 10.0) / 0.04 - 1.0).abs() < 0.1);
        assert!((var(1, -10.0) / 1e-4 - 1.0).abs() < 0.1);

        es.reset_paths();
        assert_eq!(es.ps.norm(), 0.0);
        assert_eq!(es.pc.norm(), 0.0);
    }

    #[test]
    fn bounds_clip_candidates() {
        let o = CmaesOptions { popsize: Some(12), seed: 3, bounds: Some((-0.5, 0.5)) };
        let mut es = Cmaes::new(vec![0.4; 5], 2.0, o).unwrap();
        // The optimum (2, 2, ...) lies outside: the search must end on the upper bound.
        let f = |x: &[f64]| x.iter().map(|v| (v - 2.0).powi(2)).sum::<f64>();
        for _ in 0..200 {
            let xs = es.ask();
            assert!(xs.iter().flatten().all(|v| (-0.5..=0.5).contains(v)));
            let fs: Vec<f64> = xs.iter().map(|x| f(x)).collect();
            es.tell(&xs, &fs).unwrap();
        }
        assert!(es.mean().iter().all(|m| (m - 0.5).abs() < 1e-3), "{:?}", es.mean());
    }

    #[test]
    fn injected_samples_update_exactly_as_samples() {
        let mut plain = Cmaes::new(vec![0.3; 12], 0.7, opts(21)).unwrap();
        let (mut compared, mut clipped) = (0, 0);
        for _ in 0..30 {
            let mut injected = plain.clone();
            let xs = plain.ask();
            assert_eq!(injected.ask(), xs);
            let fs: Vec<f64> = xs.iter().map(|x| rosenbrock(x)).collect();
            let within = xs.iter().all(|x| plain.mahalanobis_step(x) <= plain.injection_limit());
            plain.tell(&xs, &fs).unwrap();
            injected.tell_injected(&xs, &fs).unwrap();
            if within {
                // Nothing to clip: the update is the samples' own, bit for bit.
                assert_eq!(plain.mean(), injected.mean());
                assert_eq!(plain.sigma(), injected.sigma());
                assert_eq!(plain.covariance(), injected.covariance());
                assert_eq!(plain.ps, injected.ps);
                compared += 1;
            } else {
                // A rare sample beyond sqrt(d) + 2d/(d+2) is clipped like any injected point.
                clipped += 1;
            }
        }
        assert!(compared >= 20, "{compared} generations compared, {clipped} clipped");
    }

    #[test]
    fn a_far_injected_point_is_clipped_to_the_limit() {
        let d = 20;
        let mut es = Cmaes::new(vec![0.0; d], 0.5, opts(22)).unwrap();
        es.set_parents(Parents::All);
        let mut unclipped = es.clone();
        // Two "client means", one 1,000 sigmas away along axis 0.
        let mut far = vec![0.0; d];
        far[0] = 500.0;
        let near = vec![0.01; d];
        let limit = es.injection_limit();
        assert!((limit - ((d as f64).sqrt() + 2.0 * d as f64 / (d as f64 + 2.0))).abs() < 1e-12);
        assert!((es.mahalanobis_step(&far) - 1000.0).abs() < 1e-9);
        let pts = [near.clone(), far.clone()];
        es.tell_injected(&pts, &[1.0, 2.0]).unwrap();
        unclipped.tell(&pts, &[1.0, 2.0]).unwrap();
        // The clipped step of the far point is `limit` long: the mean moves by at most
        // sigma * limit along axis 0, and C's largest entry stays of order one.
        assert!(es.mean()[0] <= 0.5 * limit + 1e-9, "{}", es.mean()[0]);
        assert!(es.covariance().amax() < 2.0, "C grew to {}", es.covariance().amax());
        assert!(es.ps.norm() < 2.0 * limit, "|ps| = {}", es.ps.norm());
        assert!(es.sigma() < 0.5 * std::f64::consts::E, "sigma {}", es.sigma());
        // Told as a sample, the same point blows C up by two orders of magnitude.
        assert!(unclipped.covariance().amax() > 50.0, "{}", unclipped.covariance().amax());
        assert!(unclipped.ps.norm() > 10.0 * es.ps.norm());
    }

    #[test]
    fn one_dimension_works() {
        let mut es = Cmaes::new(vec![3.0], 1.0, opts(11)).unwrap();
        let f = minimize(&mut es, sphere, 1e-10, 2000);
        assert!(f < 1e-10);
    }
}
