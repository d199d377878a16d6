//! The `run` and `compare` commands: federations on the actor runtime, with files and plots.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

use fedbpt::config::{Aggregation, Config};
use fedbpt::objective::ClientLoss;
use fedbpt::strategy::{ServerFitness, ServerSigma, ServerWeights};
use fedbpt_actors::federation::{self, Clients, Env, FedSummary, RunOptions};
use fedbpt_actors::figures::{
    compare_figure, diagnostics_figure, faults_figure, has_diagnostics, method_name, run_figure,
    KillRateRow, MethodRuns,
};
use fedbpt_actors::plot::mean_std;
use fedbpt_actors::profile::Profiler;
use fedbpt_actors::run_dir::{read_metrics, RunDir};
use fedbpt_actors::server::{Checkpoint, RoundRecord};

use crate::{default_out, say};

pub(crate) fn runtime(cfg: &Config) -> Result<tokio::runtime::Runtime> {
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

/// `metrics.jsonl` as a run writes it: one JSON line per record into `metrics.jsonl.partial`,
/// which replaces `metrics.jsonl` only when the run has finished (`close`, then `publish`), so a
/// failing run leaves a finished one untouched. The first write error is kept for `close`.
pub(crate) struct MetricsLog {
    partial: PathBuf,
    file: Option<fs::File>,
    error: Option<std::io::Error>,
}

/// A closed `MetricsLog` whose every line was written.
pub(crate) struct ClosedMetricsLog {
    partial: PathBuf,
}

impl MetricsLog {
    pub(crate) fn new(dir: &Path) -> Self {
        MetricsLog { partial: dir.join("metrics.jsonl.partial"), file: None, error: None }
    }

    pub(crate) fn push<T: serde::Serialize>(&mut self, record: &T) {
        if self.error.is_some() {
            return;
        }
        let written =
            serde_json::to_string(record).map_err(std::io::Error::other).and_then(|line| {
                let mut file = match self.file.take() {
                    Some(f) => f,
                    None => fs::File::create(&self.partial)?,
                };
                writeln!(file, "{line}")?;
                file.flush()?;
                Ok(file)
            });
        match written {
            Ok(f) => self.file = Some(f),
            Err(e) => self.error = Some(e),
        }
    }

    pub(crate) fn close(self) -> Result<ClosedMetricsLog> {
        if let Some(e) = self.error {
            bail!("writing {}: {e}", self.partial.display());
        }
        Ok(ClosedMetricsLog { partial: self.partial })
    }
}

impl ClosedMetricsLog {
    /// Stages the new lines to replace `metrics.jsonl` with the rest of the result.
    pub(crate) fn stage(self, publish: &mut fedbpt_actors::run_dir::Publish<'_>) {
        publish.existing(self.partial, "metrics.jsonl");
    }
}

/// Runs one federation into `dir`. Nothing there is replaced before the run finishes: rounds
/// land in `metrics.jsonl.partial`, which becomes `metrics.jsonl` beside the new `summary.json`
/// and `accuracy.png` at the end (all three staged first, then renamed together), so a run that
/// fails (in validation, loading, restore, a round or drawing its figure) leaves a finished run
/// in `dir` as it was. Only `checkpoint.json` follows the new run from its first round on, so
/// that `--resume` can continue it.
pub(crate) fn run_one(
    rt: &tokio::runtime::Runtime,
    cfg: &Config,
    env: &mut Env,
    dir: &RunDir,
    label: &str,
    resume: Option<Checkpoint>,
    clients: Clients,
) -> Result<(FedSummary, Vec<RoundRecord>)> {
    let out = dir.path();
    let mut metrics = MetricsLog::new(out);
    let bar = progress(cfg.num_rounds, &format!("{label}: preparing"));
    let opts = RunOptions { checkpoint_dir: Some(out.to_path_buf()), resume, clients };
    let result = rt.block_on(federation::run(cfg, env, opts, &mut |r| {
        bar.set_position(r.round as u64);
        let test = r.test_acc.map(|a| format!(" test {:.2}%", 100.0 * a)).unwrap_or_default();
        bar.set_message(format!(
            "{label}: dev {:.2}%{test} clients {}",
            100.0 * r.dev_acc,
            r.clients_ok
        ));
        metrics.push(r);
    }));
    bar.finish_and_clear();
    let metrics = metrics.close()?;
    let (summary, records) = result?;
    let mut publish = dir.publish();
    publish.json("summary.json", &summary)?;
    publish.file("accuracy.png", |tmp| run_figure(tmp, &summary, &records))?;
    if has_diagnostics(&records) {
        publish.file("diagnostics.png", |tmp| diagnostics_figure(tmp, &summary, &records))?;
    }
    metrics.stage(&mut publish);
    publish.commit()?;
    Ok((summary, records))
}

/// `fedbpt plot DIR`: redraws `accuracy.png` of the finished run in `dir`; a run whose records
/// do not cover its summary's rounds is refused (the figure would be partial).
pub fn plot(dir: &Path) -> Result<()> {
    let summary_path = dir.join("summary.json");
    let summary: FedSummary = serde_json::from_slice(
        &fs::read(&summary_path).with_context(|| format!("reading {}", summary_path.display()))?,
    )
    .with_context(|| format!("{}: not a fedbpt run summary", summary_path.display()))?;
    let metrics_path = dir.join("metrics.jsonl");
    let records = read_metrics(&metrics_path)?;
    let rounds: Vec<usize> = records.iter().map(|r| r.round).collect();
    if rounds != (1..=summary.rounds).collect::<Vec<_>>() {
        bail!(
            "{}: rounds {rounds:?}, but {} says the run had {} rounds: not a finished run's \
             records, so accuracy.png is left as it is",
            metrics_path.display(),
            summary_path.display(),
            summary.rounds
        );
    }
    let run_dir = RunDir::open(dir, "DIR")?;
    let mut publish = run_dir.publish();
    publish.file("accuracy.png", |tmp| run_figure(tmp, &summary, &records))?;
    if has_diagnostics(&records) {
        publish.file("diagnostics.png", |tmp| diagnostics_figure(tmp, &summary, &records))?;
    }
    publish.commit()?;
    say(&format!("wrote {}", dir.join("accuracy.png").display()));
    Ok(())
}

/// A run of exactly `cfg` that finished in `dir` earlier (an interrupted benchmark goes on
/// where it stopped instead of redoing its runs).
fn finished_run(dir: &Path, cfg: &Config) -> Option<(FedSummary, Vec<RoundRecord>)> {
    let summary: FedSummary =
        serde_json::from_slice(&fs::read(dir.join("summary.json")).ok()?).ok()?;
    let records = read_metrics(&dir.join("metrics.jsonl")).ok()?;
    let current = summary.format == fedbpt_actors::server::CHECKPOINT_FORMAT;
    (current && summary.config == *cfg && records.len() == summary.rounds)
        .then_some((summary, records))
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
    let dir = RunDir::open(dir, "--out")?;
    run_one(rt, cfg, env, &dir, label, None, Clients::Local)
}

/// The configuration, output directory and checkpoint of a run started from `config` or
/// continued from `resume`.
pub(crate) fn run_setup(
    config: Option<&Path>,
    resume: Option<&Path>,
    out: Option<PathBuf>,
    overrides: &[String],
) -> Result<(Config, PathBuf, Option<Checkpoint>)> {
    Ok(match (config, resume) {
        (_, Some(dir)) => {
            let path = dir.join("checkpoint.json");
            let text =
                fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
            // Parsed and checked against its own configuration before anything loads.
            let cp =
                Checkpoint::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            say(&format!("resuming {} after round {}", dir.display(), cp.round));
            (cp.config.clone(), dir.to_path_buf(), Some(cp))
        }
        (Some(config), None) => {
            let cfg = Config::load(config, overrides)?;
            let out = out.unwrap_or_else(|| default_out(config, cfg.seed));
            (cfg, out, None)
        }
        (None, None) => anyhow::bail!("give a config file, or --resume DIR"),
    })
}

pub fn run(
    config: Option<&Path>,
    resume: Option<&Path>,
    out: Option<PathBuf>,
    trace: Option<&Path>,
    overrides: &[String],
) -> Result<()> {
    let (cfg, out, checkpoint) = run_setup(config, resume, out, overrides)?;
    // Before minutes of loading: a taken or unusable directory, or a --trace path that cannot
    // be written, fails first.
    let dir = RunDir::open(&out, "--out")?;
    check_trace(trace)?;
    let rt = runtime(&cfg)?;
    let mut env = Env::load(&cfg, &mut |m| say(m))?;
    say(&format!(
        "run: {} on {}, {} clients ({}), {} rounds, {}",
        env.replicas[0].info().name,
        env.task.name,
        cfg.num_users,
        if cfg.iid { "iid".to_string() } else { format!("non-iid, alpha {}", cfg.alpha_dir) },
        cfg.num_rounds,
        method_name(&cfg)
    ));
    let profiler = trace.map(|_| Profiler::start());
    let result = run_one(&rt, &cfg, &mut env, &dir, "run", checkpoint, Clients::Local);
    Profiler::stop();
    let (s, _records) = result?;
    if let (Some(p), Some(trace)) = (profiler, trace) {
        write_profile(&p, trace, &out.join("messages.csv"))?;
    }
    print_summary(&s, &out);
    Ok(())
}

/// Checks a `--trace` path before the run: not a directory, its folder creatable.
pub(crate) fn check_trace(trace: Option<&Path>) -> Result<()> {
    let Some(trace) = trace else { return Ok(()) };
    if trace.is_dir() {
        bail!("--trace {}: is a directory (name a file, e.g. trace.json)", trace.display());
    }
    if let Some(parent) = trace.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(parent)
            .with_context(|| format!("--trace {}: creating its folder", trace.display()))?;
    }
    Ok(())
}

