//! Causal LMs of the Llama family (SmolLM2, Llama 2/3, ...) as prompt-tuning backends.
//!
//! Weights load from GGUF files (quantized; kept quantized or dequantized to f32) or from Hugging
//! Face safetensors directories. candle-transformers' Llama takes token ids only, so the forward
//! pass is written here: it takes input embeddings (to inject the soft prompt), an explicit
//! attention mask (left padding, several candidates per sequence) and a reusable key/value cache.
//!
//! Class score = next-token logit of each label word after the rendered template. With
//! [`Placement::Suffix`] the text before `{prompt}` is run once per example and its key/value
//! cache is reused by every candidate prompt: only the placeholders and the template's tail run
//! per candidate, and all candidates of a population share one forward.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, IndexOp, Module, Tensor};
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use super::bf16::Bf16Linear;
use super::{
    downcast, ModelInfo, Placement, Prepared, PromptMode, PromptModel, PromptSettings, ScoreJob,
    TokenNoise,
};
use crate::data::split::noise_tokens;
use crate::data::Example;
use crate::task::{render, Piece, TaskSpec};
use crate::{Error, Result};

/// Hyper-parameters of a Llama-architecture model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f32,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
}

impl LlamaConfig {
    fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
    fn validate(&self, origin: &Path) -> Result<()> {
        let ok = self.hidden_size > 0
            && self.num_attention_heads > 0
            && self.num_key_value_heads > 0
            && self.hidden_size.is_multiple_of(self.num_attention_heads)
            && self.num_attention_heads.is_multiple_of(self.num_key_value_heads)
            && self.head_dim().is_multiple_of(2)
            && self.vocab_size > 0;
        if !ok {
            return Err(Error::file(
                origin,
                format!("inconsistent Llama hyper-parameters {self:?}"),
            ));
        }
        Ok(())
    }
}

/// How the weights of the linear layers are held in memory and multiplied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum WeightFormat {
    /// f32 (GGUF weights dequantized), multiplied with candle's f32 gemm.
    #[default]
    F32,
    /// bf16, each matmul's input rounded to bf16, f32 accumulation ([`super::bf16`]): about
    /// twice the f32 speed on CPUs with AVX-512 BF16. CPU only.
    Bf16,
    /// GGUF only: kept in the file's quantization, multiplied with candle's quantized matmul.
    Quantized,
}

/// GGUF files store q/k rows interleaved (llama.cpp's permutation), safetensors half-split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RopeStyle {
    Interleaved,
    HalfSplit,
}

#[derive(Debug)]
enum Linear {
    Dense(Tensor),
    Quant(QMatMul),
    Bf16(Bf16Linear),
}

impl Linear {
    fn from_qtensor(q: QTensor, format: WeightFormat, device: &Device) -> Result<Self> {
        Ok(match format {
            WeightFormat::F32 => Linear::Dense(q.dequantize(device)?),
            WeightFormat::Quantized => Linear::Quant(QMatMul::from_qtensor(q)?),
            WeightFormat::Bf16 => {
                let mut dense = Linear::Dense(q.dequantize(device)?);
                dense.pack_bf16()?;
                dense
            }
        })
    }

    /// Packs an f32 layer for bf16 multiplication; a quantized layer stays as it is (the
    /// caller refuses that case).
    fn pack_bf16(&mut self) -> Result<()> {
        if let Linear::Dense(w) = self {
            if !w.device().is_cpu() {
                return Err(Error::Model("bf16 weights are implemented for the CPU only".into()));
            }
            *self = Linear::Bf16(Bf16Linear::from_tensors(w, None)?);
        }
        Ok(())
    }
    /// `x` is `[rows, in]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Linear::Dense(w) => x.matmul(&w.t()?)?,
            Linear::Quant(q) => q.forward(x)?,
            Linear::Bf16(b) => b.forward(x)?,
        })
    }
}

#[derive(Debug)]
struct Layer {
    attn_norm: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ffn_norm: Tensor,
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl Layer {
    /// The q, k and v projections of the normed input; in bf16 they share one rounding of it.
    fn qkv(&self, hn: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        if let (Linear::Bf16(q), Linear::Bf16(k), Linear::Bf16(v)) = (&self.q, &self.k, &self.v) {
            let mut out = super::bf16::forward_shared(&[q, k, v], hn)?.into_iter();
            if let (Some(q), Some(k), Some(v)) = (out.next(), out.next(), out.next()) {
                return Ok((q, k, v));
            }
        }
        Ok((self.q.forward(hn)?, self.k.forward(hn)?, self.v.forward(hn)?))
    }

    /// `silu(gate(hn)) * up(hn)`; in bf16 one fused pass.
    fn gated(&self, hn: &Tensor) -> Result<Tensor> {
        if let (Linear::Bf16(g), Linear::Bf16(u)) = (&self.gate, &self.up) {
            return Ok(super::bf16::forward_swiglu(g, u, hn)?);
        }
        Ok(super::ops::swiglu(&self.gate.forward(hn)?, &self.up.forward(hn)?)?)
    }
}

/// Key/value cache of one batch of left-padded prefixes: per layer `[B, n_kv, T, head_dim]`.
struct KvCache {
    layers: LayerKv,
    /// `[B, T]`: 1 where a real token stands.
    attended: Vec<Vec<bool>>,
}

/// Keys and values of every layer, `[B, n_kv, T, head_dim]` each.
type LayerKv = Vec<(Tensor, Tensor)>;

/// One independent stack of sequences in a decoder pass (see `CausalLm::decode`).
struct Segment<'a> {
    /// Input embeddings `[B, T, H]`.
    x: Tensor,
    /// Position of each of the T columns.
    positions: Vec<u32>,
    /// Which keys each query sees.
    attend: Attend,
    past: Option<&'a KvCache>,
    /// The columns whose last hidden states the caller reads (`None`: all). The last layer's
    /// output projection and MLP then run on those rows only.
    outputs: Option<Vec<usize>>,
}

