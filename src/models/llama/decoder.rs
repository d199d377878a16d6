//! The decoder stack: the transformer layers, rotary position tables, the key/value cache of a
//! batch's text, and one decoder pass over several independent segments with its three
//! attention paths (the CPU kernel with a mask, the CPU block kernel over a cache, candle's
//! tensor ops on other devices).

use candle_core::{DType, Device, Tensor};

use super::config::LlamaConfig;
use super::masks::{block_mask, past_starts};
use super::CausalLm;
use crate::kernels::{self, ops};
use crate::models::linear::Linear;
use crate::{Error, Result};

/// GGUF files store q/k rows interleaved (llama.cpp's permutation), safetensors half-split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RopeStyle {
    Interleaved,
    HalfSplit,
}

/// One transformer block: pre-norm attention and a SwiGLU MLP, each added to the residual.
#[derive(Debug)]
pub(super) struct Layer {
    pub(super) attn_norm: Tensor,
    pub(super) q: Linear,
    pub(super) k: Linear,
    pub(super) v: Linear,
    pub(super) o: Linear,
    pub(super) ffn_norm: Tensor,
    pub(super) gate: Linear,
    pub(super) up: Linear,
    pub(super) down: Linear,
}

impl Layer {
    /// The q, k and v projections of the normed input; in bf16 they share one rounding of it.
    fn qkv(&self, hn: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        if let (Some(q), Some(k), Some(v)) = (self.q.packed(), self.k.packed(), self.v.packed()) {
            let mut out = kernels::forward_shared(&[q, k, v], hn)?.into_iter();
            if let (Some(q), Some(k), Some(v)) = (out.next(), out.next(), out.next()) {
                return Ok((q, k, v));
            }
        }
        Ok((self.q.forward(hn)?, self.k.forward(hn)?, self.v.forward(hn)?))
    }

    /// `silu(gate(hn)) * up(hn)`; in bf16 one fused pass.
    fn gated(&self, hn: &Tensor) -> Result<Tensor> {
        if let (Some(g), Some(u)) = (self.gate.packed(), self.up.packed()) {
            return Ok(kernels::forward_swiglu(g, u, hn)?);
        }
        Ok(ops::swiglu(&self.gate.forward(hn)?, &self.up.forward(hn)?)?)
    }
}

/// Key/value cache of one batch of left-padded prefixes: per layer `[B, n_kv, T, head_dim]`.
pub(super) struct KvCache {
    pub(super) layers: LayerKv,
    /// `[B, T]`: 1 where a real token stands.
    pub(super) attended: Vec<Vec<bool>>,
}

/// Keys and values of every layer, `[B, n_kv, T, head_dim]` each.
pub(super) type LayerKv = Vec<(Tensor, Tensor)>;

/// One independent stack of sequences in a decoder pass (see `CausalLm::decode`).
pub(super) struct Segment<'a> {
    /// Input embeddings `[B, T, H]`.
    pub(super) x: Tensor,
    /// Position of each of the T columns.
    pub(super) positions: Vec<u32>,
    /// Which keys each query sees.
    pub(super) attend: Attend,
    pub(super) past: Option<&'a KvCache>,
    /// The columns whose last hidden states the caller reads (`None`: all). The last layer's
    /// output projection and MLP then run on those rows only.
    pub(super) outputs: Option<Vec<usize>>,
}

/// The attention pattern of a [`Segment`].
pub(super) enum Attend {
    /// Additive mask `[B, 1, T, T_past + T]`.
    Mask(Tensor),
    /// The `T` tokens are candidate blocks of this many tokens stacked after the cache: each
    /// token sees the cache's real tokens and its own block up to itself.
    Blocks(usize),
}

/// Rows of several `[rows, H]` tensors as one; a single tensor passes through untouched.
fn cat_rows(mut parts: Vec<Tensor>) -> Result<Tensor> {
    if parts.len() == 1 {
        if let Some(only) = parts.pop() {
            return Ok(only);
        }
    }
    Ok(Tensor::cat(&parts, 0)?)
}

/// Cosine and sine tables `[positions, head_dim / 2]` of the rotary embedding.
pub(super) fn rope_tables(cfg: &LlamaConfig, device: &Device) -> Result<(Tensor, Tensor)> {
    let hd = cfg.head_dim();
    let max = cfg.max_position_embeddings.clamp(512, 8192);
    let inv: Vec<f32> =
        (0..hd).step_by(2).map(|i| 1.0 / cfg.rope_theta.powf(i as f32 / hd as f32)).collect();
    let inv = Tensor::new(inv.as_slice(), device)?.reshape((1, hd / 2))?;
    let pos = Tensor::arange(0u32, max as u32, device)?.to_dtype(DType::F32)?.reshape((max, 1))?;
    let freqs = pos.matmul(&inv)?;
    Ok((freqs.cos()?, freqs.sin()?))
}