/// A process's message flows: its Chrome trace and its messages table.
pub(crate) fn write_profile(p: &Profiler, trace: &Path, csv: &Path) -> Result<()> {
    if let Some(parent) = trace.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    p.write_chrome_trace(trace, (0, p.elapsed_us()))?;
    p.write_csv(csv)?;
    eprintln!("{}", p.table());
    say(&format!("wrote {} and {}", trace.display(), csv.display()));
    Ok(())
}

/// The one line a finished run prints on stdout.
pub(crate) fn print_summary(s: &FedSummary, out: &Path) {
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
}

/// A finished run: its summary and its records.
type Finished = (FedSummary, Vec<RoundRecord>);

/// One method `compare` runs: its directory stem, the server's rules, the clients' loss, and
/// whether its clients perturb (the config's `perturb` where `None`).
#[derive(Debug)]
struct Method {
    stem: &'static str,
    aggregation: Aggregation,
    rule: ServerSigma,
    fitness: ServerFitness,
    weights: ServerWeights,
    client_loss: ClientLoss,
    perturb: Option<bool>,
}

impl Method {
    fn config(&self, base: &Config) -> Config {
        let mut cfg = base.clone();
        cfg.aggregation = self.aggregation;
        cfg.server_sigma = self.rule;
        cfg.server_fitness = self.fitness;
        cfg.server_weights = self.weights;
        cfg.client_loss = self.client_loss;
        if let Some(p) = self.perturb {
            cfg.perturb = p;
        }
        cfg
    }

