//! BERT-family backends on tiny random checkpoints written by the tests themselves: parity with
//! candle-transformers' BertForMaskedLM, prompt injection, batching, the sentence encoder and the
//! error paths.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertForMaskedLM, Config};
use fedbpt::data::Example;
use fedbpt::models::bert::{MaskedLm, SentenceEncoder};
use fedbpt::models::{
    Placement, Prepared, PromptMode, PromptModel, PromptSettings, ScoreJob, TokenNoise,
};
use fedbpt::task::TaskSpec;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tempfile::TempDir;
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::processors::bert::BertProcessing;
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{AddedToken, PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

const HIDDEN: usize = 32;
const LAYERS: usize = 2;
const INTERMEDIATE: usize = 64;
/// Positions the model can take (BERT layout; RoBERTa gets 2 more for its offset).
const MAX_POS: usize = 64;

const WORDS: &[&str] = &[
    ".", ",", "?", "!", ":", "it", "was", "bad", "great", "good", "terrible", "movie", "film",
    "the", "a", "is", "plot", "acting", "boring", "fun", "news", "world", "sports", "business",
    "tech", "yes", "no", "maybe", "very", "not", "i", "liked", "hated", "this", "and", "##s",
    "##ing", "story", "long",
];

#[derive(Clone, Copy, PartialEq)]
enum Layout {
    /// `bert.*` + `cls.predictions.*` with an explicit decoder.
    Bert,
    /// `roberta.*` + `lm_head.*`, decoder tied to the word embeddings.
    Roberta,
    /// Encoder keys without prefix (sentence-transformers style), plus a pooler and an integer
    /// position_ids buffer.
    Encoder,
    /// Encoder keys under `bert.`.
    EncoderBertPrefix,
}

impl Layout {
    fn specials(self) -> [&'static str; 5] {
        match self {
            Layout::Roberta => ["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
            _ => ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
        }
    }
}

fn vocab(layout: Layout) -> Vec<String> {
    layout.specials().iter().chain(WORDS).map(|s| s.to_string()).collect()
}

fn config_json(layout: Layout) -> serde_json::Value {
    let roberta = layout == Layout::Roberta;
    serde_json::json!({
        "vocab_size": vocab(layout).len(),
        "hidden_size": HIDDEN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": 4,
        "intermediate_size": INTERMEDIATE,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "max_position_embeddings": if roberta { MAX_POS + 2 } else { MAX_POS },
        "type_vocab_size": if roberta { 1 } else { 2 },
        "initializer_range": 0.02,
        "layer_norm_eps": if roberta { 1e-5 } else { 1e-12 },
        "pad_token_id": if roberta { 1 } else { 0 },
        "model_type": if roberta { "roberta" } else { "bert" },
    })
}

struct Gen(ChaCha8Rng);

impl Gen {
    fn t(&mut self, shape: &[usize], center: f32, scale: f32) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> =
            (0..n).map(|_| center + scale * self.0.random_range(-1.0f32..1.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }
}

fn write_tokenizer(dir: &Path, layout: Layout) {
    let words = vocab(layout);
    let vocab_path = dir.join("vocab.txt");
    std::fs::write(&vocab_path, words.join("\n") + "\n").unwrap();
    let (pad, unk, cls, sep) = match layout {
        Layout::Roberta => ("<pad>", "<unk>", "<s>", "</s>"),
        _ => ("[PAD]", "[UNK]", "[CLS]", "[SEP]"),
    };
    let wp = WordPiece::from_file(vocab_path.to_str().unwrap())
        .unk_token(unk.to_string())
        .build()
        .unwrap();
    let id = |s: &str| words.iter().position(|w| w == s).unwrap() as u32;
    let mut tok = Tokenizer::new(wp);
    tok.with_normalizer(Some(BertNormalizer::default()));
    tok.with_pre_tokenizer(Some(BertPreTokenizer));
    if layout == Layout::Roberta {
        tok.with_post_processor(Some(RobertaProcessing::new(
            (sep.to_string(), id(sep)),
            (cls.to_string(), id(cls)),
        )));
    } else {
        tok.with_post_processor(Some(BertProcessing::new(
            (sep.to_string(), id(sep)),
            (cls.to_string(), id(cls)),
        )));
    }
    let specials: Vec<AddedToken> =
        layout.specials().iter().map(|s| AddedToken::from(s.to_string(), true)).collect();
    tok.add_special_tokens(&specials);
    // Padding and truncation the backends must switch off.
    tok.with_padding(Some(PaddingParams {
        strategy: PaddingStrategy::Fixed(16),
        pad_id: id(pad),
        pad_token: pad.to_string(),
        ..Default::default()
    }));
    tok.with_truncation(Some(TruncationParams { max_length: 8, ..Default::default() })).unwrap();
    tok.save(dir.join("tokenizer.json"), false).unwrap();
}

/// Writes config.json, model.safetensors and tokenizer.json of a tiny random model.
fn write_checkpoint(dir: &Path, layout: Layout, seed: u64) {
    let cfg = config_json(layout);
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    write_tokenizer(dir, layout);
    let mut g = Gen(ChaCha8Rng::seed_from_u64(seed));
    let v = vocab(layout).len();
    let (h, i) = (HIDDEN, INTERMEDIATE);
    let prefix = match layout {
        Layout::Bert | Layout::EncoderBertPrefix => "bert.",
        Layout::Roberta => "roberta.",
        Layout::Encoder => "",
    };
    let max_pos = cfg["max_position_embeddings"].as_u64().unwrap() as usize;
    let types = cfg["type_vocab_size"].as_u64().unwrap() as usize;
    let mut ts: HashMap<String, Tensor> = HashMap::new();
    let mut put = |name: String, t: Tensor| {
        ts.insert(name, t);
    };
    let e = format!("{prefix}embeddings");
    put(format!("{e}.word_embeddings.weight"), g.t(&[v, h], 0.0, 1.0));
    put(format!("{e}.position_embeddings.weight"), g.t(&[max_pos, h], 0.0, 0.5));
    put(format!("{e}.token_type_embeddings.weight"), g.t(&[types, h], 0.0, 0.5));
    put(format!("{e}.LayerNorm.weight"), g.t(&[h], 1.0, 0.2));
    put(format!("{e}.LayerNorm.bias"), g.t(&[h], 0.0, 0.2));
    for l in 0..LAYERS {
        let p = format!("{prefix}encoder.layer.{l}");
        for m in ["query", "key", "value"] {
            put(format!("{p}.attention.self.{m}.weight"), g.t(&[h, h], 0.0, 0.3));
            put(format!("{p}.attention.self.{m}.bias"), g.t(&[h], 0.0, 0.1));
        }
        put(format!("{p}.attention.output.dense.weight"), g.t(&[h, h], 0.0, 0.3));
        put(format!("{p}.attention.output.dense.bias"), g.t(&[h], 0.0, 0.1));
        put(format!("{p}.attention.output.LayerNorm.weight"), g.t(&[h], 1.0, 0.2));
        put(format!("{p}.attention.output.LayerNorm.bias"), g.t(&[h], 0.0, 0.2));
        put(format!("{p}.intermediate.dense.weight"), g.t(&[i, h], 0.0, 0.3));
        put(format!("{p}.intermediate.dense.bias"), g.t(&[i], 0.0, 0.1));
        put(format!("{p}.output.dense.weight"), g.t(&[h, i], 0.0, 0.3));
        put(format!("{p}.output.dense.bias"), g.t(&[h], 0.0, 0.1));
        put(format!("{p}.output.LayerNorm.weight"), g.t(&[h], 1.0, 0.2));
        put(format!("{p}.output.LayerNorm.bias"), g.t(&[h], 0.0, 0.2));
    }
    match layout {
        Layout::Bert => {
            let c = "cls.predictions";
            put(format!("{c}.transform.dense.weight"), g.t(&[h, h], 0.0, 0.3));
            put(format!("{c}.transform.dense.bias"), g.t(&[h], 0.0, 0.1));
            put(format!("{c}.transform.LayerNorm.weight"), g.t(&[h], 1.0, 0.2));
            put(format!("{c}.transform.LayerNorm.bias"), g.t(&[h], 0.0, 0.2));
            put(format!("{c}.decoder.weight"), g.t(&[v, h], 0.0, 1.0));
            let bias = g.t(&[v], 0.0, 0.5);
            put(format!("{c}.decoder.bias"), bias.clone());
            put(format!("{c}.bias"), bias);
        }
        Layout::Roberta => {
            put("lm_head.dense.weight".into(), g.t(&[h, h], 0.0, 0.3));
            put("lm_head.dense.bias".into(), g.t(&[h], 0.0, 0.1));
            put("lm_head.layer_norm.weight".into(), g.t(&[h], 1.0, 0.2));
            put("lm_head.layer_norm.bias".into(), g.t(&[h], 0.0, 0.2));
            put("lm_head.bias".into(), g.t(&[v], 0.0, 0.5));
        }
        Layout::Encoder | Layout::EncoderBertPrefix => {
            put(format!("{prefix}pooler.dense.weight"), g.t(&[h, h], 0.0, 0.3));
            put(format!("{prefix}pooler.dense.bias"), g.t(&[h], 0.0, 0.1));
            let pos: Vec<i64> = (0..max_pos as i64).collect();
            put(
                format!("{prefix}embeddings.position_ids"),
                Tensor::from_vec(pos, (1, max_pos), &Device::Cpu).unwrap(),
            );
        }
    }
    candle_core::safetensors::save(&ts, dir.join("model.safetensors")).unwrap();
}

fn tiny(layout: Layout) -> TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), layout, 7);
    dir
}

