//! The `run` and `compare` commands: federations on the actor runtime, with files and plots.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

use fedbpt::config::{Aggregation, Config};
use fedbpt_actors::federation::{self, Env, FedSummary, RunOptions};
use fedbpt_actors::plot::{accuracy_png, Curve};
use fedbpt_actors::profile::Profiler;
use fedbpt_actors::server::{Checkpoint, RoundRecord};

use crate::{default_out, say, write_json_atomic};

fn runtime(cfg: &Config) -> Result<tokio::runtime::Runtime> {
    if cfg.runtime.compute_threads > 0 {
        // candle's CPU kernels use rayon's global pool; it reads this once, on first use.
        std::env::set_var("RAYON_NUM_THREADS", cfg.runtime.compute_threads.to_string());
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cfg.runtime.tokio_threads)
        .enable_all()
        .build()
        .context("starting the tokio runtime")
}

fn progress(rounds: usize, label: &str) -> ProgressBar {
    let bar = ProgressBar::new(rounds as u64);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] round {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(label.to_string());
    bar
}

/// Runs one federation, writing `metrics.jsonl` as rounds land.
fn run_one(
    rt: &tokio::runtime::Runtime,
    cfg: &Config,
    env: &mut Env,
    out: &Path,
    label: &str,
    resume: Option<Checkpoint>,
) -> Result<(FedSummary, Vec<RoundRecord>)> {
    fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let metrics_path = out.join("metrics.jsonl");
    let mut metrics = fs::File::create(&metrics_path)
        .with_context(|| format!("creating {}", metrics_path.display()))?;
    let bar = progress(cfg.num_rounds, &format!("{label}: preparing"));
    let mut write_err = None;
    let opts = RunOptions { checkpoint_dir: Some(out.to_path_buf()), resume };
    let result = rt.block_on(federation::run(cfg, env, opts, &mut |r| {
        bar.set_position(r.round as u64);
        let test = r.test_acc.map(|a| format!(" test {:.2}%", 100.0 * a)).unwrap_or_default();
        bar.set_message(format!(
            "{label}: dev {:.2}%{test} clients {}",
            100.0 * r.dev_acc,
            r.clients_ok
        ));
        if write_err.is_none() {
            let line = serde_json::to_string(r).unwrap_or_default();
            if let Err(e) = writeln!(metrics, "{line}").and_then(|_| metrics.flush()) {
                write_err = Some(e);
            }
        }
    }));
    bar.finish_and_clear();
    if let Some(e) = write_err {
        anyhow::bail!("writing {}: {e}", metrics_path.display());
    }
    let (summary, records) = result?;
    write_json_atomic(&out.join("summary.json"), &summary)?;
    Ok((summary, records))
}

/// A run of exactly `cfg` that finished in `dir` earlier (an interrupted benchmark goes on
/// where it stopped instead of redoing its runs).
fn finished_run(dir: &Path, cfg: &Config) -> Option<(FedSummary, Vec<RoundRecord>)> {
    let summary: FedSummary =
        serde_json::from_slice(&fs::read(dir.join("summary.json")).ok()?).ok()?;
    let records: Vec<RoundRecord> = fs::read_to_string(dir.join("metrics.jsonl"))
        .ok()?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .ok()?;
    (summary.config == *cfg && records.len() == summary.rounds).then_some((summary, records))
}

/// The finished run in `dir` if there is one for `cfg`, else a new run there.
fn run_or_reuse(
    rt: &tokio::runtime::Runtime,
    cfg: &Config,
    env: &mut Env,
    dir: &Path,
    label: &str,
) -> Result<(FedSummary, Vec<RoundRecord>)> {
    if let Some(done) = finished_run(dir, cfg) {
        say(&format!("{label}: reusing the finished run in {}", dir.display()));
        return Ok(done);
    }
    run_one(rt, cfg, env, dir, label, None)
}

