//! [`LlamaConfig`], the hyper-parameters of a Llama-architecture model, and how they are read
//! from a GGUF file's `llama.*` metadata or from a Hugging Face `config.json`.

use std::path::Path;

use candle_core::quantized::gguf_file;
use serde::{Deserialize, Serialize};

use super::model_err;
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
    pub(super) fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    pub(super) fn validate(&self, origin: &Path) -> Result<()> {
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

    /// Reads the metadata of a GGUF file (`path` names it in errors); architectures other than
    /// `llama` are refused. `vocab_size` is left 0: the loader takes it from the embedding
    /// matrix.
    pub(super) fn from_gguf_metadata(ct: &gguf_file::Content, path: &Path) -> Result<Self> {
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
        Ok(LlamaConfig {
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
        })
    }

    /// Reads a Hugging Face `config.json`. Also returns its `tie_word_embeddings` (false when
    /// absent): whether the output matrix is the embedding matrix.
    pub(super) fn from_config_json(cfg_path: &Path) -> Result<(Self, bool)> {
        let text = std::fs::read_to_string(cfg_path).map_err(|e| Error::io(cfg_path, e))?;
        let raw: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| model_err(cfg_path, format!("invalid JSON: {e}")))?;
        let key = |k: &str| -> Result<usize> {
            raw.get(k)
                .and_then(|v| v.as_u64())
                .map(|v| v as usize)
                .ok_or_else(|| model_err(cfg_path, format!("missing or non-integer key `{k}`")))
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
        Ok((cfg, tied))
    }
}