fn settings(n: usize, mode: PromptMode, placement: Placement) -> PromptSettings {
    PromptSettings { n_prompt_tokens: n, mode, placement, placeholder: None }
}

fn ex(text: &str, label: usize) -> Example {
    Example { text: text.into(), text_b: None, label }
}

fn examples() -> Vec<Example> {
    vec![
        ex("good movie", 1),
        ex("the plot was boring and the acting was bad", 0),
        ex("i liked this film very much", 1),
        ex("terrible", 0),
    ]
}

fn sst2() -> TaskSpec {
    TaskSpec::builtin("sst2").unwrap()
}

fn prompt(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n * HIDDEN).map(|_| scale * rng.random_range(-1.0f32..1.0)).collect()
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            assert_eq!(x.len(), y.len());
            x.iter().zip(y).map(|(p, q)| (p - q).abs())
        })
        .fold(0.0, f32::max)
}

/// Label-word logits at the mask of `BertForMaskedLM` run on `ids`, padded with `pad`.
fn reference_scores(
    model: &BertForMaskedLM,
    ids: &[Vec<u32>],
    pad: u32,
    mask_id: u32,
    label_ids: &[u32],
) -> Vec<Vec<f32>> {
    let t = ids.iter().map(|r| r.len()).max().unwrap();
    let mut flat = Vec::new();
    let mut att = Vec::new();
    for r in ids {
        flat.extend(r.iter().copied().chain(std::iter::repeat(pad)).take(t));
        att.extend((0..t).map(|j| u32::from(j < r.len())));
    }
    let b = ids.len();
    let input = Tensor::from_vec(flat, (b, t), &Device::Cpu).unwrap();
    let att = Tensor::from_vec(att, (b, t), &Device::Cpu).unwrap();
    let types = input.zeros_like().unwrap();
    let logits = model.forward(&input, &types, Some(&att)).unwrap();
    ids.iter()
        .enumerate()
        .map(|(i, r)| {
            let pos = r.iter().position(|&x| x == mask_id).unwrap();
            let row = logits.i((i, pos)).unwrap().to_vec1::<f32>().unwrap();
            label_ids.iter().map(|&l| row[l as usize]).collect()
        })
        .collect()
}

