//! BBT's random projection: the soft prompt is `A z`, reshaped to `n_prompt_tokens x hidden`.
//!
//! A has entries N(0, s^2) with s = std_hat / (sqrt(d) * sigma_scale). Every party derives A from
//! the same seed, so A never travels: only z (d floats) does.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use crate::{Error, Result};

/// The fixed random matrix A, stored row-major `[out_dim x d]`.
#[derive(Debug, Clone)]
pub struct Projection {
    d: usize,
    out_dim: usize,
    std: f32,
    a: Vec<f32>,
}

impl Projection {
    /// `out_dim = n_prompt_tokens * hidden`; `std_hat` the embedding standard deviation the
    /// prompt should match; `sigma_scale` BBT's sigma knob (1 by default).
    pub fn new(
        d: usize,
        out_dim: usize,
        std_hat: f32,
        sigma_scale: f32,
        seed: u64,
    ) -> Result<Self> {
        if d == 0 || out_dim == 0 {
            return Err(Error::config("intrinsic_dim", "must be > 0"));
        }
        if !(std_hat.is_finite() && std_hat > 0.0 && sigma_scale.is_finite() && sigma_scale > 0.0) {
            return Err(Error::config(
                "projection",
                format!("std_hat {std_hat} and sigma {sigma_scale} must be finite and > 0"),
            ));
        }
        let bytes = (d as u64).checked_mul(out_dim as u64).and_then(|n| n.checked_mul(4));
        crate::machine::check_fits(
            "n_prompt_tokens",
            &format!(
                "the projection A ({out_dim} x {d} f32: n_prompt_tokens x hidden x intrinsic_dim)"
            ),
            bytes,
        )?;
        let std = std_hat / ((d as f32).sqrt() * sigma_scale);
        let normal =
            Normal::new(0.0f32, std).map_err(|e| Error::config("projection", e.to_string()))?;
        // A distinct stream from every other use of the run seed.
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_a11c_e000_0001);
        let a = (0..out_dim * d).map(|_| normal.sample(&mut rng)).collect();
        Ok(Self { d, out_dim, std, a })
    }

    pub fn dim(&self) -> usize {
        self.d
    }
    pub fn out_dim(&self) -> usize {
        self.out_dim
    }
    /// The standard deviation of A's entries.
    pub fn std(&self) -> f32 {
        self.std
    }

    /// The prompt `A z` (length `out_dim`).
    pub fn project(&self, z: &[f32]) -> Result<Vec<f32>> {
        if z.len() != self.d {
            return Err(Error::Optimizer(format!(
                "z has {} values, the projection expects intrinsic_dim = {}",
                z.len(),
                self.d
            )));
        }
        Ok(self
            .a
            .chunks_exact(self.d)
            .map(|row| row.iter().zip(z).map(|(a, z)| a * z).sum())
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_matrix_and_linear() {
        let p = Projection::new(10, 30, 0.5, 1.0, 7).unwrap();
        let q = Projection::new(10, 30, 0.5, 1.0, 7).unwrap();
        let r = Projection::new(10, 30, 0.5, 1.0, 8).unwrap();
        let z: Vec<f32> = (0..10).map(|i| i as f32 * 0.1).collect();
        assert_eq!(p.project(&z).unwrap(), q.project(&z).unwrap());
        assert_ne!(p.project(&z).unwrap(), r.project(&z).unwrap());
        let z2: Vec<f32> = z.iter().map(|v| 2.0 * v).collect();
        let a = p.project(&z).unwrap();
        let b = p.project(&z2).unwrap();
        for (x, y) in a.iter().zip(&b) {
            assert!((2.0 * x - y).abs() < 1e-5);
        }
        assert!(p.project(&[0.0; 3]).is_err());
    }

    #[test]
    fn entries_have_the_requested_std() {
        let p = Projection::new(100, 2000, 0.2, 1.0, 1).unwrap();
        let n = p.a.len() as f32;
        let mean = p.a.iter().sum::<f32>() / n;
        let var = p.a.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / n;
        let want = 0.2 / 10.0;
        assert!((var.sqrt() - want).abs() / want < 0.02, "{} vs {want}", var.sqrt());
    }
}
