//! The linear layer `y = x . W^T + b` with `W` held as bf16, packed once at load in the layout
//! of [`super::layout`]. Each matmul's input is rounded to bf16 once (shared by layers that read
//! the same input) and the products are accumulated in f32.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::layout::{from_bf16, pair, to_bf16, RoundedInput, Words, MAX_TILE_ROWS, NR, PAIR_BLOCK};
use super::ops::SharedMut;
use super::tiles::{self, Tile};
use super::Kernel;

/// Rows per parallel task (with one panel): enough that a task amortizes its start and the
/// AVX2 kernel's widening of the panel.
const ROWS_PER_TASK: usize = 128;

/// A linear layer with `W` packed as bf16 panels for one [`Kernel`].
#[derive(Debug, Clone)]
pub struct PackedLinear {
    kernel: Kernel,
    outputs: usize,
    inputs: usize,
    /// Input pairs: `ceil(inputs / 2)`.
    pairs: usize,
    /// Pairs per panel row block, padded: `pairs` rounded up to a multiple of 16.
    kpairs: usize,
    /// `[panel][kpairs][NR]` words; columns and inputs past the end are zero.
    packed: Words,
    bias: Option<Vec<f32>>,
}

impl PackedLinear {
    /// Packs a row-major `[outputs, inputs]` weight for `kernel`.
    ///
    /// # Panics
    /// If `weight` does not hold `outputs * inputs` values, `bias` not `outputs`, or this CPU
    /// cannot run `kernel` ([`Self::from_tensors`] checks all three and returns an error).
    pub fn new(
        weight: &[f32],
        outputs: usize,
        inputs: usize,
        bias: Option<Vec<f32>>,
        kernel: Kernel,
    ) -> Self {
        assert_eq!(weight.len(), outputs * inputs, "weight is not [{outputs}, {inputs}]");
        assert!(kernel.available(), "this CPU cannot run the {} kernel", kernel.name());
        if let Some(b) = &bias {
            assert_eq!(b.len(), outputs, "bias is not [{outputs}]");
        }
        let pairs = inputs.div_ceil(2);
        let kpairs = pairs.div_ceil(PAIR_BLOCK) * PAIR_BLOCK;
        let panels = outputs.div_ceil(NR);
        let mut packed = Words::zeroed(panels * kpairs * NR);
        let words = packed.as_mut_slice();
        let at = |n: usize, k: usize| if k < inputs { weight[n * inputs + k] } else { 0.0 };
        for n in 0..outputs {
            let (panel, col) = (n / NR, n % NR);
            for j in 0..pairs {
                words[(panel * kpairs + j) * NR + col] = pair(at(n, 2 * j), at(n, 2 * j + 1));
            }
        }
        Self { kernel, outputs, inputs, pairs, kpairs, packed, bias }
    }

    /// Packs a `[outputs, inputs]` tensor and an optional `[outputs]` bias for `kernel`.
    pub fn from_tensors(
        weight: &Tensor,
        bias: Option<&Tensor>,
        kernel: Kernel,
    ) -> candle_core::Result<Self> {
        let (outputs, inputs) = weight.dims2()?;
        if !weight.device().is_cpu() {
            candle_core::bail!("bf16 weights are implemented for the CPU only");
        }
        if !kernel.available() {
            candle_core::bail!("this CPU cannot run the {} kernel", kernel.name());
        }
        let w = weight.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let b = bias
            .map(|b| b.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>())
            .transpose()?;
        if b.as_ref().is_some_and(|b| b.len() != outputs) {
            candle_core::bail!("bias does not have {outputs} entries");
        }
        Ok(Self::new(&w, outputs, inputs, b, kernel))
    }

    pub fn outputs(&self) -> usize {
        self.outputs
    }

    pub fn inputs(&self) -> usize {
        self.inputs
    }

    pub fn kernel(&self) -> Kernel {
        self.kernel
    }

    /// The same weights for another kernel (every kernel reads the same packing).
    ///
    /// # Panics
    /// If this CPU cannot run `kernel`.
    pub fn with_kernel(&self, kernel: Kernel) -> Self {
        assert!(kernel.available(), "this CPU cannot run the {} kernel", kernel.name());
        Self { kernel, ..self.clone() }
    }

