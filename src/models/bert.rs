//! BERT-family backends: masked LMs ([`MaskedLm`], BERT and RoBERTa with their MLM heads) and
//! sentence encoders without a head ([`SentenceEncoder`], MiniLM and the like).
//!
//! Both share one embedding stage written here (word + position + token-type embeddings, then
//! LayerNorm), because the soft prompt must enter after that LayerNorm, which candle's
//! `BertModel` does not expose. The transformer layers are [`super::bert_encoder`]'s (candle's
//! `BertEncoder` arranged for throughput); RoBERTa's encoder weights have the same layout.
//!
//! Input layout of one example (prefix placement, the reference's):
//! `[CLS] p_1 .. p_n <template with the example's text> [SEP]`, where `p_i` are placeholder tokens
//! whose post-LayerNorm embeddings receive prompt row `i` (added in `add` mode, replaced in `cat`
//! mode). Suffix placement puts the placeholders where the template's `{prompt}` marker stands.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{embedding, layer_norm, linear, Embedding, LayerNorm, Linear, VarBuilder};
use candle_transformers::models::bert::{Config, HiddenAct};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tokenizers::Tokenizer;

use super::bert_encoder::Encoder;
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

/// Word, position and token-type embeddings with their LayerNorm (BERT's embedding layer,
/// dropout none). Token types are all 0: templates render one segment.
struct Embeddings {
    word: Embedding,
    position: Embedding,
    token_type: Tensor,
    layer_norm: LayerNorm,
    /// First position id: 0 for BERT, `padding_idx + 1` for RoBERTa.
    position_offset: usize,
}

impl Embeddings {
    fn load(vb: VarBuilder, config: &Config, position_offset: usize) -> candle_core::Result<Self> {
        let h = config.hidden_size;
        let word = embedding(config.vocab_size, h, vb.pp("word_embeddings"))?;
        let position = embedding(config.max_position_embeddings, h, vb.pp("position_embeddings"))?;
        let token_type =
            vb.pp("token_type_embeddings").get((config.type_vocab_size, h), "weight")?.get(0)?;
        let layer_norm = layer_norm(h, config.layer_norm_eps, vb.pp("LayerNorm"))?;
        Ok(Self { word, position, token_type, layer_norm, position_offset })
    }

    /// `[b, t]` right-padded ids -> `[b, t, h]` post-LayerNorm embeddings. Positions count from
    /// the offset for every row; padded slots get positions too but nothing attends to them.
    /// `words` = (flat positions `b * t + i`, `[k, h]` vectors) replaces those positions' word
    /// embeddings before position, type and LayerNorm: BBT's `cat` mode, whose prompt vectors
    /// are input embeddings.
    fn forward(
        &self,
        ids: &Tensor,
        words: Option<(&[u32], &Tensor)>,
    ) -> candle_core::Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let start = self.position_offset as u32;
        let positions = Tensor::arange(start, start + t as u32, ids.device())?;
        let mut word = self.word.forward(ids)?;
        if let Some((at, vectors)) = words {
            word = replace_rows(&word.reshape((b * t, ()))?, at, vectors)?.reshape(word.shape())?;
        }
        // Same summation order as candle's BertEmbeddings: (word + type) + position.
        let xs = word.broadcast_add(&self.token_type)?;
        let xs = xs.broadcast_add(&self.position.forward(&positions)?)?;
        self.layer_norm.forward(&xs)
    }
}

/// `flat` `[n, h]` with rows `at` replaced by the rows of `vectors` (other rows bit-identical).
fn replace_rows(flat: &Tensor, at: &[u32], vectors: &Tensor) -> candle_core::Result<Tensor> {
    let n = flat.dim(0)?;
    let mut keep = vec![1f32; n];
    for &k in at {
        keep[k as usize] = 0.0;
    }
    let keep = Tensor::from_vec(keep, (n, 1), flat.device())?;
    let idx = Tensor::new(at, flat.device())?;
    let placed = flat.zeros_like()?.index_add(&idx, vectors, 0)?;
    flat.broadcast_mul(&keep)? + placed
}

/// The head of a [`MaskedLm`]: BERT's `cls.predictions` or RoBERTa's `lm_head` (dense,
/// activation, LayerNorm, decoder), scoring classes by the logits of their label words at the
/// template's `{mask}`. Loads checkpoints with the key layout `bert.*` + `cls.predictions.*` (BERT)
/// or `roberta.*` + `lm_head.*` (RoBERTa, positions from `pad_token_id + 1`).
pub struct MlmHead {
    dense: Linear,
    act: HiddenAct,
    layer_norm: LayerNorm,
    /// `[vocab, h]`, the word embeddings where the checkpoint ties them.
    decoder: Tensor,
    bias: Tensor,
}

