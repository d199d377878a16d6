//! `fedbpt bench`: forward throughput of each backend at BBT's batch shapes, beside its PyTorch
//! peers in f32 and bf16 (`bench/peer_minilm.py`, `bench/peer_causal.py`) and llama.cpp on the
//! same GGUF (`bench/peer_llamacpp.py`) where `$FEDBPT_PEER_PYTHON` can import them, and the
//! linear layers alone; every rate beside the CPU's measured peak for its number format, in the
//! same run. One JSON object per line.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use serde_json::json;

use fedbpt::config::{BackendKind, Config};
use fedbpt::experiment;
use fedbpt::kernels::{ops, Kernel, PackedLinear};
use fedbpt::models::linear::LinearFormat;
use fedbpt::models::random_checkpoint::{self, RobertaShape};
use fedbpt::models::{Placement, PromptModel, ScoreJob};
use fedbpt::peak::{self, Peak};

use crate::bench::share;

use crate::bench::peers::{peer, peer_causal, peer_isa_for, peer_llamacpp, peer_variants};

/// Non-embedding parameters: 2 FLOPs each per token is the forward's matmul work.
fn non_embedding_params(model: &dyn PromptModel) -> usize {
    let info = model.info();
    info.n_params.saturating_sub(info.vocab_size * info.hidden_size)
}

fn time_scores(
    model: &dyn PromptModel,
    batch: &fedbpt::models::Prepared,
    prompts: &[Vec<f32>],
    iters: usize,
) -> Result<f64> {
    let refs: Vec<&[f32]> = prompts.iter().map(|p| p.as_slice()).collect();
    model.scores_many(batch, &refs)?; // warm-up
    let t = Instant::now();
    for _ in 0..iters {
        model.scores_many(batch, &refs)?;
    }
    Ok(t.elapsed().as_secs_f64() / iters as f64)
}

/// Quickstart's shapes: 10 clients, each scoring a population of 5 on its 8 examples. Times the
/// ten requests served one forward each against one merged forward (what a worker does with
/// the requests queued while it was busy).
fn merge_gain(
    model: &dyn PromptModel,
    task: &fedbpt::task::TaskSpec,
    exs: &[fedbpt::data::Example],
    out_dim: usize,
    iters: usize,
) -> Result<serde_json::Value> {
    let (clients, per_client, pop) = (10, 8, 5);
    let batches = (0..clients)
        .map(|c| {
            let shard: Vec<_> =
                exs.iter().cycle().skip(c * per_client).take(per_client).cloned().collect();
            model.prepare(task, &shard, None)
        })
        .collect::<fedbpt::Result<Vec<_>>>()?;
    let prompts: Vec<Vec<Vec<f32>>> = (0..clients)
        .map(|c| (0..pop).map(|i| vec![1e-3 * (c * pop + i) as f32; out_dim]).collect())
        .collect();
    let refs: Vec<Vec<&[f32]>> =
        prompts.iter().map(|ps| ps.iter().map(|p| p.as_slice()).collect()).collect();
    let jobs: Vec<ScoreJob<'_>> =
        batches.iter().zip(&refs).map(|(b, p)| ScoreJob { batch: b, prompts: p }).collect();
    let alone = || -> fedbpt::Result<()> {
        for j in &jobs {
            model.scores_many(j.batch, j.prompts)?;
        }
        Ok(())
    };
    alone()?; // warm-up
    model.scores_jobs(&jobs)?;
    let (mut t_alone, mut t_merged) = (0.0, 0.0);
    for _ in 0..iters {
        let t = Instant::now();
        alone()?;
        t_alone += t.elapsed().as_secs_f64();
        let t = Instant::now();
        model.scores_jobs(&jobs)?;
        t_merged += t.elapsed().as_secs_f64();
    }
    let (t_alone, t_merged) = (t_alone / iters as f64, t_merged / iters as f64);
    Ok(json!({
        "model": model.info().name,
        "bench": "merge",
        "requests": clients,
        "examples_per_request": per_client,
        "candidates_per_request": pop,
        "s_one_forward_each": t_alone,
        "s_merged": t_merged,
        "speedup": t_alone / t_merged,
    }))
}

