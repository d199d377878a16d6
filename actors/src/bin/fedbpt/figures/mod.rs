//! The figures the CLI writes: a run's accuracy, step size and training loss per round; the
//! comparison of methods over seeds; accuracy against the kill rate. Spreads over seeds are
//! drawn as bands (one standard deviation) or error bars.

pub mod draw;

use std::path::Path;

use self::draw::{figure_png, mean_and_band, mean_std, Panel, Points, Series, Style};
use anyhow::Result;

use fedbpt::cmaes::CmaFlavour;
use fedbpt::config::{Aggregation, Config};
use fedbpt::objective::ClientLoss;
use fedbpt::strategy::{ServerFitness, ServerSigma, ServerWeights};
use fedbpt_actors::federation::FedSummary;
use fedbpt_actors::server::RoundRecord;

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
    let mut name = base.to_string();
    match cfg.server_fitness {
        ServerFitness::Loss => {}
        ServerFitness::Permuted => name.push_str(", permuted fitness"),
        ServerFitness::Improvement => name.push_str(", ranked by improvement"),
    }
    if cfg.server_weights == ServerWeights::Equal {
        name.push_str(", equal weights");
    }
    if cfg.client_loss == ClientLoss::ClassBalanced {
        name.push_str(", class-balanced loss");
    }
    if cfg.perturb {
        name.push_str(&format!(" + perturbation {}", cfg.perturb_rate));
    }
    if cfg.cma == CmaFlavour::Pycma {
        name.push_str(", pycma CMA-ES");
    }
    name
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
            let (m, sd) = self::draw::mean_std(&v);
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

/// Shares of each class in `counts` (all zero for an empty row).
fn shares<T: Copy + Into<f64>>(counts: &[T]) -> Vec<f64> {
    let total: f64 = counts.iter().map(|&c| c.into()).sum();
    counts.iter().map(|&c| if total > 0.0 { c.into() / total } else { 0.0 }).collect()
}

/// `diagnostics.png` of one run, from its records' `clients` and `dev_confusion`: (1) the share
/// of dev examples the global model predicts as each class, beside the true shares; (2) the
/// class mix the server's update leans to (each class's share in the clients' shards weighted
/// by their weights) beside the equal-weight mix; (3) how skewed (the majority class's share of
/// its shard) the client at each rank was, on average over the rounds; (4) the share, at each
/// rank, of the class the global model the round started from predicted most. Whether the highest weighted
/// clients are the most skewed, towards the class the model already favours, and whether the
/// model drifts to it, in one picture. An error when the records carry no diagnostics (see
/// [`has_diagnostics`]).
pub fn diagnostics_figure(path: &Path, s: &FedSummary, records: &[RoundRecord]) -> Result<()> {
    if !has_diagnostics(records) {
        anyhow::bail!("the records carry no per-client diagnostics (made before they existed?)");
    }
    let n_classes = records.iter().map(|r| r.dev_confusion.len()).max().unwrap_or(0);
    let mut predicted = Panel::new(
        "global model's dev predictions per class (dashed: true share)",
        "round",
        "share of dev (%)",
    );
    let mut leaning = Panel::new(
        "class mix of the update, by the server's weights (dashed: equal weights)",
        "round",
        "share (%)",
    );
    for c in 0..n_classes {
        let name = format!("class {c}");
        let (mut pred, mut truth, mut weighted, mut plain) = (vec![], vec![], vec![], vec![]);
        for r in records {
            let x = r.round as f64;
            if r.dev_confusion.len() == n_classes {
                let column: Vec<usize> = r.dev_confusion.iter().map(|row| row[c]).collect();
                let total: usize = r.dev_confusion.iter().flatten().sum();
                let true_c: usize = r.dev_confusion[c].iter().sum();
                if total > 0 {
                    pred.push((x, pct(column.iter().sum::<usize>() as f64 / total as f64)));
                    truth.push((x, pct(true_c as f64 / total as f64)));
                }
            }
            if !r.clients.is_empty() {
                let share = |cl: &fedbpt_actors::round::ClientDiagnostics| {
                    shares(&cl.class_counts).get(c).copied().unwrap_or(0.0)
                };
                let w: f64 = r.clients.iter().map(|cl| cl.weight * share(cl)).sum();
                let total_w: f64 = r.clients.iter().map(|cl| cl.weight).sum();
                let p: f64 = r.clients.iter().map(share).sum::<f64>() / r.clients.len() as f64;
                if total_w > 0.0 {
                    weighted.push((x, pct(w / total_w)));
                }
                plain.push((x, pct(p)));
            }
        }
        predicted.series.push(Series::new(name.clone(), Style::Line, c, pred));
        predicted.series.push(Series::new("", Style::Dashed, c, truth));
        leaning.series.push(Series::new(name, Style::Line, c, weighted));
        leaning.series.push(Series::new("", Style::Dashed, c, plain));
    }
    let mut ranks =
        Panel::new("skew of the client at each rank", "rank (1 = best)", "majority share (%)");
    let every_round: Vec<(&RoundRecord, Option<usize>)> =
        records.iter().map(|r| (r, None)).collect();
    ranks.series = vec![by_rank(&every_round, |_, cl| {
        Some(shares(&cl.class_counts).into_iter().fold(0.0, f64::max))
    })];
    let mut favoured = Panel::new(
        "share of the class the model predicted most before the round, at each rank",
        "rank (1 = best)",
        "share of that class (%)",
    );
    let started_from: Vec<(&RoundRecord, Option<usize>)> =
        crate::mechanism::favoured_before(records).into_iter().map(|(r, c)| (r, Some(c))).collect();
    favoured.series = vec![by_rank(&started_from, |favoured, cl| {
        favoured.map(|c| crate::mechanism::share(cl, c))
    })];
    let title = format!(
        "{}: {} clients, {}, seed {}",
        method_name(&s.config),
        s.clients,
        if s.iid { "iid" } else { "non-iid" },
        s.seed
    );
    figure_png(path, &title, 1, (900, 330), &[predicted, leaning, ranks, favoured])
}

/// The mean (in %) and spread over rounds of `value` for the told client at each rank, given
/// each round with a class the value may refer to.
fn by_rank(
    rounds: &[(&RoundRecord, Option<usize>)],
    value: impl Fn(Option<usize>, &fedbpt_actors::round::ClientDiagnostics) -> Option<f64>,
) -> Series {
    let mut at: Vec<Vec<f64>> = Vec::new();
    for &(r, class) in rounds {
        for cl in r.clients.iter().filter(|cl| cl.rank >= 1) {
            if let Some(v) = value(class, cl) {
                if at.len() < cl.rank {
                    at.resize(cl.rank, Vec::new());
                }
                at[cl.rank - 1].push(pct(v));
            }
        }
    }
    let (mut mean, mut band) = (Vec::new(), Vec::new());
    for (i, v) in at.iter().enumerate().filter(|(_, v)| !v.is_empty()) {
        let (m, sd) = mean_std(v);
        mean.push(((i + 1) as f64, m));
        band.push(((i + 1) as f64, m - sd, m + sd));
    }
    Series::new("mean over rounds, +- sd", Style::Line, 0, mean).with_band(band)
}

/// Whether any record has the clients' ranks and the dev predictions that
/// [`diagnostics_figure`] draws.
pub fn has_diagnostics(records: &[RoundRecord]) -> bool {
    records.iter().any(|r| !r.clients.is_empty() && !r.dev_confusion.is_empty())
}
