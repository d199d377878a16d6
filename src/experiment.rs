//! From a [`Config`] to loaded parts: the model backend (embedded asset, local path or hub id)
//! and the task's data split.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Device;

use crate::assets;
use crate::config::{client_index, BackendKind, Config, DataFile, NoniidSplit};
use crate::data::split::{
    dedup_examples, k_shot, partition_client_mix, partition_dirichlet, partition_iid, test_split,
    Split,
};
use crate::data::{sources, Dataset, Example};
use crate::models::bert::{MaskedLm, SentenceEncoder};
use crate::models::linear::LinearFormat;
use crate::models::llama::CausalLm;
use crate::models::{PromptModel, PromptSettings};
use crate::replay::GlobalStrategy;
use crate::seeds::{derive, tag};
use crate::strategy::Aggregator;
use crate::{Error, Result};

/// Seed of the fixed test split: the same test set for every run seed.
pub const TEST_SPLIT_SEED: u64 = 20_231_003;

/// The server's aggregation rule as configured, at its starting state.
pub fn aggregator_for(cfg: &Config) -> Result<Box<dyn Aggregator>> {
    Ok(GlobalStrategy::from_config(cfg)?.into_aggregator())
}

/// Prompt settings from the config.
pub fn prompt_settings(cfg: &Config) -> PromptSettings {
    PromptSettings {
        n_prompt_tokens: cfg.n_prompt_tokens,
        mode: cfg.cat_or_add,
        placement: cfg.placement,
        placeholder: cfg.placeholder.clone(),
    }
}

/// Parses "cpu" / "cuda:N".
pub fn device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        other => {
            let idx = other
                .strip_prefix("cuda:")
                .and_then(|i| i.parse::<usize>().ok())
                .ok_or_else(|| {
                    Error::config(
                        "runtime.devices",
                        format!("unknown device `{other}` (cpu or cuda:N)"),
                    )
                })?;
            Device::new_cuda(idx).map_err(|e| {
                let hint = if cfg!(feature = "cuda") {
                    "is the NVIDIA driver loaded and the GPU listed by `nvidia-smi`?"
                } else {
                    "CUDA needs a build with `--features cuda`"
                };
                Error::config("runtime.devices", format!("`{other}` unavailable ({e}); {hint}"))
            })
        }
    }
}

/// Loads the configured model on `device`, fetching an embedded asset when needed.
pub fn load_model(
    cfg: &Config,
    device: &Device,
    progress: &mut dyn FnMut(&str),
) -> Result<Arc<dyn PromptModel>> {
    let format = cfg.weights.resolve(device)?;
    load_model_as(cfg, format, device, progress)
}

/// [`load_model`] with the linear layers built as `format` whatever `cfg.weights` says (the
/// bench measures every kernel in one process).
pub fn load_model_as(
    cfg: &Config,
    format: LinearFormat,
    device: &Device,
    progress: &mut dyn FnMut(&str),
) -> Result<Arc<dyn PromptModel>> {
    #[cfg(feature = "stand-in")]
    if cfg.model_name == "stand-in" {
        return Ok(Arc::new(crate::models::stand_in::StandIn::new(prompt_settings(cfg))));
    }
    if format == LinearFormat::Packed(crate::kernels::Kernel::Portable) {
        progress(
            "warning: the bf16 linear layers run the portable loop (no AVX2 or better kernel \
             here, or FEDBPT_KERNEL=portable): slower than weights = \"f32\"",
        );
    }
    let path = resolve_model(&cfg.model_name, progress)?;
    load_model_path(&path, cfg, prompt_settings(cfg), format, device)
}

/// The file or directory `model_name` stands for: an embedded model (fetched when missing), an
/// existing path, or a hub id (downloaded).
pub fn resolve_model(name: &str, progress: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    Ok(match assets::spec(name) {
        Some(spec) if spec.kind == assets::AssetKind::Model => {
            let dir = assets::ensure(&assets::home(), spec, progress)?;
            match name {
                "smollm2" => dir.join("SmolLM2-135M-Instruct.Q4_1.gguf"),
                _ => dir,
            }
        }
        _ => {
            let p = PathBuf::from(name);
            if p.exists() {
                p
            } else if looks_like_hub_id(name) {
                hub_download(name)?
            } else {
                return Err(Error::config(
                    "model_name",
                    format!("`{name}` is neither an embedded model (smollm2, minilm), an existing path, nor a hub id (org/name)"),
                ));
            }
        }
    })
}