fn read_config(dir: &Path) -> Config {
    serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap()
}

fn word_id(layout: Layout, w: &str) -> u32 {
    vocab(layout).iter().position(|x| x == w).unwrap() as u32
}

#[test]
fn bert_layout_matches_candle_bert_for_masked_lm() {
    let dir = tiny(Layout::Bert);
    let n = 4;
    let model =
        MaskedLm::load(dir.path(), settings(n, PromptMode::Add, Placement::Prefix), &Device::Cpu)
            .unwrap();
    let batch = model.prepare(&sst2(), &examples(), None).unwrap();
    let ours = model.scores(&batch, Some(&vec![0.0; n * HIDDEN])).unwrap();

    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(
            &[dir.path().join("model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
    }
    .unwrap();
    let reference = BertForMaskedLM::load(vb, &read_config(dir.path())).unwrap();
    let ids = model.input_ids(&batch, true).unwrap();
    let l = Layout::Bert;
    let labels = [word_id(l, "bad"), word_id(l, "great")];
    let want = reference_scores(&reference, &ids, 0, word_id(l, "[MASK]"), &labels);
    let d = max_diff(&ours, &want);
    assert!(d < 1e-4, "max diff {d}: {ours:?} vs {want:?}");
    // Manual prompt: the same network on the ids without placeholders.
    let manual = model.scores(&batch, None).unwrap();
    let ids = model.input_ids(&batch, false).unwrap();
    let want = reference_scores(&reference, &ids, 0, word_id(l, "[MASK]"), &labels);
    assert!(max_diff(&manual, &want) < 1e-4);
}

#[test]
fn bf16_weights_stay_near_the_f32_network_and_keep_rows_independent() {
    let dir = tiny(Layout::Bert);
    let n = 4;
    let s = settings(n, PromptMode::Add, Placement::Prefix);
    let exact = MaskedLm::load(dir.path(), s.clone(), &Device::Cpu).unwrap();
    let mut model = MaskedLm::load(dir.path(), s, &Device::Cpu).unwrap();
    model.use_packed(fedbpt::kernels::Kernel::available_all()[0]).unwrap();
    let exs = examples();
    let batch = model.prepare(&sst2(), &exs, None).unwrap();
    let p = prompt(n, 3, 0.5);
    let want = exact.scores(&batch, Some(&p)).unwrap();
    let got = model.scores(&batch, Some(&p)).unwrap();
    let scale = want.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
    let d = max_diff(&got, &want);
    // Not the f32 result: bf16 keeps 8 mantissa bits of every matmul operand.
    assert!(d > 0.0, "bf16 scores equal the f32 ones: the bf16 path did not run");
    assert!(d < 0.03 * scale, "max diff {d} at score scale {scale}");
    // Each example's scores stay independent of what else is in the pass.
    let alone = model.prepare(&sst2(), &exs[1..2], None).unwrap();
    let one = model.scores(&alone, Some(&p)).unwrap();
    assert!(max_diff(&one, &got[1..2]) < 1e-5, "{one:?} vs {:?}", &got[1..2]);
}

#[test]
fn roberta_layout_matches_renamed_bert_for_masked_lm() {
    let dir = tiny(Layout::Roberta);
    let n = 3;
    let model =
        MaskedLm::load(dir.path(), settings(n, PromptMode::Add, Placement::Prefix), &Device::Cpu)
            .unwrap();
    assert_eq!(model.info().family, "roberta");
    let batch = model.prepare(&sst2(), &examples(), None).unwrap();
    let ours = model.scores(&batch, Some(&vec![0.0; n * HIDDEN])).unwrap();

    // The same network as BERT keys: positions shifted by padding_idx + 1 = 2, decoder tied to
    // the word embeddings, lm_head as the prediction transform.
    let st =
        candle_core::safetensors::load(dir.path().join("model.safetensors"), &Device::Cpu).unwrap();
    let mut renamed = HashMap::new();
    for (k, t) in &st {
        let k2 = if let Some(rest) = k.strip_prefix("roberta.") {
            format!("bert.{rest}")
        } else if let Some(rest) = k.strip_prefix("lm_head.dense.") {
            format!("cls.predictions.transform.dense.{rest}")
        } else if let Some(rest) = k.strip_prefix("lm_head.layer_norm.") {
            format!("cls.predictions.transform.LayerNorm.{rest}")
        } else if k == "lm_head.bias" {
            "cls.predictions.decoder.bias".into()
        } else {
            panic!("unexpected key {k}")
        };
        let t = if k2 == "bert.embeddings.position_embeddings.weight" {
            t.narrow(0, 2, t.dim(0).unwrap() - 2).unwrap()
        } else {
            t.clone()
        };
        renamed.insert(k2, t);
    }
    renamed.insert(
        "cls.predictions.decoder.weight".into(),
        st["roberta.embeddings.word_embeddings.weight"].clone(),
    );
    let mut cfg = read_config(dir.path());
    cfg.max_position_embeddings -= 2;
    let reference =
        BertForMaskedLM::load(VarBuilder::from_tensors(renamed, DType::F32, &Device::Cpu), &cfg)
            .unwrap();
    let ids = model.input_ids(&batch, true).unwrap();
    let l = Layout::Roberta;
    assert!(ids
        .iter()
        .all(|r| r[0] == word_id(l, "<s>") && *r.last().unwrap() == word_id(l, "</s>")));
    let labels = [word_id(l, "bad"), word_id(l, "great")];
    let want = reference_scores(&reference, &ids, 1, word_id(l, "<mask>"), &labels);
    let d = max_diff(&ours, &want);
    assert!(d < 1e-4, "max diff {d}: {ours:?} vs {want:?}");
}

#[test]
fn token_layout_prefix_suffix_and_no_tokenizer_truncation() {
    let dir = tiny(Layout::Bert);
    let l = Layout::Bert;
    let id = |w: &str| word_id(l, w);
    let model =
        MaskedLm::load(dir.path(), settings(3, PromptMode::Add, Placement::Prefix), &Device::Cpu)
            .unwrap();
    let batch = model.prepare(&sst2(), &[ex("Good movie", 1)], None).unwrap();
    let ids = model.input_ids(&batch, true).unwrap();
    let body =
        [id("."), id("good"), id("movie"), id("."), id("it"), id("was"), id("[MASK]"), id(".")];
    let mut want = vec![id("[CLS]"), id("."), id("."), id(".")];
    want.extend(body);
    want.push(id("[SEP]"));
    assert_eq!(ids[0], want);
    let manual = model.input_ids(&batch, false).unwrap();
    let mut want = vec![id("[CLS]")];
    want.extend(body);
    want.push(id("[SEP]"));
    assert_eq!(manual[0], want);
    assert_eq!(batch.tokens_per_pass, 13);

    // Suffix: where {prompt} stands; the placeholder text is cycled.
    let mut s = settings(3, PromptMode::Add, Placement::Suffix);
    s.placeholder = Some("it was".into());
    let enc_dir = tiny(Layout::Encoder);
    let enc = SentenceEncoder::load(enc_dir.path(), s, &Device::Cpu).unwrap();
    let batch = enc.prepare(&sst2(), &[ex("good movie", 1)], None).unwrap();
    let ids = enc.input_ids(&batch, true).unwrap();
    assert_eq!(
        ids[0],
        vec![id("[CLS]"), id("good"), id("movie"), id("it"), id("was"), id("it"), id("[SEP]")]
    );
    // Suffix placement needs the marker.
    let mut task = sst2();
    task.encoder.template = "{text} .".into();
    let err = enc.prepare(&task, &[ex("good", 1)], None).err().unwrap().to_string();
    assert!(err.contains("{prompt}"), "{err}");

    // tokenizer.json truncates to 8 and pads to 16: both must be off.
    let long = "the plot was boring and the acting was bad and the story was long";
    let batch = model.prepare(&sst2(), &[ex(long, 0)], None).unwrap();
    let ids = &model.input_ids(&batch, true).unwrap()[0];
    assert_eq!(ids.len(), 1 + 3 + 1 + 14 + 5 + 1);
}

#[test]
fn long_text_is_truncated_not_the_template() {
    let dir = tiny(Layout::Bert);
    let model =
        MaskedLm::load(dir.path(), settings(5, PromptMode::Add, Placement::Prefix), &Device::Cpu)
            .unwrap();
    let long = vec!["good movie"; 100].join(" ");
    let batch = model.prepare(&sst2(), &[ex(&long, 1), ex("bad", 0)], None).unwrap();
    let ids = &model.input_ids(&batch, true).unwrap()[0];
    assert_eq!(ids.len(), MAX_POS);
    let l = Layout::Bert;
    let tail: Vec<u32> =
        [".", "it", "was", "[MASK]", ".", "[SEP]"].iter().map(|w| word_id(l, w)).collect();
    assert_eq!(&ids[ids.len() - 6..], tail.as_slice());
    let s = model.scores(&batch, Some(&prompt(5, 1, 1.0))).unwrap();
    assert!(s.iter().flatten().all(|x| x.is_finite()));
}

#[test]
fn prompts_modes_and_manual_prompt_change_scores() {
    let dir = tiny(Layout::Bert);
    let n = 4;
    let add =
        MaskedLm::load(dir.path(), settings(n, PromptMode::Add, Placement::Prefix), &Device::Cpu)
            .unwrap();
    let cat =
        MaskedLm::load(dir.path(), settings(n, PromptMode::Cat, Placement::Prefix), &Device::Cpu)
            .unwrap();
    let task = sst2();
    let (ba, bc) = (
        add.prepare(&task, &examples(), None).unwrap(),
        cat.prepare(&task, &examples(), None).unwrap(),
    );
    let zero = vec![0.0; n * HIDDEN];
    let p = prompt(n, 3, 1.0);
    let z_add = add.scores(&ba, Some(&zero)).unwrap();
    let p_add = add.scores(&ba, Some(&p)).unwrap();
    let p_cat = cat.scores(&bc, Some(&p)).unwrap();
    let z_cat = cat.scores(&bc, Some(&zero)).unwrap();
    let manual = add.scores(&ba, None).unwrap();
    assert_eq!(z_add.len(), 4);
    assert!(z_add.iter().all(|r| r.len() == 2));
    assert!(max_diff(&z_add, &p_add) > 1e-3, "nonzero prompt must change scores");
    assert!(max_diff(&p_add, &p_cat) > 1e-3, "add and cat must differ");
    assert!(max_diff(&z_add, &z_cat) > 1e-3, "cat replaces the placeholders' embeddings");
    assert!(max_diff(&z_add, &manual) > 1e-3, "manual prompt has no placeholders");
    // The manual prompt does not depend on the mode.
    assert!(max_diff(&manual, &cat.scores(&bc, None).unwrap()) < 1e-6);
    // Deterministic.
    assert_eq!(p_add, add.scores(&ba, Some(&p)).unwrap());
    // Wrong prompt length is an error, not a panic.
    assert!(add.scores(&ba, Some(&zero[1..])).is_err());
}

/// BBT's `cat` mode puts the prompt vectors in as input (word) embeddings, before position,
/// type and LayerNorm: a prompt equal to the placeholders' own word embeddings must give exactly
/// the scores of `add` with a zero prompt.
#[test]
fn cat_prompts_are_word_embeddings_before_layer_norm() {
    let dir = tiny(Layout::Bert);
    let n = 4;
    let s = |mode| settings(n, mode, Placement::Prefix);
    let add = MaskedLm::load(dir.path(), s(PromptMode::Add), &Device::Cpu).unwrap();
    let cat = MaskedLm::load(dir.path(), s(PromptMode::Cat), &Device::Cpu).unwrap();
    let task = sst2();
    let (ba, bc) = (
        add.prepare(&task, &examples(), None).unwrap(),
        cat.prepare(&task, &examples(), None).unwrap(),
    );
    let ids = cat.input_ids(&bc, true).unwrap();
    // Prefix placement: the placeholders follow [CLS].
    let placeholder_ids = &ids[0][1..=n];
    assert!(ids.iter().all(|r| &r[1..=n] == placeholder_ids));
    let st =
        candle_core::safetensors::load(dir.path().join("model.safetensors"), &Device::Cpu).unwrap();
    let words = &st["bert.embeddings.word_embeddings.weight"];
    let mut own = Vec::new();
    for &id in placeholder_ids {
        own.extend(words.get(id as usize).unwrap().to_vec1::<f32>().unwrap());
    }
    let zero = vec![0.0; n * HIDDEN];
    let want = add.scores(&ba, Some(&zero)).unwrap();
    let got = cat.scores(&bc, Some(&own)).unwrap();
    assert!(max_diff(&got, &want) < 1e-5, "{got:?} vs {want:?}");
    // And a zero prompt in cat mode removes the placeholders' word embeddings.
    assert!(max_diff(&cat.scores(&bc, Some(&zero)).unwrap(), &want) > 1e-3);
}

#[test]
fn masked_lm_noise_spares_only_placeholders_and_mask() {
    let dir = tiny(Layout::Bert);
    let n = 3;
    let m =
        MaskedLm::load(dir.path(), settings(n, PromptMode::Add, Placement::Prefix), &Device::Cpu)
            .unwrap();
    let task = sst2();
    let clean = m.prepare(&task, &examples(), None).unwrap();
    let noisy = m.prepare(&task, &examples(), Some(TokenNoise { rate: 1.0, seed: 7 })).unwrap();
    let mask = word_id(Layout::Bert, "[MASK]");
    let (a, b) = (m.input_ids(&clean, true).unwrap(), m.input_ids(&noisy, true).unwrap());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.len(), y.len());
        for (j, (u, v)) in x.iter().zip(y).enumerate() {
            // [CLS] then the placeholders (prefix), the rest perturbed but the mask.
            let spared = (1..=n).contains(&j) || *u == mask;
            assert_eq!(u == v, spared, "position {j}: {x:?} vs {y:?}");
        }
    }
}

