//! CPU kernels for the BERT and Llama forwards where candle's general ones are the bottleneck
//! at BBT's shapes (tens of short sequences per pass, two cores):
//! - [`linear`]: the bias rides in the matmul's accumulator instead of a separate single-threaded
//!   broadcast add over the output;
//! - [`varlen_attention`]: attention of each sequence over its own tokens, read straight from the
//!   packed query/key/value rows, one (sequence, head) pair per task: no padding, no mask, no
//!   transposed copies, and no matmul split over threads too small to share;
//! - [`masked_attention`]: the same task split for Llama's grouped-query attention over a
//!   key/value cache, with the mask added inside the softmax pass;
//! - [`gelu_erf`] and [`swiglu`]: vectorized element-wise passes split over rayon's threads.
//!
//! Off the CPU or for other dtypes, [`linear`], [`gelu_erf`] and [`swiglu`] fall back to candle's
//! ops; the attention kernels are CPU-only and their callers keep candle's path elsewhere.
//!
//! candle computes the erf GELU one element at a time through libm's `erf`; in a BERT forward
//! at BBT's shapes that costs about a third as much as all the matmuls together. [`gelu_erf`]
//! evaluates erf as a clamped rational polynomial instead (no `exp`, no branches), which the
//! compiler vectorizes, and splits the work over rayon's threads. Its error against libm's erf is
//! below 1e-6 over the whole real line (tested), under the forward's own f32 rounding noise.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use candle_transformers::models::bert::HiddenAct;
use gemm::Parallelism;
use rayon::prelude::*;

/// Defines `fn $name(args)` that runs `$generic(args)` compiled for the widest vectors this
/// process uses ([`super::cpu::vector_level`]: AVX-512, else AVX2 and FMA), else as built. The
/// same operations in every build (no reassociation), so the same bits. Without FMA, `mul_add`
/// is a libm call per element, and the build's baseline x86-64 has neither, so the element-wise
/// loops below would not vectorize.
macro_rules! with_simd {
    ($(#[$doc:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) => $generic:ident) => {
        $(#[$doc])*
        $vis fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                use super::cpu::{vector_level, VectorLevel};
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
                fn wide($($arg: $ty),*) {
                    $generic($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                fn fast($($arg: $ty),*) {
                    $generic($($arg),*)
                }
                match vector_level() {
                    // SAFETY: the CPU has these features (`vector_level` checked them).
                    VectorLevel::Avx512 => return unsafe { wide($($arg),*) },
                    // SAFETY: as above.
                    VectorLevel::Avx2 => return unsafe { fast($($arg),*) },
                    VectorLevel::Baseline => {}
                }
            }
            $generic($($arg),*)
        }
    };
}

/// Odd numerator coefficients, highest power first (x^13 .. x^1), of the rational erf fit
/// on [-4, 4]; beyond that erf is +-1 to f32 precision.
const ERF_NUM: [f32; 7] = [
    -2.726_142_3e-10,
    2.770_681_4e-8,
    -2.101_024e-6,
    -5.692_506_4e-5,
    -7.349_906_3e-4,
    -2.954_6e-3,
    -1.609_603_3e-2,
];
/// Even denominator coefficients, highest power first (x^8 .. x^0).
const ERF_DEN: [f32; 5] =
    [-1.456_607_2e-5, -2.133_740_6e-4, -1.682_827e-3, -7.373_329_2e-3, -1.426_474e-2];

/// erf(x) to about 1e-7 absolute, branch-free.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = ERF_NUM[0];
    for c in &ERF_NUM[1..] {
        p = p.mul_add(x2, *c);
    }
    let mut q = ERF_DEN[0];
    for c in &ERF_DEN[1..] {
        q = q.mul_add(x2, *c);
    }
    x * p / q
}

#[inline(always)]
fn gelu_erf_scalar(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

#[inline(always)]
fn gelu_slice_generic(src: &[f32], dst: &mut [f32]) {
    for (o, &s) in dst.iter_mut().zip(src) {
        *o = gelu_erf_scalar(s);
    }
}

with_simd! {
    /// [`gelu_slice_generic`], compiled for the widest vectors in use.
    fn gelu_slice(src: &[f32], dst: &mut [f32]) => gelu_slice_generic
}

/// e^x to about 2e-7 relative, branch-free (range reduction to e^r, |r| <= ln2 / 2, then a
/// degree-6 Taylor polynomial), so that loops over it vectorize.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let x = x.clamp(-87.3, 88.3);
    let n = (x * std::f32::consts::LOG2_E).round_ties_even();
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p: f32 = 1.0 / 720.0;
    for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = p.mul_add(r, c);
    }
    // Below the clamp e^x underflows: zero, as masked attention scores need.
    if x <= -87.3 {
        0.0
    } else {
        p * f32::from_bits(((n as i32 + 127) as u32) << 23)
    }
}