fn load_model_path(
    path: &Path,
    cfg: &Config,
    settings: PromptSettings,
    format: LinearFormat,
    device: &Device,
) -> Result<Arc<dyn PromptModel>> {
    let is_gguf = path.extension().is_some_and(|e| e == "gguf");
    let kind = match cfg.backend {
        BackendKind::Auto if is_gguf => BackendKind::Causal,
        BackendKind::Auto => detect_backend(path)?,
        k => k,
    };
    Ok(match kind {
        BackendKind::Causal => {
            let mut m = if is_gguf {
                CausalLm::from_gguf(path, settings, format, device)?
            } else {
                let mut m = CausalLm::from_safetensors_dir(path, settings, device)?;
                if let Some(kernel) = unquantized_kernel(format)? {
                    m.use_packed(kernel)?;
                }
                m
            };
            m.max_text_tokens = cfg.max_text_tokens;
            Arc::new(m)
        }
        BackendKind::Mlm => {
            let mut m = MaskedLm::load(path, settings, device)?;
            if let Some(kernel) = unquantized_kernel(format)? {
                m.use_packed(kernel)?;
            }
            Arc::new(m)
        }
        BackendKind::Encoder => {
            let mut m = SentenceEncoder::load(path, settings, device)?;
            if let Some(kernel) = unquantized_kernel(format)? {
                m.use_packed(kernel)?;
            }
            Arc::new(m)
        }
        BackendKind::Auto => unreachable!("resolved above"),
    })
}

/// For a model loaded in f32 (safetensors): the kernel to pack it for, if any; `quantized` is
/// an error there.
fn unquantized_kernel(format: LinearFormat) -> Result<Option<crate::kernels::Kernel>> {
    match format {
        LinearFormat::F32 => Ok(None),
        LinearFormat::Packed(kernel) => Ok(Some(kernel)),
        LinearFormat::Quantized => Err(Error::config(
            "weights",
            "`quantized` applies to GGUF files only; use auto, f32 or bf16",
        )),
    }
}

/// Picks a backend for a Hugging Face directory from its `config.json`.
fn detect_backend(dir: &Path) -> Result<BackendKind> {
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::file(&cfg_path, format!("invalid JSON: {e}")))?;
    let model_type = v.get("model_type").and_then(|m| m.as_str()).unwrap_or("");
    let archs = v.get("architectures").map(|a| a.to_string()).unwrap_or_default();
    Ok(match model_type {
        "llama" | "mistral" | "qwen2" => BackendKind::Causal,
        _ if archs.contains("MaskedLM") => BackendKind::Mlm,
        "bert" | "roberta" | "xlm-roberta" => BackendKind::Encoder,
        other => {
            return Err(Error::file(
                &cfg_path,
                format!(
                    "model_type `{other}` not recognised; set `backend` to causal, mlm or encoder"
                ),
            ))
        }
    })
}

fn looks_like_hub_id(name: &str) -> bool {
    let parts: Vec<&str> = name.split('/').collect();
    parts.len() == 2 && parts.iter().all(|p| !p.is_empty() && !p.starts_with('.'))
}

/// Downloads `config.json`, `tokenizer.json` and the safetensors of a hub model (hf-hub's cache).
fn hub_download(id: &str) -> Result<PathBuf> {
    let offline = |e: String| {
        Error::config(
            "model_name",
            format!(
                "`{id}` looks like a Hugging Face hub id, but downloading it failed: {e}. \
                 The hub is unreachable from this machine; download the model elsewhere and set \
                 model_name to its local directory (config.json, *.safetensors, tokenizer.json)"
            ),
        )
    };
    let api = hf_hub::api::sync::Api::new().map_err(|e| offline(e.to_string()))?;
    let repo = api.model(id.to_string());
    let config = repo.get("config.json").map_err(|e| offline(e.to_string()))?;
    repo.get("tokenizer.json").map_err(|e| offline(e.to_string()))?;
    repo.get("model.safetensors").map_err(|e| offline(e.to_string()))?;
    Ok(config.parent().map(Path::to_path_buf).unwrap_or_default())
}

