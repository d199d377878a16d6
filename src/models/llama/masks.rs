//! Additive attention masks (0 where a key is seen, `MASKED` where not) over left-padded rows:
//! the causal mask of a plain pass and the mask of candidate blocks stacked after a cached
//! prefix, plus the left-padding check the CPU block kernel relies on.

use candle_core::{Device, Tensor};

use crate::{Error, Result};

const MASKED: f32 = -1e30;

/// Causal mask over left-padded rows, `[B, 1, T, T]`; a padding query sees only itself so its
/// softmax stays finite.
pub(super) fn causal_mask(attended: &[Vec<bool>], device: &Device) -> Result<Tensor> {
    let b = attended.len();
    let t = attended.first().map(|r| r.len()).unwrap_or(0);
    let mut m = Vec::with_capacity(b * t * t);
    for row in attended {
        for i in 0..t {
            for (j, &real) in row.iter().enumerate() {
                let ok = (j <= i && real) || i == j;
                m.push(if ok { 0.0 } else { MASKED });
            }
        }
    }
    Ok(Tensor::from_vec(m, (b, 1, t, t), device)?)
}

/// The first real column of each left-padded cache row (its real tokens are the rest).
pub(super) fn past_starts(attended: &[Vec<bool>]) -> Result<Vec<usize>> {
    attended
        .iter()
        .map(|row| {
            let start = row.iter().take_while(|&&real| !real).count();
            if row[start..].iter().all(|&real| real) {
                Ok(start)
            } else {
                Err(Error::Model("cache rows must be left-padded".into()))
            }
        })
        .collect()
}

/// Mask `[B, 1, P*S, T_past + P*S]` for candidate blocks stacked after a cached prefix.
pub(super) fn block_mask(
    attended: &[Vec<bool>],
    n_cand: usize,
    s: usize,
    device: &Device,
) -> Result<Tensor> {
    let b = attended.len();
    let t_past = attended.first().map(|r| r.len()).unwrap_or(0);
    let q = n_cand * s;
    let mut m = Vec::with_capacity(b * q * (t_past + q));
    for row in attended {
        for qi in 0..q {
            let (pq, sq) = (qi / s, qi % s);
            m.extend(row.iter().map(|&real| if real { 0.0 } else { MASKED }));
            for kk in 0..q {
                let ok = kk / s == pq && kk % s <= sq;
                m.push(if ok { 0.0 } else { MASKED });
            }
        }
    }
    Ok(Tensor::from_vec(m, (b, 1, q, t_past + q), device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `[1, 1, q, k]` mask as rows.
    fn plane(mask: Tensor) -> Vec<Vec<f32>> {
        mask.squeeze(0).unwrap().squeeze(0).unwrap().to_vec2::<f32>().unwrap()
    }

    #[test]
    fn masks_are_finite_for_padding_rows_and_block_diagonal() {
        let att = vec![vec![false, true, true]];
        let m = plane(causal_mask(&att, &Device::Cpu).unwrap());
        assert_eq!(m[0], vec![0.0, MASKED, MASKED]); // pad row sees itself
        assert_eq!(m[2], vec![MASKED, 0.0, 0.0]);
        let bm = plane(block_mask(&att, 2, 2, &Device::Cpu).unwrap());
        // query 3 = candidate 1, token 1: cached real tokens, then its own block only.
        assert_eq!(bm[3], vec![MASKED, 0.0, 0.0, MASKED, MASKED, 0.0, 0.0]);
        assert_eq!(bm[0], vec![MASKED, 0.0, 0.0, 0.0, MASKED, MASKED, MASKED]);
    }
}
