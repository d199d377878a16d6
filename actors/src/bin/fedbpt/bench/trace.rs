//! `fedbpt bench-trace`: the wall-time overhead of message-flow tracing.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result};
use serde_json::json;

/// Times `fedbpt run` on `config` without and with `--trace` (separate processes, alternating,
/// so both pay the same start-up) and prints the overhead as JSON.
pub fn trace_overhead(
    config: &Path,
    pairs: usize,
    overrides: &[String],
    out: std::path::PathBuf,
) -> Result<()> {
    let exe = std::env::current_exe().context("locating the fedbpt binary")?;
    let mut plain = Vec::new();
    let mut traced = Vec::new();
    for i in 0..pairs.max(1) {
        for with_trace in [false, true] {
            let dir = out.join(format!("{}-{i}", if with_trace { "traced" } else { "plain" }));
            let mut cmd = Command::new(&exe);
            cmd.arg("run").arg(config).arg("--out").arg(&dir);
            if with_trace {
                cmd.arg("--trace").arg(dir.join("trace.json"));
            }
            for o in overrides {
                cmd.arg("--set").arg(o);
            }
            let t = Instant::now();
            let status = cmd.status().with_context(|| format!("running {}", exe.display()))?;
            if !status.success() {
                anyhow::bail!(
                    "the {} run failed ({status})",
                    if with_trace { "traced" } else { "plain" }
                );
            }
            let s = t.elapsed().as_secs_f64();
            if with_trace {
                traced.push(s)
            } else {
                plain.push(s)
            }
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (p, t) = (mean(&plain), mean(&traced));
    let line = json!({
        "bench": "trace_overhead",
        "config": config.display().to_string(),
        "plain_wall_s": plain,
        "traced_wall_s": traced,
        "overhead_pct": 100.0 * (t - p) / p,
    });
    println!("{line}");
    Ok(())
}