impl MlmHead {
    fn load_weights(
        vb: VarBuilder,
        layout: Layout,
        config: &Config,
        word_embeddings: &Tensor,
        names: &HashSet<String>,
    ) -> candle_core::Result<Self> {
        let h = config.hidden_size;
        let v = config.vocab_size;
        let (head, transform, ln, act) = match layout {
            Layout::Bert => {
                ("cls.predictions", "cls.predictions.transform", "LayerNorm", config.hidden_act)
            }
            // RobertaLMHead applies the erf GELU whatever hidden_act says.
            Layout::Roberta => ("lm_head", "lm_head", "layer_norm", HiddenAct::Gelu),
        };
        let tvb = vb.pp(transform);
        let dense = linear(h, h, tvb.pp("dense"))?;
        let layer_norm = layer_norm(h, config.layer_norm_eps, tvb.pp(ln))?;
        let has = |k: &str| names.contains(&format!("{head}.{k}"));
        let hvb = vb.pp(head);
        let decoder = if has("decoder.weight") {
            hvb.get((v, h), "decoder.weight")?
        } else {
            word_embeddings.clone()
        };
        let bias = if has("bias") {
            hvb.get(v, "bias")?
        } else if has("decoder.bias") {
            hvb.get(v, "decoder.bias")?
        } else {
            Tensor::zeros(v, DType::F32, vb.device())?
        };
        Ok(Self { dense, act, layer_norm, decoder, bias })
    }

    /// Logits of `ids` only, for hidden states `[b, h]` taken at the mask positions: the rows of
    /// the full head's output at those ids, without the `[b, vocab]` product.
    fn logits(&self, xs: &Tensor, ids: &Tensor) -> candle_core::Result<Tensor> {
        let xs = self.dense.forward(xs)?;
        let xs = ops::activation(&xs, self.act)?;
        let xs = self.layer_norm.forward(&xs)?;
        let w = self.decoder.index_select(ids, 0)?;
        let b = self.bias.index_select(ids, 0)?;
        xs.matmul(&w.t()?)?.broadcast_add(&b)
    }
}

/// Key layout of a checkpoint with an MLM head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// `bert.*` + `cls.predictions.*`.
    Bert,
    /// `roberta.*` + `lm_head.*`.
    Roberta,
}

/// Where a token of the input came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Special,
    Literal,
    Data,
    Mask,
    Placeholder,
}

/// One tokenized input (one variant of one example).
#[derive(Debug, Clone)]
struct Row {
    ids: Vec<u32>,
    /// First placeholder (placeholders are contiguous); `None` in the manual variant.
    prompt_start: Option<usize>,
    /// Position of the `{mask}` token, if the template has one.
    mask_pos: Option<usize>,
    /// Tokens the encoder pools: the template's and the example's own, no special tokens or
    /// placeholders.
    pool: Vec<bool>,
}

impl Row {
    fn new(tokens: &[(u32, Kind)]) -> Self {
        let ids = tokens.iter().map(|t| t.0).collect();
        let prompt_start = tokens.iter().position(|t| t.1 == Kind::Placeholder);
        let mask_pos = tokens.iter().position(|t| t.1 == Kind::Mask);
        let pool =
            tokens.iter().map(|t| matches!(t.1, Kind::Literal | Kind::Data | Kind::Mask)).collect();
        Self { ids, prompt_start, mask_pos, pool }
    }
}

/// Both variants of every example: with placeholders (soft prompt) and without (manual prompt).
struct Rows {
    prompted: Vec<Row>,
    manual: Vec<Row>,
}

/// A batch prepared by a [`PromptedBert`]: its rows and what its head scores them against.
struct Batch<C> {
    rows: Rows,
    classes: C,
}

/// A batch with the prompts to score on it (`None`: the manual variant, once).
type BatchJob<'a, C> = (&'a Batch<C>, Option<&'a [&'a [f32]]>);

/// What a [`SentenceEncoder`] batch scores its rows against.
struct LabelDescriptions {
    /// `[classes, h]`, unit rows: pooled label descriptions.
    pooled: Tensor,
    temperature: f32,
}

/// One job of [`Backbone::run_jobs`]: the rows it reads and its prompts (`None`: the manual
/// variant, once).
struct RunJob<'a> {
    rows: &'a Rows,
    prompts: Option<&'a [&'a [f32]]>,
}

/// The output of a run of one job.
fn only_job<T>(mut outputs: Vec<T>) -> Result<T> {
    outputs.pop().ok_or_else(|| Error::Model("no output for the job".into()))
}

/// Scores `[rows, k]` of a chunk whose rows belong to different jobs: `score(job, rows)` runs on
/// each job's rows (in chunk order) and the results go back to their places.
fn per_job(
    job_of: &[usize],
    features: &Tensor,
    mut score: impl FnMut(usize, &Tensor) -> Result<Tensor>,
) -> Result<Vec<Vec<f32>>> {
    let mut out = vec![Vec::new(); job_of.len()];
    let mut jobs: Vec<usize> = job_of.to_vec();
    jobs.sort_unstable();
    jobs.dedup();
    for job in jobs {
        let idx: Vec<u32> =
            (0..job_of.len()).filter(|&i| job_of[i] == job).map(|i| i as u32).collect();
        let picked = if idx.len() == job_of.len() {
            features.clone()
        } else {
            features.index_select(&Tensor::new(idx.as_slice(), features.device())?, 0)?
        };
        for (&i, row) in idx.iter().zip(score(job, &picked)?.to_vec2::<f32>()?) {
            out[i as usize] = row;
        }
    }
    Ok(out)
}

