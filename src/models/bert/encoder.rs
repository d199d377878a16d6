//! BERT's transformer layers (also RoBERTa's: same layout), arranged for throughput.
//!
//! Same weights and arithmetic as candle-transformers' `BertEncoder`, with four changes that
//! matter on a CPU at BBT's shapes (tens of short sequences per pass):
//! - linear layers multiply the real tokens of all sequences at once, packed as one 2-D matmul
//!   with no padding rows; candle_nn's `Linear` on a 3-D input runs one small matmul per
//!   sequence, repacking the weight each time, and padding to the longest sequence wastes more
//!   than half the work on MR's mixed lengths;
//! - query, key and value come from one fused `[3h, h]` matmul, biases ride in the matmuls;
//! - on the CPU, attention runs per sequence over its own tokens ([`ops::varlen_attention`]);
//!   elsewhere on the padded layout with a mask, as candle does;
//! - the erf GELU is the vectorized one of [`crate::kernels::ops`].
//!
//! A parity test against candle's `BertForMaskedLM` (`tests/bert_backends.rs`) guards the
//! equivalence.

use candle_core::{DType, Tensor};
use candle_nn::{layer_norm, linear, LayerNorm, VarBuilder};
use candle_transformers::models::bert::{Config, HiddenAct};

use crate::kernels::{ops, Kernel};
use crate::models::linear::Linear;

/// A linear layer of the encoder, loaded in f32 (packed later by [`BertEncoder::use_packed`]).
fn dense(vb: VarBuilder, inputs: usize, outputs: usize) -> candle_core::Result<Linear> {
    let l = linear(inputs, outputs, vb)?;
    Ok(Linear::F32 { weight: l.weight().clone(), bias: l.bias().cloned() })
}

struct Layer {
    /// Query, key and value projections stacked: `[3h, h]` weight and `[3h]` bias.
    qkv: Linear,
    attention_out: Linear,
    attention_norm: LayerNorm,
    intermediate: Linear,
    act: HiddenAct,
    output: Linear,
    output_norm: LayerNorm,
    /// Both norms' epsilon.
    eps: f32,
}

impl Layer {
    fn load(vb: VarBuilder, config: &Config) -> candle_core::Result<Self> {
        let (h, eps) = (config.hidden_size, config.layer_norm_eps);
        let sa = vb.pp("attention.self");
        let parts = ["query", "key", "value"]
            .iter()
            .map(|n| linear(h, h, sa.pp(n)))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let weight = Tensor::cat(&parts.iter().map(|l| l.weight()).collect::<Vec<_>>(), 0)?;
        let bias = parts.iter().map(|l| l.bias().cloned()).collect::<Option<Vec<_>>>();
        let bias = bias.map(|b| Tensor::cat(&b, 0)).transpose()?;
        Ok(Self {
            qkv: Linear::F32 { weight, bias },
            attention_out: dense(vb.pp("attention.output.dense"), h, h)?,
            attention_norm: layer_norm(h, eps, vb.pp("attention.output.LayerNorm"))?,
            intermediate: dense(vb.pp("intermediate.dense"), h, config.intermediate_size)?,
            act: config.hidden_act,
            output: dense(vb.pp("output.dense"), config.intermediate_size, h)?,
            output_norm: layer_norm(h, eps, vb.pp("output.LayerNorm"))?,
            eps: eps as f32,
        })
    }

    /// `xs`: the `[n, h]` packed rows of real tokens.
    fn forward(&self, xs: &Tensor, pack: &Packing, heads: usize) -> candle_core::Result<Tensor> {
        let qkv = self.qkv.forward(xs)?;
        let context = if xs.device().is_cpu() && xs.dtype() == DType::F32 {
            ops::varlen_attention(&qkv, &pack.lengths, heads)?
        } else {
            padded_attention(&qkv, pack, heads)?
        };
        let attended = ops::add_layer_norm(
            &self.attention_out.forward(&context)?,
            xs,
            &self.attention_norm,
            self.eps,
        )?;
        let inner = ops::activation(&self.intermediate.forward(&attended)?, self.act)?;
        ops::add_layer_norm(&self.output.forward(&inner)?, &attended, &self.output_norm, self.eps)
    }
}

/// Attention as candle's BERT computes it, on the padded layout with an additive mask: the
/// path for devices without [`ops::varlen_attention`]. `qkv`: `[n, 3h]` packed rows.
fn padded_attention(qkv: &Tensor, pack: &Packing, heads: usize) -> candle_core::Result<Tensor> {
    let h = qkv.dim(1)? / 3;
    let hd = h / heads;
    let (b, t) = (pack.b, pack.t);
    // [n, 3h] -> padded [b, t, 3h] -> [3, b, heads, t, hd]: q, k, v in attention order.
    let qkv = pack.pad(qkv)?.reshape((b, t, 3, heads, hd))?;
    let qkv = qkv.permute((2, 0, 3, 1, 4))?.contiguous()?;
    let (q, k, v) = (qkv.get(0)?, qkv.get(1)?, qkv.get(2)?);
    let mut scores = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?;
    if let Some(mask) = &pack.mask {
        scores = scores.broadcast_add(mask)?;
    }
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    let context = probs.matmul(&v)?.transpose(1, 2)?.reshape((b * t, h))?;
    pack.unpad(&context)
}

/// Where each real token of a right-padded `[b, t]` batch sits among the `n` packed rows.
struct Packing {
    lengths: Vec<usize>,
    b: usize,
    t: usize,
    /// Packed row -> padded slot, `[n]`.
    real_slots: Tensor,
    /// Padded slot -> packed row, `[b * t]`; padding points at row `n`, a zero row.
    slot_rows: Tensor,
    /// Additive `[b, 1, 1, t]` mask hiding the padding; `None` when nothing is padded.
    mask: Option<Tensor>,
    n: usize,
}

