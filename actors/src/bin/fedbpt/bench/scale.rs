//! `fedbpt bench-scale`: many simulated clients in one process. Each row (10, 100, 1,000, ...
//! clients) runs in its own child process, so that its peak memory is its own: every client
//! holds a shard of the same size, a fixed number are sampled per round, and the dev set has a
//! fixed size, so that a sampled client's work and the evaluation are the same in every row and
//! whatever grows with the row is the runtime's.
//!
//! A round's wall time (from the start of one `RunRound` to the next) is split, on the
//! profiler's spans, into the time a forward was running, the time CMA-ES ran (clients' ask and
//! tell, the server's configure and aggregate) while no forward did, and the rest: messaging,
//! scheduling and bookkeeping.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use fedbpt::config::Config;
use fedbpt_actors::federation::{self, Clients, Env, RunOptions};
use fedbpt_actors::profile::{MessageSpan, Profiler, Spans};

use crate::cmd::run::runtime;
use crate::output::say;

/// What one row varies; everything else comes from the config and `--set`.
#[derive(Debug, Clone, Copy)]
pub struct Row {
    pub clients: usize,
    pub per_round: usize,
    pub shard: usize,
    pub dev_per_class: usize,
}

/// The row's overrides: `clients` clients of `shard` examples each (the train pool is exactly
/// what they hold), `per_round` sampled per round, a dev set of `dev_per_class` per class.
fn row_overrides(row: Row, n_classes: usize, min_clients: usize) -> Vec<String> {
    let per_round = row.per_round.min(row.clients);
    let k_shot = (row.clients * row.shard).div_ceil(n_classes.max(1));
    vec![
        format!("num_users={}", row.clients),
        format!("clients_per_round={}", if per_round == row.clients { 0 } else { per_round }),
        format!("min_clients={}", min_clients.min(per_round).max(1)),
        format!("k_shot={k_shot}"),
        format!("dev_k_shot={}", row.dev_per_class),
        "iid=true".into(),
    ]
}

/// Runs every row in a child process of this binary and writes their JSON lines (and a table on
/// stderr).
pub fn run(
    config: &Path,
    clients: &[usize],
    template: Row,
    overrides: &[String],
    json_out: Option<&Path>,
) -> Result<()> {
    if clients.is_empty() || clients.contains(&0) {
        bail!("--clients: give client counts of at least 1");
    }
    check(template)?;
    crate::output::check_json_out(json_out)?;
    let exe = std::env::current_exe().context("locating the fedbpt binary")?;
    let mut rows: Vec<Value> = Vec::new();
    for &n in clients {
        let mut cmd = Command::new(&exe);
        cmd.arg("bench-scale").arg(config).arg("--row").arg(n.to_string());
        cmd.args(["--per-round", &template.per_round.to_string()]);
        cmd.args(["--shard", &template.shard.to_string()]);
        cmd.args(["--dev-per-class", &template.dev_per_class.to_string()]);
        for o in overrides {
            cmd.arg("--set").arg(o);
        }
        say(&format!("bench-scale: {n} clients"));
        let out = cmd.output().with_context(|| format!("running {}", exe.display()))?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            let tail: Vec<&str> = err.lines().rev().take(5).collect();
            bail!("the row of {n} clients failed ({}): {}", out.status, tail.join(" | "));
        }
        let line = String::from_utf8_lossy(&out.stdout);
        let v: Value = line
            .lines()
            .rev()
            .find_map(|l| serde_json::from_str(l).ok())
            .with_context(|| format!("the row of {n} clients printed no JSON line"))?;
        println!("{v}");
        rows.push(v);
    }
    add_memory_per_client(&mut rows);
    if let Some(p) = json_out {
        crate::output::write_json_lines(p, &rows)?;
    }
    eprintln!("{}", table(&rows));
    Ok(())
}

/// Memory per client: the growth of peak RSS from the smallest row, per added client (the
/// shards are part of it, so this bounds what an idle client costs beyond its data from above).
fn add_memory_per_client(rows: &mut [Value]) {
    let Some(base) = rows.first().cloned() else { return };
    let (n0, m0) = (base["clients"].as_f64().unwrap_or(0.0), base["peak_rss_bytes"].as_f64());
    for r in rows.iter_mut().skip(1) {
        let n = r["clients"].as_f64().unwrap_or(0.0);
        if let (Some(m0), Some(m)) = (m0, r["peak_rss_bytes"].as_f64()) {
            if n > n0 {
                r["rss_bytes_per_added_client"] = json!((m - m0) / (n - n0));
            }
        }
    }
}