/// Tokenizer plus the special tokens and limits the backends need.
struct TextSide {
    tokenizer: Tokenizer,
    path: PathBuf,
    /// Special tokens before the text (`[CLS]` / `<s>`).
    leading: Vec<u32>,
    /// Special tokens after the text (`[SEP]` / `</s>`).
    trailing: Vec<u32>,
    mask_id: Option<u32>,
    pad_id: u32,
    /// Placeholder ids, already cycled to `n_prompt_tokens`.
    placeholders: Vec<u32>,
    max_len: usize,
    vocab_size: usize,
}

impl TextSide {
    fn load(
        path: &Path,
        config: &Config,
        settings: &PromptSettings,
        max_len: usize,
    ) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::file(path, "tokenizer file not found"));
        }
        let mut tokenizer =
            Tokenizer::from_file(path).map_err(|e| Error::file(path, e.to_string()))?;
        // We pad, truncate and add special tokens ourselves, per template piece.
        tokenizer.with_padding(None);
        tokenizer.with_truncation(None).map_err(|e| Error::file(path, e.to_string()))?;
        let probe = tokenizer.encode("a", true).map_err(|e| Error::file(path, e.to_string()))?;
        let (ids, special) = (probe.get_ids(), probe.get_special_tokens_mask());
        let n_lead = special.iter().take_while(|&&s| s == 1).count();
        let n_trail = special.iter().rev().take_while(|&&s| s == 1).count();
        let (mut leading, mut trailing) = if n_lead < ids.len() {
            (ids[..n_lead].to_vec(), ids[ids.len() - n_trail..].to_vec())
        } else {
            (Vec::new(), Vec::new())
        };
        // A tokenizer.json without post-processor: fall back to the usual names.
        let find = |names: &[&str]| names.iter().find_map(|n| tokenizer.token_to_id(n));
        if leading.is_empty() && trailing.is_empty() {
            match (find(&["[CLS]", "<s>"]), find(&["[SEP]", "</s>"])) {
                (Some(c), Some(s)) => {
                    leading = vec![c];
                    trailing = vec![s];
                }
                _ => {
                    return Err(Error::file(
                        path,
                        "cannot tell the special tokens: no post-processor and no [CLS]/[SEP] or <s>/</s>",
                    ))
                }
            }
        }
        let mask_id = find(&["[MASK]", "<mask>"]);
        let text = settings.placeholder.as_deref().unwrap_or(DEFAULT_PLACEHOLDER);
        let base = tokenizer
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?
            .get_ids()
            .to_vec();
        if base.is_empty() && settings.n_prompt_tokens > 0 {
            return Err(Error::Tokenizer(format!("placeholder text {text:?} gives no tokens")));
        }
        let placeholders = base.iter().copied().cycle().take(settings.n_prompt_tokens).collect();
        let side = Self {
            tokenizer,
            path: path.to_path_buf(),
            leading,
            trailing,
            mask_id,
            pad_id: config.pad_token_id as u32,
            placeholders,
            max_len,
            vocab_size: config.vocab_size,
        };
        let specials = side.leading.iter().chain(&side.trailing).chain(&side.placeholders);
        side.check_ids(specials.copied(), "special or placeholder token")?;
        Ok(side)
    }

    fn check_ids(&self, ids: impl IntoIterator<Item = u32>, what: &str) -> Result<()> {
        for id in ids {
            if id as usize >= self.vocab_size {
                return Err(Error::Tokenizer(format!(
                    "{}: {what} id {id} is outside the model's vocabulary of {}",
                    self.path.display(),
                    self.vocab_size
                )));
            }
        }
        Ok(())
    }

    fn tokens(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", self.path.display())))?;
        let ids = enc.get_ids().to_vec();
        self.check_ids(ids.iter().copied(), "token")?;
        Ok(ids)
    }

    /// The single token of a verbalizer word.
    fn single_token(&self, word: &str) -> Result<u32> {
        match self.tokens(word)?.as_slice() {
            [id] => Ok(*id),
            ids => Err(Error::Task(format!(
                "label word {word:?} is {} tokens for {}; each label word must be one token",
                ids.len(),
                self.path.display()
            ))),
        }
    }

    /// Tokenizes one example for `template` into its prompted and manual variants.
    fn encode_example(
        &self,
        template: &str,
        example: &Example,
        placement: Placement,
        rng: &mut Option<(ChaCha8Rng, f32)>,
    ) -> Result<(Row, Row)> {
        let pieces = render(template, example, placement == Placement::Suffix)?;
        let markers = pieces.iter().filter(|p| **p == Piece::Prompt).count();
        if placement == Placement::Suffix && markers != 1 {
            return Err(Error::Task(format!(
                "template {template:?} has {markers} {{prompt}} markers; suffix placement needs one"
            )));
        }
        // Tokens of each piece, tagged with where they came from.
        let mut parts: Vec<(Kind, Vec<u32>)> = Vec::with_capacity(pieces.len());
        for (i, piece) in pieces.iter().enumerate() {
            match piece {
                Piece::Literal(s) => {
                    // Whitespace before a mask or the placeholders would become a token of its
                    // own in byte-level BPE; RoBERTa's <mask> strips it too.
                    let next_glues = matches!(pieces.get(i + 1), Some(Piece::Mask | Piece::Prompt));
                    let s = if next_glues { s.trim_end() } else { s.as_str() };
                    parts.push((Kind::Literal, self.tokens(s)?));
                }
                Piece::Data(s) => parts.push((Kind::Data, self.tokens(s)?)),
                Piece::Mask => {
                    let id = self.mask_id.ok_or_else(|| {
                        Error::Tokenizer(format!(
                            "{}: template has {{mask}} but the tokenizer has no [MASK] or <mask>",
                            self.path.display()
                        ))
                    })?;
                    parts.push((Kind::Mask, vec![id]));
                }
                Piece::Prompt => parts.push((Kind::Placeholder, self.placeholders.clone())),
            }
        }
        if placement == Placement::Prefix {
            parts.insert(0, (Kind::Placeholder, self.placeholders.clone()));
        }
        // Truncate the example's text, longest data piece first, never the template.
        let total = self.leading.len()
            + self.trailing.len()
            + parts.iter().map(|p| p.1.len()).sum::<usize>();
        let fixed =
            total - parts.iter().filter(|p| p.0 == Kind::Data).map(|p| p.1.len()).sum::<usize>();
        if fixed > self.max_len {
            return Err(Error::Task(format!(
                "template {template:?} with special tokens and {} placeholders takes {fixed} tokens, more than the model's {}",
                self.placeholders.len(),
                self.max_len
            )));
        }
        for _ in self.max_len..total {
            let longest = parts.iter_mut().filter(|p| p.0 == Kind::Data).max_by_key(|p| p.1.len());
            if let Some(piece) = longest {
                piece.1.pop();
            }
        }
        let mut prompted: Vec<(u32, Kind)> = Vec::with_capacity(total);
        let mut manual: Vec<(u32, Kind)> = Vec::with_capacity(total);
        let special = |ids: &[u32]| ids.iter().map(|&id| (id, Kind::Special)).collect::<Vec<_>>();
        let leading = special(&self.leading);
        // Prefix placement: right after the first special token.
        let split =
            if placement == Placement::Prefix { leading.len().min(1) } else { leading.len() };
        prompted.extend_from_slice(&leading[..split]);
        manual.extend_from_slice(&leading);
        for (kind, ids) in &parts {
            if *kind == Kind::Placeholder {
                prompted.extend(ids.iter().map(|&id| (id, *kind)));
                if placement == Placement::Prefix {
                    prompted.extend_from_slice(&leading[split..]);
                }
            } else {
                let toks = ids.iter().map(|&id| (id, *kind));
                prompted.extend(toks.clone());
                manual.extend(toks);
            }
        }
        prompted.extend(special(&self.trailing));
        manual.extend(special(&self.trailing));
        if let Some((rng, rate)) = rng.as_mut() {
            // Every attended token may be replaced, special and template tokens included, as the
            // reference perturbs every attended token; not the placeholders (they carry the
            // prompt) nor the mask (the position that is scored). Perturbed batches are only
            // scored with prompts, so the manual variant stays as it is.
            let editable: Vec<bool> =
                prompted.iter().map(|t| !matches!(t.1, Kind::Placeholder | Kind::Mask)).collect();
            let mut ids: Vec<u32> = prompted.iter().map(|t| t.0).collect();
            noise_tokens(&mut ids, &editable, *rate, self.vocab_size as u32, rng);
            prompted.iter_mut().zip(ids).for_each(|(t, id)| t.0 = id);
        }
        let mut prompted = Row::new(&prompted);
        if prompted.prompt_start.is_none() {
            // n = 0: an empty block right after the first special token.
            prompted.prompt_start = Some(split);
        }
        Ok((prompted, Row::new(&manual)))
    }

    /// Tokenizes all examples; the noise generator runs through them in order.
    fn encode_all(
        &self,
        template: &str,
        examples: &[Example],
        placement: Placement,
        noise: Option<TokenNoise>,
    ) -> Result<Rows> {
        let mut rng = match noise {
            Some(n) if !(0.0..=1.0).contains(&n.rate) => {
                return Err(Error::Task(format!("token noise rate {} is not in [0, 1]", n.rate)))
            }
            Some(n) => Some((ChaCha8Rng::seed_from_u64(n.seed), n.rate)),
            None => None,
        };
        let mut rows = Rows { prompted: Vec::new(), manual: Vec::new() };
        for ex in examples {
            let (p, m) = self.encode_example(template, ex, placement, &mut rng)?;
            rows.prompted.push(p);
            rows.manual.push(m);
        }
        Ok(rows)
    }
}

