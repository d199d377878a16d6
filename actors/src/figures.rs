//! The figures the CLI writes: a run's accuracy, step size and training loss per round; the
//! comparison of methods over seeds; accuracy against the kill rate. Spreads over seeds are
//! drawn as bands (one standard deviation) or error bars.

use std::path::Path;

use anyhow::Result;
use fedbpt::config::{Aggregation, Config};
use fedbpt::strategy::ServerSigma;

use crate::federation::FedSummary;
use crate::plot::{figure_png, mean_and_band, Panel, Points, Series, Style};
use crate::server::RoundRecord;

fn pct(v: f64) -> f64 {
    100.0 * v
}

/// Dev metric per round, from round 0 (z = 0).
fn dev_points(s: &FedSummary, records: &[RoundRecord]) -> Vec<(f64, f64)> {
    std::iter::once((0.0, pct(s.zero_prompt_dev_acc)))
        .chain(records.iter().map(|r| (r.round as f64, pct(r.dev_acc))))
        .collect()
}

/// Test metric at round 0 (z = 0) and every round that evaluated it.
fn test_points(s: &FedSummary, records: &[RoundRecord]) -> Vec<(f64, f64)> {
    std::iter::once((0.0, pct(s.zero_prompt_test_acc)))
        .chain(records.iter().filter_map(|r| r.test_acc.map(|a| (r.round as f64, pct(a)))))
        .collect()
}

fn sigma_points(records: &[RoundRecord]) -> Vec<(f64, f64)> {
    records.iter().map(|r| (r.round as f64, r.sigma)).collect()
}

fn loss_points(records: &[RoundRecord]) -> Vec<(f64, f64)> {
    records.iter().filter_map(|r| r.train_loss.map(|l| (r.round as f64, l))).collect()
}

fn manual_line(manual: f64, rounds: usize) -> Vec<(f64, f64)> {
    vec![(0.0, pct(manual)), (rounds as f64, pct(manual))]
}

/// `accuracy.png` of one run: dev metric every round and test metric where evaluated (round 0
/// is z = 0), the manual prompt as a dashed line; the step size sent each round; the mean
/// training loss of the replies.
pub fn run_figure(path: &Path, s: &FedSummary, records: &[RoundRecord]) -> Result<()> {
    let rounds = records.last().map_or(0, |r| r.round);
    let metric = format!("{:?}", s.metric).to_lowercase();
    let mut acc = Panel::new(format!("{metric} per round"), "round", &format!("{metric} (%)"));
    acc.series = vec![
        Series::new("dev", Style::Line, 0, dev_points(s, records)),
        Series::new("test (where evaluated)", Style::Markers, 1, test_points(s, records)),
        Series::new(
            "manual prompt (test)",
            Style::Dashed,
            2,
            manual_line(s.zero_shot_test_acc, rounds),
        ),
    ];
    let mut sigma = Panel::new("step size sent to the clients", "round", "sigma");
    sigma.log_y = true;
    sigma.series = vec![Series::new("sigma", Style::Line, 3, sigma_points(records))];
    let mut loss = Panel::new("training loss (mean over replies)", "round", "loss");
    loss.series = vec![Series::new("train loss", Style::Line, 4, loss_points(records))];
    let title = format!(
        "{} on {}: {}, {} clients, {}, seed {}",
        s.model,
        s.task,
        method_name(&s.config),
        s.clients,
        if s.iid { "iid" } else { "non-iid" },
        s.seed
    );
    figure_png(path, &title, 1, (900, 330), &[acc, sigma, loss])
}

/// The method a configuration runs, as tables and figures name it: the server's rule, and the
/// clients' perturbation (Eq. 7) when it is on.
pub fn method_name(cfg: &Config) -> String {
    let base = match (cfg.aggregation, cfg.server_sigma) {
        (Aggregation::Fedavg, _) => "FedAvg-BBT",
        (Aggregation::Fedbpt, ServerSigma::Reference) => "FedBPT (reference rule)",
        (Aggregation::Fedbpt, ServerSigma::ClientRms) => "FedBPT (client-RMS sigma)",
    };
    if cfg.perturb {
        format!("{base} + perturbation {}", cfg.perturb_rate)
    } else {
        base.to_string()
    }
}

/// One run's series of some quantity per round.
type SeriesOf = fn(&FedSummary, &[RoundRecord]) -> Points;