    /// `x [rows, inputs]` (row-major) -> `[rows, outputs]`.
    ///
    /// # Panics
    /// If `x` does not hold `rows * inputs` values ([`Self::forward`] checks and errs instead).
    pub fn forward_slice(&self, x: &[f32], rows: usize) -> Vec<f32> {
        assert_eq!(x.len(), rows * self.inputs, "input is not [{rows}, {}]", self.inputs);
        self.forward_rounded(&self.round_input(x, rows), rows)
    }

    /// The layer on an input already rounded by [`Self::round_input`] (layers that read the same
    /// input share one rounding: see [`forward_shared`]).
    fn forward_rounded(&self, x: &RoundedInput, rows: usize) -> Vec<f32> {
        if self.inputs == 0 {
            return match &self.bias {
                Some(bias) => bias.iter().copied().cycle().take(rows * self.outputs).collect(),
                None => vec![0.0; rows * self.outputs],
            };
        }
        panel_tasks(self.outputs, self.inputs, rows, |panel, row0, row_end, out| {
            // SAFETY: `panel_tasks` hands each task its own rows of its own panel's columns.
            unsafe { self.run_panel(None, x, panel, row0..row_end, out) }
        })
    }

    /// The input rounded to bf16 in the form this layer's kernel reads.
    fn round_input(&self, x: &[f32], rows: usize) -> RoundedInput {
        let parallel = rows * self.inputs >= 1 << 15;
        match self.kernel {
            Kernel::Avx2 => {
                let width = 2 * self.pairs;
                let mut out = vec![0f32; rows * width];
                let convert = |(row, dst): (usize, &mut [f32])| {
                    let src = &x[row * self.inputs..(row + 1) * self.inputs];
                    dst.iter_mut().zip(src).for_each(|(d, &s)| *d = from_bf16(to_bf16(s)));
                };
                if width > 0 && parallel {
                    out.par_chunks_mut(width).enumerate().for_each(convert);
                } else if width > 0 {
                    out.chunks_mut(width).enumerate().for_each(convert);
                }
                RoundedInput::Floats(out)
            }
            _ => {
                let padded_rows = rows.div_ceil(MAX_TILE_ROWS) * MAX_TILE_ROWS;
                let mut words = Words::zeroed(padded_rows * self.kpairs);
                if self.kpairs > 0 {
                    let kernel = self.kernel;
                    let convert = |(row, dst): (usize, &mut [u32])| {
                        if row < rows {
                            let src = &x[row * self.inputs..(row + 1) * self.inputs];
                            tiles::round_row(kernel, src, &mut dst[..self.pairs]);
                        }
                    };
                    let slice = words.as_mut_slice();
                    if parallel {
                        slice.par_chunks_mut(self.kpairs).enumerate().for_each(convert);
                    } else {
                        slice.chunks_mut(self.kpairs).enumerate().for_each(convert);
                    }
                }
                RoundedInput::Pairs(words)
            }
        }
    }

