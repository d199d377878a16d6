//! Linear layers in bf16: weights stored as bf16, each matmul's input rounded to bf16, products
//! accumulated in f32 (the residual stream, norms, attention and softmax stay f32).
//!
//! On CPUs with AVX-512 BF16 (`vdpbf16ps`: 32 bf16 products per instruction where an f32 FMA does
//! 16), the kernel here runs the matmuls at up to twice the f32 rate; on this project's 2-core
//! build machine (Zen 4) a register-bound loop of it peaks at about 230 GFLOP/s per core against
//! 115 for f32 FMA. Elsewhere a portable loop computes the same sums, so results do not depend on
//! the CPU beyond the order of f32 additions.
//!
//! Layout: the `[out, in]` weight is packed once, at load, into panels of [`NR`] output columns;
//! within a panel, input positions go in pairs `(2j, 2j + 1)`, one 32-bit word per column and pair,
//! which is what `vdpbf16ps` multiplies against a broadcast pair of input values.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::ops::SharedMut;

/// Output columns per panel: three 16-lane f32 vectors.
pub const NR: usize = 48;
/// Input rows per micro-kernel call: 8 rows x 3 vectors = 24 accumulators of the 32 registers.
const MR: usize = 8;
/// Rows per parallel task (with one panel): enough that a task amortizes its start.
const ROWS_PER_TASK: usize = 128;

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

/// Two bf16 values in one word: `lo` in the low half, as `vdpbf16ps` reads pairs.
fn pair(lo: f32, hi: f32) -> u32 {
    to_bf16(lo) as u32 | ((to_bf16(hi) as u32) << 16)
}

/// Whether this CPU runs the AVX-512 BF16 kernel (else the portable loop runs).
pub fn has_fast_kernel() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A linear layer `y = x . W^T + b` with `W` packed as bf16 panels.
#[derive(Debug, Clone)]
pub struct Bf16Linear {
    outputs: usize,
    inputs: usize,
    /// Input pairs: `ceil(inputs / 2)`.
    pairs: usize,
    /// `[panel][pair][NR]` words; columns and inputs past the end are zero.
    packed: Vec<u32>,
    bias: Option<Vec<f32>>,
}

impl Bf16Linear {
    /// Packs a row-major `[outputs, inputs]` weight.
    ///
    /// # Panics
    /// If `weight` does not hold `outputs * inputs` values or `bias` not `outputs`
    /// ([`Self::from_tensors`] checks shapes and returns an error instead).
    pub fn new(weight: &[f32], outputs: usize, inputs: usize, bias: Option<Vec<f32>>) -> Self {
        assert_eq!(weight.len(), outputs * inputs, "weight is not [{outputs}, {inputs}]");
        if let Some(b) = &bias {
            assert_eq!(b.len(), outputs, "bias is not [{outputs}]");
        }
        let pairs = inputs.div_ceil(2);
        let panels = outputs.div_ceil(NR);
        let mut packed = vec![0u32; panels * pairs * NR];
        let at = |n: usize, k: usize| if k < inputs { weight[n * inputs + k] } else { 0.0 };
        for n in 0..outputs {
            let (panel, col) = (n / NR, n % NR);
            for j in 0..pairs {
                packed[(panel * pairs + j) * NR + col] = pair(at(n, 2 * j), at(n, 2 * j + 1));
            }
        }
        Self { outputs, inputs, pairs, packed, bias }
    }

    /// Packs a `[outputs, inputs]` f32 tensor and an optional `[outputs]` bias.
    pub fn from_tensors(weight: &Tensor, bias: Option<&Tensor>) -> candle_core::Result<Self> {
        let (outputs, inputs) = weight.dims2()?;
        let w = weight.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let b = bias
            .map(|b| b.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>())
            .transpose()?;
        if b.as_ref().is_some_and(|b| b.len() != outputs) {
            candle_core::bail!("bias does not have {outputs} entries");
        }
        Ok(Self::new(&w, outputs, inputs, b))
    }