    /// FedBPT as the reference runs it, but for what `with` changes.
    const fn fedbpt(stem: &'static str) -> Self {
        Method {
            stem,
            aggregation: Aggregation::Fedbpt,
            rule: ServerSigma::Reference,
            fitness: ServerFitness::Loss,
            weights: ServerWeights::Rank,
            client_loss: ClientLoss::Mean,
            perturb: None,
        }
    }
}

/// How many of `METHODS`, from the first, `compare` runs when none is named.
const DEFAULT_METHODS: usize = 4;

/// FedAvg-BBT, FedBPT with the earlier and the reference server rule (same local search), the
/// paper's FedBPT: the reference rule with its clients' perturbation (Eq. 7); then the variants
/// that test the non-iid mechanism (run when named): fitnesses permuted across clients, equal
/// weights, ranking by improvement, and class-balanced client losses.
const METHODS: [Method; 8] = [
    Method { aggregation: Aggregation::Fedavg, ..Method::fedbpt("fedavg-bbt") },
    Method { rule: ServerSigma::ClientRms, ..Method::fedbpt("fedbpt-client-rms") },
    Method::fedbpt("fedbpt"),
    Method { perturb: Some(true), ..Method::fedbpt("fedbpt-perturb") },
    Method { fitness: ServerFitness::Permuted, ..Method::fedbpt("fedbpt-permuted") },
    Method { weights: ServerWeights::Equal, ..Method::fedbpt("fedbpt-equal") },
    Method { fitness: ServerFitness::Improvement, ..Method::fedbpt("fedbpt-improvement") },
    Method { client_loss: ClientLoss::ClassBalanced, ..Method::fedbpt("fedbpt-balanced") },
];