fn table(rows: &[Value]) -> String {
    let mut s = String::from(
        "| clients | spawn + prepare s | round s | forward | CMA-ES | messaging + bookkeeping | mailbox wait p99 ms | messages/round | peak RSS MB | RSS per added client KB |\n|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    for r in rows {
        let round = f(r, "round_s");
        let pct = |k: &str| 100.0 * f(r, k) / round;
        s += &format!(
            "| {} | {:.2} | {:.4} | {:.1}% | {:.1}% | {:.2}% | {:.2} | {:.0} | {:.0} | {} |\n",
            r["clients"],
            f(r, "spawn_s"),
            round,
            pct("forward_s"),
            pct("cma_es_s"),
            pct("other_s"),
            f(r, "mailbox_wait_p99_us") / 1000.0,
            f(r, "messages_per_round"),
            f(r, "peak_rss_bytes") / 1e6,
            r["rss_bytes_per_added_client"]
                .as_f64()
                .map_or_else(|| "-".to_string(), |b| format!("{:.1}", b / 1e3)),
        );
    }
    s
}

/// Refuses sizes of 0: a sample of 0 would mean every client, a dev of 0 would mean `k_shot`.
fn check(row: Row) -> Result<()> {
    for (flag, v) in [
        ("--per-round", row.per_round),
        ("--shard", row.shard),
        ("--dev-per-class", row.dev_per_class),
    ] {
        if v == 0 {
            bail!("{flag}: must be at least 1");
        }
    }
    Ok(())
}

/// One row, in this process: prints one JSON line on stdout.
pub fn run_row(config: &Path, row: Row, overrides: &[String]) -> Result<()> {
    check(row)?;
    let probe = Config::load(config, overrides)?;
    let n_classes = probe.task_spec()?.n_classes();
    let mut all = overrides.to_vec();
    all.extend(row_overrides(row, n_classes, probe.min_clients));
    let cfg = Config::load(config, &all)?;
    let rt = runtime(&cfg)?;
    let mut env = Env::load(&cfg, &mut |m| eprintln!("{m}"))?;
    let rss_loaded = memory_status("VmRSS");
    let profiler = Profiler::start();
    let started = Instant::now();
    let mut rss_after_round_1 = None;
    let result = rt.block_on(federation::run(
        &cfg,
        &mut env,
        RunOptions { checkpoint_dir: None, resume: None, clients: Clients::Local },
        &mut |r| {
            if r.round == 1 {
                rss_after_round_1 = memory_status("VmRSS");
            }
        },
    ));
    Profiler::stop();
    let (summary, records) = result?;
    let wall = started.elapsed().as_secs_f64();
    let b = breakdown(&profiler.spans());
    let line = json!({
        "bench": "scale",
        "model": summary.model,
        "clients": row.clients,
        "clients_per_round": if cfg.clients_per_round == 0 { cfg.num_users } else { cfg.clients_per_round.min(cfg.num_users) },
        "prepare_requests": summary.prepare_requests,
        "examples_per_client": row.shard,
        "dev_examples": cfg.dev_per_class() * n_classes,
        "local_iter": cfg.local_iter,
        "local_popsize": cfg.local_popsize,
        "rounds": records.len(),
        "wall_s": wall,
        "spawn_s": b.spawn_s,
        "clients_start_s": b.clients_start_s,
        "clients_started": b.clients_started,
        "train_requests_per_round": b.train_per_round,
        "round_s": b.round_s,
        "forward_s": b.forward_s,
        "cma_es_s": b.cma_es_s,
        "other_s": b.other_s,
        "other_pct": 100.0 * b.other_s / b.round_s,
        "messages_per_round": b.messages_per_round,
        "mailbox_wait_p50_us": b.wait_p50_us,
        "mailbox_wait_p99_us": b.wait_p99_us,
        "mailbox_wait_max_us": b.wait_max_us,
        "rss_loaded_bytes": rss_loaded,
        "rss_after_round_1_bytes": rss_after_round_1,
        "peak_rss_bytes": memory_status("VmHWM"),
        "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
    });
    println!("{line}");
    Ok(())
}

