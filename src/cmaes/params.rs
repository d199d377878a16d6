//! Strategy parameters of each [`CmaFlavour`]: recombination weights and learning rates for a
//! dimension and a population size.

use serde::{Deserialize, Serialize};

use super::{CmaFlavour, Parents};

/// Strategy parameters that depend on the dimension and the number of told candidates.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct Params {
    /// Number of candidates these parameters were computed for.
    pub lambda: usize,
    /// Normalized positive recombination weights of the best `weights.len()` candidates.
    pub weights: Vec<f64>,
    /// Variance-effective selection mass `1 / sum(w^2)`.
    pub mueff: f64,
    pub cc: f64,
    pub cs: f64,
    pub c1: f64,
    pub cmu: f64,
    pub damps: f64,
    /// pycma: the non-positive weights that follow `weights` (best to worst, zeros included),
    /// already scaled by `finalize_negative_weights`. Empty for the tutorial flavour.
    #[serde(default)]
    pub negative_weights: Vec<f64>,
    /// pycma: mirrored candidates per generation (`lam_mirr`). 0 for the tutorial flavour.
    #[serde(default)]
    pub mirrors: usize,
}

impl Params {
    pub fn new(flavour: CmaFlavour, n: usize, lambda: usize, parents: Parents) -> Self {
        match flavour {
            CmaFlavour::Tutorial => Self::tutorial(n, lambda, parents),
            CmaFlavour::Pycma => Self::pycma(n, lambda, parents),
        }
    }

    fn tutorial(n: usize, lambda: usize, parents: Parents) -> Self {
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
        let (negative_weights, mirrors) = (Vec::new(), 0);
        Self { lambda, weights, mueff, cc, cs, c1, cmu, damps, negative_weights, mirrors }
    }

    /// pycma 3.4.0's defaults (docs/pycma-flavour.md, "Parameters"). [`Parents::All`] is
    /// `CMA_mu = popsize`, i.e. `RecombinationWeights(2 * popsize)`; [`Parents::Equal`] has no
    /// pycma counterpart and gets equal positive weights and no negative ones.
    fn pycma(n: usize, lambda: usize, parents: Parents) -> Self {
        let nf = n as f64;
        let len = match parents {
            Parents::BestHalf | Parents::Equal => lambda,
            Parents::All => 2 * lambda,
        };
        let (weights, mut negative_weights) = match parents {
            Parents::Equal => (vec![1.0 / lambda as f64; lambda], Vec::new()),
            _ => recombination_weights(len),
        };
        let mueff = 1.0 / weights.iter().map(|w| w * w).sum::<f64>();
        let cc = (4.0 + mueff / nf) / (nf + 4.0 + 2.0 * mueff / nf);
        let cs = (mueff + 2.0) / (nf + mueff + 3.0);
        let c1 = (len as f64 / 6.0).min(1.0) * 2.0 / ((nf + 1.3).powi(2) + mueff);
        let cmu =
            (1.0 - c1).min(2.0 * (0.25 + mueff - 2.0 + 1.0 / mueff) / ((nf + 2.0).powi(2) + mueff));
        finalize_negative_weights(&mut negative_weights, nf, c1, cmu, mueff);
        // CMA_mirrors = popsize < 6.
        let mirrors = if lambda < 6 {
            (0.5 + 0.16 * (lambda.min(2 * n + 2) as f64) + 0.29) as usize
        } else {
            0
        };
        let mirror_term = ((mirrors as f64 / (0.159 * lambda as f64) - 1.0).powi(2)).min(1.0);
        let damps = 0.5
            + mirror_term / 2.0
            + 2.0 * (((mueff - 1.0) / (nf + 1.0)).sqrt() - 1.0).max(0.0)
            + cs;
        Self { lambda, weights, mueff, cc, cs, c1, cmu, damps, negative_weights, mirrors }
    }

    /// Tells between two eigendecompositions.
    pub fn eigen_gap(&self, flavour: CmaFlavour, n: usize) -> f64 {
        match flavour {
            // A lazy gap of `0.5 * lambda / ((c1 + cmu) * d)` evaluations, as the tutorial
            // writes it, i.e. `0.5 / ((c1 + cmu) * d)` generations. The covariance moves by
            // about `c1 + cmu` per generation, so a basis that lags by this much costs little
            // progress while saving most of the `O(d^3)` work in high dimension.
            CmaFlavour::Tutorial => 0.5 / ((self.c1 + self.cmu) * n as f64),
            // What pycma 3.4.0 actually uses (es.py:1732): five times shorter.
            CmaFlavour::Pycma => 1.0 / (self.c1 + self.cmu + 1e-23) / n as f64 / 10.0,
        }
    }