/// A safetensors checkpoint, memory-mapped, with its tensor names and parameter count.
struct Checkpoint {
    /// The file, for errors about its contents.
    path: PathBuf,
    vb: VarBuilder<'static>,
    names: HashSet<String>,
    n_params: usize,
}

fn open_checkpoint(path: &Path, device: &Device) -> Result<Checkpoint> {
    if !path.is_file() {
        return Err(Error::file(path, "model weights not found"));
    }
    // SAFETY: the file is mapped read-only; like every mmap-based loader we rely on nobody
    // truncating it while the model is alive.
    let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(path) }
        .map_err(|e| Error::file(path, e.to_string()))?;
    let mut names = HashSet::new();
    let mut n_params = 0;
    for (name, view) in st.tensors() {
        // Float tensors only: some checkpoints carry integer buffers such as position_ids.
        if DType::try_from(view.dtype()).is_ok_and(|d| d.is_float()) {
            n_params += view.shape().iter().product::<usize>();
        }
        names.insert(name);
    }
    let vb = VarBuilder::from_backend(Box::new(st), DType::F32, device.clone());
    Ok(Checkpoint { path: path.to_path_buf(), vb, names, n_params })
}

/// Standard deviation of all entries of `[rows, cols]` (f64 accumulation over row sums).
fn tensor_std(w: &Tensor) -> candle_core::Result<f32> {
    let n = w.elem_count() as f64;
    let mean = w.sum(1)?.to_dtype(DType::F64)?.to_vec1::<f64>()?.iter().sum::<f64>() / n;
    let sq = w.affine(1.0, -mean)?.sqr()?.sum(1)?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    Ok((sq.iter().sum::<f64>() / n).sqrt() as f32)
}

