//! Loading a [`CausalLm`]: from a GGUF file (weights dequantized or kept quantized, see
//! [`LinearFormat`]) or from a Hugging Face safetensors directory, and the assembly both share
//! (shape checks, rotary tables, embedding statistics). Also [`CausalLm::use_packed`], which
//! packs loaded f32 weights as bf16 for a kernel.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, QTensor};
use candle_core::{DType, Device, Tensor};
use tokenizers::Tokenizer;

use super::config::LlamaConfig;
use super::decoder::{rope_tables, Layer, RopeStyle};
use super::tokenizer::{load_tokenizer_json, tokenizer_from_gguf};
use super::{model_err, CausalLm, SUFFIX_PASS_ROWS};
use crate::kernels::Kernel;
use crate::models::linear::{Linear, LinearFormat};
use crate::models::{ModelInfo, PromptSettings};
use crate::{Error, Result};

impl CausalLm {
    /// Loads a GGUF file (`llama` architecture). The tokenizer comes from a `tokenizer.json`
    /// beside the file when there is one, else from the GGUF metadata.
    pub fn from_gguf(
        path: &Path,
        settings: PromptSettings,
        format: LinearFormat,
        device: &Device,
    ) -> Result<Self> {
        // candle's reader trusts the header's counts and lengths: check them first.
        crate::models::gguf_check::check_gguf(path)?;
        let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let ct = gguf_file::Content::read(&mut file)
            .map_err(|e| model_err(path, format!("not a readable GGUF file: {e}")))?;
        let cfg = LlamaConfig::from_gguf_metadata(&ct, path)?;
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

    /// Multiplies every linear layer in bf16 on `kernel` from now on (see [`crate::kernels`]);
    /// the embeddings and the output rows stay f32. Quantized layers are refused: load the GGUF
    /// file as [`LinearFormat::Packed`] instead.
    pub fn use_packed(&mut self, kernel: Kernel) -> Result<()> {
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
                lin.pack(kernel)?;
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
        let (cfg, tied) = LlamaConfig::from_config_json(&cfg_path)?;
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
        let lin =
            |name: &str| -> Result<Linear> { Ok(Linear::F32 { weight: get(name)?, bias: None }) };
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
}

/// Standard deviation of all entries of `t` (computed in f64).
pub(super) fn tensor_std(t: &Tensor) -> Result<f32> {
    let flat = t.flatten_all()?.to_dtype(DType::F64)?;
    let n = flat.elem_count() as f64;
    let mean = (flat.sum_all()?.to_scalar::<f64>()?) / n;
    let var = (flat.affine(1.0, -mean)?.sqr()?.sum_all()?.to_scalar::<f64>()?) / n;
    Ok(var.sqrt() as f32)
}

/// The `*.safetensors` files of `dir`, sorted; an error when there are none.
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

/// The files, comma-separated, for error messages.
fn files_list(files: &[PathBuf]) -> String {
    files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ")
}