/// Largest class-score difference and how often the predicted class agrees, between two weight
/// formats on the same batch.
fn agreement(
    model: &dyn PromptModel,
    weights: &str,
    reference: &[Vec<f32>],
    scores: &[Vec<f32>],
) -> serde_json::Value {
    let argmax = |row: &[f32]| {
        row.iter().enumerate().fold(0, |best, (i, v)| if *v > row[best] { i } else { best })
    };
    let max_diff = reference
        .iter()
        .zip(scores)
        .flat_map(|(a, b)| a.iter().zip(b).map(|(x, y)| (x - y).abs()))
        .fold(0f32, f32::max);
    let same = reference.iter().zip(scores).filter(|(a, b)| argmax(a) == argmax(b)).count();
    json!({
        "model": model.info().name,
        "bench": "agreement",
        "weights": weights,
        "max_abs_score_diff": max_diff,
        "same_prediction": same as f64 / reference.len().max(1) as f64,
        "examples": reference.len(),
    })
}

/// roberta-large's shapes with random weights: throughput depends on the shapes only, so this
/// measures the papers' model on machines that hold no model files.
const RANDOM_ROBERTA: &str = "roberta-large-random";

/// A checkpoint the bench wrote itself, removed when dropped (also on an early error return).
struct TempModel {
    root: PathBuf,
    dir: PathBuf,
}

impl TempModel {
    /// Writes [`RANDOM_ROBERTA`] under the temp dir; the checkpoint directory is named after
    /// the model so that its lines say `"model": "roberta-large-random"`.
    fn roberta_large() -> Result<Self> {
        let root = std::env::temp_dir()
            .join(format!("fedbpt-roberta-large-random-{}", std::process::id()));
        let dir = root.join(RANDOM_ROBERTA);
        eprintln!("writing a random-weight roberta-large to {}", dir.display());
        let model = Self { root, dir };
        random_checkpoint::write_roberta(&model.dir, &RobertaShape::large(), 0)?;
        Ok(model)
    }
}