/// The attention pattern of a [`Segment`].
enum Attend {
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

/// A Llama-family causal LM with soft-prompt injection.
pub struct CausalLm {
    cfg: LlamaConfig,
    layers: Vec<Layer>,
    embed: Tensor,
    final_norm: Tensor,
    /// Output matrix `[vocab, hidden]` (tied to `embed` when the model ties them).
    lm_head: Tensor,
    cos: Tensor,
    sin: Tensor,
    rope: RopeStyle,
    tokenizer: Tokenizer,
    info: ModelInfo,
    settings: PromptSettings,
    device: Device,
    /// Longest text (in tokens) kept per example; longer texts are cut.
    pub max_text_tokens: usize,
    /// Examples per forward chunk (bounds memory).
    pub chunk_examples: usize,
    /// Rows (tokens) a suffix-placement decoder pass aims at: candidates and jobs are grouped
    /// into passes of about this many rows (see `suffix_passes`).
    pub suffix_pass_rows: usize,
}

fn model_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::file(path, e.to_string())
}

impl CausalLm {
    /// Loads a GGUF file (`llama` architecture). The tokenizer comes from a `tokenizer.json`
    /// beside the file when there is one, else from the GGUF metadata.
    pub fn from_gguf(
        path: &Path,
        settings: PromptSettings,
        format: WeightFormat,
        device: &Device,
    ) -> Result<Self> {
        let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let ct = gguf_file::Content::read(&mut file)
            .map_err(|e| model_err(path, format!("not a readable GGUF file: {e}")))?;
        let md = |k: &str| {
            ct.metadata.get(k).ok_or_else(|| model_err(path, format!("GGUF metadata lacks `{k}`")))
        };
        let arch = md("general.architecture")?.to_string().map_err(|e| model_err(path, e))?.clone();
        if arch != "llama" {
            return Err(model_err(
                path,
                format!("architecture `{arch}` is not supported (llama only)"),
            ));
        }
        let u = |k: &str| -> Result<usize> {
            Ok(md(&format!("llama.{k}"))?.to_u32().map_err(|e| model_err(path, e))? as usize)
        };
        let hidden = u("embedding_length")?;
        let n_heads = u("attention.head_count")?;
        let cfg = LlamaConfig {
            hidden_size: hidden,
            intermediate_size: u("feed_forward_length")?,
            num_hidden_layers: u("block_count")?,
            num_attention_heads: n_heads,
            num_key_value_heads: u("attention.head_count_kv").unwrap_or(n_heads),
            rms_norm_eps: md("llama.attention.layer_norm_rms_epsilon")?
                .to_f32()
                .map_err(|e| model_err(path, e))? as f64,
            rope_theta: ct
                .metadata
                .get("llama.rope.freq_base")
                .and_then(|v| v.to_f32().ok())
                .unwrap_or(10_000.0),
            vocab_size: 0,
            max_position_embeddings: u("context_length").unwrap_or(4096),
        };
        let mut get = |name: &str| -> Result<QTensor> {
            ct.tensor(&mut file, name, device)
                .map_err(|e| model_err(path, format!("tensor `{name}`: {e}")))
        };
        let embed_q = get("token_embd.weight")?;
        let embed = embed_q.dequantize(device)?;
        let lm_head = match get("output.weight") {
            Ok(q) => q.dequantize(device)?,
            Err(_) => embed.clone(),
        };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let mut lin = |n: &str| -> Result<Linear> {
                Linear::from_qtensor(get(&format!("blk.{i}.{n}.weight"))?, format, device)
            };
            let (q, k, v, o) =
                (lin("attn_q")?, lin("attn_k")?, lin("attn_v")?, lin("attn_output")?);
            let (gate, up, down) = (lin("ffn_gate")?, lin("ffn_up")?, lin("ffn_down")?);
            layers.push(Layer {
                attn_norm: get(&format!("blk.{i}.attn_norm.weight"))?.dequantize(device)?,
                ffn_norm: get(&format!("blk.{i}.ffn_norm.weight"))?.dequantize(device)?,
                q,
                k,
                v,
                o,
                gate,
                up,
                down,
            });
        }
        let final_norm = get("output_norm.weight")?.dequantize(device)?;
        let n_params: usize = ct.tensor_infos.values().map(|t| t.shape.elem_count()).sum();
        let json = path.with_file_name("tokenizer.json");
        let tokenizer = if json.exists() {
            load_tokenizer_json(&json)?
        } else {
            tokenizer_from_gguf(&ct, path)?
        };
        let name = path.file_stem().and_then(|s| s.to_str()).unwrap_or("gguf").to_string();
        Self::assemble(
            cfg,
            layers,
            embed,
            lm_head,
            final_norm,
            RopeStyle::Interleaved,
            tokenizer,
            name,
            n_params,
            settings,
            device,
            path,
        )
    }

    /// Multiplies every f32 linear layer in bf16 from now on (see [`super::bf16`]); the
    /// embeddings and the output rows stay f32. Quantized layers are refused: load the GGUF
    /// file with [`WeightFormat::Bf16`] instead.
    pub fn use_bf16(&mut self) -> Result<()> {
        for layer in &mut self.layers {
            for lin in [
                &mut layer.q,
                &mut layer.k,
                &mut layer.v,
                &mut layer.o,
                &mut layer.gate,
                &mut layer.up,
                &mut layer.down,
            ] {
                if matches!(lin, Linear::Quant(_)) {
                    return Err(Error::Model(
                        "quantized layers cannot be switched to bf16; load with weights = bf16"
                            .into(),
                    ));
                }
                lin.pack_bf16()?;
            }
        }
        Ok(())
    }

    /// Loads a Hugging Face Llama directory: `config.json`, `*.safetensors`, `tokenizer.json`.
    pub fn from_safetensors_dir(
        dir: &Path,
        settings: PromptSettings,
        device: &Device,
    ) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
        let raw: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| model_err(&cfg_path, format!("invalid JSON: {e}")))?;
        let key = |k: &str| -> Result<usize> {
            raw.get(k)
                .and_then(|v| v.as_u64())
                .map(|v| v as usize)
                .ok_or_else(|| model_err(&cfg_path, format!("missing or non-integer key `{k}`")))
        };
        let n_heads = key("num_attention_heads")?;
        let cfg = LlamaConfig {
            hidden_size: key("hidden_size")?,
            intermediate_size: key("intermediate_size")?,
            num_hidden_layers: key("num_hidden_layers")?,
            num_attention_heads: n_heads,
            num_key_value_heads: key("num_key_value_heads").unwrap_or(n_heads),
            rms_norm_eps: raw.get("rms_norm_eps").and_then(|v| v.as_f64()).unwrap_or(1e-5),
            rope_theta: raw.get("rope_theta").and_then(|v| v.as_f64()).unwrap_or(10_000.0) as f32,
            vocab_size: key("vocab_size")?,
            max_position_embeddings: key("max_position_embeddings").unwrap_or(4096),
        };
        let tied = raw.get("tie_word_embeddings").and_then(|v| v.as_bool()).unwrap_or(false);
        let files = safetensors_files(dir)?;
        // Safety: the files are memory-mapped read-only; fedbpt never writes them while loaded.
        let tensors: HashMap<String, Tensor> = {
            let mut all = HashMap::new();
            for f in &files {
                let t = candle_core::safetensors::load(f, device)
                    .map_err(|e| model_err(f, format!("not a readable safetensors file: {e}")))?;
                all.extend(t);
            }
            all
        };
        let n_params: usize = tensors.values().map(|t| t.elem_count()).sum();
        let get = |name: &str| -> Result<Tensor> {
            tensors
                .get(name)
                .ok_or_else(|| {
                    model_err(dir, format!("no tensor `{name}` in {}", files_list(&files)))
                })?
                .to_dtype(DType::F32)
                .map_err(Error::from)
        };
        let lin = |name: &str| -> Result<Linear> { Ok(Linear::Dense(get(name)?)) };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            layers.push(Layer {
                attn_norm: get(&format!("{p}.input_layernorm.weight"))?,
                q: lin(&format!("{p}.self_attn.q_proj.weight"))?,
                k: lin(&format!("{p}.self_attn.k_proj.weight"))?,
                v: lin(&format!("{p}.self_attn.v_proj.weight"))?,
                o: lin(&format!("{p}.self_attn.o_proj.weight"))?,
                ffn_norm: get(&format!("{p}.post_attention_layernorm.weight"))?,
                gate: lin(&format!("{p}.mlp.gate_proj.weight"))?,
                up: lin(&format!("{p}.mlp.up_proj.weight"))?,
                down: lin(&format!("{p}.mlp.down_proj.weight"))?,
            });
        }
        let embed = get("model.embed_tokens.weight")?;
        let lm_head = if tied || !tensors.contains_key("lm_head.weight") {
            embed.clone()
        } else {
            get("lm_head.weight")?
        };
        let final_norm = get("model.norm.weight")?;
        let tokenizer = load_tokenizer_json(&dir.join("tokenizer.json"))?;
        let name = dir.file_name().and_then(|s| s.to_str()).unwrap_or("llama").to_string();
        Self::assemble(
            cfg,
            layers,
            embed,
            lm_head,
            final_norm,
            RopeStyle::HalfSplit,
            tokenizer,
            name,
            n_params,
            settings,
            device,
            dir,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        mut cfg: LlamaConfig,
        layers: Vec<Layer>,
        embed: Tensor,
        lm_head: Tensor,
        final_norm: Tensor,
        rope: RopeStyle,
        tokenizer: Tokenizer,
        name: String,
        n_params: usize,
        settings: PromptSettings,
        device: &Device,
        origin: &Path,
    ) -> Result<Self> {
        let (vocab, hidden) = embed.dims2().map_err(|e| model_err(origin, e))?;
        if hidden != cfg.hidden_size {
            return Err(model_err(
                origin,
                format!("embedding width {hidden} != hidden size {}", cfg.hidden_size),
            ));
        }
        cfg.vocab_size = vocab;
        cfg.validate(origin)?;
        let embedding_std = tensor_std(&embed)?;
        let (cos, sin) = rope_tables(&cfg, device)?;
        let info = ModelInfo {
            name,
            family: "llama".into(),
            hidden_size: hidden,
            vocab_size: vocab,
            n_params,
            embedding_std,
        };
        Ok(Self {
            cfg,
            layers,
            embed,
            final_norm,
            lm_head,
            cos,
            sin,
            rope,
            tokenizer,
            info,
            settings,
            device: device.clone(),
            max_text_tokens: 256,
            chunk_examples: 64,
            suffix_pass_rows: SUFFIX_PASS_ROWS,
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Standard deviation of the input embeddings of the given tokens (a prompt scale that
    /// matches what the model sees for the task's own words).
    pub fn token_embedding_std(&self, ids: &[u32]) -> Result<f32> {
        let idx = Tensor::new(ids, &self.device)?;
        tensor_std(&self.embed.index_select(&idx, 0)?)
    }

    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(format!("cannot encode {text:?}: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    fn label_ids(&self, task: &TaskSpec) -> Result<Vec<u32>> {
        task.causal
            .label_words
            .iter()
            .map(|w| {
                let ids = self.encode(w)?;
                match ids.as_slice() {
                    [id] => Ok(*id),
                    _ => Err(Error::Task(format!(
                        "label word {w:?} is {} tokens for this tokenizer ({ids:?}); label words must be single tokens",
                        ids.len()
                    ))),
                }
            })
            .collect()
    }

    fn placeholder_ids(&self) -> Result<Vec<u32>> {
        let n = self.settings.n_prompt_tokens;
        let base = match &self.settings.placeholder {
            Some(text) => self.encode(text)?,
            // A space: the most content-free token the vocabulary has.
            None => self.encode(" ")?,
        };
        if base.is_empty() {
            return Err(Error::config("placeholder", "tokenizes to nothing"));
        }
        Ok((0..n).map(|i| base[i % base.len()]).collect())
    }

    /// Next-token logits over the whole vocabulary after `ids`, one unpadded sequence, with an
    /// optional prompt injected at `(start, prompt)`: a diagnostic, the parity check against
    /// candle's own Llama, and the reference the cached batched path is tested against.
    pub fn next_token_logits(
        &self,
        ids: &[u32],
        prompt_at: Option<(usize, &[f32])>,
    ) -> Result<Vec<f32>> {
        if ids.is_empty() {
            return Err(Error::Model("empty input".into()));
        }
        let mut x = self.embed.index_select(&Tensor::new(ids, &self.device)?, 0)?.unsqueeze(0)?;
        if let Some((start, p)) = prompt_at {
            if start + self.settings.n_prompt_tokens > ids.len() {
                return Err(Error::Model("prompt does not fit in the sequence".into()));
            }
            x = self.inject(&x, &self.prompt_tensor(p)?, start)?;
        }
        let t = ids.len();
        let mask = causal_mask(&[vec![true; t]], &self.device)?;
        let positions: Vec<u32> = (0..t as u32).collect();
        let (h, _) = self.forward_embeds(&x, &positions, &mask, None, false)?;
        let last = h.i((0, t - 1))?.unsqueeze(0)?;
        let last = candle_nn::ops::rms_norm(&last, &self.final_norm, self.cfg.rms_norm_eps as f32)?;
        Ok(last.matmul(&self.lm_head.t()?)?.squeeze(0)?.to_vec1()?)
    }

    /// Token ids of `text` (no special tokens).
    /// Token ids of every example of a prepared batch as it runs with placeholders: the text
    /// part and, in suffix placement, the shared tail (placeholders left out).
    pub fn input_ids(&self, batch: &Prepared) -> Result<Vec<Vec<u32>>> {
        let b = downcast::<CausalBatch>(batch, "llama")?;
        Ok(b.examples.iter().map(|e| [e.head.as_slice(), &e.tail].concat()).collect())
    }

    pub fn encode_text(&self, text: &str) -> Result<Vec<u32>> {
        self.encode(text)
    }

    /// Runs the decoder stack over input embeddings `x: [B, T, H]` at `positions` (length T)
    /// with an additive mask `[B, 1, T, T_past + T]`. Returns the last hidden states and, when
    /// `keep_kv`, each layer's keys/values (past included).
    fn forward_embeds(
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
    fn decode(&self, segs: &[Segment<'_>], keep_kv: bool) -> Result<(Vec<Tensor>, Vec<LayerKv>)> {
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
        for (li, layer) in self.layers.iter().enumerate() {
            let hn = candle_nn::ops::rms_norm(&x, &layer.attn_norm, eps)?;
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
                        super::ops::block_attention(&q, &k, &v, pk, pv, starts, *s, scale as f32)?
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
                                super::ops::masked_attention(&q, &k, &v, mask, scale as f32)?
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
            x = (x + layer.o.forward(&y)?)?;
            let hn = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, eps)?;
            let ff = layer.gated(&hn)?;
            x = (x + layer.down.forward(&ff)?)?;
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

    /// Logits of `label_ids` from final hidden states `[N, H]`.
    fn label_logits(&self, hidden: &Tensor, label_ids: &[u32]) -> Result<Tensor> {
        let hn = candle_nn::ops::rms_norm(hidden, &self.final_norm, self.cfg.rms_norm_eps as f32)?;
        let rows = self.lm_head.index_select(&Tensor::new(label_ids, &self.device)?, 0)?;
        Ok(hn.matmul(&rows.t()?)?)
    }

    /// Token embeddings of left-padded `seqs` as `[B, T, H]`, plus the attended flags.
    fn embed_padded(&self, seqs: &[&[u32]]) -> Result<(Tensor, Vec<Vec<bool>>)> {
        let t = seqs.iter().map(|s| s.len()).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(seqs.len() * t);
        let mut attended = Vec::with_capacity(seqs.len());
        for s in seqs {
            let pad = t - s.len();
            ids.extend(std::iter::repeat_n(0u32, pad));
            ids.extend_from_slice(s);
            attended.push((0..t).map(|i| i >= pad).collect());
        }
        let x = self.embed.index_select(&Tensor::new(ids.as_slice(), &self.device)?, 0)?;
        Ok((x.reshape((seqs.len(), t, self.cfg.hidden_size))?, attended))
    }

    /// Adds (or writes, in `cat` mode) prompt rows into `x: [N, T, H]` at columns
    /// `start..start + n` of every row.
    fn inject(&self, x: &Tensor, prompt: &Tensor, start: usize) -> Result<Tensor> {
        let (n_rows, t, h) = x.dims3()?;
        let n = prompt.dim(0)?;
        let p = prompt.unsqueeze(0)?.broadcast_as((n_rows, n, h))?;
        let mid = x.narrow(1, start, n)?;
        let mid = match self.settings.mode {
            PromptMode::Add => (mid + p)?,
            PromptMode::Cat => p.contiguous()?,
        };
        let mut parts = Vec::with_capacity(3);
        if start > 0 {
            parts.push(x.narrow(1, 0, start)?);
        }
        parts.push(mid);
        if start + n < t {
            parts.push(x.narrow(1, start + n, t - start - n)?);
        }
        Ok(Tensor::cat(&parts, 1)?)
    }

    fn prompt_tensor(&self, prompt: &[f32]) -> Result<Tensor> {
        let (n, h) = (self.settings.n_prompt_tokens, self.cfg.hidden_size);
        if prompt.len() != n * h {
            return Err(Error::Model(format!(
                "prompt has {} values, expected n_prompt_tokens * hidden = {n} * {h}",
                prompt.len()
            )));
        }
        Ok(Tensor::from_slice(prompt, (n, h), &self.device)?)
    }
}

/// One example, tokenized.
struct Encoded {
    /// Everything before the placeholders (suffix) or the whole input (prefix).
    head: Vec<u32>,
    /// Template tail after the placeholders (suffix placement only).
    tail: Vec<u32>,
}

/// What `prepare` keeps for the causal backend.
struct CausalBatch {
    label_ids: Vec<u32>,
    placeholders: Vec<u32>,
    placement: Placement,
    examples: Vec<Encoded>,
    /// Processing order (by length); chunks of it share one padded forward.
    order: Vec<usize>,
    /// Suffix placement: per chunk of `order`, the text's key/value cache.
    caches: Vec<KvCache>,
    /// Suffix placement: the shared tail tokens.
    tail: Vec<u32>,
}

impl PromptModel for CausalLm {
    fn info(&self) -> &ModelInfo {
        &self.info
    }
    fn settings(&self) -> &PromptSettings {
        &self.settings
    }

    fn prepare(
        &self,
        task: &TaskSpec,
        examples: &[Example],
        noise: Option<TokenNoise>,
    ) -> Result<Prepared> {
        let label_ids = self.label_ids(task)?;
        let placeholders = self.placeholder_ids()?;
        let placement = self.settings.placement;
        let mut rng = noise.map(|n| rand_chacha::ChaCha8Rng::seed_from_u64(n.seed));
        let mut encoded = Vec::with_capacity(examples.len());
        let mut shared_tail: Option<Vec<u32>> = None;
        for (i, ex) in examples.iter().enumerate() {
            if ex.label >= label_ids.len() {
                return Err(Error::Task(format!(
                    "example {i} has label {} but the task has {} classes",
                    ex.label,
                    label_ids.len()
                )));
            }
            let pieces = render(&task.causal.template, ex, true)?;
            let split = match placement {
                Placement::Suffix => {
                    pieces.iter().position(|p| *p == Piece::Prompt).ok_or_else(|| {
                        Error::Task(format!(
                        "suffix placement needs a {{prompt}} marker in the causal template {:?}",
                        task.causal.template
                    ))
                    })?
                }
                Placement::Prefix => pieces.len(),
            };
            let mut head = Vec::new();
            let mut data_tokens = 0usize;
            for p in &pieces[..split] {
                match p {
                    Piece::Literal(s) => {
                        head.extend(self.encode(s)?);
                    }
                    Piece::Data(s) => {
                        let mut ids = self.encode(s)?;
                        let room = self.max_text_tokens.saturating_sub(data_tokens);
                        ids.truncate(room);
                        data_tokens += ids.len();
                        head.extend(ids);
                    }
                    Piece::Prompt => {}
                    Piece::Mask => {
                        return Err(Error::Task("causal templates have no {mask}".into()))
                    }
                }
            }
            let mut tail = Vec::new();
            for p in pieces.iter().skip(split + 1) {
                match p {
                    Piece::Literal(s) => tail.extend(self.encode(s)?),
                    Piece::Data(_) => {
                        return Err(Error::Task(
                            "suffix placement needs all example text before {prompt}; use placement = \"prefix\"".into(),
                        ))
                    }
                    Piece::Prompt => {}
                    Piece::Mask => return Err(Error::Task("causal templates have no {mask}".into())),
                }
            }
            if let (Some(rng), Some(n)) = (rng.as_mut(), noise) {
                // Every token before the prompt may be replaced, template text included, as
                // the reference perturbs every attended token; not the placeholders (which
                // carry the prompt) and not the token that is scored (prefix placement: the
                // last one; suffix placement scores after the shared tail, left intact).
                let mut editable = vec![true; head.len()];
                if placement == Placement::Prefix {
                    if let Some(last) = editable.last_mut() {
                        *last = false;
                    }
                }
                noise_tokens(&mut head, &editable, n.rate, self.cfg.vocab_size as u32, rng);
            }
            match (&shared_tail, placement) {
                (None, Placement::Suffix) => shared_tail = Some(tail.clone()),
                (Some(t), Placement::Suffix) if *t != tail => {
                    return Err(Error::Task(
                        "template tail after {prompt} differs between examples".into(),
                    ))
                }
                _ => {}
            }
            if head.is_empty() {
                return Err(Error::Task(format!("example {i} renders to no tokens")));
            }
            encoded.push(Encoded { head, tail });
        }
        let tail = shared_tail.unwrap_or_default();
        if placement == Placement::Suffix && tail.is_empty() {
            return Err(Error::Task("suffix placement needs template text after {prompt}".into()));
        }
        // Length-sorted chunks keep left padding (wasted compute) small.
        let mut order: Vec<usize> = (0..encoded.len()).collect();
        order.sort_by_key(|&i| encoded[i].head.len());
        let mut caches = Vec::new();
        let mut tokens_per_pass = 0;
        if placement == Placement::Suffix {
            for chunk in order.chunks(self.chunk_examples) {
                let seqs: Vec<&[u32]> = chunk.iter().map(|&i| encoded[i].head.as_slice()).collect();
                let (x, attended) = self.embed_padded(&seqs)?;
                let t = attended[0].len();
                let mask = causal_mask(&attended, &self.device)?;
                let positions: Vec<u32> = (0..t as u32).collect();
                let (_, kv) = self.forward_embeds(&x, &positions, &mask, None, true)?;
                caches.push(KvCache { layers: kv, attended });
                tokens_per_pass += chunk.len() * (placeholders.len() + tail.len());
            }
        } else {
            tokens_per_pass = encoded.iter().map(|e| e.head.len() + placeholders.len()).sum();
        }
        let labels = examples.iter().map(|e| e.label).collect();
        Ok(Prepared {
            labels,
            n_classes: label_ids.len(),
            tokens_per_pass,
            inner: Box::new(CausalBatch {
                label_ids,
                placeholders,
                placement,
                examples: encoded,
                order,
                caches,
                tail,
            }),
        })
    }

    fn scores(&self, batch: &Prepared, prompt: Option<&[f32]>) -> Result<Vec<Vec<f32>>> {
        match prompt {
            Some(p) => Ok(self.scores_many(batch, &[p])?.pop().unwrap_or_default()),
            None => {
                let b = downcast::<CausalBatch>(batch, "llama")?;
                let mut out = self.score_candidates(b, &[], false)?;
                Ok(out.pop().unwrap_or_default())
            }
        }
    }

    fn scores_many(&self, batch: &Prepared, prompts: &[&[f32]]) -> Result<Vec<Vec<Vec<f32>>>> {
        let b = downcast::<CausalBatch>(batch, "llama")?;
        let tensors = prompts.iter().map(|p| self.prompt_tensor(p)).collect::<Result<Vec<_>>>()?;
        if tensors.is_empty() {
            return Ok(Vec::new());
        }
        self.score_candidates(b, &tensors, true)
    }

    fn scores_jobs(&self, jobs: &[ScoreJob<'_>]) -> Result<Vec<Vec<Vec<Vec<f32>>>>> {
        let batches = jobs
            .iter()
            .map(|j| downcast::<CausalBatch>(j.batch, "llama"))
            .collect::<Result<Vec<_>>>()?;
        // Suffix chunks are independent segments over their own caches: any number of them
        // share one pass. Prefix batches would need re-padding; they run one by one.
        let mergeable = jobs.len() > 1
            && batches.iter().all(|b| b.placement == Placement::Suffix)
            && jobs.iter().all(|j| !j.prompts.is_empty());
        if !mergeable {
            return jobs.iter().map(|j| self.scores_many(j.batch, j.prompts)).collect();
        }
        self.suffix_jobs(jobs, &batches)
    }
}

impl CausalLm {
    /// Scores every example under each prompt; `with_placeholders = false` (and no prompts) is
    /// the manual prompt. Returns `[prompt][example][class]`.
    fn score_candidates(
        &self,
        b: &CausalBatch,
        prompts: &[Tensor],
        with_placeholders: bool,
    ) -> Result<Vec<Vec<Vec<f32>>>> {
        let n_cand = prompts.len().max(1);
        let mut out = vec![vec![Vec::new(); b.examples.len()]; n_cand];
        match b.placement {
            Placement::Suffix => {
                let mut items = self.suffix_passes(&[(b, prompts, with_placeholders)])?;
                out = items.pop().ok_or_else(|| Error::Model("no suffix scores".into()))?;
            }
            Placement::Prefix => {
                let len = |i: usize| b.examples[i].head.len() + b.examples[i].tail.len();
                for chunk in length_chunks(&b.order, len, self.chunk_examples) {
                    for p in 0..n_cand {
                        let seqs: Vec<Vec<u32>> = chunk
                            .iter()
                            .map(|&i| {
                                let e = &b.examples[i];
                                let mut s = if with_placeholders {
                                    b.placeholders.clone()
                                } else {
                                    Vec::new()
                                };
                                s.extend_from_slice(&e.head);
                                s.extend_from_slice(&e.tail);
                                s
                            })
                            .collect();
                        let refs: Vec<&[u32]> = seqs.iter().map(|s| s.as_slice()).collect();
                        let (mut x, attended) = self.embed_padded(&refs)?;
                        let t = attended[0].len();
                        if with_placeholders {
                            // Placeholders lead each sequence, right after its left padding;
                            // inject per row at its own offset.
                            let mut rows = Vec::with_capacity(chunk.len());
                            for (r, seq) in refs.iter().enumerate() {
                                let row = x.narrow(0, r, 1)?;
                                rows.push(self.inject(&row, &prompts[p], t - seq.len())?);
                            }
                            x = Tensor::cat(&rows, 0)?;
                        }
                        let mask = causal_mask(&attended, &self.device)?;
                        let positions: Vec<u32> = (0..t as u32).collect();
                        let (h, _) = self.forward_embeds(&x, &positions, &mask, None, false)?;
                        let last = h.i((.., t - 1))?.contiguous()?;
                        let logits = self.label_logits(&last, &b.label_ids)?;
                        for (&i, row) in chunk.iter().zip(logits.to_vec2::<f32>()?) {
                            out[p][i] = row;
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    /// The decoder input of one chunk's candidate blocks, and the block length `S`.
    fn suffix_segment<'a>(
        &self,
        cache: &'a KvCache,
        tail: &[u32],
        placeholders: &[u32],
        prompts: &[Tensor],
        with_placeholders: bool,
    ) -> Result<(Segment<'a>, usize)> {
        let n_cand = prompts.len().max(1);
        let b = cache.attended.len();
        let t_past = cache.attended[0].len();
        let mut block: Vec<u32> =
            if with_placeholders { placeholders.to_vec() } else { Vec::new() };
        block.extend_from_slice(tail);
        let s = block.len();
        let base = self
            .embed
            .index_select(&Tensor::new(block.as_slice(), &self.device)?, 0)?
            .unsqueeze(0)?;
        let blocks = if with_placeholders {
            prompts.iter().map(|p| self.inject(&base, p, 0)).collect::<Result<Vec<_>>>()?
        } else {
            vec![base]
        };
        let x = Tensor::cat(&blocks, 1)?; // [1, P*S, H]
        let x = x.broadcast_as((b, n_cand * s, self.cfg.hidden_size))?.contiguous()?;
        let positions: Vec<u32> =
            (0..n_cand).flat_map(|_| (0..s as u32).map(|j| t_past as u32 + j)).collect();
        // Only the last token of each block is scored.
        let outputs = Some((0..n_cand).map(|p| p * s + s - 1).collect());
        Ok((Segment { x, positions, attend: Attend::Blocks(s), past: Some(cache), outputs }, s))
    }

    /// Label logits `[prompt][example][class]` from the hidden states `[B, P, H]` of the last
    /// token of a chunk's candidate blocks (the segment's `outputs`).
    fn suffix_logits(
        &self,
        h: &Tensor,
        n_cand: usize,
        label_ids: &[u32],
    ) -> Result<Vec<Vec<Vec<f32>>>> {
        let (b, cols, _) = h.dims3()?;
        if cols != n_cand {
            return Err(Error::Model(format!("{cols} hidden states per row for {n_cand} blocks")));
        }
        let last = h.reshape((b * n_cand, self.cfg.hidden_size))?;
        let logits = self.label_logits(&last, label_ids)?.reshape((b, n_cand, label_ids.len()))?;
        Ok(logits.transpose(0, 1)?.contiguous()?.to_vec3::<f32>()?)
    }

    /// Several jobs' suffix chunks through shared decoder passes.
    fn suffix_jobs(
        &self,
        jobs: &[ScoreJob<'_>],
        batches: &[&CausalBatch],
    ) -> Result<Vec<Vec<Vec<Vec<f32>>>>> {
        let prompts = jobs
            .iter()
            .map(|j| j.prompts.iter().map(|p| self.prompt_tensor(p)).collect::<Result<Vec<_>>>())
            .collect::<Result<Vec<_>>>()?;
        let work: Vec<_> =
            batches.iter().zip(&prompts).map(|(b, p)| (*b, p.as_slice(), true)).collect();
        self.suffix_passes(&work)
    }

    /// Scores of suffix work items `(batch, prompts, with placeholders)`, each as
    /// `[prompt][example][class]` (one "prompt" when there are none: the manual prompt). Every
    /// (chunk, group of candidates) is a segment of about `suffix_pass_rows` rows or fewer, and
    /// consecutive segments share a decoder pass up to that many rows: the activations of a pass
    /// this size stay in cache; one pass over all 20 candidates of a 64-example chunk (10,240
    /// rows) ran about 1.1-1.2x slower on the build machine.
    fn suffix_passes(
        &self,
        work: &[(&CausalBatch, &[Tensor], bool)],
    ) -> Result<Vec<Vec<Vec<Vec<f32>>>>> {
        /// Where a segment's scores go: work item, the chunk's examples, first prompt, prompts.
        type Origin<'c> = (usize, &'c [usize], usize, usize);
        let mut out: Vec<Vec<Vec<Vec<f32>>>> = work
            .iter()
            .map(|(b, p, _)| vec![vec![Vec::new(); b.examples.len()]; p.len().max(1)])
            .collect();
        let flush = |pending: &mut Vec<(Segment<'_>, Origin<'_>)>,
                     out: &mut Vec<Vec<Vec<Vec<f32>>>>|
         -> Result<()> {
            let (segs, origins): (Vec<_>, Vec<_>) = pending.drain(..).unzip();
            let (hidden, _) = self.decode(&segs, false)?;
            for (h, (wi, chunk, first, n)) in hidden.iter().zip(origins) {
                let logits = self.suffix_logits(h, n.max(1), &work[wi].0.label_ids)?;
                scatter(&mut out[wi][first..], chunk, logits);
            }
            Ok(())
        };
        let mut pending = Vec::new();
        let mut pending_rows = 0;
        for (wi, &(b, prompts, with_placeholders)) in work.iter().enumerate() {
            let s = b.tail.len() + if with_placeholders { b.placeholders.len() } else { 0 };
            for (cache, chunk) in b.caches.iter().zip(b.order.chunks(self.chunk_examples)) {
                let per_pass = (self.suffix_pass_rows / (chunk.len() * s).max(1)).max(1);
                let groups: Vec<&[Tensor]> = if prompts.is_empty() {
                    vec![prompts]
                } else {
                    prompts.chunks(per_pass).collect()
                };
                for (gi, group) in groups.into_iter().enumerate() {
                    let (seg, s) = self.suffix_segment(
                        cache,
                        &b.tail,
                        &b.placeholders,
                        group,
                        with_placeholders,
                    )?;
                    let rows = chunk.len() * group.len().max(1) * s;
                    if !pending.is_empty() && pending_rows + rows > self.suffix_pass_rows {
                        flush(&mut pending, &mut out)?;
                        pending_rows = 0;
                    }
                    pending.push((seg, (wi, chunk, gi * per_pass, group.len())));
                    pending_rows += rows;
                }
            }
        }
        if !pending.is_empty() {
            flush(&mut pending, &mut out)?;
        }
        Ok(out)
    }
}

/// Default rows (tokens) of one suffix decoder pass.
const SUFFIX_PASS_ROWS: usize = 2048;

/// Writes a chunk's `[prompt][row][class]` scores to the rows' example indices.
fn scatter(out: &mut [Vec<Vec<f32>>], chunk: &[usize], scores: Vec<Vec<Vec<f32>>>) {
    for (p, rows) in scores.into_iter().enumerate() {
        for (&i, row) in chunk.iter().zip(rows) {
            out[p][i] = row;
        }
    }
}

/// Splits `order` (sorted by length) into runs of at most `max_rows` whose longest member is at
/// most 1/8 (plus 2 tokens) longer than the shortest, so that a left-padded pass computes few
/// padding rows. On MR's mixed lengths one 64-row chunk padded to its longest sentence computed
/// almost twice the real tokens.
fn length_chunks(order: &[usize], len: impl Fn(usize) -> usize, max_rows: usize) -> Vec<&[usize]> {
    let mut chunks = Vec::new();
    let mut start = 0;
    while start < order.len() {
        let shortest = len(order[start]);
        let limit = shortest + shortest / 8 + 2;
        let mut end = start + 1;
        while end < order.len() && end - start < max_rows.max(1) && len(order[end]) <= limit {
            end += 1;
        }
        chunks.push(&order[start..end]);
        start = end;
    }
    chunks
}

const MASKED: f32 = -1e30;

/// Causal mask over left-padded rows, `[B, 1, T, T]`; a padding query sees only itself so its
/// softmax stays finite.
fn causal_mask(attended: &[Vec<bool>], device: &Device) -> Result<Tensor> {
    let b = attended.len();
    let t = attended.first().map(|r| r.len()).unwrap_or(0);
    let mut m = Vec::with_capacity(b * t * t);
    for row in attended {
        for i in 0..t {
            for (j, &real) in row.iter().enumerate() {
                let ok = (j <= i && real) || i == j;
                m.push(if ok { 0.0 } else { MASKED });
            }
        }
    }
    Ok(Tensor::from_vec(m, (b, 1, t, t), device)?)
}

/// The first real column of each left-padded cache row (its real tokens are the rest).
fn past_starts(attended: &[Vec<bool>]) -> Result<Vec<usize>> {
    attended
        .iter()
        .map(|row| {
            let start = row.iter().take_while(|&&real| !real).count();
            if row[start..].iter().all(|&real| real) {
                Ok(start)
            } else {
                Err(Error::Model("cache rows must be left-padded".into()))
            }
        })
        .collect()
}

/// Mask `[B, 1, P*S, T_past + P*S]` for candidate blocks stacked after a cached prefix.
fn block_mask(attended: &[Vec<bool>], n_cand: usize, s: usize, device: &Device) -> Result<Tensor> {
    let b = attended.len();
    let t_past = attended.first().map(|r| r.len()).unwrap_or(0);
    let q = n_cand * s;
    let mut m = Vec::with_capacity(b * q * (t_past + q));
    for row in attended {
        for qi in 0..q {
            let (pq, sq) = (qi / s, qi % s);
            m.extend(row.iter().map(|&real| if real { 0.0 } else { MASKED }));
            for kk in 0..q {
                let ok = kk / s == pq && kk % s <= sq;
                m.push(if ok { 0.0 } else { MASKED });
            }
        }
    }
    Ok(Tensor::from_vec(m, (b, 1, q, t_past + q), device)?)
}

fn rope_tables(cfg: &LlamaConfig, device: &Device) -> Result<(Tensor, Tensor)> {
    let hd = cfg.head_dim();
    let max = cfg.max_position_embeddings.clamp(512, 8192);
    let inv: Vec<f32> =
        (0..hd).step_by(2).map(|i| 1.0 / cfg.rope_theta.powf(i as f32 / hd as f32)).collect();
    let inv = Tensor::new(inv.as_slice(), device)?.reshape((1, hd / 2))?;
    let pos = Tensor::arange(0u32, max as u32, device)?.to_dtype(DType::F32)?.reshape((max, 1))?;
    let freqs = pos.matmul(&inv)?;
    Ok((freqs.cos()?, freqs.sin()?))
}

fn tensor_std(t: &Tensor) -> Result<f32> {
    let flat = t.flatten_all()?.to_dtype(DType::F64)?;
    let n = flat.elem_count() as f64;
    let mean = (flat.sum_all()?.to_scalar::<f64>()?) / n;
    let var = (flat.affine(1.0, -mean)?.sqr()?.sum_all()?.to_scalar::<f64>()?) / n;
    Ok(var.sqrt() as f32)
}

fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(model_err(dir, "no *.safetensors file in the model directory"));
    }
    Ok(files)
}

fn files_list(files: &[PathBuf]) -> String {
    files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ")
}

/// Loads `tokenizer.json` with its padding and truncation switched off (we pad ourselves).
pub fn load_tokenizer_json(path: &Path) -> Result<Tokenizer> {
    if !path.exists() {
        return Err(Error::file(path, "tokenizer file not found"));
    }
    let mut tok = Tokenizer::from_file(path)
        .map_err(|e| model_err(path, format!("invalid tokenizer: {e}")))?;
    tok.with_padding(None);
    tok.with_truncation(None).map_err(|e| model_err(path, e))?;
    Ok(tok)
}

/// Builds a byte-level BPE tokenizer from GGUF metadata (`tokenizer.ggml.*`, model `gpt2`).
fn tokenizer_from_gguf(ct: &gguf_file::Content, path: &Path) -> Result<Tokenizer> {
    use tokenizers::models::bpe::BPE;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::pre_tokenizers::digits::Digits;
    use tokenizers::pre_tokenizers::sequence::Sequence;
    use tokenizers::pre_tokenizers::PreTokenizerWrapper;

    let get = |k: &str| {
        ct.metadata.get(k).ok_or_else(|| model_err(path, format!("GGUF metadata lacks `{k}` (needed to build the tokenizer; or put a tokenizer.json beside the file)")))
    };
    let model = get("tokenizer.ggml.model")?.to_string().map_err(|e| model_err(path, e))?;
    if model != "gpt2" {
        return Err(model_err(path, format!("GGUF tokenizer model `{model}` is not supported (gpt2 byte-level BPE only); put a tokenizer.json beside the file")));
    }
    let tokens = get("tokenizer.ggml.tokens")?.to_vec().map_err(|e| model_err(path, e))?;
    let mut vocab = tokenizers::models::bpe::Vocab::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        vocab.insert(t.to_string().map_err(|e| model_err(path, e))?.clone(), i as u32);
    }
    let mut merges = Vec::new();
    if let Some(m) = ct.metadata.get("tokenizer.ggml.merges") {
        for v in m.to_vec().map_err(|e| model_err(path, e))? {
            let s = v.to_string().map_err(|e| model_err(path, e))?;
            let (a, b) =
                s.split_once(' ').ok_or_else(|| model_err(path, format!("bad merge {s:?}")))?;
            merges.push((a.to_string(), b.to_string()));
        }
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| model_err(path, format!("cannot build BPE tokenizer: {e}")))?;
    let mut tok = Tokenizer::new(bpe);
    let pre = ct
        .metadata
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.to_string().ok().cloned())
        .unwrap_or_default();
    let byte_level = ByteLevel::new(false, true, true);
    // SmolLM / StarCoder-style vocabularies split digits one by one before byte-level BPE.
    let pre_tok: PreTokenizerWrapper = if matches!(pre.as_str(), "smollm" | "starcoder" | "refact")
    {
        Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into()
    } else {
        byte_level.into()
    };
    tok.with_pre_tokenizer(Some(pre_tok));
    tok.with_decoder(Some(ByteLevel::default()));
    Ok(tok)
}

/// Quantizes `t` for tests and tools that write small GGUF files.
pub fn quantize_for_gguf(t: &Tensor, dtype: GgmlDType) -> Result<QTensor> {
    Ok(QTensor::quantize(t, dtype)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `[1, 1, q, k]` mask as rows.
    fn plane(mask: Tensor) -> Vec<Vec<f32>> {
        mask.squeeze(0).unwrap().squeeze(0).unwrap().to_vec2::<f32>().unwrap()
    }

    #[test]
    fn length_chunks_bound_padding_and_rows_and_cover_everything() {
        let lengths = [3usize, 3, 4, 5, 9, 9, 10, 30, 31, 31, 31];
        let order: Vec<usize> = (0..lengths.len()).collect();
        let chunks = length_chunks(&order, |i| lengths[i], 2);
        let flat: Vec<usize> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
        assert_eq!(flat, order);
        for c in &chunks {
            assert!(!c.is_empty() && c.len() <= 2);
            let (lo, hi) = (lengths[c[0]], lengths[*c.last().unwrap()]);
            assert!(hi <= lo + lo / 8 + 2, "{c:?}");
        }
        assert_eq!(length_chunks(&order, |i| lengths[i], 64).len(), 3);
    }

    #[test]
    fn masks_are_finite_for_padding_rows_and_block_diagonal() {
        let att = vec![vec![false, true, true]];
        let m = plane(causal_mask(&att, &Device::Cpu).unwrap());
        assert_eq!(m[0], vec![0.0, MASKED, MASKED]); // pad row sees itself
        assert_eq!(m[2], vec![MASKED, 0.0, 0.0]);
        let bm = plane(block_mask(&att, 2, 2, &Device::Cpu).unwrap());
        // query 3 = candidate 1, token 1: cached real tokens, then its own block only.
        assert_eq!(bm[3], vec![MASKED, 0.0, 0.0, MASKED, MASKED, 0.0, 0.0]);
        assert_eq!(bm[0], vec![MASKED, 0.0, 0.0, 0.0, MASKED, MASKED, MASKED]);
    }
}