/// Loads the configured corpus (embedded `mr` / `bbc`, or `[data]`) with exact duplicates
/// removed (a warning says how many), so no text can sit in both the training and the test set.
pub fn load_dataset(cfg: &Config, progress: &mut dyn FnMut(&str)) -> Result<Dataset> {
    let mut ds = read_dataset(cfg, progress)?;
    let removed = dedup_examples(&mut ds.examples);
    if removed.copies > 0 {
        ds.warnings.push(format!(
            "removed {} repeated copies of {} texts",
            removed.copies, removed.repeated
        ));
    }
    if removed.conflicting > 0 {
        ds.warnings.push(format!(
            "removed all {} copies of {} texts whose copies disagree on the label",
            removed.conflicting, removed.conflicting_texts
        ));
    }
    Ok(ds)
}

/// One site's own training shard (`[[cluster.shards]]`), read and de-duplicated as the corpus is.
pub fn load_shard_file(cfg: &Config, file: &DataFile) -> Result<Dataset> {
    let mut ds = read_data_file(cfg, file)?;
    dedup_examples(&mut ds.examples);
    Ok(ds)
}

fn read_dataset(cfg: &Config, progress: &mut dyn FnMut(&str)) -> Result<Dataset> {
    if let Some(d) = &cfg.data {
        return read_data_file(cfg, d);
    }
    read_embedded(cfg, progress)
}

fn read_data_file(cfg: &Config, d: &DataFile) -> Result<Dataset> {
    match d.format.as_str() {
        "tsv" => {
            let kind = match cfg.task_name.as_str() {
                "sst2" | "mr" | "yelp" => sources::GlueKind::Sst2,
                "mrpc" => sources::GlueKind::Mrpc,
                "rte" => sources::GlueKind::Rte,
                "snli" => sources::GlueKind::Snli,
                other => {
                    return Err(Error::config(
                        "data.format",
                        format!("tsv needs a GLUE task, not `{other}`"),
                    ))
                }
            };
            sources::load_glue_tsv(&d.path, kind)
        }
        "csv" | "jsonl" => {
            let mut cols = d.columns.clone().ok_or_else(|| {
                Error::config("data.columns", "csv and jsonl need [data.columns]")
            })?;
            // String labels are the task's class names unless the file says otherwise.
            if cols.label_names.is_none() {
                cols.label_names = Some(cfg.task_spec()?.label_names);
            }
            if d.format == "csv" {
                sources::load_csv(&d.path, &cols)
            } else {
                sources::load_jsonl(&d.path, &cols)
            }
        }
        other => {
            Err(Error::config("data.format", format!("unknown format `{other}` (tsv, csv, jsonl)")))
        }
    }
}

fn read_embedded(cfg: &Config, progress: &mut dyn FnMut(&str)) -> Result<Dataset> {
    let root = assets::home();
    match cfg.task_name.as_str() {
        "mr" => {
            let spec =
                assets::spec("mr").ok_or_else(|| Error::config("task_name", "no mr asset"))?;
            let dir = assets::ensure(&root, spec, progress)?;
            sources::load_mr(&dir.join("movieReviewSnippets_GroundTruth.txt"))
        }
        "bbc" => {
            let spec =
                assets::spec("bbc").ok_or_else(|| Error::config("task_name", "no bbc asset"))?;
            let dir = assets::ensure(&root, spec, progress)?;
            sources::load_bbc(&dir)
        }
        other => Err(Error::config(
            "task_name",
            format!("task `{other}` has no embedded data; give a [data] file (path, format)"),
        )),
    }
}

/// The test set's size for a corpus of `n` examples: `test_size`, but at most half the corpus
/// (the rest feeds the k-shot sets), with a warning when that clamps it.
pub fn test_size_for(cfg: &Config, n: usize) -> Result<(usize, Option<String>)> {
    let size = cfg.test_size.min(n / 2);
    if size == 0 {
        return Err(Error::config(
            "test_size",
            format!("{n} examples leave no test set (it takes at most half of them)"),
        ));
    }
    let warning = (size < cfg.test_size).then(|| {
        format!(
            "test_size = {} is more than half of the {n} examples: the test set has {size}",
            cfg.test_size
        )
    });
    Ok((size, warning))
}