impl Drop for TempModel {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// The run configuration of one measurement. The random RoBERTa runs as BBT runs its MLMs:
/// the masked-LM head, 50 prompt tokens (the paper's) at the prefix.
fn bench_config(name: &str, random: Option<&TempModel>, placement: Placement) -> Config {
    let cfg = Config {
        model_name: name.to_string(),
        task_name: "mr".into(),
        placement,
        ..Config::default()
    };
    match random {
        Some(m) if name == RANDOM_ROBERTA => Config {
            model_name: m.dir.display().to_string(),
            backend: BackendKind::Mlm,
            n_prompt_tokens: 50,
            ..cfg
        },
        _ => cfg,
    }
}

/// Finds (or fetches) every model but the one the bench writes itself.
fn find_models(models: &[String]) -> Result<()> {
    for name in models.iter().filter(|m| m.as_str() != RANDOM_ROBERTA) {
        experiment::resolve_model(name, &mut |m| eprintln!("{m}"))
            .with_context(|| format!("--models {name}"))?;
    }
    Ok(())
}

/// `device` is `cpu` or `cuda:N`; on a GPU the CPU's peak, the linear layers and the CPU peers
/// are left out (they would measure the host, not the device).
pub fn run(
    models: &[String],
    formats: &[LinearFormat],
    iters: usize,
    device_name: &str,
    json_out: Option<&Path>,
) -> Result<()> {
    if formats.is_empty() {
        anyhow::bail!(
            "--weights: name at least one format (f32, bf16, bf16-KERNEL, kernels, quantized)"
        );
    }
    let iters = iters.max(1);
    // Before minutes of measuring (and writing a random checkpoint), so that a misspelt model,
    // a device this build cannot open or a taken output path fails first.
    find_models(models)?;
    let device = experiment::device(device_name)?;
    crate::output::check_json_out(json_out)?;
    let mut lines = Vec::new();
    let threads = compute_threads();
    let on_cpu = device_name == "cpu";
    let measured = on_cpu.then(|| peak::measure(threads, 0.5));
    let peak = measured.as_ref();
    if let Some(p) = peak {
        let line = json!({"bench": "peak", "peak": p});
        println!("{line}");
        lines.push(line);
        for line in linear_layers(p)? {
            println!("{line}");
            lines.push(line);
        }
    }
    let random = if models.iter().any(|m| m == RANDOM_ROBERTA) {
        Some(TempModel::roberta_large()?)
    } else {
        None
    };
    for name in models {
        let mut suffix_tokens = None;
        let (placements, examples, populations): (Vec<Placement>, usize, Vec<usize>) =
            match name.as_str() {
                "minilm" => (vec![Placement::Suffix], 32, vec![1, 20]),
                RANDOM_ROBERTA => (vec![Placement::Prefix], 32, vec![1, 20]),
                _ => (vec![Placement::Suffix, Placement::Prefix], 64, vec![1, 20]),
            };
        for placement in placements {
            let mut reference_scores: Option<Vec<Vec<f32>>> = None;
            for &weights in formats {
                let cfg = bench_config(name, random.as_ref(), placement);
                let model =
                    experiment::load_model_as(&cfg, weights, &device, &mut |m| eprintln!("{m}"))?;
                let (_, split) = experiment::load_split(&cfg, &mut |m| eprintln!("{m}"))?;
                let task = cfg.task_spec()?;
                let exs = &split.test[..examples.min(split.test.len())];
                let t = Instant::now();
                let batch = model.prepare(&task, exs, None)?;
                let prepare_s = t.elapsed().as_secs_f64();
                let out_dim = cfg.n_prompt_tokens * model.info().hidden_size;
                let flops_per_token = 2.0 * non_embedding_params(model.as_ref()) as f64;
                let weights_name = weights.name();
                for &pop in &populations {
                    // Prefix placement reruns whole sequences per candidate: one population is
                    // plenty.
                    if placement == Placement::Prefix && pop > 1 && model.info().family == "llama" {
                        continue;
                    }
                    let prompts: Vec<Vec<f32>> =
                        (0..pop).map(|i| vec![1e-3 * i as f32; out_dim]).collect();
                    let dt = time_scores(model.as_ref(), &batch, &prompts, iters)?;
                    let tokens = (batch.tokens_per_pass * pop) as f64;
                    let line = json!({
                        "model": model.info().name,
                        "family": model.info().family,
                        "weights": weights_name,
                        "placement": format!("{placement:?}").to_lowercase(),
                        "examples": batch.len(),
                        "candidates": pop,
                        "tokens_per_pass": batch.tokens_per_pass,
                        "prepare_s": prepare_s,
                        "s_per_call": dt,
                        "s_per_candidate": dt / pop as f64,
                        "tokens_per_s": tokens / dt,
                        "examples_per_s": (batch.len() * pop) as f64 / dt,
                        "gflops": tokens * flops_per_token / dt / 1e9,
                        "share_of_peak": share(peak, &weights_name, tokens * flops_per_token / dt / 1e9),
                        "threads": threads,
                        "device": device_name,
                    });
                    println!("{line}");
                    lines.push(line);
                }
                // How far this format's class scores are from the first format's (z = 0).
                let zero = vec![0f32; out_dim];
                let scores = model.scores_many(&batch, &[zero.as_slice()])?.remove(0);
                match &reference_scores {
                    None => reference_scores = Some(scores),
                    Some(reference) => {
                        let line = agreement(model.as_ref(), &weights_name, reference, &scores);
                        println!("{line}");
                        lines.push(line);
                    }
                }
                if placement == Placement::Suffix {
                    suffix_tokens = Some(batch.tokens_per_pass);
                    let mut line = merge_gain(model.as_ref(), &task, exs, out_dim, iters)?;
                    line["weights"] = json!(weights_name);
                    println!("{line}");
                    lines.push(line);
                }
                if weights != formats[0] || !on_cpu {
                    continue;
                }
                if placement == Placement::Prefix && model.info().family == "llama" {
                    // The peer's rows: the prefix pass's mean length; the suffix's new tokens
                    // per row.
                    let rows = batch.len().max(1);
                    let seq = (batch.tokens_per_pass as f64 / rows as f64).round() as usize;
                    let new = suffix_tokens.map(|t| t / rows).unwrap_or(8).clamp(1, seq.max(2) - 1);
                    let gguf = experiment::resolve_model(name, &mut |m| eprintln!("{m}"))?;
                    for variant in peer_variants(formats) {
                        for line in peer_causal(&gguf, rows, seq, new, threads, &variant) {
                            let line = variant.tag(line, &model.info().name, None, peak);
                            println!("{line}");
                            lines.push(line);
                        }
                    }
                    // Its line declares the GGUF's own format (q4_1): no measured peak, so its
                    // share_of_peak stays null rather than a share of the f32 FMA peak.
                    for line in peer_llamacpp(&gguf, rows, seq, new, threads) {
                        let line = with_share(line, peak);
                        println!("{line}");
                        lines.push(line);
                    }
                }
                if name == "minilm" {
                    let dir = experiment::resolve_model(name, &mut |m| eprintln!("{m}"))?;
                    // Same batch and token count as ours: the peer's rows are uniform, so none
                    // of its work is padding either. Once per population size: our rows are
                    // examples x candidates.
                    let seq = (batch.tokens_per_pass as f64 / batch.len().max(1) as f64).round();
                    for &pop in &populations {
                        for variant in peer_variants(formats) {
                            let line =
                                peer(&dir, batch.len() * pop, seq as usize, threads, &variant);
                            let line = variant.tag(line, &model.info().name, Some(pop), peak);
                            println!("{line}");
                            lines.push(line);
                        }
                    }
                }
            }
        }
    }
    for line in versus(&lines) {
        println!("{line}");
        lines.push(line);
    }
    if let Some(p) = json_out {
        crate::output::write_json_lines(p, &lines)?;
    }
    Ok(())
}

/// Our throughput over each peer's on the same model, placement, candidates and instruction
/// set (above 1: ours is faster): the bench's verdicts, one line per pair.
fn versus(lines: &[serde_json::Value]) -> Vec<serde_json::Value> {
    let ours = lines.iter().filter(|l| l["bench"].is_null() && l["peer"].is_null());
    let mut out = Vec::new();
    for o in ours {
        let (Some(format), Some(ours_tps)) = (o["weights"].as_str(), o["tokens_per_s"].as_f64())
        else {
            continue;
        };
        let Some(isa) = peer_isa_for(format) else { continue };
        for p in lines.iter().filter(|p| {
            p["isa"].as_str() == Some(isa)
                && p["beside_model"] == o["model"]
                && p["candidates"] == o["candidates"]
                && (p["placement"].is_null() || p["placement"] == o["placement"])
        }) {
            let Some(peer_tps) = p["tokens_per_s"].as_f64().filter(|t| *t > 0.0) else {
                continue;
            };
            out.push(json!({
                "bench": "versus",
                "model": o["model"],
                "placement": o["placement"],
                "candidates": o["candidates"],
                "ours": format,
                "peer": p["peer"],
                "peer_dtype": p["dtype"],
                "peer_isa": isa,
                "speedup": ours_tps / peer_tps,
            }));
        }
    }
    out
}

/// The formats `--weights` names (see `fedbpt bench --help`), in order, without repeats.
pub fn parse_formats(names: &[String]) -> Result<Vec<LinearFormat>> {
    let mut out: Vec<LinearFormat> = Vec::new();
    for name in names {
        let found = match name.trim() {
            "f32" => vec![LinearFormat::F32],
            "quantized" => vec![LinearFormat::Quantized],
            "bf16" => vec![LinearFormat::Packed(
                fedbpt::kernels::active().map_err(|e| anyhow::anyhow!("--weights bf16: {e}"))?,
            )],
            "kernels" => Kernel::available_all()
                .into_iter()
                .filter(|k| *k != Kernel::Portable)
                .map(LinearFormat::Packed)
                .collect(),
            other => {
                let kernel =
                    other.strip_prefix("bf16-").and_then(Kernel::parse).ok_or_else(|| {
                        anyhow::anyhow!(
                            "--weights: `{other}` is not f32, quantized, bf16, bf16-KERNEL \
                         (amx, avx512bf16, avx2, portable) or kernels"
                        )
                    })?;
                kernel.self_check().map_err(|e| anyhow::anyhow!("--weights {other}: {e}"))?;
                vec![LinearFormat::Packed(kernel)]
            }
        };
        for f in found {
            if !out.contains(&f) {
                out.push(f);
            }
        }
    }
    Ok(out)
}

/// Threads the forwards use: `RAYON_NUM_THREADS` when set (candle's pool reads it), else
/// every core.
fn compute_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
}