    pub fn outputs(&self) -> usize {
        self.outputs
    }

    pub fn inputs(&self) -> usize {
        self.inputs
    }

    /// `x [rows, inputs]` (row-major) -> `[rows, outputs]`.
    ///
    /// # Panics
    /// If `x` does not hold `rows * inputs` values ([`Self::forward`] checks and errs instead).
    pub fn forward_slice(&self, x: &[f32], rows: usize) -> Vec<f32> {
        self.forward_with(x, rows, has_fast_kernel())
    }

    /// [`Self::forward_slice`] through the portable loop whatever the CPU (the same bits; for
    /// tests and benchmarks).
    pub fn forward_portable(&self, x: &[f32], rows: usize) -> Vec<f32> {
        self.forward_with(x, rows, false)
    }

    fn forward_with(&self, x: &[f32], rows: usize, fast: bool) -> Vec<f32> {
        assert_eq!(x.len(), rows * self.inputs, "input is not [{rows}, {}]", self.inputs);
        self.forward_rounded(&self.round_input(x, rows), rows, fast)
    }

    /// The layer on an input already rounded by [`Self::round_input`] (layers that read the same
    /// input share one rounding: see [`forward_shared`]).
    fn forward_rounded(&self, xb: &[u32], rows: usize, fast: bool) -> Vec<f32> {
        if self.inputs == 0 {
            return match &self.bias {
                Some(bias) => bias.iter().copied().cycle().take(rows * self.outputs).collect(),
                None => vec![0.0; rows * self.outputs],
            };
        }
        panel_tasks(self.outputs, self.inputs, rows, |panel, row0, row_end, out| {
            // SAFETY: `panel_tasks` hands each task its own rows of its own panel's columns.
            unsafe { self.run_panel(None, xb, panel, row0..row_end, out, fast) }
        })
    }

    /// The input rounded to bf16, `[rows][pairs]` words, a zero after an odd last input.
    fn round_input(&self, x: &[f32], rows: usize) -> Vec<u32> {
        let mut xb = vec![0u32; rows * self.pairs];
        if self.pairs == 0 {
            return xb;
        }
        let convert = |(row, dst): (usize, &mut [u32])| {
            round_row(&x[row * self.inputs..(row + 1) * self.inputs], dst)
        };
        if rows * self.inputs >= 1 << 15 {
            xb.par_chunks_mut(self.pairs).enumerate().for_each(convert);
        } else {
            xb.chunks_mut(self.pairs).enumerate().for_each(convert);
        }
        xb
    }

    /// Rows `rows` of one panel's columns, written into `dst`: this layer's output, or with
    /// `up`, `silu(x . W^T + b) * (x . U^T + bu)` (this layer the gate).
    ///
    /// # Safety
    /// `dst` must point at a `[rows, outputs]` buffer that no one else writes in this block.
    unsafe fn run_panel(
        &self,
        up: Option<&Bf16Linear>,
        xb: &[u32],
        panel: usize,
        rows: std::ops::Range<usize>,
        dst: SharedMut,
        fast: bool,
    ) {
        let col0 = panel * NR;
        let cols = NR.min(self.outputs - col0);
        let (mut tile, mut tile_up) = ([[0f32; NR]; MR], [[0f32; NR]; MR]);
        let mut r = rows.start;
        while r < rows.end {
            let n = MR.min(rows.end - r);
            let a = &xb[r * self.pairs..(r + n) * self.pairs];
            compute_tile(a, n, self.pairs, self.panel(panel), &mut tile, fast);
            if let Some(up) = up {
                compute_tile(a, n, self.pairs, up.panel(panel), &mut tile_up, fast);
            }
            for i in 0..n {
                add_bias(&mut tile[i][..cols], self.bias.as_deref(), col0);
                // SAFETY: row r + i < rows and columns col0..col0 + cols <= outputs.
                let out = unsafe {
                    std::slice::from_raw_parts_mut(dst.at((r + i) * self.outputs + col0), cols)
                };
                match up {
                    Some(up) => {
                        add_bias(&mut tile_up[i][..cols], up.bias.as_deref(), col0);
                        // The same function as the separate SwiGLU pass: the same bits.
                        super::ops::swiglu_slice(&tile[i][..cols], &tile_up[i][..cols], out);
                    }
                    None => out.copy_from_slice(&tile[i][..cols]),
                }
            }
            r += n;
        }
    }

