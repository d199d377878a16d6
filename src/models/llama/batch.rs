//! Turning examples and prompts into decoder inputs: tokenizing and templating a task's
//! examples into a [`CausalBatch`] (with the text's key/value cache in suffix placement), the
//! label-word and placeholder tokens, left-padded token embeddings, and the soft prompt as a
//! tensor injected over the placeholders.

use candle_core::Tensor;
use rand::SeedableRng;

use super::decoder::KvCache;
use super::masks::causal_mask;
use super::CausalLm;
use crate::data::split::noise_tokens;
use crate::data::Example;
use crate::models::{distinct_label_ids, Placement, Prepared, PromptMode, TokenNoise};
use crate::task::{render, Piece, TaskSpec};
use crate::{Error, Result};

/// One example, tokenized.
pub(super) struct Encoded {
    /// Everything before the placeholders (suffix) or the whole input (prefix).
    pub(super) head: Vec<u32>,
    /// Template tail after the placeholders (suffix placement only).
    pub(super) tail: Vec<u32>,
}

/// What `prepare` keeps for the causal backend.
pub(super) struct CausalBatch {
    pub(super) label_ids: Vec<u32>,
    pub(super) placeholders: Vec<u32>,
    pub(super) placement: Placement,
    pub(super) examples: Vec<Encoded>,
    /// Processing order (by length); chunks of it share one padded forward.
    pub(super) order: Vec<usize>,
    /// Suffix placement: per chunk of `order`, the text's key/value cache.
    pub(super) caches: Vec<KvCache>,
    /// Suffix placement: the shared tail tokens.
    pub(super) tail: Vec<u32>,
}

impl CausalLm {
    pub(super) fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(format!("cannot encode {text:?}: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The single token of each label word.
    fn label_ids(&self, task: &TaskSpec) -> Result<Vec<u32>> {
        let words = &task.causal.label_words;
        let ids = words
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
            .collect::<Result<Vec<u32>>>()?;
        distinct_label_ids(words, &ids)?;
        Ok(ids)
    }

    /// `n_prompt_tokens` placeholder tokens: the placeholder text's tokens, cycled.
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

    /// [`crate::models::PromptModel::prepare`] of the causal backend: encodes and templates
    /// every example (with optional token noise) and, in suffix placement, runs each
    /// length-sorted chunk's text once to keep its key/value cache.
    pub(super) fn prepare_batch(
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
            // Positions past the rotary table would index outside it.
            let positions = self.cos.dim(0)?;
            let length = head.len() + placeholders.len() + tail.len();
            if length > positions {
                return Err(Error::config(
                    "n_prompt_tokens",
                    format!(
                        "example {i} takes {length} positions with {} placeholders, more than \
                         the model's {positions} (lower n_prompt_tokens or max_text_tokens)",
                        placeholders.len()
                    ),
                ));
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

    /// Token embeddings of left-padded `seqs` as `[B, T, H]`, plus the attended flags.
    pub(super) fn embed_padded(&self, seqs: &[&[u32]]) -> Result<(Tensor, Vec<Vec<bool>>)> {
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
    pub(super) fn inject(&self, x: &Tensor, prompt: &Tensor, start: usize) -> Result<Tensor> {
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

    /// The prompt's `n_prompt_tokens * hidden` values as `[n_prompt_tokens, hidden]`.
    pub(super) fn prompt_tensor(&self, prompt: &[f32]) -> Result<Tensor> {
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