    /// Rows `rows` of one panel's columns, written into `dst`: this layer's output, or with
    /// `up`, `silu(x . W^T + b) * (x . U^T + bu)` (this layer the gate).
    ///
    /// # Safety
    /// `dst` must point at a `[rows, outputs]` buffer that no one else writes in this block.
    unsafe fn run_panel(
        &self,
        up: Option<&PackedLinear>,
        x: &RoundedInput,
        panel: usize,
        rows: std::ops::Range<usize>,
        dst: SharedMut,
    ) {
        let col0 = panel * NR;
        let cols = NR.min(self.outputs - col0);
        let geometry = tiles::Geometry { pairs: self.pairs, kpairs: self.kpairs };
        let mut block = tiles::Block::start(self.kernel, self.panel(panel), geometry);
        let mut block_up = up.map(|u| tiles::Block::start(self.kernel, u.panel(panel), geometry));
        let (mut tile, mut tile_up): (Box<Tile>, Box<Tile>) =
            (Box::new([[0.0; NR]; MAX_TILE_ROWS]), Box::new([[0.0; NR]; MAX_TILE_ROWS]));
        let step = tiles::rows_per_block(self.kernel);
        let mut r = rows.start;
        while r < rows.end {
            let n = step.min(rows.end - r);
            block.compute(x, r, n, &mut tile);
            if let Some(block_up) = &mut block_up {
                block_up.compute(x, r, n, &mut tile_up);
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
        x.contiguous()?.apply_op1_no_bwd(&PackedMatmul(self))
    }

    /// The packed words of one panel.
    fn panel(&self, panel: usize) -> &[u32] {
        &self.packed.as_slice()[panel * self.kpairs * NR..(panel + 1) * self.kpairs * NR]
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
/// q, k and v projections). The same results as each layer's [`PackedLinear::forward`].
pub fn forward_shared(layers: &[&PackedLinear], x: &Tensor) -> candle_core::Result<Vec<Tensor>> {
    let Some(first) = layers.first() else { return Ok(Vec::new()) };
    if layers.iter().any(|l| l.inputs != first.inputs || l.kernel != first.kernel) {
        candle_core::bail!("bf16 layers sharing an input must take the same width and kernel");
    }
    with_input(x, first.inputs, |data, rows| {
        let xb = first.round_input(data, rows);
        layers
            .iter()
            .map(|l| {
                let out = l.forward_rounded(&xb, rows);
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
    gate: &PackedLinear,
    up: &PackedLinear,
    x: &Tensor,
) -> candle_core::Result<Tensor> {
    if (gate.inputs, gate.outputs, gate.kernel) != (up.inputs, up.outputs, up.kernel) {
        candle_core::bail!(
            "gate [{}, {}] and up [{}, {}] projections differ in shape or kernel",
            gate.outputs,
            gate.inputs,
            up.outputs,
            up.inputs
        );
    }
    with_input(x, gate.inputs, |data, rows| {
        let out = swiglu_slice_rows(gate, up, data, rows);
        Tensor::from_vec(out, (rows, gate.outputs), x.device())
    })
}

fn swiglu_slice_rows(gate: &PackedLinear, up: &PackedLinear, x: &[f32], rows: usize) -> Vec<f32> {
    if gate.inputs == 0 {
        let g = gate.forward_slice(x, rows);
        let u = up.forward_slice(x, rows);
        let mut out = vec![0f32; g.len()];
        super::ops::swiglu_slice(&g, &u, &mut out);
        return out;
    }
    let xb = gate.round_input(x, rows);
    panel_tasks(gate.outputs, gate.inputs, rows, |panel, row0, row_end, out| {
        // SAFETY: `panel_tasks` hands each task its own rows of its own panel's columns.
        unsafe { gate.run_panel(Some(up), &xb, panel, row0..row_end, out) }
    })
}

struct PackedMatmul<'a>(&'a PackedLinear);

impl CustomOp1 for PackedMatmul<'_> {
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

/// The largest difference from the portable loop a correct kernel shows on the self-check's
/// layer (f32 rounding in another order; a broken kernel is off by whole units).
const SELF_CHECK_TOLERANCE: f32 = 1e-4;

/// Runs `kernel` and the portable loop on a layer with ragged edges (150 rows: a task and a
/// partial block; 100 columns: a partial panel; 77 inputs: an odd width, pairs past a tile)
/// and compares them.
pub(super) fn self_check(kernel: Kernel) -> Result<(), String> {
    let (rows, outputs, inputs) = (150, 100, 77);
    // A fixed, cheap pseudo-random fill in [-1, 1) (no RNG state to share).
    let fill = |n: usize, salt: u32| -> Vec<f32> {
        (0..n as u32)
            .map(|i| {
                let h = (i ^ (salt << 24)).wrapping_mul(0x9E37_79B9).rotate_left(13);
                (h.wrapping_mul(0x85EB_CA6B) >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0
            })
            .collect()
    };
    let (x, w, b) = (fill(rows * inputs, 1), fill(outputs * inputs, 2), fill(outputs, 3));
    let layer = PackedLinear::new(&w, outputs, inputs, Some(b), kernel);
    let got = layer.forward_slice(&x, rows);
    let want = layer.with_kernel(Kernel::Portable).forward_slice(&x, rows);
    judge(kernel, &got, &want)
}

/// Whether a kernel's self-check output `got` agrees with the portable loop's `want`.
fn judge(kernel: Kernel, got: &[f32], want: &[f32]) -> Result<(), String> {
    let worst = if got.len() != want.len() {
        f32::INFINITY
    } else {
        got.iter()
            .zip(want)
            .map(
                |(g, w)| {
                    if g.is_finite() {
                        (g - w).abs() / (1.0 + w.abs())
                    } else {
                        f32::INFINITY
                    }
                },
            )
            .fold(0f32, f32::max)
    };
    if worst > SELF_CHECK_TOLERANCE {
        return Err(format!(
            "the {} kernel differs from the portable loop by {worst:e} (relative) on its \
             self-check layer",
            kernel.name()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random(n: usize, rng: &mut rand::rngs::StdRng) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// The kernels other than the portable loop that this CPU runs; says loudly which are
    /// skipped (a comparison with the portable loop would compare it with itself).
    fn fast_kernels(test: &str) -> Vec<Kernel> {
        let mut out = Vec::new();
        for k in [Kernel::Amx, Kernel::Avx512Bf16, Kernel::Avx2] {
            if k.available() {
                out.push(k);
            } else {
                eprintln!("SKIPPED {test} for the {} kernel: this CPU lacks it", k.name());
            }
        }
        out
    }

    /// The sums a kernel must produce: bf16-rounded operands, exact (f64) accumulation.
    fn exact(x: &[f32], w: &[f32], bias: &[f32], rows: usize, out: usize, k: usize) -> Vec<f64> {
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

    /// Ragged shapes: rows past a multiple of 6, 8 and 16 and of a task, partial panels, odd
    /// input widths, widths past a multiple of 32 (a tile's pairs), one task and many.
    const SHAPES: [(usize, usize, usize); 7] = [
        (1, 1, 1),
        (3, 5, 7),
        (8, 48, 64),
        (13, 50, 33),
        (17, 97, 95),
        (130, 97, 384),
        (300, 192, 577),
    ];

    #[test]
    fn the_portable_loop_equals_the_exact_sum_of_rounded_products() {
        for &(rows, out, k) in &SHAPES {
            let mut rng = rand::rngs::StdRng::seed_from_u64((rows * 7 + out * 3 + k) as u64);
            let (x, w, bias) =
                (random(rows * k, &mut rng), random(out * k, &mut rng), random(out, &mut rng));
            let lin = PackedLinear::new(&w, out, k, Some(bias.clone()), Kernel::Portable);
            let got = lin.forward_slice(&x, rows);
            for (i, (g, e)) in got.iter().zip(&exact(&x, &w, &bias, rows, out, k)).enumerate() {
                // Only the f32 accumulation order differs from the exact sum.
                let tol = 1e-5 * (k as f64).sqrt() * 4.0;
                assert!(((*g as f64) - e).abs() < tol, "[{rows}x{out}x{k}] {i}: {g} vs {e}");
            }
        }
    }

    #[test]
    fn every_kernel_matches_the_portable_loop_on_ragged_shapes() {
        for kernel in fast_kernels("every_kernel_matches_the_portable_loop_on_ragged_shapes") {
            for &(rows, out, k) in &SHAPES {
                let mut rng = rand::rngs::StdRng::seed_from_u64((rows + out * 5 + k * 11) as u64);
                let (x, w, bias) =
                    (random(rows * k, &mut rng), random(out * k, &mut rng), random(out, &mut rng));
                let lin = PackedLinear::new(&w, out, k, Some(bias), kernel);
                let got = lin.forward_slice(&x, rows);
                let want = lin.with_kernel(Kernel::Portable).forward_slice(&x, rows);
                assert_eq!(got.len(), want.len());
                if kernel == Kernel::Amx {
                    // Tiles add their pairs in their own order: f32 rounding apart.
                    for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                        let tol = 1e-5 * (k as f32).sqrt() * 4.0;
                        assert!((g - e).abs() < tol, "amx [{rows}x{out}x{k}] {i}: {g} vs {e}");
                    }
                } else {
                    // Same exact products added in the same order: the same bits.
                    assert_eq!(bits(&got), bits(&want), "{} [{rows}x{out}x{k}]", kernel.name());
                }
            }
        }
    }

    #[test]
    fn shared_rounding_and_fused_swiglu_give_the_separate_layers_bits() {
        let dev = candle_core::Device::Cpu;
        let mut kernels = fast_kernels("shared_rounding_and_fused_swiglu (fast kernels)");
        kernels.push(Kernel::Portable);
        for kernel in kernels {
            for (rows, out, k) in [(3, 5, 7), (141, 100, 65), (300, 48, 64)] {
                let mut rng = rand::rngs::StdRng::seed_from_u64((rows + out + k) as u64);
                let x = random(rows * k, &mut rng);
                let pack = |w: Vec<f32>, n: usize, b: Option<Vec<f32>>| {
                    PackedLinear::new(&w, n, k, b, kernel)
                };
                let gate = pack(random(out * k, &mut rng), out, None);
                let up = pack(random(out * k, &mut rng), out, Some(random(out, &mut rng)));
                let other = pack(random(9 * k, &mut rng), 9, Some(random(9, &mut rng)));
                let xt = Tensor::from_slice(&x, (rows, k), &dev).unwrap();
                let tbits = |t: &Tensor| bits(&t.flatten_all().unwrap().to_vec1::<f32>().unwrap());
                let shared = forward_shared(&[&gate, &other, &up], &xt).unwrap();
                for (layer, got) in [&gate, &other, &up].iter().zip(&shared) {
                    assert_eq!(tbits(got), tbits(&layer.forward(&xt).unwrap()));
                }
                let separate = super::super::ops::swiglu(
                    &gate.forward(&xt).unwrap(),
                    &up.forward(&xt).unwrap(),
                )
                .unwrap();
                let fused = forward_swiglu(&gate, &up, &xt).unwrap();
                assert_eq!(fused.dims(), &[rows, out]);
                assert_eq!(tbits(&fused), tbits(&separate), "{}", kernel.name());
            }
        }
        // Mismatched shapes or kernels are errors.
        let a = PackedLinear::new(&[0.0; 6], 2, 3, None, Kernel::Portable);
        let b = PackedLinear::new(&[0.0; 9], 3, 3, None, Kernel::Portable);
        let xt = Tensor::zeros((2, 3), candle_core::DType::F32, &dev).unwrap();
        assert!(forward_swiglu(&a, &b, &xt).is_err());
        let narrow = PackedLinear::new(&[0.0; 4], 2, 2, None, Kernel::Portable);
        assert!(forward_shared(&[&a, &narrow], &xt).is_err());
        if Kernel::Avx2.available() {
            assert!(forward_swiglu(&a, &a.with_kernel(Kernel::Avx2), &xt).is_err());
        }
        let wide = Tensor::zeros((2, 4), candle_core::DType::F32, &dev).unwrap();
        assert!(forward_swiglu(&a, &a, &wide).is_err());
    }

    #[test]
    fn vector_rounding_equals_the_scalar_rounding_on_special_values() {
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
        let mut scalar = vec![0u32; 35];
        tiles::round_row(Kernel::Portable, &x, &mut scalar);
        if !super::super::cpu::features().avx512_bf16 {
            eprintln!("SKIPPED the vector part of vector_rounding_equals_the_scalar_rounding: no AVX-512 BF16");
            return;
        }
        let mut vector = vec![0u32; 35];
        tiles::round_row(Kernel::Avx512Bf16, &x, &mut vector);
        assert_eq!(scalar, vector);
    }

    #[test]
    fn a_layer_without_inputs_returns_its_bias() {
        for kernel in Kernel::available_all() {
            let lin = PackedLinear::new(&[], 3, 0, Some(vec![1.0, 2.0, 3.0]), kernel);
            assert_eq!(lin.forward_slice(&[], 2), vec![1.0, 2.0, 3.0, 1.0, 2.0, 3.0]);
        }
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
    fn the_candle_op_matches_the_slice_path_and_stays_near_f32() {
        let dev = candle_core::Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (9, 20), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (30, 20), &dev).unwrap();
        let f32_out =
            x.matmul(&w.t().unwrap()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for kernel in Kernel::available_all() {
            let lin = PackedLinear::from_tensors(&w, None, kernel).unwrap();
            let via_op = lin.forward(&x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let direct = lin.forward_slice(&x.flatten_all().unwrap().to_vec1::<f32>().unwrap(), 9);
            assert_eq!(via_op, direct);
            for (a, b) in via_op.iter().zip(&f32_out) {
                // bf16 keeps 8 bits of mantissa: about 0.4% per operand, over 20 products.
                assert!((a - b).abs() < 0.1, "{}: {a} vs {b}", kernel.name());
            }
        }
    }

    #[test]
    fn the_self_check_passes_every_available_kernel_and_catches_a_wrong_one() {
        for kernel in Kernel::available_all() {
            assert_eq!(self_check(kernel), Ok(()), "{}", kernel.name());
        }
        let want = vec![1.0f32, -2.0, 3.5, 0.0];
        assert_eq!(judge(Kernel::Amx, &want, &want), Ok(()));
        let mut off = want.clone();
        off[2] += 0.01;
        let e = judge(Kernel::Amx, &off, &want).unwrap_err();
        assert!(e.contains("amx") && e.contains("differs"), "{e}");
        let mut nan = want.clone();
        nan[0] = f32::NAN;
        assert!(judge(Kernel::Avx2, &nan, &want).is_err());
        assert!(judge(Kernel::Avx2, &want[..3], &want).is_err());
    }
}