#[test]
fn scores_do_not_depend_on_batch_neighbours() {
    for layout in [Layout::Bert, Layout::Roberta] {
        let dir = tiny(layout);
        let n = 4;
        let model = MaskedLm::load(
            dir.path(),
            settings(n, PromptMode::Add, Placement::Prefix),
            &Device::Cpu,
        )
        .unwrap();
        let task = sst2();
        let exs = examples();
        let p = prompt(n, 5, 1.0);
        let full = model.scores(&model.prepare(&task, &exs, None).unwrap(), Some(&p)).unwrap();
        let reversed: Vec<Example> = exs.iter().rev().cloned().collect();
        let rev = model.scores(&model.prepare(&task, &reversed, None).unwrap(), Some(&p)).unwrap();
        let rev_back: Vec<Vec<f32>> = rev.into_iter().rev().collect();
        assert!(max_diff(&full, &rev_back) < 1e-4);
        let manual = model.scores(&model.prepare(&task, &exs, None).unwrap(), None).unwrap();
        for i in 0..exs.len() {
            let one = model.prepare(&task, &exs[i..i + 1], None).unwrap();
            let alone = model.scores(&one, Some(&p)).unwrap();
            assert!(
                max_diff(&full[i..i + 1], &alone) < 1e-4,
                "example {i} depends on its neighbours"
            );
            let manual_alone = model.scores(&one, None).unwrap();
            assert!(max_diff(&manual[i..i + 1], &manual_alone) < 1e-4);
        }
    }
}

