//! The AMX block: 16 rows x 48 columns in three tiles of f32 accumulators (tmm0-2), one tile of
//! input rows (tmm3) and three of weights (tmm4-6), 16 pairs (32 products) per step. Tile
//! instructions are written with `asm!` (no stable intrinsics); the process asks Linux for tile
//! state first (see [`crate::kernels::cpu`]).
//!
//! `tdpbf16ps` adds its pairs in its own order (not `vdpbf16ps`'s), so the results agree with
//! the portable loop's to f32 rounding, not bit for bit.

use std::arch::asm;

use super::super::layout::{MAX_TILE_ROWS, NR};
use super::Tile;

/// Bytes per tile row: 16 f32, or 16 pairs of bf16.
const ROW_BYTES: u16 = 64;

/// The 64-byte tile configuration `ldtilecfg` reads (palette 1).
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    bytes_per_row: [u16; 16],
    rows: [u8; 16],
}

/// Configures tmm0-7 as 16 rows of 64 bytes (this thread).
///
/// # Safety
/// The CPU must have AMX and the process its permission.
pub(super) unsafe fn configure() {
    let mut cfg = TileConfig {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        bytes_per_row: [0; 16],
        rows: [0; 16],
    };
    for t in 0..8 {
        cfg.bytes_per_row[t] = ROW_BYTES;
        cfg.rows[t] = MAX_TILE_ROWS as u8;
    }
    // SAFETY: `cfg` is a valid palette-1 configuration, 64-byte aligned.
    unsafe { asm!("ldtilecfg [{}]", in(reg) &cfg, options(nostack, readonly, preserves_flags)) };
}

/// Releases this thread's tile state.
///
/// # Safety
/// AMX must have been configured on this thread.
pub(super) unsafe fn release() {
    // SAFETY: the caller configured AMX.
    unsafe { asm!("tilerelease", options(nostack, nomem, preserves_flags)) };
}

/// `tile[i][c] = sum_j dot(a[i][j], b[j][c])` for all 16 rows, over `kpairs` pairs (a multiple
/// of 16; `a`'s row stride and the panel's length in pairs).
///
/// # Safety
/// AMX must be configured on this thread; `a` must hold 16 rows of `kpairs` words and `b` a
/// panel of `kpairs * NR` words.
pub(super) unsafe fn block(a: &[u32], kpairs: usize, b: &[u32], tile: &mut Tile) {
    assert!(
        kpairs.is_multiple_of(16) && a.len() >= MAX_TILE_ROWS * kpairs && b.len() >= kpairs * NR
    );
    let a_stride = kpairs * 4;
    let b_stride = NR * 4;
    // SAFETY (all blocks): tiles configured by the caller; every tile load reads 16 rows of 64
    // bytes inside `a` or `b` (asserted above), the stores 16 rows of 64 bytes inside `tile`
    // (16 rows of NR = 48 f32, the three tiles side by side).
    unsafe {
        asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", options(nostack, nomem));
        for k in (0..kpairs).step_by(16) {
            let bp = b.as_ptr().add(k * NR);
            asm!(
                "tileloadd tmm3, [{a} + {sa} * 1]",
                "tileloadd tmm4, [{b0} + {sb} * 1]",
                "tileloadd tmm5, [{b1} + {sb} * 1]",
                "tileloadd tmm6, [{b2} + {sb} * 1]",
                "tdpbf16ps tmm0, tmm3, tmm4",
                "tdpbf16ps tmm1, tmm3, tmm5",
                "tdpbf16ps tmm2, tmm3, tmm6",
                a = in(reg) a.as_ptr().add(k),
                sa = in(reg) a_stride,
                b0 = in(reg) bp,
                b1 = in(reg) bp.add(16),
                b2 = in(reg) bp.add(32),
                sb = in(reg) b_stride,
                options(nostack, readonly),
            );
        }
        let c = tile.as_mut_ptr().cast::<f32>();
        asm!(
            "tilestored [{c0} + {sc} * 1], tmm0",
            "tilestored [{c1} + {sc} * 1], tmm1",
            "tilestored [{c2} + {sc} * 1], tmm2",
            c0 = in(reg) c,
            c1 = in(reg) c.add(16),
            c2 = in(reg) c.add(32),
            sc = in(reg) NR * 4,
            options(nostack),
        );
    }
}

/// A register-bound loop of `tdpbf16ps` over four accumulator tiles, for the peak: returns the
/// FLOPs done (`iters` x 4 instructions x 16 x 16 x 32 x 2).
///
/// # Safety
/// The CPU must have AMX and the process its permission.
pub unsafe fn peak_loop(iters: u64) -> f64 {
    // SAFETY: the caller checked AMX; the tiles are zeroed, then only multiplied.
    unsafe {
        configure();
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            "tilezero tmm4",
            "tilezero tmm5",
            "tilezero tmm6",
            "tilezero tmm7",
            options(nostack, nomem)
        );
        for _ in 0..iters {
            asm!(
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                options(nostack, nomem)
            );
        }
        release();
    }
    iters as f64 * 4.0 * (16 * 16 * 32 * 2) as f64
}