/// The run's curve starting at z = 0 (round 0), and the manual prompt as a flat line.
fn with_baselines(mut c: Curve, s: &FedSummary, rounds: usize) -> Vec<Curve> {
    c.points.insert(0, (0.0, 100.0 * s.zero_prompt_test_acc));
    let manual = Curve {
        name: "manual prompt".into(),
        points: vec![
            (0.0, 100.0 * s.zero_shot_test_acc),
            (rounds as f64, 100.0 * s.zero_shot_test_acc),
        ],
    };
    vec![c, manual]
}

fn curve(name: &str, records: &[RoundRecord]) -> Curve {
    Curve {
        name: name.into(),
        points: records
            .iter()
            .filter_map(|r| r.test_acc.map(|a| (r.round as f64, 100.0 * a)))
            .collect(),
    }
}

pub fn run(
    config: Option<&Path>,
    resume: Option<&Path>,
    out: Option<PathBuf>,
    trace: Option<&Path>,
    overrides: &[String],
) -> Result<()> {
    let (cfg, out, checkpoint) = match (config, resume) {
        (_, Some(dir)) => {
            let path = dir.join("checkpoint.json");
            let text =
                fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
            let cp: Checkpoint = serde_json::from_str(&text)
                .with_context(|| format!("{}: not a fedbpt checkpoint", path.display()))?;
            say(&format!("resuming {} after round {}", dir.display(), cp.round));
            (cp.config.clone(), dir.to_path_buf(), Some(cp))
        }
        (Some(config), None) => {
            let cfg = Config::load(config, overrides)?;
            let out = out.unwrap_or_else(|| default_out(config, cfg.seed));
            (cfg, out, None)
        }
        (None, None) => anyhow::bail!("give a config file, or --resume DIR"),
    };
    let rt = runtime(&cfg)?;
    let mut env = Env::load(&cfg, &mut |m| say(m))?;
    say(&format!(
        "run: {} on {}, {} clients ({}), {} rounds, aggregation {:?}",
        env.replicas[0].info().name,
        env.task.name,
        cfg.num_users,
        if cfg.iid { "iid".to_string() } else { format!("non-iid, alpha {}", cfg.alpha_dir) },
        cfg.num_rounds,
        cfg.aggregation
    ));
    let profiler = trace.map(|_| Profiler::start());
    let result = run_one(&rt, &cfg, &mut env, &out, "run", checkpoint);
    Profiler::stop();
    let (s, records) = result?;
    if let (Some(p), Some(trace)) = (profiler, trace) {
        if let Some(parent) = trace.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        p.write_chrome_trace(trace, (0, p.elapsed_us()))?;
        p.write_csv(&out.join("messages.csv"))?;
        eprintln!("{}", p.table());
        say(&format!("wrote {} and {}", trace.display(), out.join("messages.csv").display()));
    }
    accuracy_png(
        &out.join("accuracy.png"),
        &format!("{} on {} ({:?})", s.model, s.task, s.aggregation),
        "round",
        &with_baselines(curve("test accuracy (round 0: z = 0)", &records), &s, records.len()),
    )?;
    println!(
        "manual prompt {:.2}% | z=0 {:.2}% | final {:.2}% | best-on-dev {:.2}% (round {}) | up {:.0} B, down {:.0} B per client-round (FedAvg of the model: {} B) | {:.0}s -> {}",
        100.0 * s.zero_shot_test_acc,
        100.0 * s.zero_prompt_test_acc,
        100.0 * s.final_test_acc,
        100.0 * s.best_dev_test_acc,
        s.best_dev_round,
        s.bytes_up_per_client_round,
        s.bytes_down_per_client_round,
        s.fedavg_full_model_bytes_per_client_round,
        s.wall_s,
        out.display()
    );
    Ok(())
}

fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len().max(1) as f64;
    let m = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / n;
    (m, var.sqrt())
}