/// Adds `mask` to each row of `scores` (`[rows, n]`), then softmax per row.
#[inline(always)]
fn masked_softmax_generic(scores: &mut [f32], mask: &[f32], n: usize) {
    for (row, mrow) in scores.chunks_mut(n).zip(mask.chunks(n)) {
        let mut max = f32::NEG_INFINITY;
        for (x, &m) in row.iter_mut().zip(mrow) {
            *x += m;
            max = max.max(*x);
        }
        let mut sum = 0.0;
        for x in row.iter_mut() {
            *x = exp(*x - max);
            sum += *x;
        }
        let inv = 1.0 / sum;
        row.iter_mut().for_each(|x| *x *= inv);
    }
}

with_simd! {
    /// [`masked_softmax_generic`], compiled for the widest vectors in use.
    fn masked_softmax(scores: &mut [f32], mask: &[f32], n: usize) => masked_softmax_generic
}

#[inline(always)]
fn swiglu_slice_generic(gate: &[f32], up: &[f32], dst: &mut [f32]) {
    for ((o, &g), &u) in dst.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + exp(-g)) * u;
    }
}

with_simd! {
    /// [`swiglu_slice_generic`], compiled for the widest vectors in use.
    pub(crate) fn swiglu_slice(gate: &[f32], up: &[f32], dst: &mut [f32]) => swiglu_slice_generic
}

/// Elements per rayon task: large enough that scheduling costs nothing.
const CHUNK: usize = 16 * 1024;

struct GeluErf;

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "fast-gelu-erf"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("fast-gelu-erf takes f32, got {:?}", storage.dtype());
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("fast-gelu-erf takes a contiguous tensor");
        };
        let src = &data[start..end];
        let mut out = vec![0f32; src.len()];
        out.par_chunks_mut(CHUNK).zip(src.par_chunks(CHUNK)).for_each(|(o, s)| gelu_slice(s, o));
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

/// The erf GELU: the fast CPU kernel for f32 tensors, candle's own op elsewhere (CUDA, other
/// dtypes).
pub fn gelu_erf(xs: &Tensor) -> candle_core::Result<Tensor> {
    if xs.device().is_cpu() && xs.dtype() == DType::F32 {
        xs.contiguous()?.apply_op1_no_bwd(&GeluErf)
    } else {
        xs.gelu_erf()
    }
}

struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (gate, up) = (f32_slice(gs, gl, "swiglu gate")?, f32_slice(us, ul, "swiglu up")?);
        if gl.shape() != ul.shape() {
            candle_core::bail!("swiglu: gate {:?} and up {:?} differ", gl.shape(), ul.shape());
        }
        let mut out = vec![0f32; gate.len()];
        out.par_chunks_mut(CHUNK)
            .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK)))
            .for_each(|(o, (g, u))| swiglu_slice(g, u, o));
        Ok((CpuStorage::F32(out), gl.shape().clone()))
    }
}

/// `silu(gate) * up`, Llama's MLP gate: one parallel pass on the CPU, candle's ops elsewhere.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    if gate.device().is_cpu() && gate.dtype() == DType::F32 && up.dtype() == DType::F32 {
        gate.contiguous()?.apply_op2_no_bwd(&up.contiguous()?, &SwiGlu)
    } else {
        candle_nn::ops::silu(gate)? * up
    }
}

/// One row of [`add_rms_norm`]: `sum = x + y` and `normed = sum / rms(sum) * weight`, in
/// candle's order of operations (a sequential sum of squares, then `s / m * w`).
#[inline(always)]
fn add_rms_norm_row_generic(
    x: &[f32],
    y: &[f32],
    w: &[f32],
    eps: f32,
    sum: &mut [f32],
    normed: &mut [f32],
) {
    for ((s, &a), &b) in sum.iter_mut().zip(x).zip(y) {
        *s = a + b;
    }
    let sum2: f32 = sum.iter().map(|&v| v * v).sum();
    let m = (sum2 / sum.len() as f32 + eps).sqrt();
    for ((d, &s), &a) in normed.iter_mut().zip(sum.iter()).zip(w) {
        *d = s / m * a;
    }
}

with_simd! {
    /// [`add_rms_norm_row_generic`], compiled for the widest vectors in use.
    fn add_rms_norm_row(x: &[f32], y: &[f32], w: &[f32], eps: f32, sum: &mut [f32], normed: &mut [f32]) => add_rms_norm_row_generic
}