#[test]
fn scores_many_equals_per_prompt_scores() {
    let dir = tiny(Layout::Bert);
    let n = 4;
    for mode in [PromptMode::Add, PromptMode::Cat] {
        let model =
            MaskedLm::load(dir.path(), settings(n, mode, Placement::Prefix), &Device::Cpu).unwrap();
        let batch = model.prepare(&sst2(), &examples(), None).unwrap();
        let ps: Vec<Vec<f32>> = (0..5).map(|s| prompt(n, 10 + s, 1.0)).collect();
        let refs: Vec<&[f32]> = ps.iter().map(|p| p.as_slice()).collect();
        let many = model.scores_many(&batch, &refs).unwrap();
        assert_eq!(many.len(), 5);
        for (p, got) in ps.iter().zip(&many) {
            assert!(max_diff(got, &model.scores(&batch, Some(p)).unwrap()) < 1e-4);
        }
        assert!(model.scores_many(&batch, &[]).unwrap().is_empty());
    }
}

#[test]
fn jobs_merged_into_shared_passes_score_as_they_would_alone() {
    let n = 3;
    let exs = examples();
    let (first, second) = exs.split_at(exs.len() / 2);
    let ps: Vec<Vec<f32>> = (0..3).map(|s| prompt(n, 30 + s, 1.0)).collect();
    let refs: Vec<&[f32]> = ps.iter().map(|p| p.as_slice()).collect();
    let check = |model: &dyn PromptModel, a: &Prepared, b: &Prepared| {
        let jobs = [
            ScoreJob { batch: a, prompts: &refs[..2] },
            ScoreJob { batch: b, prompts: &refs[1..] },
            ScoreJob { batch: a, prompts: &[] },
        ];
        let merged = model.scores_jobs(&jobs).unwrap();
        assert_eq!(merged.len(), 3);
        assert!(merged[2].is_empty());
        for (job, got) in jobs.iter().zip(&merged).take(2) {
            let alone = model.scores_many(job.batch, job.prompts).unwrap();
            assert_eq!(got.len(), alone.len());
            for (g, a) in got.iter().zip(&alone) {
                assert!(max_diff(g, a) < 1e-5, "merged {g:?} vs alone {a:?}");
            }
        }
    };
    let dir = tiny(Layout::Bert);
    let mlm =
        MaskedLm::load(dir.path(), settings(n, PromptMode::Add, Placement::Prefix), &Device::Cpu)
            .unwrap();
    let (a, b) =
        (mlm.prepare(&sst2(), first, None).unwrap(), mlm.prepare(&sst2(), second, None).unwrap());
    check(&mlm, &a, &b);
    let dir = tiny(Layout::Encoder);
    let enc = SentenceEncoder::load(
        dir.path(),
        settings(n, PromptMode::Add, Placement::Suffix),
        &Device::Cpu,
    )
    .unwrap();
    // Different temperatures per job: each job keeps its own head.
    let mut hot = sst2();
    hot.encoder.temperature = 0.5;
    let (a, b) =
        (enc.prepare(&sst2(), first, None).unwrap(), enc.prepare(&hot, second, None).unwrap());
    check(&enc, &a, &b);
}

