//! The AVX-512 BF16 block: `vdpbf16ps`, 8 rows x 48 columns in 24 accumulators.

use std::arch::x86_64::*;

use super::super::layout::NR;
use super::Tile;

/// `tile[i][c] = sum_j dot(a[i][j], b[j][c])` for `rows` (1..=8) rows of `a` (row stride
/// `stride` words) over the first `pairs` pairs.
///
/// # Safety
/// The CPU must have AVX-512 F and BF16.
#[target_feature(enable = "avx512f,avx512bf16")]
pub(super) unsafe fn block(
    a: &[u32],
    rows: usize,
    stride: usize,
    pairs: usize,
    b: &[u32],
    tile: &mut Tile,
) {
    match rows {
        8 => rows_of::<8>(a, stride, pairs, b, tile),
        7 => rows_of::<7>(a, stride, pairs, b, tile),
        6 => rows_of::<6>(a, stride, pairs, b, tile),
        5 => rows_of::<5>(a, stride, pairs, b, tile),
        4 => rows_of::<4>(a, stride, pairs, b, tile),
        3 => rows_of::<3>(a, stride, pairs, b, tile),
        2 => rows_of::<2>(a, stride, pairs, b, tile),
        _ => rows_of::<1>(a, stride, pairs, b, tile),
    }
}

#[target_feature(enable = "avx512f,avx512bf16")]
fn rows_of<const R: usize>(a: &[u32], stride: usize, pairs: usize, b: &[u32], tile: &mut Tile) {
    assert!(R >= 1 && a.len() >= (R - 1) * stride + pairs && b.len() >= pairs * NR);
    let mut acc = [[_mm512_setzero_ps(); 3]; R];
    for j in 0..pairs {
        // SAFETY: j * NR + 48 <= b.len() and i * stride + j < a.len(), asserted above.
        unsafe {
            let bp = b.as_ptr().add(j * NR);
            let b0 = std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(bp.cast()));
            let b1 =
                std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(bp.add(16).cast()));
            let b2 =
                std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(bp.add(32).cast()));
            for (i, acc) in acc.iter_mut().enumerate() {
                let x = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(
                    *a.get_unchecked(i * stride + j) as i32,
                ));
                acc[0] = _mm512_dpbf16_ps(acc[0], x, b0);
                acc[1] = _mm512_dpbf16_ps(acc[1], x, b1);
                acc[2] = _mm512_dpbf16_ps(acc[2], x, b2);
            }
        }
    }
    for (out, acc) in tile.iter_mut().zip(&acc) {
        for (v, chunk) in acc.iter().zip(out.chunks_exact_mut(16)) {
            // SAFETY: chunk holds 16 f32.
            unsafe { _mm512_storeu_ps(chunk.as_mut_ptr(), *v) };
        }
    }
}

/// One row of f32 rounded to bf16 pairs (`vcvtneps2bf16`), zero-padded.
///
/// # Safety
/// The CPU must have AVX-512 F and BF16.
#[target_feature(enable = "avx512f,avx512bf16")]
pub(super) unsafe fn round_row(x: &[f32], dst: &mut [u32]) {
    let full = (x.len() / 32).min(dst.len() / 16);
    for c in 0..full {
        // SAFETY: 32 floats from c * 32 and 16 words from c * 16 are in bounds.
        unsafe {
            let lo = _mm512_loadu_ps(x.as_ptr().add(c * 32));
            let hi = _mm512_loadu_ps(x.as_ptr().add(c * 32 + 16));
            // Lower 16 results from the second operand.
            let packed = _mm512_cvtne2ps_pbh(hi, lo);
            _mm512_storeu_si512(
                dst.as_mut_ptr().add(c * 16).cast(),
                std::mem::transmute::<__m512bh, __m512i>(packed),
            );
        }
    }
    super::portable::round_row(&x[full * 32..], &mut dst[full * 16..]);
}