/// The residual add `x + y` (`[n, h]`) and the next RMS norm of it (`weight` `[h]`) in one
/// parallel pass over rows; candle's add runs on one thread. The same bits as `x + y` followed
/// by `candle_nn::ops::rms_norm` (tested). Off the CPU or for other dtypes, those two ops.
pub fn add_rms_norm(
    x: &Tensor,
    y: &Tensor,
    weight: &Tensor,
    eps: f32,
) -> candle_core::Result<(Tensor, Tensor)> {
    let fast = x.device().is_cpu()
        && [x, y, weight].iter().all(|t| t.dtype() == DType::F32)
        && x.rank() == 2
        && x.dims() == y.dims()
        && weight.dims1()? == x.dim(1)?;
    if !fast {
        let sum = (x + y)?;
        let normed = candle_nn::ops::rms_norm(&sum, weight, eps)?;
        return Ok((sum, normed));
    }
    let (x, y, weight) = (x.contiguous()?, y.contiguous()?, weight.contiguous()?);
    let (n, h) = x.dims2()?;
    let (mut sum, mut normed) = (vec![0f32; n * h], vec![0f32; n * h]);
    with_f32(&x, "residual", |xs| {
        with_f32(&y, "residual update", |ys| {
            with_f32(&weight, "rms norm weight", |w| {
                if h == 0 {
                    return Ok(());
                }
                // Enough rows per task that scheduling costs nothing.
                let rows = (CHUNK / h).max(1);
                sum.par_chunks_mut(rows * h)
                    .zip(normed.par_chunks_mut(rows * h))
                    .enumerate()
                    .for_each(|(c, (sum, normed))| {
                        let at = c * rows * h;
                        for (r, (s, d)) in
                            sum.chunks_exact_mut(h).zip(normed.chunks_exact_mut(h)).enumerate()
                        {
                            let row = at + r * h..at + (r + 1) * h;
                            add_rms_norm_row(&xs[row.clone()], &ys[row], w, eps, s, d);
                        }
                    });
                Ok(())
            })
        })
    })?;
    let device = x.device();
    Ok((Tensor::from_vec(sum, (n, h), device)?, Tensor::from_vec(normed, (n, h), device)?))
}

/// One row of [`add_layer_norm`]: `normed = (s - mean) / sqrt(var + eps) * weight + bias` of
/// `s = x + y`, in candle's order of operations (sequential sums of values and squares).
#[inline(always)]
fn add_layer_norm_row_generic(x: &[f32], y: &[f32], wb: [&[f32]; 2], eps: f32, normed: &mut [f32]) {
    let [w, b] = wb;
    let (mut sum, mut sum2) = (0f32, 0f32);
    for ((d, &a), &c) in normed.iter_mut().zip(x).zip(y) {
        let v = a + c;
        *d = v;
        sum += v;
        sum2 += v * v;
    }
    let n = normed.len() as f32;
    let mean = sum / n;
    let var = sum2 / n - mean * mean;
    let inv_std = (var + eps).sqrt().recip();
    for ((d, &alpha), &beta) in normed.iter_mut().zip(w).zip(b) {
        *d = (*d - mean) * inv_std * alpha + beta;
    }
}

with_simd! {
    /// [`add_layer_norm_row_generic`], compiled for the widest vectors in use.
    fn add_layer_norm_row(x: &[f32], y: &[f32], wb: [&[f32]; 2], eps: f32, normed: &mut [f32]) => add_layer_norm_row_generic
}

/// BERT's post-norm residual, `layer_norm(x + y)` with `weight` and `bias` (`[h]`), in one
/// parallel pass over rows; candle's add runs on one thread. The same bits as `x + y` followed
/// by candle_nn's `LayerNorm` (tested). Off the CPU or for other dtypes, those two ops.
pub fn add_layer_norm(
    x: &Tensor,
    y: &Tensor,
    norm: &candle_nn::LayerNorm,
    eps: f32,
) -> candle_core::Result<Tensor> {
    let (weight, Some(bias)) = (norm.weight(), norm.bias()) else {
        return candle_nn::Module::forward(norm, &(x + y)?);
    };
    let fast = x.device().is_cpu()
        && [x, y, weight, bias].iter().all(|t| t.dtype() == DType::F32)
        && x.rank() == 2
        && x.dims() == y.dims()
        && weight.dims1()? == x.dim(1)?
        && bias.dims1()? == x.dim(1)?;
    if !fast {
        return candle_nn::Module::forward(norm, &(x + y)?);
    }
    let (x, y) = (x.contiguous()?, y.contiguous()?);
    let (weight, bias) = (weight.contiguous()?, bias.contiguous()?);
    let (n, h) = x.dims2()?;
    let mut normed = vec![0f32; n * h];
    with_f32(&x, "residual", |xs| {
        with_f32(&y, "residual update", |ys| {
            with_f32(&weight, "layer norm weight", |w| {
                with_f32(&bias, "layer norm bias", |b| {
                    if h == 0 {
                        return Ok(());
                    }
                    let rows = (CHUNK / h).max(1);
                    normed.par_chunks_mut(rows * h).enumerate().for_each(|(c, normed)| {
                        let at = c * rows * h;
                        for (r, d) in normed.chunks_exact_mut(h).enumerate() {
                            let row = at + r * h..at + (r + 1) * h;
                            add_layer_norm_row(&xs[row.clone()], &ys[row], [w, b], eps, d);
                        }
                    });
                    Ok(())
                })
            })
        })
    })?;
    Tensor::from_vec(normed, (n, h), x.device())
}

/// The activation a BERT-family config names.
pub fn activation(xs: &Tensor, act: HiddenAct) -> candle_core::Result<Tensor> {
    match act {
        HiddenAct::Gelu => gelu_erf(xs),
        HiddenAct::GeluApproximate => xs.gelu(),
        HiddenAct::Relu => xs.relu(),
    }
}

/// The contiguous f32 data of a CPU tensor's storage, or an error naming `what`.
pub(crate) fn f32_slice<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{what}: expected f32, got {:?}", storage.dtype());
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{what}: expected a contiguous tensor");
    };
    Ok(&data[start..end])
}

/// `x [n, in] . w[out, in]^T + bias[out]`, the bias as the accumulator's starting value.
struct LinearBias;

