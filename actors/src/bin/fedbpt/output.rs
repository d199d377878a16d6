//! What every command writes or reads outside a run directory: messages, default paths,
//! benchmark JSON, a finished run's rounds.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use fedbpt_actors::run_dir::write_atomic;

pub(crate) fn say(msg: &str) {
    eprintln!("{msg}");
}

pub(crate) fn default_out(config: &Path, seed: u64) -> PathBuf {
    let stem = config.file_stem().and_then(|s| s.to_str()).unwrap_or("run");
    PathBuf::from("runs").join(format!("{stem}-seed{seed}"))
}

/// Checks a benchmark's `--json` path before minutes of measuring: its folder is created, and
/// a file already there (a finished result) is refused rather than overwritten.
pub(crate) fn check_json_out(path: Option<&Path>) -> Result<()> {
    let Some(path) = path else { return Ok(()) };
    if path.exists() {
        bail!(
            "--json {}: the file exists (a finished result is not overwritten: move it, or name another)",
            path.display()
        );
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).with_context(|| format!("--json: creating {}", dir.display()))?;
    }
    Ok(())
}

/// Writes one JSON object per line to `path` (checked by [`check_json_out`]), atomically.
pub(crate) fn write_json_lines(path: &Path, lines: &[serde_json::Value]) -> Result<()> {
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    write_atomic(path, text.as_bytes())
}

/// Writes `value` as pretty JSON to `path` atomically.
pub fn write_json_atomic(path: &Path, value: &impl serde::Serialize) -> Result<()> {
    write_atomic(path, &serde_json::to_vec_pretty(value)?)
}

/// One line of a finished run's `metrics.jsonl`: the wall clock, the byte counts, and the rest.
pub(crate) struct RoundLine {
    pub wall_s: f64,
    pub bytes_up: usize,
    pub bytes_down: usize,
    /// The record without its wall clock.
    pub rest: serde_json::Value,
}

/// The rounds of the finished run in `dir` (read by [`fedbpt_actors::run_dir::read_metrics`]).
pub(crate) fn read_rounds(dir: &Path) -> Result<Vec<RoundLine>> {
    fedbpt_actors::run_dir::read_metrics(&dir.join("metrics.jsonl"))?
        .into_iter()
        .map(|r| {
            let mut rest = serde_json::to_value(&r)?;
            if let Some(o) = rest.as_object_mut() {
                o.remove("wall_s");
            }
            Ok(RoundLine { wall_s: r.wall_s, bytes_up: r.bytes_up, bytes_down: r.bytes_down, rest })
        })
        .collect()
}