/// A process's memory figure from `/proc/self/status` (`VmRSS`, `VmHWM`), in bytes; `None`
/// where the file does not exist (not Linux).
fn memory_status(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = text.lines().find(|l| l.starts_with(key) && l[key.len()..].starts_with(':'))?;
    let kb: u64 = line[key.len() + 1..].trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb * 1024)
}

/// A run's rounds, split as the module doc says (seconds, means over the rounds after the
/// first, which also pays for warm-up).
#[derive(Debug, Clone, PartialEq)]
pub struct Breakdown {
    /// From the profiler's start to the first round: spawning the clients, preparing their
    /// shards and the evaluation sets, scoring the baselines.
    pub spawn_s: f64,
    /// Of which the clients' start-up: from the first client asking the data loader for its
    /// shard to the last one served.
    pub clients_start_s: f64,
    /// Shards the data loader served: one per client started.
    pub clients_started: usize,
    /// `Train` requests per round: the clients contacted.
    pub train_per_round: f64,
    pub round_s: f64,
    pub forward_s: f64,
    pub cma_es_s: f64,
    pub other_s: f64,
    pub messages_per_round: f64,
    pub wait_p50_us: u64,
    pub wait_p99_us: u64,
    pub wait_max_us: u64,
}

/// Length of the union of `spans` clipped to `[lo, hi)`.
fn covered(spans: &mut [(u64, u64)], lo: u64, hi: u64) -> u64 {
    spans.sort_unstable();
    let (mut total, mut reach) = (0, lo);
    for &(a, b) in spans.iter() {
        let (a, b) = (a.max(reach), b.min(hi));
        if b > a {
            total += b - a;
            reach = b;
        }
    }
    total
}

fn in_window(spans: &[(u64, u64)], lo: u64, hi: u64) -> Vec<(u64, u64)> {
    spans.iter().copied().filter(|&(a, b)| b > lo && a < hi).collect()
}

