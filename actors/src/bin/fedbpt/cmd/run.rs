//! `fedbpt run`: one simulated federation into its run directory, and what `compare`,
//! `bench-faults` and `serve` share with it (the runtime, the progress bar, the metrics log).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

use fedbpt::config::Config;
use fedbpt_actors::federation::{self, Clients, Env, FedSummary, RunOptions};
use fedbpt_actors::profile::Profiler;
use fedbpt_actors::run_dir::{read_metrics, RunDir};
use fedbpt_actors::server::{Checkpoint, RoundRecord};

use crate::figures::{diagnostics_figure, has_diagnostics, method_name, run_figure};
use crate::output::{default_out, say};

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
    // Staged first: a failure below (a full disk) removes the new lines with the rest.
    metrics.stage(&mut publish);
    publish.json("summary.json", &summary)?;
    publish.file("accuracy.png", |tmp| run_figure(tmp, &summary, &records))?;
    if has_diagnostics(&records) {
        publish.file("diagnostics.png", |tmp| diagnostics_figure(tmp, &summary, &records))?;
    }
    publish.commit()?;
    Ok((summary, records))
}

/// A run of exactly `cfg` that finished in `dir` earlier (an interrupted benchmark goes on
/// where it stopped instead of redoing its runs).
pub(crate) fn finished_run(dir: &Path, cfg: &Config) -> Option<(FedSummary, Vec<RoundRecord>)> {
    let summary: FedSummary =
        serde_json::from_slice(&fs::read(dir.join("summary.json")).ok()?).ok()?;
    let records = read_metrics(&dir.join("metrics.jsonl")).ok()?;
    let current = summary.format == fedbpt_actors::server::CHECKPOINT_FORMAT;
    (current && summary.config == *cfg && records.len() == summary.rounds)
        .then_some((summary, records))
}

/// The finished run in `dir` if there is one for `cfg`, else a new run there.
pub(crate) fn run_or_reuse(
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
pub(crate) type Finished = (FedSummary, Vec<RoundRecord>);
