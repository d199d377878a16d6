//! `fedbpt bench-cluster`: the per-round overhead of the wire, one process against several.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result};
use serde_json::json;

use crate::cmd::serve::loopback;

/// Per-round cost of the wire: the same federation in one process and across `processes`
/// client processes on loopback (each in its own processes, alternating), and the bytes per
/// client-round counted on the client processes' sockets. Prints one JSON object.
pub fn cluster_overhead(
    config: &Path,
    processes: usize,
    pairs: usize,
    overrides: &[String],
    out: std::path::PathBuf,
) -> Result<()> {
    let exe = std::env::current_exe().context("locating the fedbpt binary")?;
    let rounds_of =
        |dir: &Path| -> Result<Vec<crate::output::RoundLine>> { crate::output::read_rounds(dir) };
    let (mut one_wall, mut cluster_wall) = (Vec::new(), Vec::new());
    let (mut one_round, mut cluster_round) = (Vec::new(), Vec::new());
    let (mut up, mut down, mut payload_up, mut payload_down) = (0u64, 0u64, 0usize, 0usize);
    let mut client_rounds = 0usize;
    let mut equal = true;
    for i in 0..pairs.max(1) {
        let one = out.join(format!("one-{i}"));
        let mut cmd = Command::new(&exe);
        cmd.arg("run").arg(config).arg("--out").arg(&one);
        for o in overrides {
            cmd.arg("--set").arg(o);
        }
        let t = Instant::now();
        let status = cmd.status().with_context(|| format!("running {}", exe.display()))?;
        if !status.success() {
            anyhow::bail!("the one-process run failed ({status})");
        }
        one_wall.push(t.elapsed().as_secs_f64());
        let many = out.join(format!("processes-{i}"));
        cluster_wall.push(loopback(config, overrides, &many, processes, None)?);
        let (a, b) = (rounds_of(&one)?, rounds_of(&many)?);
        equal &= a.iter().map(|r| &r.rest).eq(b.iter().map(|r| &r.rest));
        one_round.push(mean_round_s(&a));
        cluster_round.push(mean_round_s(&b));
        payload_up += b.iter().map(|r| r.bytes_up).sum::<usize>();
        payload_down += b.iter().map(|r| r.bytes_down).sum::<usize>();
        for k in 1..=processes {
            let path = many.join(format!("join-{k}.json"));
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("reading {}", path.display()))?;
            up += v["socket_bytes_sent"].as_u64().unwrap_or(0);
            down += v["socket_bytes_received"].as_u64().unwrap_or(0);
            let sites = v["sites"].as_u64().unwrap_or(0) as usize;
            client_rounds += sites * v["rounds"].as_u64().unwrap_or(0) as usize;
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let (p, c) = (mean(&one_round), mean(&cluster_round));
    let per = |b: f64| b / client_rounds.max(1) as f64;
    let line = json!({
        "bench": "cluster_overhead",
        "config": config.display().to_string(),
        "processes": processes,
        "one_process_wall_s": one_wall,
        "cluster_wall_s": cluster_wall,
        "one_process_round_s": one_round,
        "cluster_round_s": cluster_round,
        "overhead_per_round_s": c - p,
        "overhead_pct": 100.0 * (c - p) / p,
        "socket_bytes_up_per_client_round": per(up as f64),
        "socket_bytes_down_per_client_round": per(down as f64),
        "payload_bytes_up_per_client_round": per(payload_up as f64),
        "payload_bytes_down_per_client_round": per(payload_down as f64),
        "metrics_equal_but_wall": equal,
    });
    println!("{line}");
    Ok(())
}

/// Mean wall time of a round after the first (which also waits for the clients to start).
fn mean_round_s(rounds: &[crate::output::RoundLine]) -> f64 {
    let gaps: Vec<f64> = rounds.windows(2).map(|w| w[1].wall_s - w[0].wall_s).collect();
    gaps.iter().sum::<f64>() / gaps.len().max(1) as f64
}