#[test]
fn model_info_counts_parameters_and_embedding_std() {
    for (layout, family) in [(Layout::Bert, "bert"), (Layout::Roberta, "roberta")] {
        let dir = tiny(layout);
        let model = MaskedLm::load(
            dir.path(),
            settings(2, PromptMode::Add, Placement::Prefix),
            &Device::Cpu,
        )
        .unwrap();
        let st = candle_core::safetensors::load(dir.path().join("model.safetensors"), &Device::Cpu)
            .unwrap();
        let info = model.info();
        assert_eq!(info.family, family);
        assert_eq!(info.hidden_size, HIDDEN);
        assert_eq!(info.vocab_size, vocab(layout).len());
        assert_eq!(info.n_params, st.values().map(|t| t.elem_count()).sum::<usize>());
        let prefix = if layout == Layout::Bert { "bert" } else { "roberta" };
        let w = st[&format!("{prefix}.embeddings.word_embeddings.weight")].flatten_all().unwrap();
        let v = w.to_vec1::<f32>().unwrap();
        let mean = v.iter().sum::<f32>() / v.len() as f32;
        let std = (v.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / v.len() as f32).sqrt();
        assert!((info.embedding_std - std).abs() < 1e-4, "{} vs {std}", info.embedding_std);
    }
}

