//! The portable block: plain loops in `vdpbf16ps`'s order (the odd product first; each product
//! of two bf16 values is exact in f32), so it gives the AVX-512 BF16 and AVX2 kernels' bits.

use super::super::layout::{from_bf16, pair, NR};
use super::Tile;

/// `tile[i][c] = sum_j dot(a[i][j], b[j][c])` for `rows` rows of `a` (row stride `stride`
/// words) over the first `pairs` pairs.
pub(super) fn block(
    a: &[u32],
    rows: usize,
    stride: usize,
    pairs: usize,
    b: &[u32],
    tile: &mut Tile,
) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2")]
        fn wide(a: &[u32], rows: usize, stride: usize, pairs: usize, b: &[u32], tile: &mut Tile) {
            block_generic(a, rows, stride, pairs, b, tile)
        }
        if is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2, checked just above.
            return unsafe { wide(a, rows, stride, pairs, b, tile) };
        }
    }
    block_generic(a, rows, stride, pairs, b, tile)
}

#[inline(always)]
fn block_generic(a: &[u32], rows: usize, stride: usize, pairs: usize, b: &[u32], tile: &mut Tile) {
    for (i, out) in tile.iter_mut().take(rows).enumerate() {
        *out = [0.0; NR];
        for j in 0..pairs {
            let x = a[i * stride + j];
            let (x0, x1) = (from_bf16(x as u16), from_bf16((x >> 16) as u16));
            for (o, &w) in out.iter_mut().zip(&b[j * NR..(j + 1) * NR]) {
                *o += x1 * from_bf16((w >> 16) as u16);
                *o += x0 * from_bf16(w as u16);
            }
        }
    }
}

/// One row rounded to bf16 pairs, zero-padded past an odd end.
pub(super) fn round_row(x: &[f32], dst: &mut [u32]) {
    for (j, d) in dst.iter_mut().enumerate() {
        let lo = x.get(2 * j).copied().unwrap_or(0.0);
        let hi = x.get(2 * j + 1).copied().unwrap_or(0.0);
        *d = pair(lo, hi);
    }
}