impl CustomOp3 for LinearBias {
    fn name(&self) -> &'static str {
        "linear-bias"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w, bias) = (
            f32_slice(xs, xl, "linear input")?,
            f32_slice(ws, wl, "linear weight")?,
            f32_slice(bs, bl, "linear bias")?,
        );
        let (n, k) = xl.shape().dims2()?;
        let (out, k2) = wl.shape().dims2()?;
        if k != k2 || bias.len() != out {
            candle_core::bail!(
                "linear: input [{n}, {k}], weight [{out}, {k2}], bias [{}]",
                bias.len()
            );
        }
        let mut dst = Vec::with_capacity(n * out);
        for _ in 0..n {
            dst.extend_from_slice(bias);
        }
        if n > 0 && out > 0 {
            // SAFETY: dst is [n, out] row-major, x [n, k] row-major, w [out, k] row-major read as
            // its transpose [k, out] (row step 1, column step k); all in bounds by the checks above.
            unsafe {
                gemm::gemm(
                    n,
                    out,
                    k,
                    dst.as_mut_ptr(),
                    1,
                    out as isize,
                    true,
                    x.as_ptr(),
                    1,
                    k as isize,
                    w.as_ptr(),
                    k as isize,
                    1,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    parallelism(n * out * k),
                )
            }
        }
        Ok((CpuStorage::F32(dst), Shape::from((n, out))))
    }
}

/// Threads for one matmul of `work` multiply-adds, as candle decides it.
fn parallelism(work: usize) -> Parallelism {
    let threads = candle_core::utils::get_num_threads();
    if threads > 1 && work >= 4096 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    }
}

/// `x [n, in] . weight[out, in]^T + bias[out]`.
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> candle_core::Result<Tensor> {
    match bias {
        Some(b) if x.device().is_cpu() && x.dtype() == DType::F32 && x.rank() == 2 => {
            x.contiguous()?.apply_op3_no_bwd(&weight.contiguous()?, &b.contiguous()?, &LinearBias)
        }
        Some(b) => x.broadcast_matmul(&weight.t()?)?.broadcast_add(b),
        None => x.broadcast_matmul(&weight.t()?),
    }
}

/// Attention over packed rows: see [`varlen_attention`].
struct VarlenAttention<'a> {
    lengths: &'a [usize],
    heads: usize,
}

/// A raw pointer that rayon tasks may share: each task writes a disjoint part.
#[derive(Clone, Copy)]
pub(crate) struct SharedMut(pub(crate) *mut f32);
// SAFETY: only used to write disjoint blocks from different tasks ((sequence, head) blocks of
// attention here, (panel, rows) blocks in `bf16`).
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// The pointer `offset` elements on (a method, so closures capture the whole `Send` struct).
    ///
    /// # Safety
    /// `offset` must stay inside the allocation.
    pub(crate) unsafe fn at(self, offset: usize) -> *mut f32 {
        unsafe { self.0.add(offset) }
    }
}

impl CustomOp1 for VarlenAttention<'_> {
    fn name(&self) -> &'static str {
        "varlen-attention"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let qkv = f32_slice(storage, layout, "attention input")?;
        let (n, three_h) = layout.shape().dims2()?;
        let h = three_h / 3;
        let heads = self.heads;
        if three_h % 3 != 0 || heads == 0 || h % heads != 0 {
            candle_core::bail!("attention: [{n}, {three_h}] is not q, k, v of {heads} heads");
        }
        if self.lengths.iter().sum::<usize>() != n {
            candle_core::bail!("attention: sequence lengths do not add up to {n} rows");
        }
        let hd = h / heads;
        let scale = 1.0 / (hd as f32).sqrt();
        let mut starts = Vec::with_capacity(self.lengths.len());
        let mut offset = 0;
        for &len in self.lengths {
            starts.push(offset);
            offset += len;
        }
        let mut out = vec![0f32; n * h];
        let dst = SharedMut(out.as_mut_ptr());
        let tasks: Vec<(usize, usize)> = (0..self.lengths.len())
            .filter(|&s| self.lengths[s] > 0)
            .flat_map(|s| (0..heads).map(move |hh| (s, hh)))
            .collect();
        tasks.par_iter().for_each(|&(s, hh)| {
            let (start, len) = (starts[s], self.lengths[s]);
            let rs = three_h;
            let q = qkv[start * three_h + hh * hd..].as_ptr();
            let k = qkv[start * three_h + h + hh * hd..].as_ptr();
            let v = qkv[start * three_h + 2 * h + hh * hd..].as_ptr();
            let mut scores = vec![0f32; len * len];
            // SAFETY: q, k, v rows of this sequence lie inside qkv ([n, 3h], row step 3h); the
            // scores buffer is [len, len]; the output block rows start..start+len, columns
            // hh*hd.., belong to this task alone.
            unsafe {
                // scores = q . k^T: k read as [hd, len] (row step 1, column step 3h).
                matmul([len, len, hd], (scores.as_mut_ptr(), len), (q, rs), k, (rs, 1), scale);
            }
            for row in scores.chunks_mut(len) {
                let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                let mut sum = 0.0;
                for x in row.iter_mut() {
                    *x = (*x - max).exp();
                    sum += *x;
                }
                let inv = 1.0 / sum;
                row.iter_mut().for_each(|x| *x *= inv);
            }
            unsafe {
                matmul(
                    [len, hd, len],
                    (dst.at(start * h + hh * hd), h),
                    (scores.as_ptr(), len),
                    v,
                    (1, rs),
                    1.0,
                );
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((n, h))))
    }
}