    /// `x [rows, inputs]` -> `[rows, outputs]` as a candle op (CPU, f32).
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.contiguous()?.apply_op1_no_bwd(&Bf16Matmul(self))
    }

    /// The packed words of one panel.
    fn panel(&self, panel: usize) -> &[u32] {
        &self.packed[panel * self.pairs * NR..(panel + 1) * self.pairs * NR]
    }
}

/// Adds the columns `col0..` of `bias` (if any) to `row`.
fn add_bias(row: &mut [f32], bias: Option<&[f32]>, col0: usize) {
    if let Some(bias) = bias {
        row.iter_mut().zip(&bias[col0..]).for_each(|(v, b)| *v += b);
    }
}

/// Runs `task(panel, row0, row_end, dst)` over every (panel of [`NR`] columns, block of
/// [`ROWS_PER_TASK`] rows) of a `[rows, outputs]` result, in parallel when the work is large
/// enough, and returns the result. Each task must write every element of its block.
fn panel_tasks(
    outputs: usize,
    inputs: usize,
    rows: usize,
    task: impl Fn(usize, usize, usize, SharedMut) + Sync,
) -> Vec<f32> {
    // Not zeroed first: the tasks write every element (zeroing cost 3% of a forward at BBT's
    // shapes, a pass over the largest buffers for nothing).
    let mut dst: Vec<f32> = Vec::with_capacity(rows * outputs);
    let panels = outputs.div_ceil(NR);
    let tasks: Vec<(usize, usize)> =
        (0..panels).flat_map(|p| (0..rows).step_by(ROWS_PER_TASK).map(move |r| (p, r))).collect();
    let out = SharedMut(dst.as_mut_ptr());
    let run = |&(panel, row0): &(usize, usize)| {
        task(panel, row0, (row0 + ROWS_PER_TASK).min(rows), out);
    };
    if rows * outputs * inputs >= 1 << 16 && tasks.len() > 1 {
        tasks.par_iter().for_each(run);
    } else {
        tasks.iter().for_each(run);
    }
    // SAFETY: the tasks cover every (row block, panel) pair and each writes all its elements
    // (the contract above), the panels together all `outputs` columns.
    unsafe { dst.set_len(rows * outputs) };
    dst
}

/// The first `n` rows of `tile` from `n` rows of rounded input `a` and one panel `b`.
fn compute_tile(
    a: &[u32],
    n: usize,
    pairs: usize,
    b: &[u32],
    tile: &mut [[f32; NR]; MR],
    fast: bool,
) {
    if fast {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX-512 F and BF16 (`fast`); `a` holds n rows of `pairs` words,
        // `b` one panel of `pairs * NR` words (the kernel asserts both).
        unsafe {
            match n {
                8 => avx512::tile::<8>(a, pairs, b, tile),
                7 => avx512::tile::<7>(a, pairs, b, tile),
                6 => avx512::tile::<6>(a, pairs, b, tile),
                5 => avx512::tile::<5>(a, pairs, b, tile),
                4 => avx512::tile::<4>(a, pairs, b, tile),
                3 => avx512::tile::<3>(a, pairs, b, tile),
                2 => avx512::tile::<2>(a, pairs, b, tile),
                _ => avx512::tile::<1>(a, pairs, b, tile),
            }
            return;
        }
    }
    portable_tile(a, n, pairs, b, tile);
}

