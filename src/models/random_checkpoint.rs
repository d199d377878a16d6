//! A RoBERTa masked-LM checkpoint with random weights, written to disk in the layout
//! [`super::bert::MaskedLm`] loads. Throughput depends on a model's shapes, not its weights: this
//! lets `fedbpt bench` measure roberta-large (the paper's model) on machines that hold no model
//! files.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::Normal;
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{AddedToken, Tokenizer};

use crate::{Error, Result};

/// RoBERTa's position table: 512 tokens plus the `pad_token_id + 1` offset.
const MAX_POSITIONS: usize = 514;
/// RoBERTa's `<pad>`.
const PAD_ID: usize = 1;
/// Specials at ids 0..4 as in RoBERTa; `<mask>` takes the last id.
const SPECIALS: [&str; 4] = ["<s>", "<pad>", "</s>", "<unk>"];
const MASK: &str = "<mask>";
/// BERT's initializer range: weights ~ N(0, 0.02).
const INIT_STD: f32 = 0.02;

/// Common English words, the MR template's words and its label words first: with the letters
/// and `##` letters below, every lowercase word tokenizes, the frequent ones as one token.
const WORDS: &str = "\
    it was bad great the and of to is in that this film movie with for as but its an be on \
    you not by about more one all than like have has so are if at from who story there out \
    what too much his up no or good can into comedy just even characters only will funny \
    some time little well way their been most any love make us he they never enough work we \
    life your does do director best which own new very could would through how because real \
    may people makes action performances drama world made plot many her she really both \
    those them better script something audience while other fun first nothing cast long \
    often still performance self interesting screen moments minutes where hollywood between \
    being over old worth hard every another almost man seems humor these should feel kind \
    when see thriller direction heart acting entertaining look thing then dull watch without \
    less might american things years big here always romantic sense original pretty bit far \
    yet tale material give before seen end why come ever family special effects boring \
    terrible beautiful smart compelling flat stupid mess worst charming clever sweet fresh \
    tedious predictable powerful moving wonderful awful dumb cliches visual style history \
    rather shot becomes gets take want know same had were did my me i a our him whose such \
    though although least full star stars picture series genre hour hours two three";

/// Whether a character is split off as punctuation by BERT's pre-tokenizer.
const PUNCTUATION: &str = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~";

/// Layer sizes of a RoBERTa encoder with its MLM head (positions 514, one token type,
/// LayerNorm eps 1e-5 and pad id 1 are RoBERTa's for every shape).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RobertaShape {
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub intermediate: usize,
    pub vocab: usize,
}

impl RobertaShape {
    /// roberta-large (355M parameters), the model of the BBT and FedBPT papers.
    pub fn large() -> Self {
        Self { layers: 24, hidden: 1024, heads: 16, intermediate: 4096, vocab: 50265 }
    }
}

/// Writes `config.json`, `model.safetensors` (f32, weights ~ N(0, 0.02), LayerNorms at 1 and 0,
/// biases 0, decoder tied to the word embeddings as in RoBERTa) and a WordPiece `tokenizer.json`
/// of exactly `shape.vocab` tokens into `dir` (created if missing). Deterministic in `seed`.
pub fn write_roberta(dir: &Path, shape: &RobertaShape, seed: u64) -> Result<()> {
    if shape.heads == 0 || !shape.hidden.is_multiple_of(shape.heads) {
        return Err(Error::Model(format!(
            "hidden {} is not a multiple of heads {}",
            shape.hidden, shape.heads
        )));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let config = config_json(shape);
    let path = dir.join("config.json");
    let text =
        serde_json::to_string_pretty(&config).map_err(|e| Error::file(&path, e.to_string()))?;
    std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
    write_tokenizer(dir, shape.vocab)?;
    let path = dir.join("model.safetensors");
    let tensors = weights(shape, seed)?;
    candle_core::safetensors::save(&tensors, &path).map_err(|e| Error::file(&path, e.to_string()))
}

/// The Hugging Face `config.json` of roberta-large with `shape`'s sizes.
fn config_json(shape: &RobertaShape) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["RobertaForMaskedLM"],
        "model_type": "roberta",
        "vocab_size": shape.vocab,
        "hidden_size": shape.hidden,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "intermediate_size": shape.intermediate,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "max_position_embeddings": MAX_POSITIONS,
        "type_vocab_size": 1,
        "initializer_range": INIT_STD,
        "layer_norm_eps": 1e-5,
        "pad_token_id": PAD_ID,
        "bos_token_id": 0,
        "eos_token_id": 2,
    })
}

