//! `fedbpt plot`: redraws a finished run's figures from its records.

use std::fs;
use std::path::Path;

use anyhow::{bail, Context, Result};

use fedbpt_actors::federation::FedSummary;
use fedbpt_actors::run_dir::{read_metrics, RunDir};

use crate::figures::{diagnostics_figure, has_diagnostics, run_figure};
use crate::output::say;

/// `fedbpt plot DIR`: redraws `accuracy.png` (and `diagnostics.png` where the records have
/// them) of the finished run in `dir`; a run whose records
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
    let mut wrote = vec!["accuracy.png"];
    if has_diagnostics(&records) {
        publish.file("diagnostics.png", |tmp| diagnostics_figure(tmp, &summary, &records))?;
        wrote.push("diagnostics.png");
    }
    publish.commit()?;
    say(&format!("wrote {} in {}", wrote.join(" and "), dir.display()));
    Ok(())
}