impl Packing {
    fn new(lengths: &[usize], t: usize, device: &candle_core::Device) -> candle_core::Result<Self> {
        let b = lengths.len();
        let n: usize = lengths.iter().sum();
        let mut real_slots = Vec::with_capacity(n);
        let mut slot_rows = vec![n as u32; b * t];
        let mut mask = vec![f32::MIN; b * t];
        for (i, &len) in lengths.iter().enumerate() {
            if len > t {
                candle_core::bail!("sequence of {len} tokens in a batch padded to {t}");
            }
            for j in 0..len {
                slot_rows[i * t + j] = real_slots.len() as u32;
                real_slots.push((i * t + j) as u32);
                mask[i * t + j] = 0.0;
            }
        }
        let mask = if n == b * t {
            None
        } else {
            // As candle's BertModel builds it: 0 attended, f32::MIN padding.
            Some(Tensor::from_vec(mask, (b, 1, 1, t), device)?)
        };
        Ok(Self {
            lengths: lengths.to_vec(),
            b,
            t,
            real_slots: Tensor::from_vec(real_slots, n, device)?,
            slot_rows: Tensor::from_vec(slot_rows, b * t, device)?,
            mask,
            n,
        })
    }

    /// `[b * t, c]` padded rows -> `[n, c]` real ones.
    fn unpad(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        if self.n == self.b * self.t {
            return Ok(xs.clone());
        }
        xs.index_select(&self.real_slots, 0)
    }

    /// `[n, c]` real rows -> `[b * t, c]` padded ones, zeros in the padding.
    fn pad(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        if self.n == self.b * self.t {
            return Ok(xs.clone());
        }
        let zero = xs.narrow(0, 0, 1)?.zeros_like()?;
        Tensor::cat(&[xs, &zero], 0)?.index_select(&self.slot_rows, 0)
    }
}

/// The stack of transformer layers under a checkpoint's `encoder.` prefix.
pub struct Encoder {
    layers: Vec<Layer>,
    heads: usize,
}

impl Encoder {
    /// Loads `layer.{i}.*` for every layer the config names.
    pub fn load(vb: VarBuilder, config: &Config) -> candle_core::Result<Self> {
        if config.num_attention_heads == 0
            || !config.hidden_size.is_multiple_of(config.num_attention_heads)
        {
            candle_core::bail!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                config.hidden_size,
                config.num_attention_heads
            );
        }
        let layers = (0..config.num_hidden_layers)
            .map(|i| Layer::load(vb.pp(format!("layer.{i}")), config))
            .collect::<candle_core::Result<_>>()?;
        Ok(Self { layers, heads: config.num_attention_heads })
    }

    /// Multiplies every linear layer in bf16 on `kernel` from now on (see [`crate::kernels`]);
    /// CPU only.
    pub fn use_packed(&mut self, kernel: Kernel) -> crate::Result<()> {
        for layer in &mut self.layers {
            for dense in [
                &mut layer.qkv,
                &mut layer.attention_out,
                &mut layer.intermediate,
                &mut layer.output,
            ] {
                dense.pack(kernel)?;
            }
        }
        Ok(())
    }

    /// `[b, t, h]` embeddings of right-padded sequences of `lengths` tokens -> `[b, t, h]` hidden
    /// states, zeros in the padding. Linear layers see only the real tokens.
    pub fn forward(&self, xs: &Tensor, lengths: &[usize]) -> candle_core::Result<Tensor> {
        let (b, t, h) = xs.dims3()?;
        if lengths.len() != b {
            candle_core::bail!("{} lengths for a batch of {b}", lengths.len());
        }
        let pack = Packing::new(lengths, t, xs.device())?;
        let mut rows = pack.unpad(&xs.reshape((b * t, h))?)?;
        for layer in &self.layers {
            rows = layer.forward(&rows, &pack, self.heads)?;
        }
        pack.pad(&rows)?.reshape((b, t, h))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn packed_attention_equals_the_padded_masked_one() {
        let dev = Device::Cpu;
        let (heads, h) = (4, 32);
        let lengths = [7, 1, 13, 0, 5];
        let n: usize = lengths.iter().sum();
        let qkv = Tensor::randn(0f32, 1.0, (n, 3 * h), &dev).unwrap();
        let pack = Packing::new(&lengths, 13, &dev).unwrap();
        let fast = ops::varlen_attention(&qkv, &lengths, heads).unwrap();
        let reference = padded_attention(&qkv, &pack, heads).unwrap();
        let diff = (fast - reference).unwrap().abs().unwrap().flatten_all().unwrap();
        let worst = diff.max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(worst < 1e-5, "max diff {worst}");
    }

    #[test]
    fn pad_then_unpad_is_the_identity_and_padding_is_zero() {
        let dev = Device::Cpu;
        let lengths = [3, 0, 2];
        let rows = Tensor::arange(1f32, 11f32, &dev).unwrap().reshape((5, 2)).unwrap();
        let pack = Packing::new(&lengths, 3, &dev).unwrap();
        let padded = pack.pad(&rows).unwrap();
        assert_eq!(
            padded.to_vec2::<f32>().unwrap(),
            vec![
                vec![1., 2.],
                vec![3., 4.],
                vec![5., 6.],
                vec![0., 0.],
                vec![0., 0.],
                vec![0., 0.],
                vec![7., 8.],
                vec![9., 10.],
                vec![0., 0.]
            ]
        );
        let back = pack.unpad(&padded).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), rows.to_vec2::<f32>().unwrap());
    }
}