/// Splits each round of `spans`; rounds are the `RunRound` handlings, each window running to
/// the next one's start (so checkpointing and the next round's send count), the last to its
/// own end.
pub fn breakdown(spans: &Spans) -> Breakdown {
    let mut rounds: Vec<(u64, u64)> = spans
        .messages
        .iter()
        .filter(|m| m.message == "RunRound")
        .map(|m| (m.start_us, m.end_us))
        .collect();
    rounds.sort_unstable();
    let windows: Vec<(u64, u64)> = rounds
        .iter()
        .enumerate()
        .map(|(i, &(a, b))| (a, rounds.get(i + 1).map_or(b, |next| next.0)))
        .collect();
    let spawn_s = windows.first().map_or(0.0, |w| w.0 as f64 / 1e6);
    let shards: Vec<&MessageSpan> =
        spans.messages.iter().filter(|m| m.message == "Shard").collect();
    let clients_start_s =
        match (shards.iter().map(|m| m.sent_us).min(), shards.iter().map(|m| m.end_us).max()) {
            (Some(a), Some(b)) => b.saturating_sub(a) as f64 / 1e6,
            _ => 0.0,
        };
    // The first round also waits for warm-up; measure the rest when there is a rest.
    let measured = if windows.len() > 1 { &windows[1..] } else { &windows[..] };
    let cma: Vec<(u64, u64)> = spans.phases.iter().map(|&(_, a, b)| (a, b)).collect();
    let (mut round, mut fwd, mut cma_only, mut other, mut messages) = (0u64, 0, 0, 0, 0usize);
    let mut trains = 0usize;
    let mut waits = Vec::new();
    for &(lo, hi) in measured {
        let f = covered(&mut in_window(&spans.forwards, lo, hi), lo, hi);
        let mut busy = in_window(&spans.forwards, lo, hi);
        busy.extend(in_window(&cma, lo, hi));
        let busy = covered(&mut busy, lo, hi);
        round += hi - lo;
        fwd += f;
        cma_only += busy - f;
        other += (hi - lo) - busy;
        for m in spans.messages.iter().filter(|m| m.start_us >= lo && m.start_us < hi) {
            messages += 1;
            trains += usize::from(m.message == "Train");
            waits.push(m.start_us.saturating_sub(m.sent_us));
        }
    }
    waits.sort_unstable();
    let pick =
        |q: f64| waits.get(((waits.len().saturating_sub(1)) as f64 * q).round() as usize).copied();
    let n = measured.len().max(1) as f64;
    let s = |us: u64| us as f64 / 1e6 / n;
    Breakdown {
        spawn_s,
        clients_start_s,
        clients_started: shards.len(),
        train_per_round: trains as f64 / n,
        round_s: s(round),
        forward_s: s(fwd),
        cma_es_s: s(cma_only),
        other_s: s(other),
        messages_per_round: messages as f64 / n,
        wait_p50_us: pick(0.5).unwrap_or(0),
        wait_p99_us: pick(0.99).unwrap_or(0),
        wait_max_us: waits.last().copied().unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(message: &'static str, sent: u64, start: u64, end: u64) -> MessageSpan {
        MessageSpan {
            message,
            receiver: "server".into(),
            sent_us: sent,
            start_us: start,
            end_us: end,
        }
    }

    #[test]
    fn union_counts_overlaps_once_and_clips_to_the_window() {
        let mut v = vec![(0, 10), (5, 15), (20, 30), (28, 40)];
        assert_eq!(covered(&mut v, 0, 100), 15 + 20);
        assert_eq!(covered(&mut v, 8, 25), 7 + 5);
        assert_eq!(covered(&mut Vec::new(), 0, 100), 0);
    }

    #[test]
    fn a_round_splits_into_forward_cma_es_and_the_rest() {
        // Round 1 [1000, 2000) is warm-up; round 2 [2000, 3000) is measured: forwards cover
        // 2100..2600 (two overlapping), CMA-ES 2500..2700 (100 of it beside a forward), so
        // 1000 - 600 = 400 us is neither.
        let spans = Spans {
            messages: vec![
                msg("RunRound", 990, 1000, 1990),
                msg("RunRound", 1995, 2000, 2950),
                msg("Train", 2000, 2010, 2600),
                msg("Train", 2000, 2050, 2600),
                msg("Shard", 100, 120, 130),
                msg("Shard", 140, 150, 400),
            ],
            forwards: vec![(1100, 1500), (2100, 2400), (2300, 2600)],
            phases: vec![("local CMA-ES", 2500, 2700)],
        };
        let b = breakdown(&spans);
        assert_eq!(b.spawn_s, 0.001);
        assert!((b.clients_start_s - 300e-6).abs() < 1e-12, "{b:?}");
        assert!((b.round_s - 950e-6).abs() < 1e-12, "{b:?}");
        assert!((b.forward_s - 500e-6).abs() < 1e-12, "{b:?}");
        assert!((b.cma_es_s - 100e-6).abs() < 1e-12, "{b:?}");
        assert!((b.other_s - 350e-6).abs() < 1e-12, "{b:?}");
        assert_eq!(b.messages_per_round, 3.0);
        assert_eq!((b.clients_started, b.train_per_round), (2, 2.0));
        assert_eq!((b.wait_p50_us, b.wait_max_us), (10, 50));
    }

    #[test]
    fn rows_hold_the_same_shards_and_sampling_at_every_size() {
        let row = Row { clients: 1000, per_round: 10, shard: 2, dev_per_class: 16 };
        let o = row_overrides(row, 2, 5);
        for want in [
            "num_users=1000",
            "clients_per_round=10",
            "min_clients=5",
            "k_shot=1000",
            "dev_k_shot=16",
        ] {
            assert!(o.contains(&want.to_string()), "{want} in {o:?}");
        }
        // Fewer clients than the sample: all take part, the quorum fits.
        let o = row_overrides(Row { clients: 4, ..row }, 2, 5);
        assert!(o.contains(&"clients_per_round=0".to_string()), "{o:?}");
        assert!(o.contains(&"min_clients=4".to_string()), "{o:?}");
    }

    #[test]
    fn sizes_of_zero_are_refused_by_name() {
        let row = Row { clients: 10, per_round: 10, shard: 1, dev_per_class: 16 };
        assert!(check(row).is_ok());
        for (bad, flag) in [
            (Row { per_round: 0, ..row }, "--per-round"),
            (Row { shard: 0, ..row }, "--shard"),
            (Row { dev_per_class: 0, ..row }, "--dev-per-class"),
        ] {
            let e = check(bad).expect_err(flag).to_string();
            assert!(e.contains(flag), "{e}");
        }
    }
}
