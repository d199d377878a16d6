//! `fedbpt bbt`: centralized black-box prompt tuning into its run directory.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use indicatif::{ProgressBar, ProgressStyle};

use fedbpt::config::Config;
use fedbpt::experiment;
use fedbpt_actors::run_dir::RunDir;

use crate::output::{default_out, say};

pub fn bbt(config: &Path, out: Option<PathBuf>, overrides: &[String]) -> Result<()> {
    let cfg = Config::load(config, overrides)?;
    let out = out.unwrap_or_else(|| default_out(config, cfg.seed));
    let dir = RunDir::open(&out, "--out")?;
    let device =
        experiment::device(cfg.runtime.devices.first().map(String::as_str).unwrap_or("cpu"))?;
    let model = experiment::load_model(&cfg, &device, &mut |m| say(m))?;
    let (ds, split) = experiment::load_split(&cfg, &mut |m| say(m))?;
    let task = cfg.task_spec()?;
    if task.n_classes() != ds.label_names.len() {
        bail!(
            "task `{}` has {} classes but the data has {} ({:?})",
            task.name,
            task.n_classes(),
            ds.label_names.len(),
            ds.label_names
        );
    }
    say(&format!(
        "bbt: {} on {} ({} train / {} dev / {} test), d = {}, {} prompt tokens, budget {} evaluations",
        model.info().name,
        task.name,
        split.train.len(),
        split.dev.len(),
        split.test.len(),
        cfg.intrinsic_dim,
        cfg.n_prompt_tokens,
        cfg.budget
    ));
    // As for `run`: nothing in a finished run in `out` is replaced before this search finishes.
    let mut metrics = crate::cmd::run::MetricsLog::new(&out);
    let bar = ProgressBar::new(cfg.budget as u64);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} evals {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message("preparing (tokenize, text caches, zero-shot test)");
    let mut last_dev_acc = f64::NAN;
    let summary = fedbpt::bbt::run(&cfg, model.as_ref(), &task, &split, &mut |rec| {
        bar.set_position(rec.evaluations.min(cfg.budget) as u64);
        last_dev_acc = rec.dev_acc.unwrap_or(last_dev_acc);
        bar.set_message(format!(
            "train loss {:.4} dev acc {:.3} sigma {:.3}",
            rec.best_train_loss, last_dev_acc, rec.sigma
        ));
        metrics.push(rec);
    });
    bar.finish_and_clear();
    let metrics = metrics.close()?;
    let summary = summary?;
    let mut publish = dir.publish();
    metrics.stage(&mut publish);
    publish.json("summary.json", &summary)?;
    publish.commit()?;
    println!(
        "manual prompt {:.2}% | z=0 {:.2}% | final {:.2}% | best-on-dev {:.2}% (dev {:.2}%) | {} evaluations in {:.0}s -> {}",
        100.0 * summary.zero_shot_test_acc,
        100.0 * summary.zero_prompt_test_acc,
        100.0 * summary.final_test_acc,
        100.0 * summary.best_dev_test_acc,
        100.0 * summary.best_dev_acc,
        summary.evaluations,
        summary.wall_s,
        out.display()
    );
    Ok(())
}
