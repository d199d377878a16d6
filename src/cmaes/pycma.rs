//! What the pycma flavour does differently from the tutorial one: selective mirroring in `ask`,
//! and pycma 3.4.0's `tell` (docs/pycma-flavour.md, "ask" and "tell", in the same order): clip
//! of unknown points, mean, `ps`, `h_sigma`, `pc`, the active covariance update, sigma, and the
//! mirror directions for the next ask.
//!
//! pycma decomposes `C` lazily, at the first `ask` or Mahalanobis norm once `gap` tells have
//! passed. Nothing reads `B` and `D` in between, so decomposing at the end of that tell gives the
//! same numbers and keeps `ask` infallible.

use nalgebra::{DMatrix, DVector, SymmetricEigen};
use rand::Rng;
use rand_distr::StandardNormal;

use super::{ranking, symmetrize, Cmaes, Update};
use crate::{Error, Result};

/// pycma adds `min(D)^2` to the diagonal and decomposes again when an eigenvalue is not
/// positive; it retries without limit, this gives up after so many tries.
const MAX_DECOMPOSITION_RETRIES: usize = 20;

/// `chi_n` with pycma's 26 (utilities/math.py) and the diagonal of `C0 = diag(exp(1e-4 i / d))`
/// (sampler.py: equal eigenvalues are avoided for numpy's sake).
pub(super) fn initial_chi_n_and_variances(dim: usize) -> (f64, DVector<f64>) {
    let nf = dim as f64;
    let chi_n = nf.sqrt() * (1.0 - 1.0 / (4.0 * nf) + 1.0 / (26.0 * nf * nf));
    let variances = DVector::from_fn(dim, |i, _| ((1e-4 / nf) * i as f64).exp());
    (chi_n, variances)
}

/// `||C^-1/2 v||` with the eigensystem of the last decomposition.
fn mahalanobis_norm(es: &Cmaes, v: &DVector<f64>) -> f64 {
    let mut t = es.basis.tr_mul(v);
    t.component_div_assign(&es.scales);
    t.norm()
}

/// pycma's ask with `CMA_mirrormethod = 2`: the stored mirror directions first, a direction
/// longer than `sqrt(d)` in the metric of `sigma^2 C` rescaled to the length of a fresh
/// `N(0, I)` draw (drawn before the samples), then `popsize - mirrors` samples.
pub(super) fn ask(es: &mut Cmaes) -> Vec<Vec<f64>> {
    let lambda = es.params.lambda;
    let n = es.dim;
    let directions = std::mem::take(&mut es.mirror_directions);
    let mut asked = Vec::with_capacity(lambda);
    for y in directions.into_iter().take(lambda) {
        let length = mahalanobis_norm(es, &y) / es.sigma;
        let y = if length > (n as f64).sqrt() {
            let rng = &mut es.rng;
            let drawn: f64 = (0..n)
                .map(|_| {
                    let z: f64 = rng.sample(StandardNormal);
                    z * z
                })
                .sum::<f64>()
                .sqrt();
            y * (drawn / length)
        } else {
            y
        };
        asked.push(es.clamped((&es.mean + y).as_slice().to_vec()));
    }
    es.asked_mirrors = asked.len();
    let samples = es.sample(lambda - asked.len());
    asked.extend(samples);
    asked
}