/// Seeded N(0, 0.02) tensors; each is generated straight into its own buffer, so the peak is the
/// model's size once (1.4 GB for roberta-large) plus one tensor's bytes while saving.
struct Gen {
    rng: ChaCha8Rng,
    normal: Normal<f32>,
}

impl Gen {
    fn normal(&mut self, shape: &[usize]) -> Result<Tensor> {
        let n = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| self.rng.sample(self.normal)).collect();
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
    }
}

fn fill(shape: &[usize], value: f32) -> Result<Tensor> {
    Ok(Tensor::full(value, shape, &Device::Cpu)?)
}

/// Every tensor of `roberta.*` + `lm_head.*` (no `lm_head.decoder.weight`: tied).
fn weights(shape: &RobertaShape, seed: u64) -> Result<HashMap<String, Tensor>> {
    let normal = Normal::new(0.0, INIT_STD).map_err(|e| Error::Model(e.to_string()))?;
    let mut g = Gen { rng: ChaCha8Rng::seed_from_u64(seed), normal };
    let (h, i, v) = (shape.hidden, shape.intermediate, shape.vocab);
    let mut ts = HashMap::new();
    let e = "roberta.embeddings";
    ts.insert(format!("{e}.word_embeddings.weight"), g.normal(&[v, h])?);
    ts.insert(format!("{e}.position_embeddings.weight"), g.normal(&[MAX_POSITIONS, h])?);
    ts.insert(format!("{e}.token_type_embeddings.weight"), g.normal(&[1, h])?);
    ts.insert(format!("{e}.LayerNorm.weight"), fill(&[h], 1.0)?);
    ts.insert(format!("{e}.LayerNorm.bias"), fill(&[h], 0.0)?);
    for l in 0..shape.layers {
        let p = format!("roberta.encoder.layer.{l}");
        let mut dense = |name: String, rows: usize, cols: usize| -> Result<()> {
            ts.insert(format!("{name}.weight"), g.normal(&[rows, cols])?);
            ts.insert(format!("{name}.bias"), fill(&[rows], 0.0)?);
            Ok(())
        };
        for m in ["query", "key", "value"] {
            dense(format!("{p}.attention.self.{m}"), h, h)?;
        }
        dense(format!("{p}.attention.output.dense"), h, h)?;
        dense(format!("{p}.intermediate.dense"), i, h)?;
        dense(format!("{p}.output.dense"), h, i)?;
        for ln in ["attention.output.LayerNorm", "output.LayerNorm"] {
            ts.insert(format!("{p}.{ln}.weight"), fill(&[h], 1.0)?);
            ts.insert(format!("{p}.{ln}.bias"), fill(&[h], 0.0)?);
        }
    }
    ts.insert("lm_head.dense.weight".into(), g.normal(&[h, h])?);
    ts.insert("lm_head.dense.bias".into(), fill(&[h], 0.0)?);
    ts.insert("lm_head.layer_norm.weight".into(), fill(&[h], 1.0)?);
    ts.insert("lm_head.layer_norm.bias".into(), fill(&[h], 0.0)?);
    ts.insert("lm_head.bias".into(), fill(&[v], 0.0)?);
    Ok(ts)
}

/// Exactly `vocab` tokens: the specials at 0..4, punctuation, digits, letters and `##` letters
/// (so any lowercase word tokenizes), the common words that fit, `[unused{i}]` fillers, and
/// `<mask>` last.
fn vocabulary(vocab: usize) -> Result<Vec<String>> {
    let mut base: Vec<String> = SPECIALS.iter().map(|s| s.to_string()).collect();
    let singles = PUNCTUATION.chars().chain('0'..='9').chain('a'..='z');
    base.extend(singles.map(String::from));
    base.extend(('0'..='9').chain('a'..='z').map(|c| format!("##{c}")));
    if base.len() + 1 > vocab {
        return Err(Error::Model(format!(
            "a vocabulary of {vocab} cannot hold the {} special, punctuation, digit and letter tokens",
            base.len() + 1
        )));
    }
    let mut seen: HashSet<String> = base.iter().cloned().collect();
    for w in WORDS.split_whitespace().map(str::to_string) {
        if base.len() + 1 == vocab {
            break;
        }
        if seen.insert(w.clone()) {
            base.push(w);
        }
    }
    let fillers = vocab - 1 - base.len();
    base.extend((0..fillers).map(|i| format!("[unused{i}]")));
    base.push(MASK.to_string());
    Ok(base)
}