/// The methods named by their stems, in the order given; the first `DEFAULT_METHODS` where none
/// is named.
fn select_methods(stems: &[String]) -> Result<Vec<&'static Method>> {
    if stems.is_empty() {
        return Ok(METHODS[..DEFAULT_METHODS].iter().collect());
    }
    let mut picked: Vec<&'static Method> = Vec::new();
    for stem in stems {
        let Some(m) = METHODS.iter().find(|m| m.stem == stem.as_str()) else {
            let known: Vec<&str> = METHODS.iter().map(|m| m.stem).collect();
            bail!("--methods: unknown method {stem:?} (known: {})", known.join(", "));
        };
        if !picked.iter().any(|p| p.stem == m.stem) {
            picked.push(m);
        }
    }
    Ok(picked)
}

/// The partitions to run as (index in the results, iid), non-iid first; both where none is named.
fn select_partitions(names: &[String]) -> Result<Vec<(usize, bool)>> {
    if let Some(bad) = names.iter().find(|n| !matches!(n.as_str(), "iid" | "non-iid")) {
        bail!("--partitions: unknown partition {bad:?} (known: iid, non-iid)");
    }
    let wanted = |name: &str| names.is_empty() || names.iter().any(|n| n == name);
    Ok([(1, false, "non-iid"), (0, true, "iid")]
        .into_iter()
        .filter(|(_, _, name)| wanted(name))
        .map(|(index, iid, _)| (index, iid))
        .collect())
}

