//! What crosses the server-client boundary each round: the search distribution the server
//! sends and the update a client returns. Both are plain data (serde), checked on arrival.

use nalgebra::DMatrix;
use serde::{Deserialize, Serialize};

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
pub(crate) fn pack_upper(c: &DMatrix<f64>) -> PackedCovariance {
    let n = c.nrows().min(c.ncols());
    let mut upper = Vec::with_capacity(n * (n + 1) / 2);
    for i in 0..n {
        upper.extend((i..n).map(|j| c[(i, j)] as f32));
    }
    PackedCovariance { dim: n, upper }
}

/// What a client returns: `d` floats, its fitness, its loss and its per-iteration step sizes
/// (the 4 KB upload).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ClientUpdate {
    /// Client index.
    pub client: usize,
    /// Round this update answers.
    pub round: usize,
    /// The client's final local mean.
    pub mean: Vec<f32>,
    /// Fitness of that mean on the client's shard, as its local search ranked candidates (lower
    /// is better): the loss, or with perturbation the Eq. 7 ratio loss(real) / loss(perturbed).
    /// The server ranks clients by it.
    pub fitness: f64,
    /// Plain loss of that mean on the client's real shard (what reports call training loss).
    pub loss: f64,
    /// Step size of each local CMA-ES iteration, recorded before its `ask` (the first is the
    /// sigma the server sent).
    pub sigmas: Vec<f64>,
    /// Fitness of the mean the client received, scored on its shard before its search (only
    /// when the server ranks by improvement, `server_fitness = "improvement"`).
    #[serde(default)]
    pub start_fitness: Option<f64>,
    /// Examples of each class in the client's shard, for the round's diagnostics (the client
    /// owns its shard; in a cluster the server may never see it).
    #[serde(default)]
    pub class_counts: Vec<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