impl CausalLm {
    /// Runs the decoder stack over input embeddings `x: [B, T, H]` at `positions` (length T)
    /// with an additive mask `[B, 1, T, T_past + T]`. Returns the last hidden states and, when
    /// `keep_kv`, each layer's keys/values (past included).
    pub(super) fn forward_embeds(
        &self,
        x: &Tensor,
        positions: &[u32],
        mask: &Tensor,
        past: Option<&KvCache>,
        keep_kv: bool,
    ) -> Result<(Tensor, LayerKv)> {
        let seg = Segment {
            x: x.clone(),
            positions: positions.to_vec(),
            attend: Attend::Mask(mask.clone()),
            past,
            outputs: None,
        };
        let (mut hidden, mut kv) = self.decode(std::slice::from_ref(&seg), keep_kv)?;
        match (hidden.pop(), kv.pop()) {
            (Some(h), Some(kv)) => Ok((h, kv)),
            _ => Err(Error::Model("decoder returned no output".into())),
        }
    }

    /// One decoder pass over several independent segments: the row-wise work (norms,
    /// projections, MLP) runs on all segments' rows at once, attention per segment. Returns each
    /// segment's last hidden states `[B, T, H]` and, when `keep_kv`, its keys/values per layer.
    pub(super) fn decode(
        &self,
        segs: &[Segment<'_>],
        keep_kv: bool,
    ) -> Result<(Vec<Tensor>, Vec<LayerKv>)> {
        let (nh, nkv, hd) =
            (self.cfg.num_attention_heads, self.cfg.num_key_value_heads, self.cfg.head_dim());
        let h = self.cfg.hidden_size;
        let eps = self.cfg.rms_norm_eps as f32;
        let scale = 1.0 / (hd as f64).sqrt();
        let rep = nh / nkv;
        struct Geometry {
            b: usize,
            t: usize,
            first_row: usize,
            cos: Tensor,
            sin: Tensor,
            attention: Attention,
        }
        enum Attention {
            /// candle's ops with an additive mask (non-CPU devices).
            Tensor(Tensor),
            /// The CPU kernel with the mask as one `[rep * t, n]` plane per row.
            Rows(Vec<f32>),
            /// The CPU block kernel: blocks of this length, the cache's first real column per row.
            Blocks(usize, Vec<usize>),
        }
        let fast_attention = self.device.is_cpu();
        let mut geometry = Vec::with_capacity(segs.len());
        let mut rows = Vec::with_capacity(segs.len());
        let mut first_row = 0;
        for seg in segs {
            let (b, t, _) = seg.x.dims3()?;
            let pos = Tensor::new(seg.positions.as_slice(), &self.device)?;
            let cos = self.cos.index_select(&pos, 0)?.contiguous()?;
            let sin = self.sin.index_select(&pos, 0)?.contiguous()?;
            if let (Attend::Blocks(s), past) = (&seg.attend, seg.past) {
                let rows_cached = past.map(|p| p.attended.len()).unwrap_or(0);
                if rows_cached != b || *s == 0 || t % s != 0 {
                    return Err(Error::Model(format!(
                        "candidate blocks of {s} tokens over {t} columns need a cache of {b} rows, got {rows_cached}"
                    )));
                }
            }
            let attention = match (&seg.attend, seg.past) {
                (Attend::Blocks(s), Some(past)) if fast_attention && !keep_kv => {
                    Attention::Blocks(*s, past_starts(&past.attended)?)
                }
                (attend, past) => {
                    let mask = match (attend, past) {
                        (Attend::Mask(m), _) => m.clone(),
                        (Attend::Blocks(s), Some(p)) => {
                            block_mask(&p.attended, t / s, *s, &self.device)?
                        }
                        (Attend::Blocks(_), None) => {
                            return Err(Error::Model("candidate blocks without a cache".into()))
                        }
                    };
                    // The mask repeated for the query heads stacked per kv head.
                    let mask = if rep > 1 { Tensor::cat(&vec![&mask; rep], 2)? } else { mask };
                    if fast_attention {
                        let (_, _, m, n) = mask.dims4()?;
                        let plane = mask.broadcast_as((b, 1, m, n))?.flatten_all()?;
                        Attention::Rows(plane.to_vec1::<f32>()?)
                    } else {
                        Attention::Tensor(mask)
                    }
                }
            };
            geometry.push(Geometry { b, t, first_row, cos, sin, attention });
            first_row += b * t;
            rows.push(seg.x.reshape((b * t, h))?);
        }
        let mut x = cat_rows(rows)?;
        // The rows the last layer keeps, when every segment names its output columns.
        let output_rows: Option<Vec<u32>> = segs
            .iter()
            .zip(&geometry)
            .map(|(seg, g)| {
                let cols = seg.outputs.as_ref()?;
                Some(
                    (0..g.b)
                        .flat_map(|bi| {
                            cols.iter().map(move |&c| (g.first_row + bi * g.t + c) as u32)
                        })
                        .collect::<Vec<_>>(),
                )
            })
            .collect::<Option<Vec<_>>>()
            .map(|v| v.concat());
        if let Some(bad) = segs
            .iter()
            .zip(&geometry)
            .find_map(|(seg, g)| seg.outputs.as_ref()?.iter().find(|&&c| c >= g.t).copied())
        {
            return Err(Error::Model(format!("output column {bad} is past the segment's end")));
        }
        let mut kept = vec![Vec::new(); segs.len()];
        // The normed input of the next layer's attention: each residual add below computes it
        // in the same pass.
        let mut hn = match self.layers.first() {
            Some(first) => candle_nn::ops::rms_norm(&x, &first.attn_norm, eps)?,
            None => x.clone(),
        };
        for (li, layer) in self.layers.iter().enumerate() {
            let (q_all, k_all, v_all) = layer.qkv(&hn)?;
            let mut ys = Vec::with_capacity(segs.len());
            for (si, (seg, g)) in segs.iter().zip(&geometry).enumerate() {
                let (b, t, n) = (g.b, g.t, g.b * g.t);
                let heads = |all: &Tensor, n_heads: usize| -> Result<Tensor> {
                    Ok(all
                        .narrow(0, g.first_row, n)?
                        .reshape((b, t, n_heads, hd))?
                        .transpose(1, 2)?
                        .contiguous()?)
                };
                let (q, k, v) = (heads(&q_all, nh)?, heads(&k_all, nkv)?, heads(&v_all, nkv)?);
                let (q, k) = match self.rope {
                    RopeStyle::Interleaved => (
                        candle_nn::rotary_emb::rope_i(&q, &g.cos, &g.sin)?,
                        candle_nn::rotary_emb::rope_i(&k, &g.cos, &g.sin)?,
                    ),
                    RopeStyle::HalfSplit => (
                        candle_nn::rotary_emb::rope(&q, &g.cos, &g.sin)?,
                        candle_nn::rotary_emb::rope(&k, &g.cos, &g.sin)?,
                    ),
                };
                // Grouped-query attention without copying keys: the query heads that share a kv
                // head are stacked along the query axis, so one matmul per (example, kv head)
                // instead of one per query head.
                let q = q.reshape((b, nkv, rep * t, hd))?;
                let y = match (&g.attention, seg.past) {
                    (Attention::Blocks(s, starts), Some(c)) => {
                        let (pk, pv) = &c.layers[li];
                        ops::block_attention(&q, &k, &v, pk, pv, starts, *s, scale as f32)?
                    }
                    (attention, past) => {
                        let (k, v) = match past {
                            Some(c) => {
                                let (pk, pv) = &c.layers[li];
                                (Tensor::cat(&[pk, &k], 2)?, Tensor::cat(&[pv, &v], 2)?)
                            }
                            None => (k, v),
                        };
                        if keep_kv {
                            kept[si].push((k.clone(), v.clone()));
                        }
                        match attention {
                            Attention::Rows(mask) => {
                                ops::masked_attention(&q, &k, &v, mask, scale as f32)?
                            }
                            Attention::Tensor(mask) => {
                                let att = (q.matmul(&k.t()?)? * scale)?.broadcast_add(mask)?;
                                candle_nn::ops::softmax_last_dim(&att)?.matmul(&v)?
                            }
                            Attention::Blocks(..) => {
                                return Err(Error::Model("candidate blocks without a cache".into()))
                            }
                        }
                    }
                };
                ys.push(y.reshape((b, nh, t, hd))?.transpose(1, 2)?.reshape((n, h))?);
            }
            let mut y = cat_rows(ys)?;
            if li + 1 == self.layers.len() {
                if let Some(idx) = &output_rows {
                    // Past the last attention no row reads another: keep the rows asked for.
                    let idx = Tensor::new(idx.as_slice(), &self.device)?;
                    (x, y) = (x.index_select(&idx, 0)?, y.index_select(&idx, 0)?);
                }
            }
            let ffn_in;
            (x, ffn_in) = ops::add_rms_norm(&x, &layer.o.forward(&y)?, &layer.ffn_norm, eps)?;
            let down = layer.down.forward(&layer.gated(&ffn_in)?)?;
            match self.layers.get(li + 1) {
                Some(next) => (x, hn) = ops::add_rms_norm(&x, &down, &next.attn_norm, eps)?,
                None => x = (x + down)?,
            }
        }
        let mut first = 0;
        let mut hidden = Vec::with_capacity(segs.len());
        for (seg, g) in segs.iter().zip(&geometry) {
            let cols = match (&output_rows, &seg.outputs) {
                (Some(_), Some(cols)) => cols.len(),
                _ => g.t,
            };
            hidden.push(x.narrow(0, first, g.b * cols)?.reshape((g.b, cols, h))?);
            first += g.b * cols;
        }
        Ok((hidden, kept))
    }
}