    /// pycma's `RecombinationWeights.__call__(count)`: the weight of each rank when `count`
    /// candidates are told (positive ones first; negative ones from the end of the list).
    pub fn told_weights(&self, count: usize) -> Vec<f64> {
        let mu = self.weights.len();
        let mut w: Vec<f64> = self.weights.iter().copied().take(count).collect();
        if count > mu {
            let negatives = (count - mu).min(self.negative_weights.len());
            w.extend_from_slice(&self.negative_weights[self.negative_weights.len() - negatives..]);
            // Told more points than it has weights, pycma pads with zeros after all of them.
            w.resize(count, 0.0);
        }
        w
    }
}

/// pycma's `RecombinationWeights(len)` before finalization: `ln((len+1)/2) - ln i`, the
/// positive ones scaled to sum 1 and the others to sum -1. Returns (positive, non-positive).
fn recombination_weights(len: usize) -> (Vec<f64>, Vec<f64>) {
    if len <= 1 {
        // pycma refuses fewer than 2 weights; a tell of one candidate recombines just it.
        return (vec![1.0], Vec::new());
    }
    let offset = ((len as f64 + 1.0) / 2.0).ln();
    let raw: Vec<f64> = (1..=len).map(|i| offset - (i as f64).ln()).collect();
    let mu = raw.iter().filter(|w| **w > 0.0).count();
    let positive_sum: f64 = raw[..mu].iter().sum();
    let scaled: Vec<f64> = raw.iter().map(|w| w / positive_sum).collect();
    let negative_sum: f64 = scaled[mu..].iter().sum();
    let negative = scaled[mu..]
        .iter()
        .map(|w| if negative_sum != 0.0 { w / -negative_sum } else { *w })
        .collect();
    (scaled[..mu].to_vec(), negative)
}

/// pycma's `finalize_negative_weights(N, c1, cmu)`: the negative weights sum to
/// `-(1 + c1/cmu)`, limited to `-(1 - c1 - cmu)/(cmu N)` and then to
/// `-(1 + 2 mueffminus/(mueff + 2))`.
fn finalize_negative_weights(negative: &mut [f64], n: f64, c1: f64, cmu: f64, mueff: f64) {
    if !negative.last().is_some_and(|w| *w < 0.0) || cmu <= 0.0 {
        return;
    }
    let scale_to = |negative: &mut [f64], value: f64, only_limit: bool| {
        let sum: f64 = negative.iter().sum();
        if only_limit && sum >= -value {
            return;
        }
        let factor = (value / sum).abs();
        if !only_limit || factor < 1.0 {
            negative.iter_mut().for_each(|w| *w *= factor);
        }
    };
    scale_to(negative, 1.0 + c1 / cmu, false);
    scale_to(negative, (1.0 - c1 - cmu) / cmu / n, true);
    let sum: f64 = negative.iter().sum();
    let mueff_minus = sum * sum / negative.iter().map(|w| w * w).sum::<f64>();
    scale_to(negative, 1.0 + 2.0 * mueff_minus / (mueff + 2.0), true);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pycma_parameters_match_the_table() {
        // docs/pycma-flavour.md, d = 100.
        let close = |a: f64, b: f64, tol: f64| assert!((a - b).abs() <= tol * b.abs(), "{a} {b}");
        let client = Params::pycma(100, 5, Parents::BestHalf);
        close(client.weights[0], 0.7304227103, 1e-9);
        close(client.mueff, 1.6496498389, 1e-9);
        close(client.cs, 0.0348749360, 1e-8);
        close(client.damps, 0.5681212474, 1e-9);
        close(client.c1, 1.623903e-4, 1e-6);
        close(client.negative_weights.iter().sum::<f64>(), -2.0166060, 1e-7);
        assert_eq!(client.negative_weights[0], 0.0);
        assert_eq!(client.mirrors, 1);
        close(client.eigen_gap(CmaFlavour::Pycma, 100), 3.851869, 1e-6);
        let server = Params::pycma(100, 10, Parents::All);
        assert_eq!((server.weights.len(), server.mirrors), (10, 0));
        close(server.mueff, 5.9388042356, 1e-9);
        close(server.damps, 1.0728739799, 1e-9);
        close(server.cmu, 8.371208e-4, 1e-6);
        assert_eq!(server.told_weights(10), server.weights);
        let default = Params::pycma(100, 10, Parents::BestHalf);
        close(default.negative_weights.iter().sum::<f64>(), -1.5850253, 1e-7);
        close(default.c1, 1.948395e-4, 1e-6);
    }
}