/// One method's runs (one per seed) in one partition, for [`compare_figure`].
pub struct MethodRuns<'a> {
    pub name: String,
    pub color: usize,
    pub runs: Vec<(&'a FedSummary, &'a [RoundRecord])>,
}

/// `compare.png`: per partition (columns), the test metric per round where evaluated, the dev
/// metric per round and the step size per round, each method as its mean over seeds with a
/// one-standard-deviation band; the manual prompt dashed.
pub fn compare_figure(
    path: &Path,
    title: &str,
    partitions: &[(&str, Vec<MethodRuns<'_>>)],
) -> Result<()> {
    let mut test_row = Vec::new();
    let mut dev_row = Vec::new();
    let mut sigma_row = Vec::new();
    for (part, methods) in partitions {
        let mut test =
            Panel::new(format!("{part}: test metric (%), where evaluated"), "round", "%");
        let mut dev = Panel::new(format!("{part}: dev metric (%)"), "round", "%");
        let mut sigma = Panel::new(format!("{part}: sigma sent"), "round", "sigma");
        sigma.log_y = true;
        let mut rounds = 0;
        let mut manual = None;
        for m in methods {
            let per_seed = |f: SeriesOf| m.runs.iter().map(|(s, r)| f(s, r)).collect::<Vec<_>>();
            // Test accuracy is measured at a few rounds only: markers with error bars, each
            // method nudged sideways so that they do not hide one another.
            let (mean, band) = mean_and_band(&per_seed(test_points));
            let nudge = 0.12 * (m.color as f64 - (methods.len() as f64 - 1.0) / 2.0);
            let mean = mean.into_iter().map(|(x, y)| (x + nudge, y)).collect();
            let band = band.into_iter().map(|(x, lo, hi)| (x + nudge, lo, hi)).collect();
            test.series.push(Series::new(&m.name, Style::Markers, m.color, mean).with_band(band));
            let (mean, band) = mean_and_band(&per_seed(dev_points));
            dev.series.push(Series::new(&m.name, Style::Line, m.color, mean).with_band(band));
            let (mean, band) = mean_and_band(&per_seed(|_, r| sigma_points(r)));
            sigma.series.push(Series::new(&m.name, Style::Line, m.color, mean).with_band(band));
            for (s, r) in &m.runs {
                rounds = rounds.max(r.last().map_or(0, |x| x.round));
                manual = Some(s.zero_shot_test_acc);
            }
        }
        if let Some(manual) = manual {
            test.series.push(Series::new(
                "manual prompt",
                Style::Dashed,
                7,
                manual_line(manual, rounds),
            ));
        }
        test_row.push(test);
        dev_row.push(dev);
        sigma_row.push(sigma);
    }
    let columns = partitions.len();
    let panels: Vec<Panel> = test_row.into_iter().chain(dev_row).chain(sigma_row).collect();
    figure_png(path, title, columns, (720, 400), &panels)
}

/// Per-seed results at one kill rate, for [`faults_figure`] (fractions).
pub struct KillRateRow {
    pub rate: f64,
    pub finals: Vec<f64>,
    pub bests: Vec<f64>,
}

/// `faults.png`: final and best-on-dev test metric against the share of clients killed per
/// round, mean over seeds with one-standard-deviation error bars.
pub fn faults_figure(path: &Path, title: &str, rows: &[KillRateRow]) -> Result<()> {
    let series = |name: &str, color: usize, pick: fn(&KillRateRow) -> &Vec<f64>| {
        let mut points = Vec::new();
        let mut band = Vec::new();
        for row in rows {
            let v: Vec<f64> = pick(row).iter().map(|x| pct(*x)).collect();
            let (m, sd) = crate::plot::mean_std(&v);
            points.push((pct(row.rate), m));
            band.push((pct(row.rate), m - sd, m + sd));
        }
        let line = Series::new(format!("{name} (mean)"), Style::Line, color, points.clone());
        let bars =
            Series::new(format!("{name}: +- 1 sd over seeds"), Style::Markers, color, points)
                .with_band(band);
        [line, bars]
    };
    let mut p = Panel::new(
        "test accuracy vs clients killed per round",
        "clients killed per round (%)",
        "test accuracy (%)",
    );
    p.integer_x = false;
    p.series.extend(series("final", 0, |r| &r.finals));
    p.series.extend(series("best-on-dev", 1, |r| &r.bests));
    figure_png(path, title, 1, (900, 520), &[p])
}