/// Checks that `x` is a CPU `[rows, inputs]` f32 tensor for layers taking `inputs`, and runs `f`
/// on its data.
fn with_input<R>(
    x: &Tensor,
    inputs: usize,
    f: impl FnOnce(&[f32], usize) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let x = x.contiguous()?;
    let (rows, width) = x.dims2()?;
    if width != inputs {
        candle_core::bail!("bf16 linear: input [{rows}, {width}], weight takes {inputs}");
    }
    let (storage, layout) = x.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(cpu) => {
            f(super::ops::f32_slice(cpu, layout, "bf16 linear input")?, rows)
        }
        _ => candle_core::bail!("bf16 linear: input must be on the CPU"),
    }
}

/// Several layers on the same input `x [rows, inputs]`, which is rounded to bf16 once (Llama's
/// q, k and v projections). The same results as each layer's [`Bf16Linear::forward`].
pub fn forward_shared(layers: &[&Bf16Linear], x: &Tensor) -> candle_core::Result<Vec<Tensor>> {
    let Some(first) = layers.first() else { return Ok(Vec::new()) };
    if layers.iter().any(|l| l.inputs != first.inputs) {
        candle_core::bail!("bf16 layers sharing an input must take the same width");
    }
    with_input(x, first.inputs, |data, rows| {
        let xb = first.round_input(data, rows);
        let fast = has_fast_kernel();
        layers
            .iter()
            .map(|l| {
                let out = l.forward_rounded(&xb, rows, fast);
                Tensor::from_vec(out, (rows, l.outputs), x.device())
            })
            .collect()
    })
}

/// `silu(x . G^T + bg) * (x . U^T + bu)` (Llama's gated MLP input) in one pass: each output
/// tile of the gate and of the up projection is combined as it is computed, so neither
/// `[rows, outputs]` intermediate is written out. The same bits as the two layers followed by
/// [`super::ops::swiglu`].
pub fn forward_swiglu(
    gate: &Bf16Linear,
    up: &Bf16Linear,
    x: &Tensor,
) -> candle_core::Result<Tensor> {
    if (gate.inputs, gate.outputs) != (up.inputs, up.outputs) {
        candle_core::bail!(
            "gate [{}, {}] and up [{}, {}] projections differ in shape",
            gate.outputs,
            gate.inputs,
            up.outputs,
            up.inputs
        );
    }
    with_input(x, gate.inputs, |data, rows| {
        let out = swiglu_slice_rows(gate, up, data, rows, has_fast_kernel());
        Tensor::from_vec(out, (rows, gate.outputs), x.device())
    })
}

fn swiglu_slice_rows(
    gate: &Bf16Linear,
    up: &Bf16Linear,
    x: &[f32],
    rows: usize,
    fast: bool,
) -> Vec<f32> {
    if gate.inputs == 0 {
        let g = gate.forward_with(x, rows, fast);
        let u = up.forward_with(x, rows, fast);
        let mut out = vec![0f32; g.len()];
        super::ops::swiglu_slice(&g, &u, &mut out);
        return out;
    }
    let xb = gate.round_input(x, rows);
    panel_tasks(gate.outputs, gate.inputs, rows, |panel, row0, row_end, out| {
        // SAFETY: `panel_tasks` hands each task its own rows of its own panel's columns.
        unsafe { gate.run_panel(Some(up), &xb, panel, row0..row_end, out, fast) }
    })
}

/// One row rounded to bf16 pairs.
fn round_row(x: &[f32], dst: &mut [u32]) {
    #[cfg(target_arch = "x86_64")]
    if has_fast_kernel() {
        // SAFETY: the CPU has AVX-512 F and BF16.
        return unsafe { avx512::round_row(x, dst) };
    }
    round_row_portable(x, dst)
}

fn round_row_portable(x: &[f32], dst: &mut [u32]) {
    for (j, d) in dst.iter_mut().enumerate() {
        let lo = x.get(2 * j).copied().unwrap_or(0.0);
        let hi = x.get(2 * j + 1).copied().unwrap_or(0.0);
        *d = pair(lo, hi);
    }
}