/// Self-attention of each sequence over its own tokens. `qkv`: `[n, 3h]`, the query, key and
/// value rows of sequences packed back to back (`lengths` tokens each, no padding); returns the
/// `[n, h]` context rows, heads side by side. CPU and f32 only: see `models::bert`'s encoder for
/// the padded path other devices take.
pub fn varlen_attention(
    qkv: &Tensor,
    lengths: &[usize],
    heads: usize,
) -> candle_core::Result<Tensor> {
    if !qkv.device().is_cpu() || qkv.dtype() != DType::F32 {
        candle_core::bail!("varlen attention runs on f32 CPU tensors");
    }
    qkv.contiguous()?.apply_op1_no_bwd(&VarlenAttention { lengths, heads })
}

/// Attention of grouped queries over keys with an additive mask: see [`masked_attention`].
struct MaskedAttention<'a> {
    /// `[b, m, n]`: one plane per batch row, shared by its groups.
    mask: &'a [f32],
    scale: f32,
}

impl CustomOp3 for MaskedAttention<'_> {
    fn name(&self) -> &'static str {
        "masked-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (q, k, v) = (
            f32_slice(qs, ql, "attention queries")?,
            f32_slice(ks, kl, "attention keys")?,
            f32_slice(vs, vl, "attention values")?,
        );
        let (b, g, m, hd) = ql.shape().dims4()?;
        let (kb, kg, n, khd) = kl.shape().dims4()?;
        if (kb, kg, khd) != (b, g, hd) || vl.shape() != kl.shape() || self.mask.len() != b * m * n {
            candle_core::bail!(
                "attention: queries {:?}, keys {:?}, values {:?}, mask of {}",
                ql.shape(),
                kl.shape(),
                vl.shape(),
                self.mask.len()
            );
        }
        let mut out = vec![0f32; b * g * m * hd];
        let dst = SharedMut(out.as_mut_ptr());
        (0..b * g).into_par_iter().for_each(|task| {
            let (qo, ko) = (task * m * hd, task * n * hd);
            let mask = &self.mask[(task / g) * m * n..][..m * n];
            let mut scores = vec![0f32; m * n];
            // SAFETY: this task reads the [m, hd] query and [n, hd] key / value blocks of its
            // (batch row, group) and writes only its own [m, hd] output block.
            unsafe {
                // scores = q . k^T * scale: keys read as [hd, n] (row step 1, column step hd).
                matmul(
                    [m, n, hd],
                    (scores.as_mut_ptr(), n),
                    (q[qo..].as_ptr(), hd),
                    k[ko..].as_ptr(),
                    (hd, 1),
                    self.scale,
                );
            }
            masked_softmax(&mut scores, mask, n);
            unsafe {
                matmul(
                    [m, hd, n],
                    (dst.at(qo), hd),
                    (scores.as_ptr(), n),
                    v[ko..].as_ptr(),
                    (1, hd),
                    1.0,
                );
            }
        });
        Ok((CpuStorage::F32(out), ql.shape().clone()))
    }
}

/// `softmax(q k^T * scale + mask) v` for queries `[b, g, m, hd]` and keys and values
/// `[b, g, n, hd]`, with an additive `mask` of `[b, m, n]` values shared by the `g` groups of a
/// batch row. One task per (batch row, group), each matmul on one thread: at decoding shapes
/// (a few queries over tens of keys) splitting a matmul costs more than it saves. CPU and f32
/// only.
pub fn masked_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &[f32],
    scale: f32,
) -> candle_core::Result<Tensor> {
    if !q.device().is_cpu() || q.dtype() != DType::F32 {
        candle_core::bail!("masked attention runs on f32 CPU tensors");
    }
    q.contiguous()?.apply_op3_no_bwd(
        &k.contiguous()?,
        &v.contiguous()?,
        &MaskedAttention { mask, scale },
    )
}

/// `dst[m, n] = scale * a[m, k] . b` on one thread, `b` read as `[k, n]` with steps
/// `b_steps = (between columns, between rows)`: `(row stride, 1)` reads a row-major `[n, k]` as
/// its transpose (attention scores), `(1, row stride)` a row-major `[k, n]` (weighted values).
/// `dst` and `a` are row-major with the given row strides.
///
/// # Safety
/// Each pointer must be valid for its rows and columns at its strides.
unsafe fn matmul(
    [m, n, k]: [usize; 3],
    dst: (*mut f32, usize),
    a: (*const f32, usize),
    b: *const f32,
    b_steps: (usize, usize),
    scale: f32,
) {
    // SAFETY: the caller's contract.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.0,
            1,
            dst.1 as isize,
            false,
            a.0,
            1,
            a.1 as isize,
            b,
            b_steps.0 as isize,
            b_steps.1 as isize,
            0.0,
            scale,
            false,
            false,
            false,
            Parallelism::None,
        )
    }
}