/// Embedding stage, encoder layers, tokenizer and prompt settings: what both backends share.
struct Backbone {
    embeddings: Embeddings,
    encoder: Encoder,
    text: TextSide,
    settings: PromptSettings,
    info: ModelInfo,
    device: Device,
}

impl Backbone {
    /// Loads the body under `prefix` (`"bert."`, `"roberta."` or `""`).
    fn load(
        dir: &Path,
        settings: PromptSettings,
        config: &Config,
        ckpt: &Checkpoint,
        prefix: &str,
        position_offset: usize,
        family: &str,
    ) -> Result<Self> {
        let wrap = |e: candle_core::Error| Error::file(&ckpt.path, e.to_string());
        let vb = if prefix.is_empty() {
            ckpt.vb.clone()
        } else {
            ckpt.vb.pp(prefix.trim_end_matches('.'))
        };
        let embeddings =
            Embeddings::load(vb.pp("embeddings"), config, position_offset).map_err(wrap)?;
        let encoder = Encoder::load(vb.pp("encoder"), config).map_err(wrap)?;
        let positions = config.max_position_embeddings.saturating_sub(position_offset);
        let max_len = positions.min(MAX_LEN_CAP);
        if max_len < 2 {
            return Err(Error::file(dir.join("config.json"), "max_position_embeddings too small"));
        }
        let text = TextSide::load(&dir.join("tokenizer.json"), config, &settings, max_len)?;
        let embedding_std = tensor_std(embeddings.word.embeddings()).map_err(wrap)?;
        let name = dir
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| dir.display().to_string());
        let info = ModelInfo {
            name,
            family: family.to_string(),
            hidden_size: config.hidden_size,
            vocab_size: config.vocab_size,
            n_params: ckpt.n_params,
            embedding_std,
        };
        Ok(Self { embeddings, encoder, text, settings, info, device: ckpt.vb.device().clone() })
    }

    /// Final hidden states `[b, t, h]` of right-padded `rows`; `prompt` = (prompts `[m, n, h]`,
    /// prompt index of each row) injects the soft prompt at each row's placeholders.
    fn hidden(&self, rows: &[&Row], prompt: Option<(&Tensor, &[u32])>) -> Result<Tensor> {
        let dev = &self.device;
        let b = rows.len();
        let t = rows.iter().map(|r| r.ids.len()).max().unwrap_or(0);
        let mut ids = vec![self.text.pad_id; b * t];
        for (i, r) in rows.iter().enumerate() {
            ids[i * t..i * t + r.ids.len()].copy_from_slice(&r.ids);
        }
        let ids = Tensor::from_vec(ids, (b, t), dev)?;
        let n = self.settings.n_prompt_tokens;
        // The placeholders' flat positions and the prompt vectors that go there.
        let placed = match (prompt, n > 0) {
            (Some((prompts, which)), true) => {
                let h = self.info.hidden_size;
                let mut idx = Vec::with_capacity(b * n);
                for (i, r) in rows.iter().enumerate() {
                    let start = r.prompt_start.ok_or_else(|| {
                        Error::Model("row without placeholders got a prompt".into())
                    })?;
                    idx.extend((0..n).map(|j| (i * t + start + j) as u32));
                }
                let src =
                    prompts.index_select(&Tensor::new(which, dev)?, 0)?.reshape((b * n, h))?;
                Some((idx, src))
            }
            _ => None,
        };
        let xs = match (&placed, self.settings.mode) {
            // BBT's `add`: onto the embedding layer's output (after its LayerNorm).
            (Some((idx, src)), PromptMode::Add) => {
                let xs = self.embeddings.forward(&ids, None)?;
                let flat = xs.reshape((b * t, ()))?;
                // Zeros with the prompt rows at the placeholders: adding it leaves every other
                // position bit-identical.
                let idx_t = Tensor::new(idx.as_slice(), dev)?;
                let added = flat.zeros_like()?.index_add(&idx_t, src, 0)?;
                (flat + added)?.reshape(xs.shape())?
            }
            // BBT's `cat`: the prompt vectors are input embeddings, before position and LayerNorm.
            (Some((idx, src)), PromptMode::Cat) => {
                self.embeddings.forward(&ids, Some((idx.as_slice(), src)))?
            }
            (None, _) => self.embeddings.forward(&ids, None)?,
        };
        let lengths: Vec<usize> = rows.iter().map(|r| r.ids.len()).collect();
        Ok(self.encoder.forward(&xs, &lengths)?)
    }

    /// Prompts as one `[m, n, h]` tensor after checking their lengths.
    fn prompt_tensor(&self, prompts: &[&[f32]]) -> Result<Tensor> {
        let (n, h) = (self.settings.n_prompt_tokens, self.info.hidden_size);
        let mut flat = Vec::with_capacity(prompts.len() * n * h);
        for p in prompts {
            if p.len() != n * h {
                return Err(Error::Model(format!(
                    "prompt has {} values, expected n_prompt_tokens x hidden_size = {n} x {h}",
                    p.len()
                )));
            }
            flat.extend_from_slice(p);
        }
        Ok(Tensor::from_vec(flat, (prompts.len(), n, h), &self.device)?)
    }

    /// Runs `head` over every (prompt, example) row in length-sorted chunks and returns
    /// `[prompt][example][k]`; `prompts = None` runs the manual variant once.
    fn run<H>(&self, rows: &Rows, prompts: Option<&[&[f32]]>, head: H) -> Result<Vec<Vec<Vec<f32>>>>
    where
        H: Fn(&Tensor, &[&Row]) -> Result<Tensor>,
    {
        let job = RunJob { rows, prompts };
        only_job(self.run_jobs(std::slice::from_ref(&job), |hidden, rows, _| {
            Ok(head(hidden, rows)?.to_vec2::<f32>()?)
        })?)
    }

    /// [`Backbone::run`] for several jobs at once (different clients' batches and populations):
    /// their rows share length-sorted chunks, so each pass is as full as one job's would be.
    /// `head` gets each chunk's hidden states, rows and the job of every row, and returns one
    /// score row per row. All jobs must bring prompts, or all none. Returns
    /// `[job][prompt][example][k]`.
    fn run_jobs<H>(&self, jobs: &[RunJob<'_>], head: H) -> Result<Vec<Vec<Vec<Vec<f32>>>>>
    where
        H: Fn(&Tensor, &[&Row], &[usize]) -> Result<Vec<Vec<f32>>>,
    {
        let prompted = jobs.iter().any(|j| j.prompts.is_some());
        if prompted && jobs.iter().any(|j| j.prompts.is_none()) {
            return Err(Error::Model("jobs with and without prompts in one run".into()));
        }
        // Every (job, prompt, example) row, with its prompt's index among all jobs' prompts.
        struct Item<'r> {
            row: &'r Row,
            job: usize,
            prompt: usize,
            slot: usize,
        }
        let mut items = Vec::new();
        let mut all_prompts: Vec<&[f32]> = Vec::new();
        let mut shapes = Vec::with_capacity(jobs.len());
        for (ji, job) in jobs.iter().enumerate() {
            let (variant, m) = match job.prompts {
                None => (&job.rows.manual, 1),
                Some(ps) => (&job.rows.prompted, ps.len()),
            };
            let e = variant.len();
            for p in 0..m {
                for (ei, row) in variant.iter().enumerate() {
                    items.push(Item {
                        row,
                        job: ji,
                        prompt: all_prompts.len() + p,
                        slot: p * e + ei,
                    });
                }
            }
            if let Some(ps) = job.prompts {
                all_prompts.extend_from_slice(ps);
            }
            shapes.push((m, e));
        }
        let ptensor = if prompted { Some(self.prompt_tensor(&all_prompts)?) } else { None };
        let mut order: Vec<usize> = (0..items.len()).collect();
        // Similar lengths together: attention's padded layout (off the CPU) wastes less.
        order.sort_by_key(|&r| items[r].row.ids.len());
        let mut out: Vec<Vec<Vec<f32>>> =
            shapes.iter().map(|&(m, e)| vec![Vec::new(); m * e]).collect();
        let mut start = 0;
        while start < order.len() {
            let mut end = start + 1;
            while end < order.len() {
                let len = items[order[end]].row.ids.len();
                if (end + 1 - start) * len > TOKENS_PER_PASS {
                    break;
                }
                end += 1;
            }
            let chunk = &order[start..end];
            let chunk_rows: Vec<&Row> = chunk.iter().map(|&r| items[r].row).collect();
            let which: Vec<u32> = chunk.iter().map(|&r| items[r].prompt as u32).collect();
            let job_of: Vec<usize> = chunk.iter().map(|&r| items[r].job).collect();
            let hidden =
                self.hidden(&chunk_rows, ptensor.as_ref().map(|p| (p, which.as_slice())))?;
            let scores = head(&hidden, &chunk_rows, &job_of)?;
            if scores.len() != chunk.len() {
                return Err(Error::Model("head returned a wrong number of rows".into()));
            }
            for (&r, s) in chunk.iter().zip(scores) {
                out[items[r].job][items[r].slot] = s;
            }
            start = end;
        }
        Ok(out
            .into_iter()
            .zip(&shapes)
            .map(|(flat, &(m, e))| {
                let mut it = flat.into_iter();
                (0..m).map(|_| it.by_ref().take(e).collect()).collect()
            })
            .collect())
    }

    fn check_labels(examples: &[Example], n_classes: usize) -> Result<Vec<usize>> {
        examples
            .iter()
            .map(|ex| {
                if ex.label < n_classes {
                    Ok(ex.label)
                } else {
                    Err(Error::Task(format!(
                        "label {} out of range for {n_classes} classes",
                        ex.label
                    )))
                }
            })
            .collect()
    }

    fn input_ids(rows: &Rows, with_placeholders: bool) -> Vec<Vec<u32>> {
        let v = if with_placeholders { &rows.prompted } else { &rows.manual };
        v.iter().map(|r| r.ids.clone()).collect()
    }
}

