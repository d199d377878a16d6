//! The part both BERT backends share: the embedding stage (the soft prompt enters after its
//! LayerNorm), the checkpoint, and [`Backbone`], which runs the encoder over length-sorted
//! chunks of (prompt, example) rows.

use super::*;

/// Word, position and token-type embeddings with their LayerNorm (BERT's embedding layer,
/// dropout none). Token types are all 0: templates render one segment.
pub(super) struct Embeddings {
    pub(super) word: Embedding,
    pub(super) position: Embedding,
    pub(super) token_type: Tensor,
    pub(super) layer_norm: LayerNorm,
    /// First position id: 0 for BERT, `padding_idx + 1` for RoBERTa.
    pub(super) position_offset: usize,
}

impl Embeddings {
    pub(super) fn load(
        vb: VarBuilder,
        config: &Config,
        position_offset: usize,
    ) -> candle_core::Result<Self> {
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
    pub(super) fn forward(
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
pub(super) fn replace_rows(
    flat: &Tensor,
    at: &[u32],
    vectors: &Tensor,
) -> candle_core::Result<Tensor> {
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

/// One job of [`Backbone::run_jobs`]: the rows it reads and its prompts (`None`: the manual
/// variant, once).
pub(super) struct RunJob<'a> {
    pub(super) rows: &'a Rows,
    pub(super) prompts: Option<&'a [&'a [f32]]>,
}

/// The output of a run of one job.
pub(super) fn only_job<T>(mut outputs: Vec<T>) -> Result<T> {
    outputs.pop().ok_or_else(|| Error::Model("no output for the job".into()))
}

/// Scores `[rows, k]` of a chunk whose rows belong to different jobs: `score(job, rows)` runs on
/// each job's rows (in chunk order) and the results go back to their places.
pub(super) fn per_job(
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

/// A safetensors checkpoint, memory-mapped, with its tensor names and parameter count.
pub(super) struct Checkpoint {
    /// The file, for errors about its contents.
    pub(super) path: PathBuf,
    pub(super) vb: VarBuilder<'static>,
    pub(super) names: HashSet<String>,
    pub(super) n_params: usize,
}

pub(super) fn open_checkpoint(path: &Path, device: &Device) -> Result<Checkpoint> {
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
pub(super) fn tensor_std(w: &Tensor) -> candle_core::Result<f32> {
    let n = w.elem_count() as f64;
    let mean = w.sum(1)?.to_dtype(DType::F64)?.to_vec1::<f64>()?.iter().sum::<f64>() / n;
    let sq = w.affine(1.0, -mean)?.sqr()?.sum(1)?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    Ok((sq.iter().sum::<f64>() / n).sqrt() as f32)
}

/// Embedding stage, encoder layers, tokenizer and prompt settings: what both backends share.
pub(super) struct Backbone {
    pub(super) embeddings: Embeddings,
    pub(super) encoder: Encoder,
    pub(super) text: TextSide,
    pub(super) settings: PromptSettings,
    pub(super) info: ModelInfo,
    pub(super) device: Device,
}

impl Backbone {
    /// Loads the body under `prefix` (`"bert."`, `"roberta."` or `""`).
    pub(super) fn load(
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
    pub(super) fn hidden(
        &self,
        rows: &[&Row],
        prompt: Option<(&Tensor, &[u32])>,
    ) -> Result<Tensor> {
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
    pub(super) fn prompt_tensor(&self, prompts: &[&[f32]]) -> Result<Tensor> {
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
    pub(super) fn run<H>(
        &self,
        rows: &Rows,
        prompts: Option<&[&[f32]]>,
        head: H,
    ) -> Result<Vec<Vec<Vec<f32>>>>
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
    pub(super) fn run_jobs<H>(
        &self,
        jobs: &[RunJob<'_>],
        head: H,
    ) -> Result<Vec<Vec<Vec<Vec<f32>>>>>
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

    pub(super) fn check_labels(examples: &[Example], n_classes: usize) -> Result<Vec<usize>> {
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

    pub(super) fn input_ids(rows: &Rows, with_placeholders: bool) -> Vec<Vec<u32>> {
        let v = if with_placeholders { &rows.prompted } else { &rows.manual };
        v.iter().map(|r| r.ids.clone()).collect()
    }
}
