//! BERT-family backends: masked LMs ([`MaskedLm`], BERT and RoBERTa with their MLM heads) and
//! sentence encoders without a head ([`SentenceEncoder`], MiniLM and the like).
//!
//! Both share one embedding stage written here (word + position + token-type embeddings, then
//! LayerNorm), because the soft prompt must enter after that LayerNorm, which candle's
//! `BertModel` does not expose. The transformer layers are [`encoder`]'s (candle's
//! `BertEncoder` arranged for throughput); RoBERTa's encoder weights have the same layout.
//!
//! Input layout of one example (prefix placement, the reference's):
//! `[CLS] p_1 .. p_n <template with the example's text> [SEP]`, where `p_i` are placeholder tokens
//! whose post-LayerNorm embeddings receive prompt row `i` (added in `add` mode, replaced in `cat`
//! mode). Suffix placement puts the placeholders where the template's `{prompt}` marker stands.

mod backbone;
mod encoder;
mod heads;
mod text;

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{embedding, layer_norm, linear, Embedding, LayerNorm, Linear, VarBuilder};
use candle_transformers::models::bert::{Config, HiddenAct};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tokenizers::Tokenizer;

use super::distinct_label_ids;
use super::{
    downcast, ModelInfo, Placement, Prepared, PromptMode, PromptModel, PromptSettings, ScoreJob,
    TokenNoise,
};
use crate::data::split::noise_tokens;
use crate::data::Example;
use crate::kernels::{ops, Kernel};
use crate::task::{render, Piece, TaskSpec};
use crate::{Error, Result};
use backbone::*;
use encoder::Encoder;
pub use heads::{EncoderHead, MlmHead};
use text::*;

/// Placeholder text used when [`PromptSettings::placeholder`] is `None`: a period, cycled.
///
/// Why a period: BBT's reference fills the placeholders with arbitrary vocabulary entries (ids
/// 1000..1000+n), which in a BERT vocabulary are stray characters and in RoBERTa's random words;
/// either puts content words in front of the text that the masked LM reads at z = 0. Unused-slot
/// tokens (`[unused0]`) were never trained and sit far from the embedding distribution. A run of
/// periods is the most content-free token every vocabulary has and was seen in training; the
/// reference templates already put a lone " ." after the prompt.
pub const DEFAULT_PLACEHOLDER: &str = " .";

/// Longest input in tokens, whatever the checkpoint's position table allows.
const MAX_LEN_CAP: usize = 512;

/// Rows x padded length of one forward pass; bounds activation memory (the attention scores of
/// a pass take heads x this x length floats). Small enough that a pass's largest intermediate
/// (this x the FFN width in f32) stays under glibc's largest mmap threshold (32 MB), so that
/// passes reuse freed heap memory instead of faulting in fresh pages.
const TOKENS_PER_PASS: usize = 4_096;

/// Reads and checks a BERT-family `config.json`.
///
/// Accepts the `gelu_new` / `gelu_pytorch_tanh` spellings of the tanh GELU that candle's enum
/// does not know. Errors name the file.
pub fn read_config(path: &Path) -> Result<Config> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::file(path, e.to_string()))?;
    if let Some(act) = value.get_mut("hidden_act") {
        if matches!(
            act.as_str(),
            Some("gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" | "gelu_approximate")
        ) {
            *act = serde_json::Value::from("geluapproximate");
        }
    }
    let config: Config =
        serde_json::from_value(value).map_err(|e| Error::file(path, e.to_string()))?;
    if config.num_attention_heads == 0
        || !config.hidden_size.is_multiple_of(config.num_attention_heads)
    {
        return Err(Error::file(
            path,
            format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                config.hidden_size, config.num_attention_heads
            ),
        ));
    }
    if config.hidden_size == 0 || config.vocab_size == 0 || config.type_vocab_size == 0 {
        return Err(Error::file(path, "hidden_size, vocab_size and type_vocab_size must be > 0"));
    }
    if config.pad_token_id >= config.vocab_size {
        return Err(Error::file(path, "pad_token_id is outside the vocabulary"));
    }
    Ok(config)
}

/// A batch prepared by a [`PromptedBert`]: its rows and what its head scores them against.
struct Batch<C> {
    rows: Rows,
    classes: C,
}

/// A batch with the prompts to score on it (`None`: the manual variant, once).
type BatchJob<'a, C> = (&'a Batch<C>, Option<&'a [&'a [f32]]>);

/// What sets the two backends apart: which checkpoints a head loads, what its batches carry
/// besides the rows, and how the final hidden states become class scores.
///
/// Private on purpose: its methods use this module's internals, and the only heads are
/// [`MlmHead`] and [`EncoderHead`].
trait ScoringHead: Sized + Send + Sync + 'static {
    /// The backend's name, for errors about a batch prepared by another backend.
    const BACKEND: &'static str;
    /// What a prepared batch scores its rows against.
    type Classes: Send + Sync + 'static;

    /// Finds the body's keys in `ckpt` and loads the body, then the head.
    fn load(
        dir: &Path,
        settings: PromptSettings,
        config: &Config,
        ckpt: &Checkpoint,
    ) -> Result<(Backbone, Self)>;

    /// Checks `task` against this head and tokenizes `examples`; returns their labels and the
    /// batch.
    fn prepare(
        body: &Backbone,
        task: &TaskSpec,
        examples: &[Example],
        noise: Option<TokenNoise>,
    ) -> Result<(Vec<usize>, Batch<Self::Classes>)>;

    /// One feature row per row of a chunk (`[b, k]` from hidden states `[b, t, h]`).
    fn features(hidden: &Tensor, rows: &[&Row]) -> Result<Tensor>;

    /// Class scores `[b, classes]` of feature rows that all belong to one batch.
    fn class_scores(&self, features: &Tensor, classes: &Self::Classes) -> Result<Tensor>;
}