/// Mean of the hidden states over each row's pooled tokens, scaled to unit length: `[b, h]`.
fn pool_unit(hidden: &Tensor, rows: &[&Row]) -> Result<Tensor> {
    let (b, t, _h) = hidden.dims3()?;
    let mut w = vec![0f32; b * t];
    for (i, r) in rows.iter().enumerate() {
        let count = r.pool.iter().filter(|&&p| p).count().max(1) as f32;
        for (j, &p) in r.pool.iter().enumerate() {
            if p {
                w[i * t + j] = 1.0 / count;
            }
        }
    }
    let w = Tensor::from_vec(w, (b, t, 1), hidden.device())?;
    let pooled = hidden.broadcast_mul(&w)?.sum(1)?;
    let norm = pooled.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.clamp(1e-12, f64::INFINITY)?;
    Ok(pooled.broadcast_div(&norm)?)
}

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

impl ScoringHead for MlmHead {
    const BACKEND: &'static str = "MaskedLm";
    /// The label words' token ids, `[classes]`.
    type Classes = Tensor;

    fn load(
        dir: &Path,
        settings: PromptSettings,
        config: &Config,
        ckpt: &Checkpoint,
    ) -> Result<(Backbone, Self)> {
        let has = |k: &str| ckpt.names.contains(k);
        let (layout, prefix, offset, family) = if has("bert.embeddings.word_embeddings.weight")
            && has("cls.predictions.transform.dense.weight")
        {
            (Layout::Bert, "bert.", 0, "bert")
        } else if has("roberta.embeddings.word_embeddings.weight") && has("lm_head.dense.weight") {
            (Layout::Roberta, "roberta.", config.pad_token_id + 1, "roberta")
        } else {
            return Err(Error::file(
                &ckpt.path,
                "no masked-LM layout: expected bert.* with cls.predictions.* (BERT) or roberta.* with lm_head.* (RoBERTa)",
            ));
        };
        let body = Backbone::load(dir, settings, config, ckpt, prefix, offset, family)?;
        let head = Self::load_weights(
            ckpt.vb.clone(),
            layout,
            config,
            body.embeddings.word.embeddings(),
            &ckpt.names,
        )
        .map_err(|e| Error::file(&ckpt.path, e.to_string()))?;
        Ok((body, head))
    }

