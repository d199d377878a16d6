//! The text side: the tokenizer with its special tokens and limits ([`TextSide`]), and the
//! rows it renders (each example with and without its placeholders).

use super::*;

/// Where a token of the input came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Special,
    Literal,
    Data,
    Mask,
    Placeholder,
}

/// One tokenized input (one variant of one example).
#[derive(Debug, Clone)]
pub(super) struct Row {
    pub(super) ids: Vec<u32>,
    /// First placeholder (placeholders are contiguous); `None` in the manual variant.
    pub(super) prompt_start: Option<usize>,
    /// Position of the `{mask}` token, if the template has one.
    pub(super) mask_pos: Option<usize>,
    /// Tokens the encoder pools: the template's and the example's own, no special tokens or
    /// placeholders.
    pub(super) pool: Vec<bool>,
}

impl Row {
    pub(super) fn new(tokens: &[(u32, Kind)]) -> Self {
        let ids = tokens.iter().map(|t| t.0).collect();
        let prompt_start = tokens.iter().position(|t| t.1 == Kind::Placeholder);
        let mask_pos = tokens.iter().position(|t| t.1 == Kind::Mask);
        let pool =
            tokens.iter().map(|t| matches!(t.1, Kind::Literal | Kind::Data | Kind::Mask)).collect();
        Self { ids, prompt_start, mask_pos, pool }
    }
}

/// Both variants of every example: with placeholders (soft prompt) and without (manual prompt).
pub(super) struct Rows {
    pub(super) prompted: Vec<Row>,
    pub(super) manual: Vec<Row>,
}

/// Tokenizer plus the special tokens and limits the backends need.
pub(super) struct TextSide {
    pub(super) tokenizer: Tokenizer,
    pub(super) path: PathBuf,
    /// Special tokens before the text (`[CLS]` / `<s>`).
    pub(super) leading: Vec<u32>,
    /// Special tokens after the text (`[SEP]` / `</s>`).
    pub(super) trailing: Vec<u32>,
    pub(super) mask_id: Option<u32>,
    pub(super) pad_id: u32,
    /// Placeholder ids, already cycled to `n_prompt_tokens`.
    pub(super) placeholders: Vec<u32>,
    pub(super) max_len: usize,
    pub(super) vocab_size: usize,
}

impl TextSide {
    pub(super) fn load(
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

    pub(super) fn check_ids(&self, ids: impl IntoIterator<Item = u32>, what: &str) -> Result<()> {
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

    pub(super) fn tokens(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", self.path.display())))?;
        let ids = enc.get_ids().to_vec();
        self.check_ids(ids.iter().copied(), "token")?;
        Ok(ids)
    }

    /// The single token of a verbalizer word.
    pub(super) fn single_token(&self, word: &str) -> Result<u32> {
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
    pub(super) fn encode_example(
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
    pub(super) fn encode_all(
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