/// pycma's tell. `unknown`: every point was not asked (the server's client means), so each is
/// clipped first and none is a mirror; otherwise the points are the last ask's, in its order.
pub(super) fn tell(
    es: &mut Cmaes,
    candidates: &[Vec<f64>],
    fitness: &[f64],
    unknown: bool,
) -> Result<()> {
    es.check_told(candidates, fitness)?;
    let n = es.dim;
    let nf = n as f64;
    let count = candidates.len();
    let p = es.params_for(count).into_owned();
    // The first `told_mirrors` candidates are the last ask's mirrors (when all were told).
    let told_mirrors =
        if unknown || count != es.params.lambda { 0 } else { es.asked_mirrors.min(count) };
    let (old_mean, sigma) = (&es.mean, es.sigma);

    // 2. An unknown point is clipped to the Mahalanobis length `sqrt(d) + 2d/(d+2)`.
    let mut xs: Vec<DVector<f64>> =
        candidates.iter().map(|x| DVector::from_column_slice(x)).collect();
    if unknown {
        let limit = es.injection_limit();
        for x in xs.iter_mut() {
            let factor = mahalanobis_norm(es, &(&*x - old_mean)) / sigma / limit;
            if factor > 1.0 {
                *x = (&*x - old_mean) / factor + old_mean;
            }
        }
    }
    let order = ranking(fitness);

    // 3. The mean: the positively weighted recombination of the best.
    let mut recombined = DVector::zeros(n);
    for (w, &k) in p.weights.iter().zip(&order) {
        recombined.axpy(*w, &xs[k], 1.0);
    }
    let mean = old_mean + (recombined - old_mean);
    let shift = &mean - old_mean;

    // 4. ps, with the eigensystem of the last decomposition.
    let mut t = es.basis.tr_mul(&shift);
    t.component_div_assign(&es.scales);
    let whitened = &es.basis * t * (p.mueff.sqrt() / sigma);
    let ps = &es.ps * (1.0 - p.cs) + whitened * (p.cs * (2.0 - p.cs)).sqrt();

    // 5. h_sigma, with the bias correction for `countiter` tells since the paths were zeroed.
    let path_generations = es.path_generations + 1;
    let bias = 1.0 - (1.0 - p.cs).powf(2.0 * path_generations as f64);
    let hsig = ps.norm_squared() / bias / nf - 1.0 < 1.0 + 4.0 / (nf + 1.0);
    let h = if hsig { 1.0 } else { 0.0 };

    // 6. pc and the rank-one rate corrected for the variance a stalled path loses.
    let c1a = p.c1 * (1.0 - (1.0 - h) * p.cc * (2.0 - p.cc));
    let pc = &es.pc * (1.0 - p.cc) + &shift * (h * (p.cc * (2.0 - p.cc) * p.mueff).sqrt() / sigma);

    // 7. The covariance: rank-one, rank-mu and active (negative) terms.
    let mut weights: Vec<f64> =
        std::iter::once(c1a).chain(p.told_weights(count).iter().map(|w| p.cmu * w)).collect();
    for (rank, &k) in order.iter().enumerate() {
        // A mirror is not a sample of the distribution: it gets no negative weight.
        if k < told_mirrors && weights[rank + 1] < 0.0 {
            weights[rank + 1] = 0.0;
        }
    }
    // Python's `sum`, left to right.
    let decay = 1.0 - weights.iter().fold(0.0, |acc, w| acc + w);
    let mut vectors = vec![&pc * (p.c1 / (c1a + 1e-23)).sqrt()];
    vectors.extend(order.iter().map(|&k| (&xs[k] - old_mean) / sigma));
    let mut cov = &es.cov * decay;
    for (w, v) in weights.iter().zip(&vectors) {
        let w = if *w < 0.0 {
            // A negative step counts as if its squared Mahalanobis length were d.
            w * nf / (mahalanobis_norm(es, v) + 1e-9).powi(2)
        } else {
            *w
        };
        if w != 0.0 {
            cov.ger(w, v, v, 1.0);
        }
    }

    // 8. sigma, the change of its log clipped to [-1, 1].
    let log_change = (p.cs / p.damps * (ps.norm() / es.chi_n - 1.0)).clamp(-1.0, 1.0);
    let new_sigma = sigma * log_change.exp();

    if !(new_sigma.is_finite() && new_sigma > 0.0) {
        return Err(Error::Optimizer(format!("step size became {new_sigma}")));
    }
    if mean.iter().chain(cov.iter()).chain(ps.iter()).chain(pc.iter()).any(|v| !v.is_finite()) {
        return Err(Error::Optimizer("update produced non-finite state".into()));
    }
    let since_eigen = es.since_eigen + 1;
    let eigen = if since_eigen as f64 >= p.eigen_gap(es.flavour, n) {
        Some(decompose(&mut cov, &es.scales)?)
    } else {
        None
    };

    // 9. The next ask mirrors the worst candidates, unless they were mirrors themselves.
    let mirror_directions: Vec<DVector<f64>> = order
        .iter()
        .rev()
        .take(es.params.mirrors)
        .filter(|&&k| k >= told_mirrors)
        .map(|&k| old_mean - &xs[k])
        .collect();

    es.commit(candidates, fitness, order[0], Update { mean, sigma: new_sigma, cov, ps, pc, eigen });
    es.mirror_directions = mirror_directions;
    es.asked_mirrors = 0;
    Ok(())
}

/// pycma's `_decompose_C`: symmetrize, decompose, sort ascending; while an eigenvalue is not
/// positive, add the smallest old eigenvalue to the diagonal and retry. No condition limit.
/// Returns `(B, D)`.
fn decompose(
    cov: &mut DMatrix<f64>,
    old_scales: &DVector<f64>,
) -> Result<(DMatrix<f64>, DVector<f64>)> {
    let n = cov.nrows();
    symmetrize(cov);
    let mut old_scales = old_scales.clone();
    for _ in 0..MAX_DECOMPOSITION_RETRIES {
        let eig = SymmetricEigen::try_new(cov.clone(), f64::EPSILON, 100 * n + 100)
            .ok_or_else(|| Error::Optimizer("eigendecomposition did not converge".into()))?;
        let values = &eig.eigenvalues;
        if values.iter().all(|v| v.is_finite() && *v > 0.0) {
            return Ok(sorted_ascending(&eig.eigenvectors, &values.map(f64::sqrt)));
        }
        let lift = old_scales.min().powi(2);
        if !(lift.is_finite() && lift > 0.0) {
            break;
        }
        for i in 0..n {
            cov[(i, i)] += lift;
        }
        old_scales = old_scales.map(|d| (d * d + lift).sqrt());
    }
    Err(Error::Optimizer("covariance is not positive definite".into()))
}

/// `(B, D)` with the axes ordered by ascending `D`, as pycma keeps them (`_sortBD`).
pub(super) fn sorted_ascending(
    basis: &DMatrix<f64>,
    scales: &DVector<f64>,
) -> (DMatrix<f64>, DVector<f64>) {
    let n = scales.len();
    let mut idx: Vec<usize> = (0..n).collect();
    idx.sort_by(|&a, &b| scales[a].total_cmp(&scales[b]));
    let basis = DMatrix::from_fn(n, n, |i, j| basis[(i, idx[j])]);
    let scales = DVector::from_fn(n, |j, _| scales[idx[j]]);
    (basis, scales)
}