    fn prepare(
        body: &Backbone,
        task: &TaskSpec,
        examples: &[Example],
        noise: Option<TokenNoise>,
    ) -> Result<(Vec<usize>, Batch<Tensor>)> {
        let n_classes = task.n_classes();
        if task.mlm.label_words.len() != n_classes {
            return Err(Error::Task(format!(
                "{} label words for {n_classes} classes",
                task.mlm.label_words.len()
            )));
        }
        let label_ids = task
            .mlm
            .label_words
            .iter()
            .map(|w| body.text.single_token(w))
            .collect::<Result<Vec<_>>>()?;
        distinct_label_ids(&task.mlm.label_words, &label_ids)?;
        let labels = Backbone::check_labels(examples, n_classes)?;
        let rows =
            body.text.encode_all(&task.mlm.template, examples, body.settings.placement, noise)?;
        if rows.manual.iter().any(|r| r.mask_pos.is_none()) {
            return Err(Error::Task(format!("template {:?} has no {{mask}}", task.mlm.template)));
        }
        // On the device once here rather than at every scoring call.
        let label_ids = Tensor::new(label_ids.as_slice(), &body.device)?;
        Ok((labels, Batch { rows, classes: label_ids }))
    }

    /// The hidden state at each row's `{mask}` (`prepare` made sure every row has one).
    fn features(hidden: &Tensor, rows: &[&Row]) -> Result<Tensor> {
        let (bsz, t, h) = hidden.dims3()?;
        let at: Vec<u32> = rows
            .iter()
            .enumerate()
            .map(|(i, r)| (i * t + r.mask_pos.unwrap_or(0)) as u32)
            .collect();
        let at = Tensor::from_vec(at, bsz, hidden.device())?;
        Ok(hidden.reshape((bsz * t, h))?.index_select(&at, 0)?)
    }