#[test]
fn sentence_encoder_scores() {
    let dir = tiny(Layout::Encoder);
    let n = 3;
    let enc = SentenceEncoder::load(
        dir.path(),
        settings(n, PromptMode::Add, Placement::Suffix),
        &Device::Cpu,
    )
    .unwrap();
    let info = enc.info().clone();
    assert_eq!(info.family, "minilm-encoder");
    // The integer position_ids buffer is not a parameter.
    let st =
        candle_core::safetensors::load(dir.path().join("model.safetensors"), &Device::Cpu).unwrap();
    let floats: usize =
        st.values().filter(|t| t.dtype() == DType::F32).map(|t| t.elem_count()).sum();
    assert_eq!(info.n_params, floats);

    let mut task = sst2();
    let exs = examples();
    let batch = enc.prepare(&task, &exs, None).unwrap();
    let p = prompt(n, 9, 1.0);
    let s = enc.scores(&batch, Some(&p)).unwrap();
    assert_eq!(s.len(), exs.len());
    assert!(s.iter().all(|r| r.len() == 2 && r.iter().all(|x| x.is_finite())));
    // Cosines over the temperature.
    assert!(s.iter().flatten().all(|x| x.abs() <= 1.0 / 0.05 + 1e-3));
    assert!(max_diff(&s, &enc.scores(&batch, Some(&vec![0.0; n * HIDDEN])).unwrap()) > 1e-3);
    assert!(max_diff(&s, &enc.scores(&batch, None).unwrap()) > 1e-3);
    let refs = [p.as_slice(), p.as_slice()];
    let many = enc.scores_many(&batch, &refs).unwrap();
    assert!(max_diff(&many[0], &s) < 1e-4 && max_diff(&many[1], &s) < 1e-4);

    // Temperature scales the scores.
    task.encoder.temperature = 0.1;
    let s2 = enc.scores(&enc.prepare(&task, &exs, None).unwrap(), Some(&p)).unwrap();
    let halves: Vec<Vec<f32>> = s.iter().map(|r| r.iter().map(|x| x / 2.0).collect()).collect();
    assert!(max_diff(&s2, &halves) < 1e-4);

    // Token noise: rate 0 changes nothing; rate 1 changes every attended token (special and
    // template tokens too, as the reference) but the placeholders, each to another id.
    task.encoder.temperature = 0.05;
    task.encoder.template = "review : {text}{prompt}".into();
    let clean = enc.prepare(&task, &exs, None).unwrap();
    let zero_rate = enc.prepare(&task, &exs, Some(TokenNoise { rate: 0.0, seed: 4 })).unwrap();
    assert_eq!(enc.scores(&clean, Some(&p)).unwrap(), enc.scores(&zero_rate, Some(&p)).unwrap());
    let noisy = enc.prepare(&task, &exs, Some(TokenNoise { rate: 1.0, seed: 4 })).unwrap();
    assert!(
        max_diff(&enc.scores(&clean, Some(&p)).unwrap(), &enc.scores(&noisy, Some(&p)).unwrap())
            > 1e-3
    );
    let again = enc.prepare(&task, &exs, Some(TokenNoise { rate: 1.0, seed: 4 })).unwrap();
    assert_eq!(enc.input_ids(&noisy, true).unwrap(), enc.input_ids(&again, true).unwrap());
    let (c, z) = (enc.input_ids(&clean, true).unwrap(), enc.input_ids(&noisy, true).unwrap());
    for (a, b) in c.iter().zip(&z) {
        assert_eq!(a.len(), b.len());
        // [CLS] review : <text> <placeholders> [SEP]: only the placeholders stay.
        let placeholders = a.len() - n - 1..a.len() - 1;
        for (j, (x, y)) in a.iter().zip(b).enumerate() {
            assert_eq!(x == y, placeholders.contains(&j), "position {j}: {a:?} vs {b:?}");
        }
    }
    assert!(enc.prepare(&task, &exs, Some(TokenNoise { rate: 1.5, seed: 4 })).is_err());

    // A `bert.` prefix loads too.
    let dir = tiny(Layout::EncoderBertPrefix);
    let enc = SentenceEncoder::load(
        dir.path(),
        settings(n, PromptMode::Cat, Placement::Prefix),
        &Device::Cpu,
    )
    .unwrap();
    let s = enc.scores(&enc.prepare(&sst2(), &exs, None).unwrap(), Some(&p)).unwrap();
    assert!(s.iter().flatten().all(|x| x.is_finite()));
}

