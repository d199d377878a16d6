//! The per-kernel blocks of a packed linear layer: each computes a block of rows of one panel
//! (`[rows][NR]` f32) from the rounded input and the panel's packed words. The task loop around
//! them, the packing and the candle op are in [`super::packed`].

use super::layout::{RoundedInput, MAX_TILE_ROWS, NR};
use super::Kernel;

#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod portable;

#[cfg(target_arch = "x86_64")]
pub use amx::peak_loop as amx_peak_loop;

/// One block's output rows.
pub(super) type Tile = [[f32; NR]; MAX_TILE_ROWS];

/// A layer's input width in pairs: `pairs` real, `kpairs` padded (the row stride of packed
/// panels and of rounded input rows).
#[derive(Debug, Clone, Copy)]
pub(super) struct Geometry {
    pub pairs: usize,
    pub kpairs: usize,
}

/// Rows a kernel computes per block.
pub(super) fn rows_per_block(kernel: Kernel) -> usize {
    match kernel {
        Kernel::Amx => 16,
        Kernel::Avx512Bf16 | Kernel::Portable => 8,
        Kernel::Avx2 => 6,
    }
}

/// One row of f32 rounded to bf16 pairs (zero-padded past an odd end): the same bits on every
/// path (tested), vectorized where the CPU has AVX-512 BF16.
pub(super) fn round_row(kernel: Kernel, x: &[f32], dst: &mut [u32]) {
    #[cfg(target_arch = "x86_64")]
    if kernel != Kernel::Portable && super::cpu::features().avx512_bf16 {
        // SAFETY: the CPU has AVX-512 F and BF16 (checked just above).
        return unsafe { avx512::round_row(x, dst) };
    }
    let _ = kernel;
    portable::round_row(x, dst)
}

/// One panel made ready for its kernel, computing blocks of its rows.
pub(super) struct Block<'a> {
    kernel: Kernel,
    panel: &'a [u32],
    geometry: Geometry,
    /// The AVX2 kernel's panel widened to f32 once (see [`avx2`]).
    widened: Vec<f32>,
}

impl<'a> Block<'a> {
    /// Prepares `panel` (`[kpairs][NR]` words) for `kernel`, which must be available.
    pub(super) fn start(kernel: Kernel, panel: &'a [u32], geometry: Geometry) -> Self {
        assert!(kernel.available(), "the {} kernel is not available here", kernel.name());
        assert!(panel.len() >= geometry.kpairs * NR);
        let widened = match kernel {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => avx2::widen(panel, geometry.pairs),
            _ => Vec::new(),
        };
        #[cfg(target_arch = "x86_64")]
        if kernel == Kernel::Amx {
            // SAFETY: AMX is available and permitted (asserted above).
            unsafe { amx::configure() };
        }
        Self { kernel, panel, geometry, widened }
    }

    /// Rows `row0..row0 + n` (`n` at most [`rows_per_block`]) into `tile[..n]`; the other rows
    /// of `tile` are left undefined.
    ///
    /// # Panics
    /// If `x` is not in the kernel's form or does not hold those rows.
    pub(super) fn compute(&mut self, x: &RoundedInput, row0: usize, n: usize, tile: &mut Tile) {
        assert!(n >= 1 && n <= rows_per_block(self.kernel));
        let Geometry { pairs, kpairs } = self.geometry;
        match (self.kernel, x) {
            #[cfg(target_arch = "x86_64")]
            (Kernel::Avx2, RoundedInput::Floats(a)) => {
                let width = 2 * pairs;
                let a = &a[row0 * width..(row0 + n) * width];
                // SAFETY: AVX2 and FMA are available (checked in `start`); `a` holds n rows.
                unsafe { avx2::block(a, n, width, pairs, &self.widened, tile) }
            }
            #[cfg(target_arch = "x86_64")]
            (Kernel::Amx, RoundedInput::Pairs(words)) => {
                // The tile reads 16 whole rows: the rounded input is padded to 16 rows.
                let a = &words.as_slice()[row0 * kpairs..(row0 + MAX_TILE_ROWS) * kpairs];
                // SAFETY: AMX is configured on this thread (in `start`); `a` holds 16 rows of
                // `kpairs` words and the panel `kpairs` rows of NR words (asserted there).
                unsafe { amx::block(a, kpairs, self.panel, tile) }
            }
            #[cfg(target_arch = "x86_64")]
            (Kernel::Avx512Bf16, RoundedInput::Pairs(words)) => {
                let a = &words.as_slice()[row0 * kpairs..(row0 + n) * kpairs];
                // SAFETY: AVX-512 BF16 is available (checked in `start`).
                unsafe { avx512::block(a, n, kpairs, pairs, self.panel, tile) }
            }
            (Kernel::Portable, RoundedInput::Pairs(words)) => {
                let a = &words.as_slice()[row0 * kpairs..(row0 + n) * kpairs];
                portable::block(a, n, kpairs, pairs, self.panel, tile)
            }
            (kernel, _) => panic!("the {} kernel got its input in another form", kernel.name()),
        }
    }
}

impl Drop for Block<'_> {
    fn drop(&mut self) {
        #[cfg(target_arch = "x86_64")]
        if self.kernel == Kernel::Amx {
            // SAFETY: AMX was configured in `start` on this thread.
            unsafe { amx::release() };
        }
    }
}
