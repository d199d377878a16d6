//! Model backends. Each takes a task's examples plus a soft prompt and returns class scores;
//! the prompt is injected as embeddings exactly as BBT does (see [`PromptMode`]).
//!
//! - [`bert`]: masked LMs (BERT / RoBERTa with their MLM heads) and sentence encoders (MiniLM).
//! - [`llama`]: causal LMs of the Llama family, from safetensors or GGUF.
//! - [`random_checkpoint`]: a RoBERTa checkpoint with random weights, for benchmarks.

use std::any::Any;

use serde::{Deserialize, Serialize};

use crate::data::Example;
use crate::task::TaskSpec;
use crate::Result;

pub mod bert;
pub mod gguf_check;
pub mod linear;
pub mod llama;
pub mod random_checkpoint;
#[cfg(feature = "stand-in")]
pub mod stand_in;

/// How the soft prompt enters the input embeddings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PromptMode {
    /// Added to the embedding-layer output over `n_prompt_tokens` placeholder tokens.
    #[default]
    Add,
    /// Replaces the placeholders' embeddings (prepended vectors, as BBT's `cat`).
    Cat,
}

/// Where the placeholders stand in the templated input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Placement {
    /// Right after the first special token (the reference's choice).
    #[default]
    Prefix,
    /// Where the template's `{prompt}` marker stands (after the text for causal templates, so the
    /// text's key/value cache is computed once and shared by every candidate).
    Suffix,
}

/// Static prompt settings of a backend.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PromptSettings {
    pub n_prompt_tokens: usize,
    pub mode: PromptMode,
    pub placement: Placement,
    /// Text whose tokens fill the placeholders (cycled to `n_prompt_tokens`); `None` uses the
    /// backend's neutral default. A natural phrase makes z = 0 harmless.
    #[serde(default)]
    pub placeholder: Option<String>,
}

/// Facts about a loaded model that the method needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelInfo {
    pub name: String,
    pub family: String,
    pub hidden_size: usize,
    pub vocab_size: usize,
    /// All parameters (what FedAvg of the full model would move).
    pub n_params: usize,
    /// Standard deviation of all entries of the word-embedding matrix (BBT's `std_hat`).
    pub embedding_std: f32,
}

/// Replace each attended (non-special, non-template) token of the text with probability `rate`
/// by a uniformly random token id; FedBPT's perturbation. Deterministic in `seed`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TokenNoise {
    pub rate: f32,
    pub seed: u64,
}

/// A tokenized, templated batch with whatever prompt-independent work the backend did up front
/// (a causal model's key/value cache of the text, for instance).
pub struct Prepared {
    pub labels: Vec<usize>,
    pub n_classes: usize,
    /// Tokens one scoring pass processes (for throughput figures).
    pub tokens_per_pass: usize,
    pub inner: Box<dyn Any + Send + Sync>,
}

impl Prepared {
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

/// A backend that scores prompted inputs. Implementations hold one copy of the weights and are
/// shared by reference across clients and threads.
pub trait PromptModel: Send + Sync {
    fn info(&self) -> &ModelInfo;
    fn settings(&self) -> &PromptSettings;

    /// Tokenize and template `examples` for `task`; optional token noise for perturbation.
    fn prepare(
        &self,
        task: &TaskSpec,
        examples: &[Example],
        noise: Option<TokenNoise>,
    ) -> Result<Prepared>;

    /// Class scores `[example][class]`. `prompt = None` is the manual prompt: the template with
    /// no placeholders at all. `Some(p)` has `n_prompt_tokens * hidden_size` values; zeros give the
    /// template with neutral placeholders.
    fn scores(&self, batch: &Prepared, prompt: Option<&[f32]>) -> Result<Vec<Vec<f32>>>;

    /// Scores for several prompts (a CMA-ES population); backends may batch them.
    fn scores_many(&self, batch: &Prepared, prompts: &[&[f32]]) -> Result<Vec<Vec<Vec<f32>>>> {
        prompts.iter().map(|p| self.scores(batch, Some(p))).collect()
    }

    /// Scores of several independent jobs (different clients' batches and populations),
    /// `[job][prompt][example][class]`. Backends whose shapes allow it run them as one forward;
    /// each job's scores equal its own [`PromptModel::scores_many`] up to float rounding.
    fn scores_jobs(&self, jobs: &[ScoreJob<'_>]) -> Result<Vec<Vec<Vec<Vec<f32>>>>> {
        jobs.iter().map(|j| self.scores_many(j.batch, j.prompts)).collect()
    }
}

/// One scoring request: a prepared batch and the prompts to score on it.
#[derive(Clone, Copy)]
pub struct ScoreJob<'a> {
    pub batch: &'a Prepared,
    pub prompts: &'a [&'a [f32]],
}

/// Errors when two label words map to the same token: their classes would always score alike.
pub(crate) fn distinct_label_ids(words: &[String], ids: &[u32]) -> Result<()> {
    for (j, id) in ids.iter().enumerate() {
        if let Some(i) = ids[..j].iter().position(|x| x == id) {
            return Err(crate::Error::Task(format!(
                "label words {:?} and {:?} are the same token ({id}): their classes could not be told apart",
                words[i], words[j]
            )));
        }
    }
    Ok(())
}

pub(crate) fn downcast<'a, T: 'static>(batch: &'a Prepared, backend: &str) -> Result<&'a T> {
    batch.inner.downcast_ref::<T>().ok_or_else(|| {
        crate::Error::Model(format!("batch was prepared by another backend than {backend}"))
    })
}
