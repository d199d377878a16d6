//! `fedbpt bench-faults`: final accuracy and wall time against the share of clients killed.

use std::path::{Path, PathBuf};

use anyhow::Result;

use fedbpt::config::Config;
use fedbpt_actors::federation::Env;
use fedbpt_actors::run_dir::RunDir;

use crate::cmd::compare::distinct_seeds;
use crate::cmd::run::{run_or_reuse, runtime};
use crate::figures::draw::mean_std;
use crate::figures::{faults_figure, KillRateRow};
use crate::output::say;

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