/// The fixed test split and the seeded k-shot train/dev sets.
pub fn load_split(cfg: &Config, progress: &mut dyn FnMut(&str)) -> Result<(Dataset, Split)> {
    let ds = load_dataset(cfg, progress)?;
    for w in &ds.warnings {
        progress(&format!("data warning: {w}"));
    }
    let (test_size, clamped) = test_size_for(cfg, ds.examples.len())?;
    if let Some(w) = clamped {
        progress(&format!("warning: {w}"));
    }
    let split = split_of(cfg, &ds, test_size)?;
    Ok((ds, split))
}

/// The fixed test split (`test_size` sentences, the same for every seed), then the seed's
/// k-shot training and dev sets from the rest.
fn split_of(cfg: &Config, ds: &Dataset, test_size: usize) -> Result<Split> {
    let (rest, test) = test_split(ds, test_size, TEST_SPLIT_SEED)?;
    let (train, dev) =
        k_shot(&rest, ds.label_names.len(), cfg.k_shot, cfg.dev_per_class(), cfg.seed)?;
    Ok(Split { train, dev, test })
}

/// A federation's data: each client's training shard, the dev set and the test set.
#[derive(Debug, Clone, PartialEq)]
pub struct FederatedSplit {
    pub shards: Vec<Vec<Example>>,
    pub dev: Vec<Example>,
    pub test: Vec<Example>,
}

