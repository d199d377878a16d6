//! CMA-ES (covariance matrix adaptation evolution strategy) on nalgebra, for minimization, in
//! two flavours ([`CmaFlavour`]).
//!
//! [`CmaFlavour::Tutorial`] is an own implementation of the algorithm as described in N. Hansen,
//! "The CMA Evolution Strategy: A Tutorial" (arXiv:1604.00772), with the tutorial's default
//! parameters: full covariance, rank-one and rank-mu updates, cumulative step-size adaptation
//! (the change of log sigma capped at 1 per generation) with the `h_sigma` stall, and a lazy
//! eigendecomposition.
//!
//! [`CmaFlavour::Pycma`] reproduces pycma 3.4.0 (the reference's optimizer) at the defaults the
//! reference runs, as docs/pycma-flavour.md describes formula by formula; `tests/pycma_parity.rs`
//! checks it against recorded pycma runs. Where pycma differs from the tutorial flavour: negative
//! weights for the worse candidates (active CMA, each such step rescaled to Mahalanobis length
//! `sqrt(d)`); `c1` multiplied by `min(1, len(weights) / 6)`; 1/4 added to `mueff - 2 + 1/mueff`
//! in `c_mu`; `cs = (mueff + 2) / (d + mueff + 3)` (the tutorial has `+ 5`); below popsize 6 one
//! selectively mirrored candidate per generation, and `damps` with a mirror term (0.568 instead of
//! 1.034 at popsize 5); 26 instead of 21 in `chi_n`; the initial covariance
//! `diag(exp(1e-4 i / d))`; another `h_sigma` threshold; the log change of sigma clipped to
//! [-1, 1] both ways; and an eigendecomposition five times as often.
//! The positive weights, `mueff`, `cc` and the default popsize are the same in both.
//! Samples come from this crate's ChaCha8 generator, not numpy's, so only the updates (given the
//! same told points) match pycma, not the candidates.
//!
//! The whole state, random generator included, is serializable, so a run can be checkpointed and
//! resumed bit for bit.
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

mod params;
mod pycma;

use params::Params;

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
    /// Which CMA-ES to run.
    #[serde(default)]
    pub flavour: CmaFlavour,
}

/// Which CMA-ES: the tutorial's parameters or pycma's (module doc).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CmaFlavour {
    /// Hansen's tutorial defaults, this crate's original CMA-ES.
    #[default]
    Tutorial,
    /// pycma 3.4.0 at the reference's settings (docs/pycma-flavour.md).
    Pycma,
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
    #[serde(default)]
    flavour: CmaFlavour,
    /// pycma: steps `mean_old - x_worst` of the last tell, mirrored at the next ask.
    #[serde(default)]
    mirror_directions: Vec<DVector<f64>>,
    /// pycma: how many of the last ask's candidates (the first ones) were mirrors, until told.
    #[serde(default)]
    asked_mirrors: usize,
}

/// What a tell computed, before [`Cmaes::commit`] writes it: the new distribution, its paths,
/// and the covariance's eigenbasis and axis lengths when a decomposition was due.
pub(super) struct Update {
    pub mean: DVector<f64>,
    pub sigma: f64,
    pub cov: DMatrix<f64>,
    pub ps: DVector<f64>,
    pub pc: DVector<f64>,
    pub eigen: Option<(DMatrix<f64>, DVector<f64>)>,
}