pub fn compare(
    config: &Path,
    out: Option<PathBuf>,
    seeds: &[u64],
    overrides: &[String],
) -> Result<()> {
    let base = Config::load(config, overrides)?;
    let out = out.unwrap_or_else(|| {
        let stem = config.file_stem().and_then(|s| s.to_str()).unwrap_or("run");
        PathBuf::from("runs").join(format!("{stem}-compare"))
    });
    let rt = runtime(&base)?;
    let mut env = Env::load(&base, &mut |m| say(m))?;
    let methods = [(Aggregation::Fedavg, "FedAvg-BBT"), (Aggregation::Fedbpt, "FedBPT")];
    // [partition][method] -> per-seed (final, best-dev); and the manual / z=0 baselines.
    let mut finals = vec![vec![Vec::new(); 2]; 2];
    let mut best = vec![vec![Vec::new(); 2]; 2];
    let mut manual = Vec::new();
    let mut zero = Vec::new();
    let mut curves = Vec::new();
    for (pi, iid) in [true, false].into_iter().enumerate() {
        for (mi, (agg, name)) in methods.iter().enumerate() {
            let mut per_round: Vec<Vec<f64>> = Vec::new();
            let mut rounds_x: Vec<f64> = Vec::new();
            for &seed in seeds {
                let mut cfg = base.clone();
                cfg.seed = seed;
                cfg.iid = iid;
                cfg.aggregation = *agg;
                let part = if iid { "iid" } else { "noniid" };
                let label = format!("{name} {part} seed {seed}");
                let dir = out.join(format!("{}-{part}-seed{seed}", name.to_lowercase()));
                let (s, records) = run_or_reuse(&rt, &cfg, &mut env, &dir, &label)?;
                say(&format!(
                    "{label}: final {:.2}% best-on-dev {:.2}% ({:.0}s)",
                    100.0 * s.final_test_acc,
                    100.0 * s.best_dev_test_acc,
                    s.wall_s
                ));
                finals[pi][mi].push(s.final_test_acc);
                best[pi][mi].push(s.best_dev_test_acc);
                if pi == 0 && mi == 0 {
                    manual.push(s.zero_shot_test_acc);
                    zero.push(s.zero_prompt_test_acc);
                }
                let c = curve(&label, &records);
                rounds_x = c.points.iter().map(|p| p.0).collect();
                per_round.push(c.points.iter().map(|p| p.1).collect());
            }
            let n = per_round.iter().map(|v| v.len()).min().unwrap_or(0);
            let mean: Vec<(f64, f64)> = (0..n)
                .map(|i| {
                    (
                        rounds_x[i],
                        per_round.iter().map(|v| v[i]).sum::<f64>() / per_round.len() as f64,
                    )
                })
                .collect();
            curves.push(Curve {
                name: format!("{name} ({})", if iid { "iid" } else { "non-iid" }),
                points: mean,
            });
        }
    }
    let (m_manual, s_manual) = mean_std(&manual);
    let (m_zero, s_zero) = mean_std(&zero);
    let cell = |v: &[f64]| {
        let (m, s) = mean_std(v);
        format!("{:.2} ± {:.2}", 100.0 * m, 100.0 * s)
    };
    let mut md = String::new();
    md.push_str(&format!(
        "Test accuracy (%) on {} with {}, {} clients, {} rounds, mean ± std over seeds {:?}; non-iid = Dirichlet alpha {}.\n\n",
        env.task.name,
        env.replicas[0].info().name,
        base.num_users,
        base.num_rounds,
        seeds,
        base.alpha_dir
    ));
    md.push_str("| method | iid final | iid best-on-dev | non-iid final | non-iid best-on-dev |\n|---|---|---|---|---|\n");
    md.push_str(&format!(
        "| manual prompt (zero-shot) | {0:.2} ± {1:.2} | | {0:.2} ± {1:.2} | |\n",
        100.0 * m_manual,
        100.0 * s_manual
    ));
    md.push_str(&format!(
        "| z = 0 (placeholders, no search) | {0:.2} ± {1:.2} | | {0:.2} ± {1:.2} | |\n",
        100.0 * m_zero,
        100.0 * s_zero
    ));
    for (mi, (_, name)) in methods.iter().enumerate() {
        md.push_str(&format!(
            "| {name} | {} | {} | {} | {} |\n",
            cell(&finals[0][mi]),
            cell(&best[0][mi]),
            cell(&finals[1][mi]),
            cell(&best[1][mi])
        ));
    }
    fs::create_dir_all(&out)?;
    fs::write(out.join("compare.md"), &md)
        .with_context(|| format!("writing {}", out.join("compare.md").display()))?;
    accuracy_png(
        &out.join("compare.png"),
        &format!("{}: test accuracy per round (mean of seeds)", env.task.name),
        "round",
        &curves,
    )?;
    println!("{md}");
    say(&format!(
        "wrote {} and {}",
        out.join("compare.md").display(),
        out.join("compare.png").display()
    ));
    Ok(())
}