pub fn compare(
    config: &Path,
    out: Option<PathBuf>,
    seeds: &[u64],
    methods: &[String],
    partitions: &[String],
    overrides: &[String],
) -> Result<()> {
    let base = Config::load(config, overrides)?;
    let selected = select_methods(methods)?;
    let parts = select_partitions(partitions)?;
    let out = out.unwrap_or_else(|| {
        let stem = config.file_stem().and_then(|s| s.to_str()).unwrap_or("run");
        PathBuf::from("runs").join(format!("{stem}-compare"))
    });
    distinct_seeds(seeds)?;
    let out_dir = RunDir::open(&out, "--out")?;
    let rt = runtime(&base)?;
    let mut env = Env::load(&base, &mut |m| say(m))?;
    // [partition][method] -> per-seed runs, filled method by method so that an interrupted
    // comparison has whole methods done (and each method's non-iid runs, the ones that decide
    // the paper's claim, before its iid ones).
    let mut runs: Vec<Vec<Vec<Finished>>> = vec![vec![Vec::new(); selected.len()]; 2];
    for (mi, m) in selected.iter().enumerate() {
        let name = method_name(&m.config(&base));
        for &(pi, iid) in &parts {
            for &seed in seeds {
                let mut cfg = m.config(&base);
                cfg.seed = seed;
                cfg.iid = iid;
                cfg.validate()?;
                let part = if iid { "iid" } else { "noniid" };
                let label = format!("{name} {part} seed {seed}");
                let dir = out.join(format!("{}-{part}-seed{seed}", m.stem));
                let (s, records) = run_or_reuse(&rt, &cfg, &mut env, &dir, &label)?;
                say(&format!(
                    "{label}: final {:.2}% best-on-dev {:.2}% ({:.0}s)",
                    100.0 * s.final_test_acc,
                    100.0 * s.best_dev_test_acc,
                    s.wall_s
                ));
                runs[pi][mi].push((s, records));
            }
        }
    }
    let model_name = env.replicas[0].info().name.clone();
    let md = compare_table(&base, &env.task.name, &model_name, seeds, &selected, &runs);
    let mut publish = out_dir.publish();
    publish.bytes("compare.md", md.as_bytes())?;
    let json: Vec<serde_json::Value> = runs
        .iter()
        .zip(["iid", "non-iid"])
        .flat_map(|(per_method, part)| {
            per_method.iter().flat_map(move |per_seed| {
                per_seed.iter().map(move |(s, r)| {
                    serde_json::json!({
                        "partition": part, "method": method_name(&s.config), "seed": s.seed,
                        "final_test_acc": s.final_test_acc, "best_dev_test_acc": s.best_dev_test_acc,
                        "best_dev_round": s.best_dev_round,
                        "sigma": r.iter().map(|x| x.sigma).collect::<Vec<_>>(),
                        "dev_acc": r.iter().map(|x| x.dev_acc).collect::<Vec<_>>(),
                        "test_acc": r.iter().map(|x| x.test_acc).collect::<Vec<_>>(),
                        "wall_s": s.wall_s,
                    })
                })
            })
        })
        .collect();
    publish.json("compare.json", &json)?;
    let partitions: Vec<(&str, Vec<MethodRuns<'_>>)> = runs
        .iter()
        .zip(["iid", "non-iid"])
        .filter(|(per_method, _)| per_method.iter().any(|per_seed| !per_seed.is_empty()))
        .map(|(per_method, part)| {
            let methods = per_method
                .iter()
                .zip(&selected)
                .enumerate()
                .map(|(color, (per_seed, m))| MethodRuns {
                    name: method_name(&m.config(&base)),
                    color,
                    runs: per_seed.iter().map(|(s, r)| (s, r.as_slice())).collect(),
                })
                .collect();
            (part, methods)
        })
        .collect();
    let title = format!(
        "{}, {}, {} seeds (mean +- sd)",
        env.replicas[0].info().name,
        env.task.name,
        seeds.len()
    );
    publish.file("compare.png", |tmp| compare_figure(tmp, &title, &partitions))?;
    publish.commit()?;
    println!("{md}");
    say(&format!(
        "wrote {}, {} and {}",
        out.join("compare.md").display(),
        out.join("compare.json").display(),
        out.join("compare.png").display()
    ));
    Ok(())
}

/// The comparison as markdown: final and best-on-dev test metric per method and partition
/// (mean +- std over seeds), then the step size per round of each method (mean over seeds).
/// Whether a method perturbs is in its name, so the header does not say it.
fn compare_table(
    base: &Config,
    task_name: &str,
    model_name: &str,
    seeds: &[u64],
    methods: &[&Method],
    runs: &[Vec<Vec<Finished>>],
) -> String {
    let cell = |v: Vec<f64>| {
        if v.is_empty() {
            return "not run".to_string();
        }
        let (m, s) = mean_std(&v);
        format!("{:.2} ± {:.2}", 100.0 * m, 100.0 * s)
    };
    // The manual prompt and z = 0 are scored on the one fixed test split, so any finished run
    // (of whichever partition and method ran) has them.
    let first = runs.iter().flatten().flatten().next();
    let (manual, zero) =
        first.map_or((f64::NAN, f64::NAN), |(s, _)| (s.zero_shot_test_acc, s.zero_prompt_test_acc));
    let metric =
        first.map_or("accuracy".to_string(), |(s, _)| format!("{:?}", s.metric).to_lowercase());
    let mut md = format!(
        "Test {metric} (%) on {} with {}, {} clients, {} rounds of {} local iterations x popsize {}, mean ± std over seeds {:?}; non-iid = Dirichlet alpha {} ({}).

",
        task_name,
        model_name,
        base.num_users,
        base.num_rounds,
        base.local_iter,
        base.local_popsize,
        seeds,
        base.alpha_dir,
        base.noniid_split.as_str(),
    );
    md.push_str(
        "| method | iid final | iid best-on-dev | non-iid final | non-iid best-on-dev |
|---|---|---|---|---|
",
    );
    md.push_str(&format!(
        "| manual prompt (zero-shot) | {0:.2} | | {0:.2} | |
| z = 0 (placeholders, no search) | {1:.2} | | {1:.2} | |
",
        100.0 * manual,
        100.0 * zero
    ));
    for (mi, m) in methods.iter().enumerate() {
        let name = method_name(&m.config(base));
        let pick = |pi: usize, f: fn(&FedSummary) -> f64| -> Vec<f64> {
            runs.get(pi)
                .and_then(|m| m.get(mi))
                .map_or(Vec::new(), |v| v.iter().map(|(s, _)| f(s)).collect())
        };
        md.push_str(&format!(
            "| {name} | {} | {} | {} | {} |
",
            cell(pick(0, |s| s.final_test_acc)),
            cell(pick(0, |s| s.best_dev_test_acc)),
            cell(pick(1, |s| s.final_test_acc)),
            cell(pick(1, |s| s.best_dev_test_acc)),
        ));
    }
    md.push_str(
        "
Step size sent to the clients after each round (mean over seeds):

",
    );
    let rounds = base.num_rounds;
    md.push_str(&format!(
        "| method | partition | {} |
|---|---|{}
",
        (1..=rounds).map(|r| r.to_string()).collect::<Vec<_>>().join(" | "),
        "---|".repeat(rounds)
    ));
    for (pi, part) in ["iid", "non-iid"].iter().enumerate() {
        for (mi, m) in methods.iter().enumerate() {
            let name = method_name(&m.config(base));
            let Some(per_seed) = runs.get(pi).and_then(|m| m.get(mi)).filter(|v| !v.is_empty())
            else {
                continue;
            };
            let per_round: Vec<String> = (0..rounds)
                .map(|r| {
                    let v: Vec<f64> = per_seed
                        .iter()
                        .filter_map(|(_, rec)| rec.get(r).map(|x| x.sigma))
                        .collect();
                    format!("{:.3}", mean_std(&v).0)
                })
                .collect();
            md.push_str(&format!(
                "| {name} | {part} | {} |
",
                per_round.join(" | ")
            ));
        }
    }
    md
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
    distinct_seeds(seeds)?;
    let out_dir = RunDir::open(&out, "--out")?;
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
    let mut plot_rows = Vec::new();
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
        plot_rows.push(KillRateRow { rate, finals: finals.clone(), bests: bests.clone() });
        rows.push(serde_json::json!({"kill_fraction": rate, "final_test_acc": finals, "best_dev_test_acc": bests, "wall_s": walls}));
    }
    let mut publish = out_dir.publish();
    publish.bytes("faults.md", md.as_bytes())?;
    publish.json("faults.json", &rows)?;
    let title = format!("{}, {} clients, seeds {:?}", env.task.name, base.num_users, seeds);
    publish.file("faults.png", |tmp| faults_figure(tmp, &title, &plot_rows))?;
    publish.commit()?;
    println!("{md}");
    Ok(())
}