impl Cmaes {
    /// A strategy centred on `mean` with step size `sigma` and identity covariance (pycma's
    /// `diag(exp(1e-4 i / d))` in that flavour).
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
        let flavour = opts.flavour;
        let (chi_n, variances) = match flavour {
            CmaFlavour::Tutorial => (
                nf.sqrt() * (1.0 - 1.0 / (4.0 * nf) + 1.0 / (21.0 * nf * nf)),
                DVector::from_element(dim, 1.0),
            ),
            CmaFlavour::Pycma => pycma::initial_chi_n_and_variances(dim),
        };
        Ok(Self {
            dim,
            bounds: opts.bounds,
            parents: Parents::default(),
            params: Params::new(flavour, dim, lambda, Parents::default()),
            chi_n,
            mean: DVector::from_vec(mean),
            sigma,
            cov: DMatrix::from_diagonal(&variances),
            basis: DMatrix::identity(dim, dim),
            scales: variances.map(f64::sqrt),
            since_eigen: 0,
            pc: DVector::zeros(dim),
            ps: DVector::zeros(dim),
            path_generations: 0,
            generation: 0,
            evaluations: 0,
            best: None,
            rng: ChaCha8Rng::seed_from_u64(opts.seed),
            flavour,
            mirror_directions: Vec::new(),
            asked_mirrors: 0,
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
        self.params = Params::new(self.flavour, self.dim, self.params.lambda, parents);
    }

    /// Which CMA-ES this is.
    pub fn flavour(&self) -> CmaFlavour {
        self.flavour
    }

    /// Samples `popsize` candidates `mean + sigma * B D z`, `z ~ N(0, I)`, clipped into the
    /// bounds if there are any. In the pycma flavour the first ones may instead be mirrors of
    /// the last generation's worst candidates (selective mirroring), which [`Cmaes::tell`]
    /// expects back at the same indices.
    pub fn ask(&mut self) -> Vec<Vec<f64>> {
        match self.flavour {
            CmaFlavour::Tutorial => self.sample(self.params.lambda),
            CmaFlavour::Pycma => pycma::ask(self),
        }
    }

    /// `count` candidates `mean + sigma * B D z`, `z ~ N(0, I)`, clipped into the bounds.
    fn sample(&mut self, count: usize) -> Vec<Vec<f64>> {
        let (n, lambda) = (self.dim, count);
        let rng = &mut self.rng;
        let mut z = DMatrix::<f64>::from_fn(n, lambda, |_, _| rng.sample(StandardNormal));
        for (mut row, s) in z.row_iter_mut().zip(self.scales.iter()) {
            row *= *s;
        }
        let y = &self.basis * z;
        y.column_iter()
            .map(|yk| {
                let x: Vec<f64> =
                    yk.iter().zip(self.mean.iter()).map(|(y, m)| m + self.sigma * y).collect();
                self.clamped(x)
            })
            .collect()
    }

    fn clamped(&self, mut x: Vec<f64>) -> Vec<f64> {
        if let Some((lo, hi)) = self.bounds {
            x.iter_mut().for_each(|v| *v = v.clamp(lo, hi));
        }
        x
    }

    /// Updates the distribution from evaluated candidates (lower fitness is better).
    ///
    /// Any number of candidates `>= 1` is accepted, not only the ones [`Cmaes::ask`] returned:
    /// the update sees `(x - mean) / sigma` of whatever is told. When the count differs from the
    /// popsize, weights, `mueff` and learning rates are recomputed for that count. On error the
    /// state is left unchanged.
    ///
    /// In the pycma flavour the candidates are taken to be the last [`Cmaes::ask`]'s, in its
    /// order: its mirrors (the first ones) get no negative weight, and the worst candidate is
    /// mirrored at the next ask unless it was itself a mirror.
    pub fn tell(&mut self, candidates: &[Vec<f64>], fitness: &[f64]) -> Result<()> {
        match self.flavour {
            CmaFlavour::Tutorial => self.update(candidates, fitness, false),
            CmaFlavour::Pycma => pycma::tell(self, candidates, fitness, false),
        }
    }

    /// [`Cmaes::tell`] for injected points, which were not drawn from `N(mean, sigma^2 C)`:
    /// each step `(x - mean) / sigma` longer than [`Cmaes::injection_limit`] in the metric of
    /// `C^-1` (the Mahalanobis length, as of the eigensystem the samples use) is shortened to it
    /// before the mean, path and covariance updates, as pycma does for unknown solutions
    /// (`repair_genotype`). Steps within the limit are used as they are, so told samples give
    /// exactly what [`Cmaes::tell`] gives. In the pycma flavour every told point is clipped
    /// (pycma's unknown solutions), and none counts as a mirror.
    pub fn tell_injected(&mut self, candidates: &[Vec<f64>], fitness: &[f64]) -> Result<()> {
        match self.flavour {
            CmaFlavour::Tutorial => self.update(candidates, fitness, true),
            CmaFlavour::Pycma => pycma::tell(self, candidates, fitness, true),
        }
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
            Params::new(self.flavour, self.dim, count, self.parents)
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

    /// Checks a tell's input: at least one candidate, one finite fitness per candidate, each
    /// candidate finite and of the search's dimension.
    fn check_told(&self, candidates: &[Vec<f64>], fitness: &[f64]) -> Result<()> {
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
        Ok(())
    }

    /// The parameters for a tell of `count` candidates.
    fn params_for(&self, count: usize) -> std::borrow::Cow<'_, Params> {
        if count == self.params.lambda {
            std::borrow::Cow::Borrowed(&self.params)
        } else {
            std::borrow::Cow::Owned(Params::new(self.flavour, self.dim, count, self.parents))
        }
    }

    /// Records the best candidate of a committed tell.
    /// Writes a tell's result into the strategy, once every step of it has succeeded (so a
    /// failed tell leaves the state as it was): the best point, the distribution and paths, the
    /// decomposition when one was due, and the counters.
    fn commit(&mut self, candidates: &[Vec<f64>], fitness: &[f64], best_k: usize, u: Update) {
        self.record_best(candidates, fitness, best_k);
        self.mean = u.mean;
        self.sigma = u.sigma;
        self.cov = u.cov;
        self.ps = u.ps;
        self.pc = u.pc;
        self.path_generations += 1;
        match u.eigen {
            Some((basis, scales)) => {
                self.basis = basis;
                self.scales = scales;
                self.since_eigen = 0;
            }
            None => self.since_eigen += 1,
        }
        self.generation += 1;
        self.evaluations += candidates.len();
    }

    fn record_best(&mut self, candidates: &[Vec<f64>], fitness: &[f64], best_k: usize) {
        if self.best.as_ref().is_none_or(|(_, f)| fitness[best_k] < *f) {
            self.best = Some((candidates[best_k].clone(), fitness[best_k]));
        }
    }

    /// The tutorial flavour's update.
    fn update(&mut self, candidates: &[Vec<f64>], fitness: &[f64], injected: bool) -> Result<()> {
        self.check_told(candidates, fitness)?;
        let n = self.dim;
        let count = candidates.len();
        let params = self.params_for(count).into_owned();
        let p = &params;

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
        let eigen = if since_eigen as f64 >= p.eigen_gap(self.flavour, n) {
            Some(decompose(&mut cov, f64::NEG_INFINITY)?)
        } else {
            None
        };

        self.commit(candidates, fitness, order[0], Update { mean, sigma, cov, ps, pc, eigen });
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
    /// In both flavours (pycma has no condition limit; its `_copy_light` decomposes the copied
    /// `C` the same way otherwise, and this crate's `C` may have travelled as `f32`).
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
        let (mut basis, mut scales) = decompose(&mut c, -INDEFINITE_TOL)?;
        if self.flavour == CmaFlavour::Pycma {
            (basis, scales) = pycma::sorted_ascending(&basis, &scales);
        }
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

    /// Conjugate evolution path `p_sigma` (step-size control).
    pub fn ps(&self) -> &[f64] {
        self.ps.as_slice()
    }

    /// Evolution path `p_c` (rank-one update).
    pub fn pc(&self) -> &[f64] {
        self.pc.as_slice()
    }

    /// Square roots of the eigenvalues of `C` as of the last decomposition (pycma's `D`; in
    /// the pycma flavour ascending).
    pub fn axis_lengths(&self) -> &[f64] {
        self.scales.as_slice()
    }

    /// How many of the last [`Cmaes::ask`]'s candidates, the first ones, are mirrors (pycma
    /// flavour; 0 once told, and always 0 in the tutorial flavour).
    pub fn mirrors_asked(&self) -> usize {
        self.asked_mirrors
    }

    /// Checks a state that came from outside (a checkpoint, a state transfer): every vector and
    /// matrix has the strategy's dimension and every value is finite, so that a malformed state
    /// is refused here instead of panicking in the next ask or tell.
    pub fn check_consistent(&self) -> Result<()> {
        let d = self.dim;
        let shape = |what: &str, got: String| {
            Err(Error::Optimizer(format!("{what} has shape {got}, expected dimension {d}")))
        };
        for (what, v) in
            [("mean", &self.mean), ("scales", &self.scales), ("pc", &self.pc), ("ps", &self.ps)]
        {
            if v.len() != d {
                return shape(what, v.len().to_string());
            }
            check_finite(what, v.as_slice())?;
        }
        for (what, m) in [("covariance", &self.cov), ("basis", &self.basis)] {
            if m.shape() != (d, d) {
                return shape(what, format!("{:?}", m.shape()));
            }
            check_finite(what, m.as_slice())?;
        }
        if let Some(v) = self.mirror_directions.iter().find(|v| v.len() != d) {
            return shape("a mirror direction", v.len().to_string());
        }
        if let Some((x, _)) = self.best.as_ref().filter(|(x, _)| x.len() != d) {
            return shape("the best point", x.len().to_string());
        }
        check_sigma(self.sigma)?;
        let p = &self.params;
        if p.lambda < 2 || p.weights.is_empty() || p.weights.len() > p.lambda {
            return Err(Error::Optimizer(format!(
                "{} weights for popsize {}: not a strategy's parameters",
                p.weights.len(),
                p.lambda
            )));
        }
        if self.asked_mirrors > p.lambda {
            return Err(Error::Optimizer(format!(
                "{} mirrors asked of a popsize of {}",
                self.asked_mirrors, p.lambda
            )));
        }
        Ok(())
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
    Params::new(CmaFlavour::Tutorial, 1, popsize.max(1), Parents::BestHalf).weights.len()
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
mod tests;
