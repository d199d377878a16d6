//! The two scoring heads: [`MlmHead`] (label-word logits at the template's mask) and
//! [`EncoderHead`] (cosine to pooled label descriptions).

use super::*;

/// The head of a [`MaskedLm`]: BERT's `cls.predictions` or RoBERTa's `lm_head` (dense,
/// activation, LayerNorm, decoder), scoring classes by the logits of their label words at the
/// template's `{mask}`. Loads checkpoints with the key layout `bert.*` + `cls.predictions.*` (BERT)
/// or `roberta.*` + `lm_head.*` (RoBERTa, positions from `pad_token_id + 1`).
pub struct MlmHead {
    pub(super) dense: Linear,
    pub(super) act: HiddenAct,
    pub(super) layer_norm: LayerNorm,
    /// `[vocab, h]`, the word embeddings where the checkpoint ties them.
    pub(super) decoder: Tensor,
    pub(super) bias: Tensor,
}

impl MlmHead {
    pub(super) fn load_weights(
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
    pub(super) fn logits(&self, xs: &Tensor, ids: &Tensor) -> candle_core::Result<Tensor> {
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
pub(super) enum Layout {
    /// `bert.*` + `cls.predictions.*`.
    Bert,
    /// `roberta.*` + `lm_head.*`.
    Roberta,
}

/// What a [`SentenceEncoder`] batch scores its rows against.
pub(super) struct LabelDescriptions {
    /// `[classes, h]`, unit rows: pooled label descriptions.
    pub(super) pooled: Tensor,
    pub(super) temperature: f32,
}

/// Mean of the hidden states over each row's pooled tokens, scaled to unit length: `[b, h]`.
pub(super) fn pool_unit(hidden: &Tensor, rows: &[&Row]) -> Result<Tensor> {
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