#[test]
fn batch_from_another_backend_is_an_error() {
    let (d1, d2) = (tiny(Layout::Bert), tiny(Layout::Encoder));
    let s = settings(2, PromptMode::Add, Placement::Suffix);
    let mlm = MaskedLm::load(d1.path(), s.clone(), &Device::Cpu).unwrap();
    let enc = SentenceEncoder::load(d2.path(), s, &Device::Cpu).unwrap();
    let batch = enc.prepare(&sst2(), &examples(), None).unwrap();
    assert!(mlm.scores(&batch, None).is_err());
    assert!(mlm.input_ids(&batch, true).is_err());
    // A MaskedLm needs a {mask}; an encoder-only checkpoint is no masked LM.
    let mut task = sst2();
    task.mlm.template = "{prompt} {text}".into();
    assert!(mlm.prepare(&task, &examples(), None).is_err());
    let err =
        MaskedLm::load(d2.path(), settings(2, PromptMode::Add, Placement::Prefix), &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
    assert!(err.contains("model.safetensors"), "{err}");
}

fn load_err(dir: &Path) -> String {
    match MaskedLm::load(dir, settings(2, PromptMode::Add, Placement::Prefix), &Device::Cpu) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn broken_files_give_errors_naming_them() {
    let dir = tiny(Layout::Bert);
    let weights = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();

    std::fs::remove_file(&weights).unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("model.safetensors"), "{err}");

    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("model.safetensors"), "{err}");

    std::fs::write(&weights, b"definitely not a safetensors file").unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("model.safetensors"), "{err}");

    // A tensor of the wrong shape.
    let mut st = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap();
    st.insert(
        "bert.encoder.layer.1.output.dense.bias".into(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&st, &weights).unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("model.safetensors"), "{err}");
    std::fs::write(&weights, &bytes).unwrap();

    let cfg_path = dir.path().join("config.json");
    let mut cfg = config_json(Layout::Bert);
    cfg.as_object_mut().unwrap().remove("hidden_size");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("config.json") && err.contains("hidden_size"), "{err}");
    std::fs::write(&cfg_path, "{ not json").unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("config.json"), "{err}");
    std::fs::write(&cfg_path, config_json(Layout::Bert).to_string()).unwrap();

    let tok_path = dir.path().join("tokenizer.json");
    let tok = std::fs::read(&tok_path).unwrap();
    std::fs::write(&tok_path, &tok[..tok.len() / 2]).unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("tokenizer.json"), "{err}");
    std::fs::remove_file(&tok_path).unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("tokenizer.json"), "{err}");
    std::fs::write(&tok_path, &tok).unwrap();

    // A label word of two tokens.
    let model =
        MaskedLm::load(dir.path(), settings(2, PromptMode::Add, Placement::Prefix), &Device::Cpu)
            .unwrap();
    let mut task = sst2();
    task.mlm.label_words = vec![" bad".into(), " goods".into()];
    let err = model.prepare(&task, &examples(), None).err().unwrap().to_string();
    assert!(err.contains("goods"), "{err}");
    // A label outside the classes.
    assert!(model.prepare(&sst2(), &[ex("good", 5)], None).is_err());
}

/// Empty batches are fine and give empty scores.
#[test]
fn empty_batch() {
    let dir = tiny(Layout::Bert);
    let model =
        MaskedLm::load(dir.path(), settings(2, PromptMode::Add, Placement::Prefix), &Device::Cpu)
            .unwrap();
    let batch = model.prepare(&sst2(), &[], None).unwrap();
    assert!(batch.is_empty());
    assert!(model.scores(&batch, None).unwrap().is_empty());
    assert!(model.scores(&batch, Some(&vec![0.0; 2 * HIDDEN])).unwrap().is_empty());
}
