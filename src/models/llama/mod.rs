//! Causal LMs of the Llama family (SmolLM2, Llama 2/3, ...) as prompt-tuning backends.
//!
//! Weights load from GGUF files (quantized; kept quantized, dequantized to f32 or packed as bf16)
//! or from Hugging Face safetensors directories. The forward pass is written here rather than
//! taken from candle-transformers' Llama: it takes an explicit attention mask (left padding,
//! several candidates per sequence), a key/value cache of each example's text reused by every
//! candidate, and the project's linear layers and attention kernels.
//!
//! Class score = next-token logit of each label word after the rendered template. With
//! [`Placement::Suffix`] the text before `{prompt}` is run once per example and its key/value
//! cache is reused by every candidate prompt: only the placeholders and the template's tail run
//! per candidate, and all candidates of a population share one forward.
//!
//! The files of this module:
//! - `config.rs`: [`LlamaConfig`] and its parsing from GGUF metadata or `config.json`;
//! - `load.rs`: loading from GGUF or safetensors, and [`CausalLm::use_packed`];
//! - `tokenizer.rs`: `tokenizer.json` loading, or a BPE tokenizer built from GGUF metadata;
//! - `decoder.rs`: the transformer layers, rotary tables, key/value cache and the decoder pass
//!   with its attention paths;
//! - `masks.rs`: the attention masks over left-padded rows;
//! - `batch.rs`: `prepare` (tokenizing, templating, the text's cache), input embeddings and
//!   prompt injection;
//! - `scoring.rs`: class scores of prefix and suffix batches under candidate prompts.

mod batch;
mod config;
mod decoder;
mod load;
mod masks;
mod scoring;
mod tokenizer;

use std::path::Path;

use candle_core::{Device, IndexOp, Tensor};
use tokenizers::Tokenizer;

use super::{
    downcast, ModelInfo, Placement, Prepared, PromptModel, PromptSettings, ScoreJob, TokenNoise,
};
use crate::data::Example;
use crate::task::TaskSpec;
use crate::{Error, Result};
use batch::CausalBatch;
use decoder::{Layer, RopeStyle};
use load::tensor_std;
use masks::causal_mask;

pub use config::LlamaConfig;
pub use tokenizer::load_tokenizer_json;

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

/// Default rows (tokens) of one suffix decoder pass.
const SUFFIX_PASS_ROWS: usize = 2048;

fn model_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::file(path, e.to_string())
}

impl CausalLm {
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

    /// Token ids of `text` (no special tokens).
    pub fn encode_text(&self, text: &str) -> Result<Vec<u32>> {
        self.encode(text)
    }

    /// Token ids of every example of a prepared batch as it runs with placeholders: the text
    /// part and, in suffix placement, the shared tail (placeholders left out).
    pub fn input_ids(&self, batch: &Prepared) -> Result<Vec<Vec<u32>>> {
        let b = downcast::<CausalBatch>(batch, "llama")?;
        Ok(b.examples.iter().map(|e| [e.head.as_slice(), &e.tail].concat()).collect())
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
        self.prepare_batch(task, examples, noise)
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