    fn class_scores(&self, features: &Tensor, label_ids: &Tensor) -> Result<Tensor> {
        Ok(self.logits(features, label_ids)?)
    }
}

/// The head of a [`SentenceEncoder`]: no weights of its own, the cosine between the mean-pooled
/// input and each mean-pooled label description over the task's temperature. Loads checkpoints
/// whose keys carry no prefix (`embeddings.*`, `encoder.*`, as sentence-transformers saves them)
/// or a `bert.` / `roberta.` one.
pub struct EncoderHead;

impl ScoringHead for EncoderHead {
    const BACKEND: &'static str = "SentenceEncoder";
    type Classes = LabelDescriptions;

    fn load(
        dir: &Path,
        settings: PromptSettings,
        config: &Config,
        ckpt: &Checkpoint,
    ) -> Result<(Backbone, Self)> {
        let prefix = ["", "bert.", "roberta."]
            .into_iter()
            .find(|p| ckpt.names.contains(&format!("{p}embeddings.word_embeddings.weight")))
            .ok_or_else(|| Error::file(&ckpt.path, "no embeddings.word_embeddings.weight (with or without a bert./roberta. prefix)"))?;
        let roberta = prefix == "roberta."
            || matches!(
                config.model_type.as_deref(),
                Some("roberta" | "xlm-roberta" | "camembert")
            );
        let offset = if roberta { config.pad_token_id + 1 } else { 0 };
        let body = Backbone::load(dir, settings, config, ckpt, prefix, offset, "minilm-encoder")?;
        Ok((body, Self))
    }

    fn prepare(
        body: &Backbone,
        task: &TaskSpec,
        examples: &[Example],
        noise: Option<TokenNoise>,
    ) -> Result<(Vec<usize>, Batch<LabelDescriptions>)> {
        let n_classes = task.n_classes();
        let enc = &task.encoder;
        if enc.label_descriptions.len() != n_classes {
            return Err(Error::Task(format!(
                "{} label descriptions for {n_classes} classes",
                enc.label_descriptions.len()
            )));
        }
        if !(enc.temperature > 0.0 && enc.temperature.is_finite()) {
            return Err(Error::Task(format!(
                "encoder temperature {} must be > 0",
                enc.temperature
            )));
        }
        let labels = Backbone::check_labels(examples, n_classes)?;
        // Label descriptions: plain text, no prompt, no noise, pooled once per batch.
        let descs: Vec<Example> = enc
            .label_descriptions
            .iter()
            .map(|d| Example { text: d.clone(), text_b: None, label: 0 })
            .collect();
        let desc_rows = body.text.encode_all("{text}", &descs, Placement::Prefix, None)?;
        let pooled = body.run(&desc_rows, None, pool_unit)?.pop().unwrap_or_default();
        let h = body.info.hidden_size;
        let flat: Vec<f32> = pooled.into_iter().flatten().collect();
        let pooled = Tensor::from_vec(flat, (n_classes, h), &body.device)?;
        let rows = body.text.encode_all(&enc.template, examples, body.settings.placement, noise)?;
        let classes = LabelDescriptions { pooled, temperature: enc.temperature };
        Ok((labels, Batch { rows, classes }))
    }

    fn features(hidden: &Tensor, rows: &[&Row]) -> Result<Tensor> {
        pool_unit(hidden, rows)
    }

    fn class_scores(&self, pooled: &Tensor, labels: &LabelDescriptions) -> Result<Tensor> {
        Ok(pooled.matmul(&labels.pooled.t()?)?.affine(1.0 / labels.temperature as f64, 0.0)?)
    }
}
