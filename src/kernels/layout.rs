//! The packed layout every kernel reads, and the bf16 conversions: the `[out, in]` weight in
//! panels of [`NR`] output columns; within a panel, input positions in pairs `(2j, 2j + 1)`, one
//! 32-bit word per column and pair (the even one in the low half): what `vdpbf16ps` multiplies
//! against a broadcast pair of input values, and, 16 columns and 16 pairs at a time, the layout
//! an AMX tile of B reads (rows 192 bytes apart). Pairs are padded with zeros to a multiple of
//! [`PAIR_BLOCK`] and the buffers are 64-byte aligned, as tile loads want.

/// Output columns per panel: three 16-lane vectors, or three AMX tiles.
pub const NR: usize = 48;
/// Most rows a kernel computes per block (an AMX tile's 16).
pub const MAX_TILE_ROWS: usize = 16;
/// Input pairs per AMX tile row (64 bytes): the packed pairs are a multiple of this.
pub(super) const PAIR_BLOCK: usize = 16;

/// f32 -> bf16 bits as `vcvtneps2bf16` rounds: to nearest even, denormals to signed zero, NaN
/// stays NaN.
pub fn to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    if x.is_subnormal() {
        return ((bits >> 16) & 0x8000) as u16;
    }
    let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1));
    (rounded >> 16) as u16
}

/// bf16 bits -> f32 (exact).
pub fn from_bf16(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// Two bf16 values in one word: `lo` in the low half, as `vdpbf16ps` and AMX read pairs.
pub(super) fn pair(lo: f32, hi: f32) -> u32 {
    to_bf16(lo) as u32 | ((to_bf16(hi) as u32) << 16)
}

#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Line([u32; 16]);

/// 32-bit words in 64-byte aligned lines, zero-initialized.
#[derive(Clone)]
pub(super) struct Words {
    lines: Vec<Line>,
    len: usize,
}

impl Words {
    pub(super) fn zeroed(len: usize) -> Self {
        Self { lines: vec![Line([0; 16]); len.div_ceil(16)], len }
    }

    pub(super) fn as_slice(&self) -> &[u32] {
        // SAFETY: `lines` holds at least `len` u32 (16 per line), contiguous and initialized.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast(), self.len) }
    }

    pub(super) fn as_mut_slice(&mut self) -> &mut [u32] {
        // SAFETY: as in `as_slice`, borrowed mutably.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast(), self.len) }
    }
}

impl std::fmt::Debug for Words {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Words({})", self.len)
    }
}

/// A matmul's input rounded to bf16, in the form its kernel reads.
pub(super) enum RoundedInput {
    /// `[rows padded to MAX_TILE_ROWS][kpairs]` pair words (zero rows and pairs past the end).
    Pairs(Words),
    /// `[rows][2 * pairs]` rounded values as f32 (the AVX2 kernel broadcasts them).
    Floats(Vec<f32>),
}