/// The federated split of `ds` for `cfg`: [`load_split`]'s test, dev and training sets, the
/// training set partitioned over `num_users` clients (iid, or non-iid by `noniid_split`), and
/// a site's own shard file (`cluster.shards`) in place of its part. A function of the config
/// and the corpus alone: every process of a federation derives the same split.
pub fn federated_split(cfg: &Config, ds: &Dataset) -> Result<FederatedSplit> {
    let (test_size, _) = test_size_for(cfg, ds.examples.len())?;
    let Split { train, dev, test } = split_of(cfg, ds, test_size)?;
    let n_classes = ds.label_names.len();
    let seed = derive(cfg.seed, &[tag::PARTITION]);
    let parts = if cfg.iid {
        partition_iid(train.len(), cfg.num_users, seed)?
    } else {
        let labels: Vec<usize> = train.iter().map(|e| e.label).collect();
        match cfg.noniid_split {
            NoniidSplit::ClientMix => {
                partition_client_mix(&labels, n_classes, cfg.num_users, cfg.alpha_dir, seed)?
            }
            NoniidSplit::ClassShares => {
                partition_dirichlet(&labels, n_classes, cfg.num_users, cfg.alpha_dir, seed)?
            }
        }
    };
    let mut shards: Vec<Vec<Example>> =
        parts.into_iter().map(|idx| idx.into_iter().map(|i| train[i].clone()).collect()).collect();
    for own in &cfg.cluster.shards {
        let key = "cluster.shards";
        let i = client_index(&own.site, cfg.num_users)
            .ok_or_else(|| Error::config(key, format!("`{}` is not a client", own.site)))?;
        let file = load_shard_file(cfg, &own.file())
            .map_err(|e| Error::config(key, format!("the shard of {}: {e}", own.site)))?;
        if file.label_names != ds.label_names {
            return Err(Error::config(
                key,
                format!(
                    "{} has classes {:?}, the corpus {:?}",
                    own.path.display(),
                    file.label_names,
                    ds.label_names
                ),
            ));
        }
        if file.examples.is_empty() {
            return Err(Error::config(key, format!("{} holds no examples", own.path.display())));
        }
        shards[i] = file.examples;
    }
    Ok(FederatedSplit { shards, dev, test })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jsonl_config(dir: &Path, lines: &str) -> Config {
        let p = dir.join("reviews.jsonl");
        std::fs::write(&p, lines).unwrap();
        let text = format!(
            "task_name = \"mr\"\n[data]\npath = {:?}\nformat = \"jsonl\"\n[data.columns]\ntext = \"t\"\nlabel = \"l\"\n",
            p
        );
        Config::from_toml_str(&text, &[]).unwrap()
    }

    fn corpus(n: usize) -> Dataset {
        Dataset {
            name: "toy".into(),
            label_names: vec!["negative".into(), "positive".into()],
            examples: (0..n)
                .map(|i| Example { text: format!("text {i}"), text_b: None, label: i % 2 })
                .collect(),
            warnings: Vec::new(),
        }
    }

    #[test]
    fn the_federated_split_is_a_function_of_the_config_and_the_corpus() {
        let ds = corpus(600);
        let sets = |extra: &[&str]| {
            let mut v: Vec<String> =
                ["test_size=100", "k_shot=40", "num_users=4", "seed=5"].map(String::from).into();
            v.extend(extra.iter().map(|s| s.to_string()));
            Config::from_toml_str("", &v).unwrap()
        };
        let iid = sets(&[]);
        let a = federated_split(&iid, &ds).unwrap();
        assert_eq!(a, federated_split(&iid, &ds).unwrap(), "two processes, two splits");
        assert_eq!(a.shards.len(), 4);
        assert_eq!(a.shards.iter().map(Vec::len).sum::<usize>(), 80);
        assert_eq!((a.dev.len(), a.test.len()), (80, 100));
        // The same test set for every seed; another seed, other shards.
        let other = federated_split(&sets(&["seed=6"]), &ds).unwrap();
        assert_eq!(other.test, a.test);
        assert_ne!(other.shards, a.shards);
        // Non-iid: the shards' class mixes differ from one another.
        let skewed = federated_split(&sets(&["iid=false", "alpha_dir=0.1"]), &ds).unwrap();
        let positives: Vec<f64> = skewed
            .shards
            .iter()
            .filter(|s| !s.is_empty())
            .map(|s| s.iter().filter(|e| e.label == 1).count() as f64 / s.len() as f64)
            .collect();
        let spread = positives.iter().cloned().fold(f64::NAN, f64::max)
            - positives.iter().cloned().fold(f64::NAN, f64::min);
        assert!(spread > 0.3, "class shares {positives:?}");
        // A site's own file replaces its part; a site that is no client is refused by key.
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("own.csv");
        std::fs::write(&csv, "text,label\nmine,positive\nalso mine,negative\n").unwrap();
        let own = format!(
            "cluster.shards=[{{site=\"site-2\", path=\"{}\", format=\"csv\", columns={{text=\"text\", label=\"label\"}}}}]",
            csv.display()
        );
        let with_file = federated_split(&sets(&[&own]), &ds).unwrap();
        assert_eq!(with_file.shards[1].len(), 2);
        assert_eq!(with_file.shards[0], a.shards[0]);
        let stranger = own.replace("site-2", "site-9");
        let all: Vec<String> = ["test_size=100", "k_shot=40", "num_users=4", "seed=5"]
            .into_iter()
            .map(String::from)
            .chain([stranger])
            .collect();
        let e = Config::from_toml_str("", &all)
            .map_err(|e| e.to_string())
            .and_then(|c| federated_split(&c, &ds).map_err(|e| e.to_string()));
        let e = e.expect_err("a site that is no client");
        assert!(e.contains("cluster.shards") || e.contains("site-9"), "{e}");
    }

    #[test]
    fn string_labels_map_by_the_task_names_or_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        // Names that sort the other way from the task's classes still map by name.
        let cfg = jsonl_config(
            dir.path(),
            "{\"t\": \"a\", \"l\": \"positive\"}\n{\"t\": \"b\", \"l\": \"negative\"}\n",
        );
        let ds = load_dataset(&cfg, &mut |_| {}).unwrap();
        assert_eq!(ds.label_names, ["negative", "positive"]);
        assert_eq!(ds.examples.iter().map(|e| e.label).collect::<Vec<_>>(), [1, 0]);
        // Names the task does not have are refused, not mapped in some order.
        let cfg = jsonl_config(
            dir.path(),
            "{\"t\": \"a\", \"l\": \"terrible\"}\n{\"t\": \"b\", \"l\": \"great\"}\n",
        );
        let e = load_dataset(&cfg, &mut |_| {}).unwrap_err().to_string();
        assert!(
            e.contains("reviews.jsonl") && e.contains("terrible") && e.contains("negative"),
            "{e}"
        );
    }

    #[test]
    fn a_corpus_too_small_for_a_test_set_is_an_error() {
        let cfg = Config::default();
        assert!(test_size_for(&cfg, 1).is_err());
        let (size, warning) = test_size_for(&cfg, 600).unwrap();
        assert_eq!(size, 300);
        assert!(warning.unwrap().contains("test_size = 1000"));
        assert_eq!(test_size_for(&cfg, 5000).unwrap(), (1000, None));
    }
}