/// `bench-faults`: final accuracy and wall time versus the fraction of clients killed per round,
/// over seeds; a markdown table and a plot.
pub fn bench_faults(
    config: &Path,
    out: PathBuf,
    rates: &[f64],
    seeds: &[u64],
    overrides: &[String],
) -> Result<()> {
    let base = Config::load(config, overrides)?;
    let rt = runtime(&base)?;
    let mut env = Env::load(&base, &mut |m| say(m))?;
    let mut md = format!(
        "Kill rate vs accuracy on {} with {}, {} clients, {} rounds, seeds {:?} (mean ± std).\n\n\
         Wall: each run's, less the one-off preparation of the shared test set.\n\n\
         | killed per round | final test acc (%) | best-on-dev test acc (%) | wall (s) | replies per round |\n\
         |---|---|---|---|---|\n",
        env.task.name,
        env.replicas[0].info().name,
        base.num_users,
        base.num_rounds,
        seeds
    );
    let (mut acc_curve, mut best_curve) = (Vec::new(), Vec::new());
    let mut rows = Vec::new();
    for &rate in rates {
        let (mut finals, mut bests, mut walls, mut replies) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for &seed in seeds {
            let mut cfg = base.clone();
            cfg.seed = seed;
            cfg.faults.kill_fraction = rate;
            cfg.validate()?;
            let label = format!("kill {:.0}% seed {seed}", 100.0 * rate);
            let dir = out.join(format!("kill{:.0}-seed{seed}", 100.0 * rate));
            let (s, records) = run_or_reuse(&rt, &cfg, &mut env, &dir, &label)?;
            finals.push(s.final_test_acc);
            bests.push(s.best_dev_test_acc);
            walls.push(s.wall_s - s.test_setup_s);
            replies.push(
                records.iter().map(|r| r.clients_ok as f64).sum::<f64>()
                    / records.len().max(1) as f64,
            );
        }
        let (f, fs) = mean_std(&finals);
        let (b, bs) = mean_std(&bests);
        let (w, ws) = mean_std(&walls);
        let (r, _) = mean_std(&replies);
        md.push_str(&format!(
            "| {:.0}% | {:.2} ± {:.2} | {:.2} ± {:.2} | {:.0} ± {:.0} | {:.1} |\n",
            100.0 * rate,
            100.0 * f,
            100.0 * fs,
            100.0 * b,
            100.0 * bs,
            w,
            ws,
            r
        ));
        acc_curve.push((100.0 * rate, 100.0 * f));
        best_curve.push((100.0 * rate, 100.0 * b));
        rows.push(serde_json::json!({"kill_fraction": rate, "final_test_acc": finals, "best_dev_test_acc": bests, "wall_s": walls}));
    }
    fs::create_dir_all(&out)?;
    fs::write(out.join("faults.md"), &md)
        .with_context(|| format!("writing {}", out.join("faults.md").display()))?;
    fs::write(out.join("faults.json"), serde_json::to_vec_pretty(&rows)?)?;
    accuracy_png(
        &out.join("faults.png"),
        "test accuracy (%) vs clients killed per round (mean of seeds)",
        "clients killed per round (%)",
        &[
            Curve { name: "final".into(), points: acc_curve },
            Curve { name: "best-on-dev".into(), points: best_curve },
        ],
    )?;
    println!("{md}");
    Ok(())
}