/// Dot product in eight lanes, so that it vectorizes (a single running sum would not).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] = x[l].mul_add(y[l], acc[l]);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// One (batch row, kv group) of [`block_attention`]: `q` `[m, hd]`; `kv`: the block's keys and
/// values `[t, hd]`, then the real cached keys and values `[np, hd]`; output `dst` `[m, hd]`.
#[inline(always)]
fn block_task_generic(q: &[f32], kv: [&[f32]; 4], dst: &mut [f32], dims: [usize; 3], scale: f32) {
    let [k, v, pk, pv] = kv;
    let [hd, t, s] = dims;
    let (m, np) = (q.len() / hd, pk.len() / hd);
    let n = np + s;
    let mut scores = vec![0f32; m * n];
    if np > 0 {
        // SAFETY: scores is [m, n] (row step n), q [m, hd], pk read as [hd, np]: all in bounds.
        unsafe {
            matmul(
                [m, np, hd],
                (scores.as_mut_ptr(), n),
                (q.as_ptr(), hd),
                pk.as_ptr(),
                (hd, 1),
                scale,
            );
        }
    }
    for (row, sr) in scores.chunks_exact_mut(n).enumerate() {
        let tok = row % t;
        let (first, j) = (tok - tok % s, tok % s);
        let qr = &q[row * hd..][..hd];
        for jj in 0..=j {
            sr[np + jj] = dot(qr, &k[(first + jj) * hd..][..hd]) * scale;
        }
        let live = np + j + 1;
        let max = sr[..live].iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
        let mut sum = 0.0;
        for x in &mut sr[..live] {
            *x = exp(*x - max);
            sum += *x;
        }
        let inv = 1.0 / sum;
        sr[..live].iter_mut().for_each(|x| *x *= inv);
        sr[live..].iter_mut().for_each(|x| *x = 0.0);
    }
    if np > 0 {
        // SAFETY: dst is [m, hd], scores read as [m, np] with row step n, pv [np, hd].
        unsafe {
            matmul(
                [m, hd, np],
                (dst.as_mut_ptr(), hd),
                (scores.as_ptr(), n),
                pv.as_ptr(),
                (1, hd),
                1.0,
            );
        }
    }
    for (row, (sr, out)) in scores.chunks_exact(n).zip(dst.chunks_exact_mut(hd)).enumerate() {
        let tok = row % t;
        let (first, j) = (tok - tok % s, tok % s);
        for jj in 0..=j {
            let w = sr[np + jj];
            for (o, &x) in out.iter_mut().zip(&v[(first + jj) * hd..][..hd]) {
                *o = w.mul_add(x, *o);
            }
        }
    }
}

with_simd! {
    /// [`block_task_generic`], compiled for the widest vectors in use.
    fn block_task(
        q: &[f32],
        kv: [&[f32]; 4],
        dst: &mut [f32],
        dims: [usize; 3],
        scale: f32
    ) => block_task_generic
}

/// The contiguous f32 data of a CPU tensor, or an error naming `what`.
fn with_f32<R>(
    t: &Tensor,
    what: &str,
    f: impl FnOnce(&[f32]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(cpu) => f(f32_slice(cpu, layout, what)?),
        _ => candle_core::bail!("{what}: expected a CPU tensor"),
    }
}