/// A BERT-family model taking a soft prompt at its placeholders, with scoring head `H`:
/// [`MaskedLm`] or [`SentenceEncoder`].
pub struct PromptedBert<H> {
    body: Backbone,
    head: H,
}

/// A masked LM (BERT or RoBERTa family with its MLM head) scoring classes by the MLM logits of
/// the label words at the template's `{mask}`.
pub type MaskedLm = PromptedBert<MlmHead>;

/// A sentence encoder without LM head (MiniLM-style) scoring classes by the cosine between the
/// mean-pooled prompted input and each mean-pooled label description, over the temperature.
pub type SentenceEncoder = PromptedBert<EncoderHead>;

// The bound names a private trait: only this module's heads can be plugged in.
#[allow(private_bounds)]
impl<H: ScoringHead> PromptedBert<H> {
    /// Loads `config.json`, `model.safetensors` (f32, memory-mapped) and `tokenizer.json` from
    /// a Hugging Face directory. The head decides which key layouts it accepts (see [`MlmHead`]
    /// and [`EncoderHead`]).
    pub fn load(dir: &Path, settings: PromptSettings, device: &Device) -> Result<Self> {
        let config = read_config(&dir.join("config.json"))?;
        let ckpt = open_checkpoint(&dir.join("model.safetensors"), device)?;
        let (body, head) = H::load(dir, settings, &config, &ckpt)?;
        Ok(Self { body, head })
    }

    /// Multiplies the encoder's linear layers in bf16 on `kernel` from now on (see
    /// [`crate::kernels`]); an MLM head stays f32.
    pub fn use_packed(&mut self, kernel: Kernel) -> Result<()> {
        self.body.encoder.use_packed(kernel)
    }

    /// Token ids of a prepared batch, with or without the placeholders (for inspection).
    pub fn input_ids(&self, batch: &Prepared, with_placeholders: bool) -> Result<Vec<Vec<u32>>> {
        Ok(Backbone::input_ids(&Self::batch(batch)?.rows, with_placeholders))
    }

    fn batch(batch: &Prepared) -> Result<&Batch<H::Classes>> {
        downcast::<Batch<H::Classes>>(batch, H::BACKEND)
    }

    fn score(&self, batch: &Prepared, prompts: Option<&[&[f32]]>) -> Result<Vec<Vec<Vec<f32>>>> {
        only_job(self.score_jobs(&[(Self::batch(batch)?, prompts)])?)
    }

    /// `[job][prompt][example][class]`, all jobs' rows sharing passes.
    fn score_jobs(&self, jobs: &[BatchJob<'_, H::Classes>]) -> Result<Vec<Vec<Vec<Vec<f32>>>>> {
        let run: Vec<RunJob> =
            jobs.iter().map(|&(b, p)| RunJob { rows: &b.rows, prompts: p }).collect();
        self.body.run_jobs(&run, |hidden, rows, job_of| {
            per_job(job_of, &H::features(hidden, rows)?, |j, features| {
                self.head.class_scores(features, &jobs[j].0.classes)
            })
        })
    }
}

impl<H: ScoringHead> PromptModel for PromptedBert<H> {
    fn info(&self) -> &ModelInfo {
        &self.body.info
    }

    fn settings(&self) -> &PromptSettings {
        &self.body.settings
    }

    fn prepare(
        &self,
        task: &TaskSpec,
        examples: &[Example],
        noise: Option<TokenNoise>,
    ) -> Result<Prepared> {
        let (labels, batch) = H::prepare(&self.body, task, examples, noise)?;
        let tokens_per_pass = batch.rows.prompted.iter().map(|r| r.ids.len()).sum();
        Ok(Prepared {
            labels,
            n_classes: task.n_classes(),
            tokens_per_pass,
            inner: Box::new(batch),
        })
    }

    fn scores(&self, batch: &Prepared, prompt: Option<&[f32]>) -> Result<Vec<Vec<f32>>> {
        let prompts = prompt.map(|p| vec![p]);
        Ok(self.score(batch, prompts.as_deref())?.pop().unwrap_or_default())
    }

    /// All prompts in one stacked forward per chunk (rows = prompts x examples).
    fn scores_many(&self, batch: &Prepared, prompts: &[&[f32]]) -> Result<Vec<Vec<Vec<f32>>>> {
        if prompts.is_empty() {
            return Ok(Vec::new());
        }
        self.score(batch, Some(prompts))
    }
    /// All jobs' (prompt, example) rows in shared length-sorted passes.
    fn scores_jobs(&self, jobs: &[ScoreJob<'_>]) -> Result<Vec<Vec<Vec<Vec<f32>>>>> {
        let jobs = jobs
            .iter()
            .map(|j| Ok((Self::batch(j.batch)?, Some(j.prompts))))
            .collect::<Result<Vec<_>>>()?;
        self.score_jobs(&jobs)
    }
}