/// The llama.cpp peer's line with its share: its line declares the GGUF's own format (q4_1),
/// which has no measured peak, so the share stays null.
fn with_share(mut line: serde_json::Value, peak: Option<&Peak>) -> serde_json::Value {
    if let (Some(g), Some(d)) = (line["gflops"].as_f64(), line["dtype"].as_str()) {
        line["share_of_peak"] = json!(share(peak, d, g));
    }
    line
}

/// One linear layer at BBT's shapes: candle's f32 matmul and each bf16 kernel this CPU has,
/// each beside its peak. The rows are MiniLM's FFN up and down at 32 sentences x 30 tokens and
/// at 20 candidates' worth, and SmolLM2's gate/up and down at 64 x 10 rows.
fn linear_layers(peak: &Peak) -> Result<Vec<serde_json::Value>> {
    use candle_core::{Device, Tensor};
    let best_of = |n: usize, f: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
        f()?;
        let mut best = f64::INFINITY;
        for _ in 0..n {
            let t = Instant::now();
            f()?;
            best = best.min(t.elapsed().as_secs_f64());
        }
        Ok(best)
    };
    let mut lines = Vec::new();
    for (rows, inputs, outputs) in
        [(960, 384, 1536), (960, 1536, 384), (19200, 384, 1536), (640, 576, 1536), (640, 1536, 576)]
    {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (rows, inputs), &dev)?;
        let w = Tensor::randn(0f32, 0.05, (outputs, inputs), &dev)?;
        let b = Tensor::zeros(outputs, candle_core::DType::F32, &dev)?;
        let flops = 2.0 * (rows * inputs * outputs) as f64;
        let f32_s = best_of(5, &mut || {
            ops::linear(&x, &w, Some(&b))?;
            Ok(())
        })?;
        let f32_g = flops / f32_s / 1e9;
        let mut line = json!({
            "bench": "linear",
            "rows": rows, "inputs": inputs, "outputs": outputs,
            "f32_gflops": f32_g,
            "f32_share_of_peak": share(Some(peak), "f32", f32_g),
        });
        for kernel in Kernel::available_all() {
            let packed = PackedLinear::from_tensors(&w, Some(&b), kernel)?;
            let s = best_of(5, &mut || {
                packed.forward(&x)?;
                Ok(())
            })?;
            let g = flops / s / 1e9;
            let format = LinearFormat::Packed(kernel).name();
            line[format!("{format}_gflops")] = json!(g);
            line[format!("{format}_share_of_peak")] = json!(share(Some(peak), &format, g));
        }
        lines.push(line);
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_model_is_refused_by_name_and_the_random_one_needs_no_files() {
        let models = vec![RANDOM_ROBERTA.to_string(), "not-a-model".to_string()];
        let err = find_models(&models).unwrap_err();
        assert!(format!("{err:#}").contains("--models not-a-model"), "{err:#}");
        find_models(&models[..1]).unwrap();
    }

    #[test]
    fn a_json_output_is_checked_first_and_a_finished_one_is_not_overwritten() {
        let tmp = tempfile::tempdir().unwrap();
        let finished = tmp.path().join("bench.json");
        std::fs::write(&finished, "{\"bench\": \"peak\"}\n").unwrap();
        let err = crate::output::check_json_out(Some(&finished)).unwrap_err().to_string();
        assert!(err.contains("bench.json") && err.contains("exists"), "{err}");
        assert_eq!(std::fs::read_to_string(&finished).unwrap(), "{\"bench\": \"peak\"}\n");

        let nested = tmp.path().join("new/dir/bench.json");
        crate::output::check_json_out(Some(&nested)).unwrap();
        crate::output::write_json_lines(&nested, &[json!({"a": 1}), json!({"b": 2})]).unwrap();
        assert_eq!(std::fs::read_to_string(&nested).unwrap(), "{\"a\":1}\n{\"b\":2}\n");
        crate::output::check_json_out(None).unwrap();
    }

    #[test]
    fn weights_names_parse_and_a_misspelt_or_missing_kernel_is_refused_by_flag() {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let got = parse_formats(&names(&["f32", "bf16-portable", "f32"])).unwrap();
        assert_eq!(got, vec![LinearFormat::F32, LinearFormat::Packed(Kernel::Portable)]);
        let all = parse_formats(&names(&["kernels"])).unwrap();
        assert!(!all.contains(&LinearFormat::Packed(Kernel::Portable)));
        assert_eq!(all.len(), Kernel::available_all().len() - 1);
        let err = parse_formats(&names(&["bf16-sse"])).unwrap_err().to_string();
        assert!(err.contains("--weights") && err.contains("bf16-sse"), "{err}");
        for k in Kernel::ALL.into_iter().filter(|k| !k.available()) {
            let err = parse_formats(&names(&[&format!("bf16-{}", k.name())])).unwrap_err();
            assert!(err.to_string().contains("cannot run"), "{err}");
        }
    }

    #[test]
    fn versus_pairs_each_kernel_with_the_peer_on_its_instruction_set() {
        let ours = |w: &str, tps: f64| json!({"model": "m", "weights": w, "placement": "suffix", "candidates": 1, "tokens_per_s": tps});
        let peer = |isa: &str, dtype: &str, tps: f64, placement: serde_json::Value| {
            json!({"peer": "torch", "dtype": dtype, "isa": isa, "beside_model": "m",
                   "candidates": 1, "placement": placement, "tokens_per_s": tps})
        };
        let lines = vec![
            ours("bf16-avx2", 300.0),
            ours("bf16-avx512bf16", 900.0),
            peer("avx2", "bf16", 100.0, json!("suffix")),
            peer("avx2", "f32", 150.0, json!("suffix")),
            peer("avx2", "bf16", 1.0, json!("prefix")),
            peer("avx512_core_bf16", "bf16", 450.0, serde_json::Value::Null),
            json!({"peer": "unavailable: no torch"}),
        ];
        let v = versus(&lines);
        let got: Vec<(String, String, f64)> = v
            .iter()
            .map(|l| {
                (
                    l["ours"].as_str().unwrap().to_string(),
                    l["peer_dtype"].as_str().unwrap().to_string(),
                    l["speedup"].as_f64().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("bf16-avx2".into(), "bf16".into(), 3.0),
                ("bf16-avx2".into(), "f32".into(), 2.0),
                ("bf16-avx512bf16".into(), "bf16".into(), 2.0),
            ]
        );
    }
}
