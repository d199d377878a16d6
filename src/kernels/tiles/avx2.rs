//! The AVX2 block: f32 FMA over the bf16 weights widened to f32 once per panel and task (not
//! once per row block), 6 rows x 16 columns in 12 accumulators, three times per panel. The
//! products of bf16 values are exact in f32 and added in the portable loop's order, so the
//! result has its bits.

use std::arch::x86_64::*;

use super::super::layout::NR;
use super::Tile;

/// Columns per sub-panel (two 8-lane vectors).
const SUB: usize = 16;
/// f32 per pair in a widened sub-panel: the odd inputs' 16 weights, then the even inputs'.
const PER_PAIR: usize = 2 * SUB;

/// The panel `[pairs][NR]` words as `[NR / SUB][pairs][odd 16, even 16]` f32.
pub(super) fn widen(panel: &[u32], pairs: usize) -> Vec<f32> {
    let mut out = vec![0f32; NR / SUB * pairs * PER_PAIR];
    for (s, sub) in out.chunks_exact_mut(pairs * PER_PAIR).enumerate() {
        for (j, dst) in sub.chunks_exact_mut(PER_PAIR).enumerate() {
            let words = &panel[j * NR + s * SUB..j * NR + (s + 1) * SUB];
            let (odd, even) = dst.split_at_mut(SUB);
            for ((o, e), &w) in odd.iter_mut().zip(even.iter_mut()).zip(words) {
                *o = f32::from_bits(w & 0xffff_0000);
                *e = f32::from_bits(w << 16);
            }
        }
    }
    out
}

/// `tile[i][c]` for `rows` (1..=6) rows of `a` (rounded inputs as f32, row stride `width`)
/// against the widened panel `w`.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn block(
    a: &[f32],
    rows: usize,
    width: usize,
    pairs: usize,
    w: &[f32],
    tile: &mut Tile,
) {
    for s in 0..NR / SUB {
        let sub = &w[s * pairs * PER_PAIR..(s + 1) * pairs * PER_PAIR];
        match rows {
            6 => rows_of::<6>(a, width, pairs, sub, tile, s * SUB),
            5 => rows_of::<5>(a, width, pairs, sub, tile, s * SUB),
            4 => rows_of::<4>(a, width, pairs, sub, tile, s * SUB),
            3 => rows_of::<3>(a, width, pairs, sub, tile, s * SUB),
            2 => rows_of::<2>(a, width, pairs, sub, tile, s * SUB),
            _ => rows_of::<1>(a, width, pairs, sub, tile, s * SUB),
        }
    }
}

#[target_feature(enable = "avx2,fma")]
fn rows_of<const R: usize>(
    a: &[f32],
    width: usize,
    pairs: usize,
    w: &[f32],
    tile: &mut Tile,
    col0: usize,
) {
    assert!(R >= 1 && a.len() >= R * width && width >= 2 * pairs && w.len() >= pairs * PER_PAIR);
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    for j in 0..pairs {
        // SAFETY: j * PER_PAIR + 32 <= w.len() and i * width + 2j + 1 < a.len(), asserted above.
        unsafe {
            let wp = w.as_ptr().add(j * PER_PAIR);
            let (odd0, odd1) = (_mm256_loadu_ps(wp), _mm256_loadu_ps(wp.add(8)));
            for (i, acc) in acc.iter_mut().enumerate() {
                let x = _mm256_broadcast_ss(a.get_unchecked(i * width + 2 * j + 1));
                acc[0] = _mm256_fmadd_ps(x, odd0, acc[0]);
                acc[1] = _mm256_fmadd_ps(x, odd1, acc[1]);
            }
            let (even0, even1) = (_mm256_loadu_ps(wp.add(16)), _mm256_loadu_ps(wp.add(24)));
            for (i, acc) in acc.iter_mut().enumerate() {
                let x = _mm256_broadcast_ss(a.get_unchecked(i * width + 2 * j));
                acc[0] = _mm256_fmadd_ps(x, even0, acc[0]);
                acc[1] = _mm256_fmadd_ps(x, even1, acc[1]);
            }
        }
    }
    for (out, acc) in tile.iter_mut().zip(&acc) {
        for (v, chunk) in acc.iter().zip(out[col0..col0 + SUB].chunks_exact_mut(8)) {
            // SAFETY: chunk holds 8 f32.
            unsafe { _mm256_storeu_ps(chunk.as_mut_ptr(), *v) };
        }
    }
}