/// A lowercasing WordPiece `tokenizer.json` with RoBERTa's specials and post-processor (plus the
/// `vocab.txt` it was built from).
fn write_tokenizer(dir: &Path, vocab: usize) -> Result<()> {
    let words = vocabulary(vocab)?;
    let vocab_path = dir.join("vocab.txt");
    std::fs::write(&vocab_path, words.join("\n") + "\n").map_err(|e| Error::io(&vocab_path, e))?;
    let tok_err = |e: tokenizers::Error| Error::Tokenizer(e.to_string());
    let wp = WordPiece::from_file(&vocab_path.display().to_string())
        .unk_token("<unk>".into())
        .build()
        .map_err(tok_err)?;
    let mut tok = Tokenizer::new(wp);
    tok.with_normalizer(Some(BertNormalizer::default()));
    tok.with_pre_tokenizer(Some(BertPreTokenizer));
    tok.with_post_processor(Some(RobertaProcessing::new(("</s>".into(), 2), ("<s>".into(), 0))));
    let specials: Vec<AddedToken> =
        SPECIALS.iter().chain(&[MASK]).map(|s| AddedToken::from(s.to_string(), true)).collect();
    tok.add_special_tokens(&specials);
    tok.save(dir.join("tokenizer.json"), false).map_err(tok_err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BackendKind, Config};
    use crate::data::Example;
    use crate::models::Placement;
    use crate::task::TaskSpec;

    #[test]
    fn small_random_roberta_loads_scores_and_has_the_full_vocabulary() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("roberta-small-random");
        let shape = RobertaShape { layers: 2, hidden: 32, heads: 2, intermediate: 64, vocab: 600 };
        write_roberta(&dir, &shape, 3).unwrap();

        let tok = Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
        assert_eq!(tok.get_vocab_size(true), shape.vocab);
        assert_eq!(tok.token_to_id("<mask>"), Some(shape.vocab as u32 - 1));
        assert_eq!(tok.token_to_id("<pad>"), Some(PAD_ID as u32));
        let sentence = "the movie's plot was boring , but the cast is charming !";
        let ids = tok.encode(sentence, false).unwrap().get_ids().to_vec();
        assert!(!ids.contains(&3), "unknown token in {ids:?}");

        let cfg = Config {
            model_name: dir.display().to_string(),
            backend: BackendKind::Mlm,
            placement: Placement::Prefix,
            n_prompt_tokens: 50,
            task_name: "mr".into(),
            ..Config::default()
        };
        let model = crate::experiment::load_model(&cfg, &Device::Cpu, &mut |_| {}).unwrap();
        assert_eq!(model.info().family, "roberta");
        assert_eq!(model.info().vocab_size, shape.vocab);
        let ex = |text: &str, label| Example { text: text.into(), text_b: None, label };
        let examples =
            [ex(sentence, 0), ex("a sweet , funny and beautiful film", 1), ex("zyxwv qq 1999", 0)];
        let batch = model.prepare(&TaskSpec::builtin("mr").unwrap(), &examples, None).unwrap();
        let prompts: Vec<Vec<f32>> =
            (0..2).map(|k| vec![0.01 * k as f32; cfg.n_prompt_tokens * shape.hidden]).collect();
        let refs: Vec<&[f32]> = prompts.iter().map(|p| p.as_slice()).collect();
        let scores = model.scores_many(&batch, &refs).unwrap();
        assert_eq!(scores.len(), 2);
        for per_prompt in &scores {
            assert_eq!(per_prompt.len(), examples.len());
            assert!(per_prompt.iter().all(|r| r.len() == 2 && r.iter().all(|s| s.is_finite())));
        }
    }
}
