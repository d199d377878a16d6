//! The causal backend's tokenizer: a `tokenizer.json` with padding and truncation switched off,
//! or, for a GGUF file without one beside it, a byte-level BPE built from the file's
//! `tokenizer.ggml.*` metadata.

use std::path::Path;

use candle_core::quantized::gguf_file;
use tokenizers::Tokenizer;

use super::model_err;
use crate::{Error, Result};

/// Loads `tokenizer.json` with its padding and truncation switched off (we pad ourselves).
pub fn load_tokenizer_json(path: &Path) -> Result<Tokenizer> {
    if !path.exists() {
        return Err(Error::file(path, "tokenizer file not found"));
    }
    let mut tok = Tokenizer::from_file(path)
        .map_err(|e| model_err(path, format!("invalid tokenizer: {e}")))?;
    tok.with_padding(None);
    tok.with_truncation(None).map_err(|e| model_err(path, e))?;
    Ok(tok)
}

/// Builds a byte-level BPE tokenizer from GGUF metadata (`tokenizer.ggml.*`, model `gpt2`).
pub(super) fn tokenizer_from_gguf(ct: &gguf_file::Content, path: &Path) -> Result<Tokenizer> {
    use tokenizers::models::bpe::BPE;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::pre_tokenizers::digits::Digits;
    use tokenizers::pre_tokenizers::sequence::Sequence;
    use tokenizers::pre_tokenizers::PreTokenizerWrapper;

    let get = |k: &str| {
        ct.metadata.get(k).ok_or_else(|| model_err(path, format!("GGUF metadata lacks `{k}` (needed to build the tokenizer; or put a tokenizer.json beside the file)")))
    };
    let model = get("tokenizer.ggml.model")?.to_string().map_err(|e| model_err(path, e))?;
    if model != "gpt2" {
        return Err(model_err(path, format!("GGUF tokenizer model `{model}` is not supported (gpt2 byte-level BPE only); put a tokenizer.json beside the file")));
    }
    let tokens = get("tokenizer.ggml.tokens")?.to_vec().map_err(|e| model_err(path, e))?;
    let mut vocab = tokenizers::models::bpe::Vocab::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        vocab.insert(t.to_string().map_err(|e| model_err(path, e))?.clone(), i as u32);
    }
    let mut merges = Vec::new();
    if let Some(m) = ct.metadata.get("tokenizer.ggml.merges") {
        for v in m.to_vec().map_err(|e| model_err(path, e))? {
            let s = v.to_string().map_err(|e| model_err(path, e))?;
            let (a, b) =
                s.split_once(' ').ok_or_else(|| model_err(path, format!("bad merge {s:?}")))?;
            merges.push((a.to_string(), b.to_string()));
        }
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| model_err(path, format!("cannot build BPE tokenizer: {e}")))?;
    let mut tok = Tokenizer::new(bpe);
    let pre = ct
        .metadata
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.to_string().ok().cloned())
        .unwrap_or_default();
    let byte_level = ByteLevel::new(false, true, true);
    // SmolLM / StarCoder-style vocabularies split digits one by one before byte-level BPE.
    let pre_tok: PreTokenizerWrapper = if matches!(pre.as_str(), "smollm" | "starcoder" | "refact")
    {
        Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into()
    } else {
        byte_level.into()
    };
    tok.with_pre_tokenizer(Some(pre_tok));
    tok.with_decoder(Some(ByteLevel::default()));
    Ok(tok)
}