/// [`portable_tile_generic`] compiled for AVX2 where the CPU has it (same operations, so the
/// same bits; the build's baseline x86-64 vectorizes it four lanes wide at most).
fn portable_tile(a: &[u32], rows: usize, pairs: usize, b: &[u32], tile: &mut [[f32; NR]; MR]) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2")]
        fn wide(a: &[u32], rows: usize, pairs: usize, b: &[u32], tile: &mut [[f32; NR]; MR]) {
            portable_tile_generic(a, rows, pairs, b, tile)
        }
        if is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2, checked just above.
            return unsafe { wide(a, rows, pairs, b, tile) };
        }
    }
    portable_tile_generic(a, rows, pairs, b, tile)
}

/// The same tile as the AVX-512 kernel, in plain loops and in `vdpbf16ps`'s order (odd product
/// first; each product of two bf16 values is exact in f32), so both give the same bits.
#[inline(always)]
fn portable_tile_generic(
    a: &[u32],
    rows: usize,
    pairs: usize,
    b: &[u32],
    tile: &mut [[f32; NR]; MR],
) {
    for (i, out) in tile.iter_mut().take(rows).enumerate() {
        *out = [0.0; NR];
        for j in 0..pairs {
            let x = a[i * pairs + j];
            let (x0, x1) = (from_bf16(x as u16), from_bf16((x >> 16) as u16));
            for (o, &w) in out.iter_mut().zip(&b[j * NR..(j + 1) * NR]) {
                *o += x1 * from_bf16((w >> 16) as u16);
                *o += x0 * from_bf16(w as u16);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{MR, NR};
    use std::arch::x86_64::*;

    /// `tile[i][c] = sum_j dot(a[i][j], b[j][c])` for the first `R` rows.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) fn tile<const R: usize>(
        a: &[u32],
        pairs: usize,
        b: &[u32],
        tile: &mut [[f32; NR]; MR],
    ) {
        assert!(a.len() >= R * pairs && b.len() >= pairs * NR && R <= MR);
        let mut acc = [[_mm512_setzero_ps(); 3]; R];
        for j in 0..pairs {
            // SAFETY: j * NR + 48 <= b.len() and i * pairs + j < a.len(), asserted above.
            unsafe {
                let bp = b.as_ptr().add(j * NR);
                let b0 = std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(bp.cast()));
                let b1 =
                    std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(bp.add(16).cast()));
                let b2 =
                    std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(bp.add(32).cast()));
                for (i, acc) in acc.iter_mut().enumerate() {
                    let x = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(
                        *a.get_unchecked(i * pairs + j) as i32,
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
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) fn round_row(x: &[f32], dst: &mut [u32]) {
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
        super::round_row_portable(&x[full * 32..], &mut dst[full * 16..]);
    }
}

struct Bf16Matmul<'a>(&'a Bf16Linear);

impl CustomOp1 for Bf16Matmul<'_> {
    fn name(&self) -> &'static str {
        "bf16-linear"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = super::ops::f32_slice(storage, layout, "bf16 linear input")?;
        let (rows, inputs) = layout.shape().dims2()?;
        if inputs != self.0.inputs {
            candle_core::bail!(
                "bf16 linear: input [{rows}, {inputs}], weight takes {}",
                self.0.inputs
            );
        }
        let out = self.0.forward_slice(x, rows);
        Ok((CpuStorage::F32(out), Shape::from((rows, self.0.outputs))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random(n: usize, rng: &mut rand::rngs::StdRng) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    /// The sums the kernel must produce: bf16-rounded operands, exact (f64) accumulation.
    fn reference(
        x: &[f32],
        w: &[f32],
        bias: &[f32],
        rows: usize,
        out: usize,
        k: usize,
    ) -> Vec<f64> {
        let r = |v: f32| from_bf16(to_bf16(v)) as f64;
        let mut y = vec![0f64; rows * out];
        for i in 0..rows {
            for n in 0..out {
                let dot: f64 = (0..k).map(|j| r(x[i * k + j]) * r(w[n * k + j])).sum();
                y[i * out + n] = dot + bias[n] as f64;
            }
        }
        y
    }

    fn check(rows: usize, out: usize, k: usize) {
        let mut rng = rand::rngs::StdRng::seed_from_u64((rows * 7 + out * 3 + k) as u64);
        let (x, w, bias) =
            (random(rows * k, &mut rng), random(out * k, &mut rng), random(out, &mut rng));
        let lin = Bf16Linear::new(&w, out, k, Some(bias.clone()));
        let got = lin.forward_slice(&x, rows);
        let want = reference(&x, &w, &bias, rows, out, k);
        for (i, (g, e)) in got.iter().zip(&want).enumerate() {
            // Only the f32 accumulation order differs from the exact sum of rounded products.
            let tol = 1e-5 * (k as f64).sqrt() * 4.0;
            assert!(((*g as f64) - e).abs() < tol, "[{rows}x{out}x{k}] element {i}: {g} vs {e}");
        }
    }

    #[test]
    fn shared_rounding_and_fused_swiglu_give_the_separate_layers_bits() {
        let dev = candle_core::Device::Cpu;
        // Rows past a multiple of 8 and of a task, a partial panel, an odd width, biases.
        for (rows, out, k) in [(3, 5, 7), (141, 100, 65), (300, 48, 64)] {
            let mut rng = rand::rngs::StdRng::seed_from_u64((rows + out + k) as u64);
            let x = random(rows * k, &mut rng);
            let gate = Bf16Linear::new(&random(out * k, &mut rng), out, k, None);
            let up =
                Bf16Linear::new(&random(out * k, &mut rng), out, k, Some(random(out, &mut rng)));
            let other = Bf16Linear::new(&random(9 * k, &mut rng), 9, k, Some(random(9, &mut rng)));
            let xt = Tensor::from_slice(&x, (rows, k), &dev).unwrap();
            let bits = |t: &Tensor| {
                t.flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|v| v.to_bits())
                    .collect::<Vec<_>>()
            };
            let shared = forward_shared(&[&gate, &other, &up], &xt).unwrap();
            for (layer, got) in [&gate, &other, &up].iter().zip(&shared) {
                assert_eq!(bits(got), bits(&layer.forward(&xt).unwrap()));
            }
            let separate =
                super::super::ops::swiglu(&gate.forward(&xt).unwrap(), &up.forward(&xt).unwrap())
                    .unwrap();
            let fused = forward_swiglu(&gate, &up, &xt).unwrap();
            assert_eq!(fused.dims(), &[rows, out]);
            assert_eq!(bits(&fused), bits(&separate));
            let portable = swiglu_slice_rows(&gate, &up, &x, rows, false);
            assert_eq!(portable.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), bits(&separate));
        }
        // Mismatched shapes are errors.
        let a = Bf16Linear::new(&[0.0; 6], 2, 3, None);
        let b = Bf16Linear::new(&[0.0; 9], 3, 3, None);
        let xt = Tensor::zeros((2, 3), candle_core::DType::F32, &dev).unwrap();
        assert!(forward_swiglu(&a, &b, &xt).is_err());
        assert!(forward_shared(&[&a, &Bf16Linear::new(&[0.0; 4], 2, 2, None)], &xt).is_err());
        assert!(forward_swiglu(
            &a,
            &a,
            &Tensor::zeros((2, 4), candle_core::DType::F32, &dev).unwrap()
        )
        .is_err());
    }

    #[test]
    fn kernel_equals_the_exact_sum_of_rounded_products() {
        // Row tails (1..7 past a multiple of 8), partial panels, odd input widths, one task and
        // many parallel tasks.
        for &(rows, out, k) in
            &[(1, 1, 1), (3, 5, 7), (8, 48, 64), (13, 50, 33), (130, 97, 384), (300, 192, 576)]
        {
            check(rows, out, k);
        }
    }

    /// Whether this CPU runs the AVX-512 BF16 kernel; if not, says loudly that a comparison of
    /// the kernel with the portable loop is skipped (it would compare the loop with itself).
    fn fast_kernel_or_skip(test: &str) -> bool {
        if has_fast_kernel() {
            return true;
        }
        eprintln!(
            "SKIPPED {test}: this CPU lacks AVX-512 BF16, so the dispatched path is the portable \
             loop itself and there is nothing to compare"
        );
        false
    }

    #[test]
    fn portable_loop_matches_the_dispatched_kernel() {
        if !fast_kernel_or_skip("portable_loop_matches_the_dispatched_kernel") {
            return;
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let (rows, out, k) = (11, 60, 45);
        let (x, w) = (random(rows * k, &mut rng), random(out * k, &mut rng));
        let lin = Bf16Linear::new(&w, out, k, None);
        let fast = lin.forward_slice(&x, rows);
        let mut xb = vec![0u32; rows * lin.pairs];
        for (row, d) in xb.chunks_mut(lin.pairs).enumerate() {
            round_row_portable(&x[row * k..(row + 1) * k], d);
        }
        assert_eq!(xb, lin.round_input(&x, rows), "vector and scalar rounding differ");
        let slow = lin.forward_portable(&x, rows);
        // Same products, same order of additions: the same bits.
        assert_eq!(fast, slow);
    }

    #[test]
    fn special_values_round_as_the_vector_instruction_does() {
        let specials =
            [f32::MIN_POSITIVE / 4.0, -f32::MIN_POSITIVE / 8.0, f32::INFINITY, f32::NEG_INFINITY];
        assert_eq!(to_bf16(specials[0]), 0);
        assert_eq!(to_bf16(specials[1]), 0x8000);
        assert_eq!(from_bf16(to_bf16(f32::MAX)), f32::INFINITY);
        // A row long enough for the vector path (32 per instruction) plus a scalar tail, with
        // the special values in both parts.
        let mut x: Vec<f32> = (0..70).map(|i| i as f32 * 0.37 - 9.0).collect();
        for (i, v) in specials.iter().enumerate() {
            x[i * 5] = *v;
            x[40 + i * 7] = *v;
        }
        x[64] = specials[1];
        x[66] = f32::NAN;
        x[69] = specials[0];
        if !fast_kernel_or_skip("special_values_round_as_the_vector_instruction_does (vector part)")
        {
            return;
        }
        let mut scalar = vec![0u32; 35];
        round_row_portable(&x, &mut scalar);
        let mut dispatched = vec![0u32; 35];
        round_row(&x, &mut dispatched);
        assert_eq!(scalar, dispatched);
    }

    #[test]
    fn a_layer_without_inputs_returns_its_bias() {
        let lin = Bf16Linear::new(&[], 3, 0, Some(vec![1.0, 2.0, 3.0]));
        assert_eq!(lin.forward_slice(&[], 2), vec![1.0, 2.0, 3.0, 1.0, 2.0, 3.0]);
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to the even (1.0).
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        // 1 + 3 * 2^-8 ties up to 1 + 2^-6 (even mantissa).
        assert_eq!(to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
        assert_eq!(from_bf16(to_bf16(-2.5)), -2.5);
    }

    #[test]
    fn candle_op_matches_the_slice_path() {
        let dev = candle_core::Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (9, 20), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (30, 20), &dev).unwrap();
        let lin = Bf16Linear::from_tensors(&w, None).unwrap();
        let via_op = lin.forward(&x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let direct = lin.forward_slice(&x.flatten_all().unwrap().to_vec1::<f32>().unwrap(), 9);
        assert_eq!(via_op, direct);
        let f32_out =
            x.matmul(&w.t().unwrap()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (a, b) in via_op.iter().zip(&f32_out) {
            // bf16 keeps 8 bits of mantissa: about 0.4% per operand, over 20 products.
            assert!((a - b).abs() < 0.1, "{a} vs {b}");
        }
    }
}