/// Refuses a seed list with repeats: a mean and spread over the same run twice would claim a
/// precision the runs do not have.
fn distinct_seeds(seeds: &[u64]) -> Result<()> {
    if seeds.is_empty() {
        bail!("--seeds: name at least one seed");
    }
    for (i, s) in seeds.iter().enumerate() {
        if seeds[..i].contains(s) {
            bail!("--seeds: seed {s} is named twice (each seed is one run; a repeat would count it twice)");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn methods_are_picked_in_the_order_given_and_unknown_ones_refused() {
        let all: Vec<&str> = select_methods(&[]).unwrap().iter().map(|m| m.stem).collect();
        assert_eq!(all, ["fedavg-bbt", "fedbpt-client-rms", "fedbpt", "fedbpt-perturb"]);
        let picked = select_methods(&strings(&["fedbpt", "fedavg-bbt", "fedbpt"])).unwrap();
        assert_eq!(picked.iter().map(|m| m.stem).collect::<Vec<_>>(), ["fedbpt", "fedavg-bbt"]);
        let err = select_methods(&strings(&["fedprox"])).unwrap_err().to_string();
        assert!(err.contains("fedprox") && err.contains("fedbpt-perturb"), "{err}");
    }

    fn finished(cfg: &Config, final_acc: f64) -> Finished {
        let summary = FedSummary {
            format: 0,
            model: "m".into(),
            task: "mr".into(),
            aggregation: cfg.aggregation,
            iid: cfg.iid,
            seed: cfg.seed,
            metric: Default::default(),
            zero_shot_test_acc: 0.775,
            zero_prompt_test_acc: 0.813,
            zero_prompt_dev_acc: 0.7,
            final_test_acc: final_acc,
            best_dev_test_acc: final_acc,
            best_dev_acc: 0.8,
            best_dev_round: 1,
            rounds: 1,
            clients: 10,
            train_examples: 80,
            test_examples: 1000,
            total_bytes_up: 0,
            total_bytes_down: 0,
            bytes_up_per_client_round: 0.0,
            bytes_down_per_client_round: 0.0,
            fedavg_full_model_bytes_per_client_round: 0,
            score_requests: 0,
            score_forwards: 0,
            prepare_requests: 0,
            wall_s: 1.0,
            test_setup_s: 0.0,
            linear_layers: vec!["f32".into()],
            data_fingerprint: String::new(),
            config: cfg.clone(),
        };
        (summary, Vec::new())
    }

    #[test]
    fn a_comparison_of_one_partition_and_method_still_has_its_baselines() {
        // Only non-iid runs of the one perturbing method: the baselines come from them, the
        // iid cells say "not run", and the header does not claim the base config's perturb.
        let base = Config { num_rounds: 1, ..Config::default() };
        let method = select_methods(&strings(&["fedbpt-perturb"])).unwrap();
        let runs = vec![
            vec![Vec::new()],
            vec![vec![finished(&method[0].config(&base), 0.739), finished(&base, 0.66)]],
        ];
        let md = compare_table(&base, "mr", "m", &[42, 43], &method, &runs);
        assert!(!md.contains("NaN"), "{md}");
        assert!(md.contains("| manual prompt (zero-shot) | 77.50 |"), "{md}");
        assert!(md.contains("| z = 0 (placeholders, no search) | 81.30 |"), "{md}");
        assert!(md.contains("| not run | not run | 69.95 ± 3.95 |"), "{md}");
        assert!(!md.contains("perturb false"), "{md}");
    }

    #[test]
    fn partitions_run_non_iid_first_and_unknown_ones_are_refused() {
        assert_eq!(select_partitions(&[]).unwrap(), [(1, false), (0, true)]);
        assert_eq!(select_partitions(&strings(&["iid"])).unwrap(), [(0, true)]);
        assert_eq!(select_partitions(&strings(&["non-iid"])).unwrap(), [(1, false)]);
        let err = select_partitions(&strings(&["noniid"])).unwrap_err().to_string();
        assert!(err.contains("noniid"), "{err}");
    }
}