/// Attention of candidate blocks stacked after a shared key/value cache, as Llama's suffix
/// scoring runs it: queries `q` `[b, g, m, hd]` are the `g` kv groups' query heads stacked
/// (`m = rep * t`, rows `r * t + token`), over `t` block tokens in blocks of `block`. Each token
/// attends to the cache's real keys `past_k[bi, gi, past_start[bi]..]` and to the tokens of its
/// own block up to itself (`k`, `v`: `[b, g, t, hd]`). Equal to a full masked attention over the
/// concatenated keys (tested), without the `P * block` keys per query that the mask would discard
/// nor the cache's left padding. CPU and f32 only.
#[allow(clippy::too_many_arguments)]
pub fn block_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    past_k: &Tensor,
    past_v: &Tensor,
    past_start: &[usize],
    block: usize,
    scale: f32,
) -> candle_core::Result<Tensor> {
    let (b, g, m, hd) = q.dims4()?;
    let (_, _, t, _) = k.dims4()?;
    let (_, _, tp, _) = past_k.dims4()?;
    if k.dims() != [b, g, t, hd]
        || v.dims() != k.dims()
        || past_k.dims() != [b, g, tp, hd]
        || past_v.dims() != past_k.dims()
        || block == 0
        || t % block != 0
        || t == 0
        || m % t != 0
        || past_start.len() != b
        || past_start.iter().any(|&s| s > tp)
    {
        candle_core::bail!(
            "block attention: queries {:?}, keys {:?}, values {:?}, cache {:?} / {:?}, block {block}, {} cache starts",
            q.dims(),
            k.dims(),
            v.dims(),
            past_k.dims(),
            past_v.dims(),
            past_start.len()
        );
    }
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let (pk, pv) = (past_k.contiguous()?, past_v.contiguous()?);
    let mut out = vec![0f32; b * g * m * hd];
    with_f32(&q, "attention queries", |qd| {
        with_f32(&k, "block keys", |kd| {
            with_f32(&v, "block values", |vd| {
                with_f32(&pk, "cached keys", |pkd| {
                    with_f32(&pv, "cached values", |pvd| {
                        out.par_chunks_mut(m * hd).enumerate().for_each(|(task, dst)| {
                            let start = past_start[task / g];
                            let past = task * tp * hd + start * hd..(task + 1) * tp * hd;
                            block_task(
                                &qd[task * m * hd..][..m * hd],
                                [
                                    &kd[task * t * hd..][..t * hd],
                                    &vd[task * t * hd..][..t * hd],
                                    &pkd[past.clone()],
                                    &pvd[past],
                                ],
                                dst,
                                [hd, t, block],
                                scale,
                            )
                        });
                        Ok(())
                    })
                })
            })
        })
    })?;
    Tensor::from_vec(out, (b, g, m, hd), q.device())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// erf in f64 by its Taylor series (|x| <= 3) or continued fraction, as the reference.
    fn erf_f64(x: f64) -> f64 {
        if x.abs() > 3.0 {
            // erfc continued fraction (Lentz), accurate far out where erf ~ +-1.
            let z = x.abs();
            let mut f = z;
            for k in (1..60).rev() {
                f = z + (k as f64 / 2.0) / f;
            }
            let erfc = (-z * z).exp() / (f * std::f64::consts::PI.sqrt());
            return x.signum() * (1.0 - erfc);
        }
        let (mut term, mut sum) = (x, x);
        for n in 1..200 {
            term *= -x * x / n as f64;
            sum += term / (2 * n + 1) as f64;
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    #[test]
    fn erf_matches_the_series_everywhere() {
        let mut worst = 0f64;
        for i in -20_000..=20_000 {
            let x = i as f64 * 4.5e-4; // -9 .. 9
            worst = worst.max((erf(x as f32) as f64 - erf_f64(x)).abs());
        }
        assert!(worst < 1e-6, "max |erf error| {worst}");
        assert_eq!(erf(0.0), 0.0);
        assert_eq!(erf(f32::INFINITY), erf(4.0));
        assert!((erf(4.0) - 1.0).abs() < 1e-6 && (erf(-4.0) + 1.0).abs() < 1e-6);
    }

    #[test]
    fn exp_is_within_3e_7_relative_of_std() {
        let mut worst = 0f64;
        for i in -872_000..=880_000 {
            let x = i as f32 * 1e-4;
            let want = (x as f64).exp();
            worst = worst.max(((exp(x) as f64 - want) / want).abs());
        }
        assert!(worst < 3e-7, "max relative error {worst}");
        assert!(exp(-1e4) == 0.0 && exp(-1e30) == 0.0 && exp(1e4).is_finite());
    }

    #[test]
    fn swiglu_matches_candles_silu_times_up() {
        let dev = Device::Cpu;
        let gate = (Tensor::arange(-30_000f32, 30_000f32, &dev).unwrap() * 1e-3).unwrap();
        let up = Tensor::randn(0f32, 1.0, 60_000, &dev).unwrap();
        let ours = swiglu(&gate, &up).unwrap();
        let theirs = (candle_nn::ops::silu(&gate).unwrap() * &up).unwrap();
        let diff = (ours - theirs).unwrap().abs().unwrap().max(0).unwrap();
        let diff = diff.to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5, "max diff {diff}");
    }

    /// A tensor's f32 values as bits, for comparisons that must be exact.
    fn bits(t: &Tensor) -> Vec<u32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect()
    }

    #[test]
    fn add_rms_norm_gives_candles_add_and_rms_norm_bits() {
        let dev = Device::Cpu;
        // One row, rows past a task's chunk, a width that is no multiple of a vector.
        for (n, h) in [(1, 576), (70, 576), (3, 37)] {
            let x = Tensor::randn(0f32, 1.0, (n, h), &dev).unwrap();
            let y = Tensor::randn(0f32, 0.5, (n, h), &dev).unwrap();
            let w = Tensor::randn(1f32, 0.1, h, &dev).unwrap();
            let (sum, normed) = add_rms_norm(&x, &y, &w, 1e-5).unwrap();
            let want_sum = (&x + &y).unwrap();
            let want = candle_nn::ops::rms_norm(&want_sum, &w, 1e-5).unwrap();
            assert_eq!(bits(&sum), bits(&want_sum));
            assert_eq!(bits(&normed), bits(&want), "[{n}, {h}]");
        }
        // Mismatched shapes take candle's path, which refuses them.
        let x = Tensor::zeros((2, 4), DType::F32, &dev).unwrap();
        assert!(add_rms_norm(&x, &x, &Tensor::ones(3, DType::F32, &dev).unwrap(), 1e-5).is_err());
    }

    #[test]
    fn add_layer_norm_gives_candles_add_and_layer_norm_bits() {
        let dev = Device::Cpu;
        for (n, h) in [(1, 384), (90, 384), (3, 37)] {
            let x = Tensor::randn(0f32, 1.0, (n, h), &dev).unwrap();
            let y = Tensor::randn(0.3f32, 0.5, (n, h), &dev).unwrap();
            let w = Tensor::randn(1f32, 0.1, h, &dev).unwrap();
            let b = Tensor::randn(0f32, 0.1, h, &dev).unwrap();
            let norm = candle_nn::LayerNorm::new(w, b, 1e-12);
            let got = add_layer_norm(&x, &y, &norm, 1e-12).unwrap();
            let want = candle_nn::Module::forward(&norm, &(&x + &y).unwrap()).unwrap();
            assert_eq!(bits(&got), bits(&want), "[{n}, {h}]");
        }
    }

    #[test]
    fn masked_attention_matches_candles_ops() {
        let dev = Device::Cpu;
        let (b, g, m, n, hd) = (3, 2, 5, 9, 8);
        let q = Tensor::randn(0f32, 1.0, (b, g, m, hd), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (b, g, n, hd), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (b, g, n, hd), &dev).unwrap();
        // Every row keeps at least one key; some rows mask most of them.
        let mask: Vec<f32> = (0..b * m * n)
            .map(|i| if (i % n) <= (i / n) % m || i % 7 == 0 { 0.0 } else { -1e30 })
            .collect();
        let scale = 0.3;
        let ours = masked_attention(&q, &k, &v, &mask, scale).unwrap();
        let mask_t = Tensor::from_vec(mask.clone(), (b, 1, m, n), &dev).unwrap();
        let att = (q.matmul(&k.t().unwrap()).unwrap() * scale as f64).unwrap();
        let att = candle_nn::ops::softmax_last_dim(&att.broadcast_add(&mask_t).unwrap()).unwrap();
        let theirs = att.matmul(&v).unwrap();
        let diff = (ours - theirs).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
        let diff = diff.to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5, "max diff {diff}");
    }

    #[test]
    fn block_attention_equals_masked_attention_over_the_concatenated_keys() {
        let dev = Device::Cpu;
        // hd = 20: dot products with a tail past the eight lanes; row 1 has left padding.
        let (b, g, rep, blocks, s, hd, tp) = (2, 2, 3, 3, 4, 20, 5);
        let t = blocks * s;
        let m = rep * t;
        let q = Tensor::randn(0f32, 1.0, (b, g, m, hd), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (b, g, t, hd), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (b, g, t, hd), &dev).unwrap();
        let pk = Tensor::randn(0f32, 1.0, (b, g, tp, hd), &dev).unwrap();
        let pv = Tensor::randn(0f32, 1.0, (b, g, tp, hd), &dev).unwrap();
        let starts = [0usize, 2];
        let mut mask = Vec::new();
        for &start in &starts {
            for row in 0..m {
                let tok = row % t;
                mask.extend((0..tp).map(|j| if j >= start { 0.0 } else { -1e30 }));
                mask.extend((0..t).map(|kk| {
                    if kk / s == tok / s && kk % s <= tok % s {
                        0.0
                    } else {
                        -1e30
                    }
                }));
            }
        }
        let keys = Tensor::cat(&[&pk, &k], 2).unwrap();
        let values = Tensor::cat(&[&pv, &v], 2).unwrap();
        let want = masked_attention(&q, &keys, &values, &mask, 0.4).unwrap();
        let got = block_attention(&q, &k, &v, &pk, &pv, &starts, s, 0.4).unwrap();
        let diff = (want - got).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
        let diff = diff.to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5, "max diff {diff}");
        // A cache of padding only: each token sees its own block alone.
        let empty = block_attention(&q, &k, &v, &pk, &pv, &[tp, tp], s, 0.4).unwrap();
        let only_blocks = masked_attention(
            &q,
            &keys,
            &values,
            &mask
                .chunks(tp + t)
                .flat_map(|r| std::iter::repeat_n(-1e30, tp).chain(r[tp..].iter().copied()))
                .collect::<Vec<_>>(),
            0.4,
        )
        .unwrap();
        let diff = (empty - only_blocks).unwrap().abs().unwrap().flatten_all().unwrap();
        assert!(diff.max(0).unwrap().to_scalar::<f32>().unwrap() < 1e-5);
        // Shapes that do not fit are errors, not panics.
        assert!(block_attention(&q, &k, &v, &pk, &pv, &starts, 5, 0.4).is_err());
        assert!(block_attention(&q, &k, &v, &pk, &pv, &[0, tp + 1], s, 0.4).is_err());
    }

    #[test]
    fn gelu_matches_candles_on_strided_and_contiguous_input() {
        let dev = Device::Cpu;
        let xs = (Tensor::arange(-40_000f32, 40_000f32, &dev).unwrap() * 2.5e-4).unwrap();
        let xs = xs.reshape((400, 200)).unwrap();
        for input in [xs.clone(), xs.t().unwrap()] {
            let ours = gelu_erf(&input).unwrap();
            let theirs = input.gelu_erf().unwrap();
            let diff = (ours - theirs).unwrap().abs().unwrap().max_keepdim(0).unwrap();
            let diff =
                diff.max_keepdim(1).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(diff[0] < 1e-6, "max diff {}", diff[0]);
        }
    }
}
