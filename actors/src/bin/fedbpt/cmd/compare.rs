//! `fedbpt compare`: methods x partitions x seeds, a markdown table and one figure.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

use fedbpt::cmaes::CmaFlavour;
use fedbpt::config::{Aggregation, Config};
use fedbpt::objective::ClientLoss;
use fedbpt::strategy::{ServerFitness, ServerSigma, ServerWeights};
use fedbpt_actors::federation::{Env, FedSummary};
use fedbpt_actors::run_dir::RunDir;

use crate::cmd::run::{run_or_reuse, runtime, Finished};
use crate::figures::draw::mean_std;
use crate::figures::{compare_figure, method_name, MethodRuns};
use crate::mechanism::Mechanism;
use crate::output::say;

/// One method `compare` runs: its directory stem, the server's rules, the clients' loss,
/// whether its clients perturb (the config's `perturb` where `None`), and its CMA-ES (the
/// config's `cma` where `None`).
#[derive(Debug)]
struct Method {
    stem: &'static str,
    aggregation: Aggregation,
    rule: ServerSigma,
    fitness: ServerFitness,
    weights: ServerWeights,
    client_loss: ClientLoss,
    perturb: Option<bool>,
    cma: Option<CmaFlavour>,
}

impl Method {
    fn config(&self, base: &Config) -> Config {
        let mut cfg = base.clone();
        cfg.aggregation = self.aggregation;
        cfg.server_sigma = self.rule;
        cfg.server_fitness = self.fitness;
        cfg.server_weights = self.weights;
        cfg.client_loss = self.client_loss;
        if let Some(p) = self.perturb {
            cfg.perturb = p;
        }
        if let Some(flavour) = self.cma {
            cfg.cma = flavour;
        }
        cfg
    }

    /// FedBPT as the reference runs it, but for what `with` changes.
    const fn fedbpt(stem: &'static str) -> Self {
        Method {
            stem,
            aggregation: Aggregation::Fedbpt,
            rule: ServerSigma::Reference,
            fitness: ServerFitness::Loss,
            weights: ServerWeights::Rank,
            client_loss: ClientLoss::Mean,
            perturb: None,
            cma: None,
        }
    }
}

/// How many of `METHODS`, from the first, `compare` runs when none is named.
const DEFAULT_METHODS: usize = 4;

/// FedAvg-BBT, FedBPT with the earlier and the reference server rule (same local search), the
/// paper's FedBPT: the reference rule with its clients' perturbation (Eq. 7); then the variants
/// that test the non-iid mechanism (run when named): fitnesses permuted across clients, equal
/// weights, ranking by improvement, and class-balanced client losses; and the reference rule
/// with pycma's CMA-ES (`cma = "pycma"`, docs/pycma-flavour.md) on the server and the clients.
const METHODS: [Method; 9] = [
    Method { aggregation: Aggregation::Fedavg, ..Method::fedbpt("fedavg-bbt") },
    Method { rule: ServerSigma::ClientRms, ..Method::fedbpt("fedbpt-client-rms") },
    Method::fedbpt("fedbpt"),
    Method { perturb: Some(true), ..Method::fedbpt("fedbpt-perturb") },
    Method { fitness: ServerFitness::Permuted, ..Method::fedbpt("fedbpt-permuted") },
    Method { weights: ServerWeights::Equal, ..Method::fedbpt("fedbpt-equal") },
    Method { fitness: ServerFitness::Improvement, ..Method::fedbpt("fedbpt-improvement") },
    Method { client_loss: ClientLoss::ClassBalanced, ..Method::fedbpt("fedbpt-balanced") },
    Method { cma: Some(CmaFlavour::Pycma), ..Method::fedbpt("fedbpt-pycma") },
];

/// The methods named by their stems, in the order given; the first `DEFAULT_METHODS` where none
/// is named.
fn select_methods(stems: &[String]) -> Result<Vec<&'static Method>> {
    if stems.is_empty() {
        return Ok(METHODS[..DEFAULT_METHODS].iter().collect());
    }
    let mut picked: Vec<&'static Method> = Vec::new();
    for stem in stems {
        let Some(m) = METHODS.iter().find(|m| m.stem == stem.as_str()) else {
            let known: Vec<&str> = METHODS.iter().map(|m| m.stem).collect();
            bail!("--methods: unknown method {stem:?} (known: {})", known.join(", "));
        };
        if !picked.iter().any(|p| p.stem == m.stem) {
            picked.push(m);
        }
    }
    Ok(picked)
}

/// The partitions to run as (index in the results, iid), non-iid first; both where none is named.
fn select_partitions(names: &[String]) -> Result<Vec<(usize, bool)>> {
    if let Some(bad) = names.iter().find(|n| !matches!(n.as_str(), "iid" | "non-iid")) {
        bail!("--partitions: unknown partition {bad:?} (known: iid, non-iid)");
    }
    let wanted = |name: &str| names.is_empty() || names.iter().any(|n| n == name);
    Ok([(1, false, "non-iid"), (0, true, "iid")]
        .into_iter()
        .filter(|(_, _, name)| wanted(name))
        .map(|(index, iid, _)| (index, iid))
        .collect())
}

pub fn compare(
    config: &Path,
    out: Option<PathBuf>,
    seeds: &[u64],
    methods: &[String],
    partitions: &[String],
    overrides: &[String],
) -> Result<()> {
    let base = Config::load(config, overrides)?;
    let selected = select_methods(methods)?;
    let parts = select_partitions(partitions)?;
    let out = out.unwrap_or_else(|| {
        let stem = config.file_stem().and_then(|s| s.to_str()).unwrap_or("run");
        PathBuf::from("runs").join(format!("{stem}-compare"))
    });
    distinct_seeds(seeds)?;
    let out_dir = RunDir::open(&out, "--out")?;
    let rt = runtime(&base)?;
    let mut env = Env::load(&base, &mut |m| say(m))?;
    // [partition][method] -> per-seed runs, filled method by method so that an interrupted
    // comparison has whole methods done (and each method's non-iid runs, the ones that decide
    // the paper's claim, before its iid ones).
    let mut runs: Vec<Vec<Vec<Finished>>> = vec![vec![Vec::new(); selected.len()]; 2];
    for (mi, m) in selected.iter().enumerate() {
        let name = method_name(&m.config(&base));
        for &(pi, iid) in &parts {
            for &seed in seeds {
                let mut cfg = m.config(&base);
                cfg.seed = seed;
                cfg.iid = iid;
                cfg.validate()?;
                let part = if iid { "iid" } else { "noniid" };
                let label = format!("{name} {part} seed {seed}");
                let dir = out.join(format!("{}-{part}-seed{seed}", m.stem));
                let (s, records) = run_or_reuse(&rt, &cfg, &mut env, &dir, &label)?;
                say(&format!(
                    "{label}: final {:.2}% best-on-dev {:.2}% ({:.0}s)",
                    100.0 * s.final_test_acc,
                    100.0 * s.best_dev_test_acc,
                    s.wall_s
                ));
                runs[pi][mi].push((s, records));
            }
        }
    }
    let model_name = env.replicas[0].info().name.clone();
    let md = compare_table(&base, &env.task.name, &model_name, seeds, &selected, &runs);
    let mut publish = out_dir.publish();
    publish.bytes("compare.md", md.as_bytes())?;
    let json: Vec<serde_json::Value> = runs
        .iter()
        .zip(["iid", "non-iid"])
        .flat_map(|(per_method, part)| {
            per_method.iter().flat_map(move |per_seed| {
                per_seed.iter().map(move |(s, r)| {
                    let mechanism = Mechanism::of(r);
                    serde_json::json!({
                        "partition": part, "method": method_name(&s.config), "seed": s.seed,
                        "final_test_acc": s.final_test_acc, "best_dev_test_acc": s.best_dev_test_acc,
                        "best_dev_round": s.best_dev_round,
                        "sigma": r.iter().map(|x| x.sigma).collect::<Vec<_>>(),
                        "dev_acc": r.iter().map(|x| x.dev_acc).collect::<Vec<_>>(),
                        "test_acc": r.iter().map(|x| x.test_acc).collect::<Vec<_>>(),
                        "wall_s": s.wall_s,
                        "skew_rank_correlation": mechanism.skew_rank,
                        "weight_lean": mechanism.lean,
                        "final_dev_majority_share": mechanism.final_majority,
                    })
                })
            })
        })
        .collect();
    publish.json("compare.json", &json)?;
    let partitions: Vec<(&str, Vec<MethodRuns<'_>>)> = runs
        .iter()
        .zip(["iid", "non-iid"])
        .filter(|(per_method, _)| per_method.iter().any(|per_seed| !per_seed.is_empty()))
        .map(|(per_method, part)| {
            let methods = per_method
                .iter()
                .zip(&selected)
                .enumerate()
                .map(|(color, (per_seed, m))| MethodRuns {
                    name: method_name(&m.config(&base)),
                    color,
                    runs: per_seed.iter().map(|(s, r)| (s, r.as_slice())).collect(),
                })
                .collect();
            (part, methods)
        })
        .collect();
    let title = format!(
        "{}, {}, {} seeds (mean +- sd)",
        env.replicas[0].info().name,
        env.task.name,
        seeds.len()
    );
    publish.file("compare.png", |tmp| compare_figure(tmp, &title, &partitions))?;
    publish.commit()?;
    println!("{md}");
    say(&format!(
        "wrote {}, {} and {}",
        out.join("compare.md").display(),
        out.join("compare.json").display(),
        out.join("compare.png").display()
    ));
    Ok(())
}

/// The comparison as markdown: final and best-on-dev test metric per method and partition
/// (mean +- std over seeds), then the step size per round of each method (mean over seeds).
/// Whether a method perturbs is in its name, so the header does not say it.
fn compare_table(
    base: &Config,
    task_name: &str,
    model_name: &str,
    seeds: &[u64],
    methods: &[&Method],
    runs: &[Vec<Vec<Finished>>],
) -> String {
    let cell = |v: Vec<f64>| {
        if v.is_empty() {
            return "not run".to_string();
        }
        let (m, s) = mean_std(&v);
        format!("{:.2} ± {:.2}", 100.0 * m, 100.0 * s)
    };
    // The manual prompt and z = 0 are scored on the one fixed test split, so any finished run
    // (of whichever partition and method ran) has them.
    let first = runs.iter().flatten().flatten().next();
    let (manual, zero) =
        first.map_or((f64::NAN, f64::NAN), |(s, _)| (s.zero_shot_test_acc, s.zero_prompt_test_acc));
    let metric =
        first.map_or("accuracy".to_string(), |(s, _)| format!("{:?}", s.metric).to_lowercase());
    let mut md = format!(
        "Test {metric} (%) on {} with {}, {} clients, {} rounds of {} local iterations x popsize {}, mean ± std over seeds {:?}; non-iid = Dirichlet alpha {} ({}).\n\n",
        task_name,
        model_name,
        base.num_users,
        base.num_rounds,
        base.local_iter,
        base.local_popsize,
        seeds,
        base.alpha_dir,
        base.noniid_split.as_str(),
    );
    md.push_str(
        "| method | iid final | iid best-on-dev | non-iid final | non-iid best-on-dev |\n|---|---|---|---|---|\n",
    );
    md.push_str(&format!(
        "| manual prompt (zero-shot) | {0:.2} | | {0:.2} | |\n| z = 0 (placeholders, no search) | {1:.2} | | {1:.2} | |\n",
        100.0 * manual,
        100.0 * zero
    ));
    for (mi, m) in methods.iter().enumerate() {
        let name = method_name(&m.config(base));
        let pick = |pi: usize, f: fn(&FedSummary) -> f64| -> Vec<f64> {
            runs.get(pi)
                .and_then(|m| m.get(mi))
                .map_or(Vec::new(), |v| v.iter().map(|(s, _)| f(s)).collect())
        };
        md.push_str(&format!(
            "| {name} | {} | {} | {} | {} |\n",
            cell(pick(0, |s| s.final_test_acc)),
            cell(pick(0, |s| s.best_dev_test_acc)),
            cell(pick(1, |s| s.final_test_acc)),
            cell(pick(1, |s| s.best_dev_test_acc)),
        ));
    }
    md.push_str("\nStep size sent to the clients after each round (mean over seeds):\n\n");
    let rounds = base.num_rounds;
    md.push_str(&format!(
        "| method | partition | {} |\n|---|---|{}\n",
        (1..=rounds).map(|r| r.to_string()).collect::<Vec<_>>().join(" | "),
        "---|".repeat(rounds)
    ));
    for (pi, part) in ["iid", "non-iid"].iter().enumerate() {
        for (mi, m) in methods.iter().enumerate() {
            let name = method_name(&m.config(base));
            let Some(per_seed) = runs.get(pi).and_then(|m| m.get(mi)).filter(|v| !v.is_empty())
            else {
                continue;
            };
            let per_round: Vec<String> = (0..rounds)
                .map(|r| {
                    let v: Vec<f64> = per_seed
                        .iter()
                        .filter_map(|(_, rec)| rec.get(r).map(|x| x.sigma))
                        .collect();
                    format!("{:.3}", mean_std(&v).0)
                })
                .collect();
            md.push_str(&format!("| {name} | {part} | {} |\n", per_round.join(" | ")));
        }
    }
    md.push_str(&mechanism_table(base, methods, runs));
    md
}

/// The diagnostics of each method and partition that ran (mean +- std over seeds), where its
/// records have them: see [`Mechanism`].
fn mechanism_table(base: &Config, methods: &[&Method], runs: &[Vec<Vec<Finished>>]) -> String {
    let cell = |v: Vec<f64>, scale: f64, digits: usize| {
        if v.is_empty() {
            return "-".to_string();
        }
        let (m, s) = mean_std(&v);
        format!("{:.digits$} ± {:.digits$}", scale * m, scale * s)
    };
    let mut rows = String::new();
    for (pi, part) in ["iid", "non-iid"].iter().enumerate() {
        for (mi, m) in methods.iter().enumerate() {
            let Some(per_seed) = runs.get(pi).and_then(|m| m.get(mi)).filter(|v| !v.is_empty())
            else {
                continue;
            };
            let found: Vec<Mechanism> = per_seed.iter().map(|(_, r)| Mechanism::of(r)).collect();
            if found.iter().all(|f| f.skew_rank.is_none() && f.final_majority.is_none()) {
                continue;
            }
            let pick = |f: fn(&Mechanism) -> Option<f64>| found.iter().filter_map(f).collect();
            rows.push_str(&format!(
                "| {} | {part} | {} | {} | {} |\n",
                method_name(&m.config(base)),
                cell(pick(|f| f.skew_rank), 1.0, 2),
                cell(pick(|f| f.lean), 100.0, 1),
                cell(pick(|f| f.final_majority), 100.0, 1),
            ));
        }
    }
    if rows.is_empty() {
        return rows;
    }
    format!(
        "\nDiagnostics (mean ± std over seeds), against the class the global model each round started from predicts most on dev: the rank correlation of a told client's share of that class with its place in the server's ranking (+1: the richest first), how far the server's weights lean the update to it (weighted minus equal-weight share, points), and the final model's share of dev predicted as its top class (%):\n\n| method | partition | share-rank correlation | weight lean (points) | final top-class predictions (%) |\n|---|---|---|---|---|\n{rows}"
    )
}

/// Refuses a seed list with repeats: a mean and spread over the same run twice would claim a
/// precision the runs do not have.
pub(crate) fn distinct_seeds(seeds: &[u64]) -> Result<()> {
    if seeds.is_empty() {
        bail!("--seeds: name at least one seed");
    }
    for (i, s) in seeds.iter().enumerate() {
        if seeds[..i].contains(s) {
            bail!("--seeds: seed {s} is named twice (each seed is one run; a repeat would count it twice)");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn methods_are_picked_in_the_order_given_and_unknown_ones_refused() {
        let all: Vec<&str> = select_methods(&[]).unwrap().iter().map(|m| m.stem).collect();
        assert_eq!(all, ["fedavg-bbt", "fedbpt-client-rms", "fedbpt", "fedbpt-perturb"]);
        let picked = select_methods(&strings(&["fedbpt", "fedavg-bbt", "fedbpt"])).unwrap();
        assert_eq!(picked.iter().map(|m| m.stem).collect::<Vec<_>>(), ["fedbpt", "fedavg-bbt"]);
        let err = select_methods(&strings(&["fedprox"])).unwrap_err().to_string();
        assert!(err.contains("fedprox") && err.contains("fedbpt-perturb"), "{err}");
    }

    #[test]
    fn the_pycma_method_runs_the_reference_rule_with_pycma() {
        let base = Config::default();
        let m = select_methods(&strings(&["fedbpt-pycma"])).unwrap();
        let cfg = m[0].config(&base);
        assert_eq!(cfg.cma, CmaFlavour::Pycma);
        assert_eq!(
            (cfg.aggregation, cfg.server_sigma),
            (Aggregation::Fedbpt, ServerSigma::Reference)
        );
        let reference = select_methods(&strings(&["fedbpt"])).unwrap()[0].config(&base);
        assert_eq!(reference.cma, CmaFlavour::Tutorial);
        assert_eq!(method_name(&cfg), format!("{}, pycma CMA-ES", method_name(&reference)));
        // The config's own cma is kept by the methods that do not set one.
        let pycma_base = Config { cma: CmaFlavour::Pycma, ..Config::default() };
        let reference = select_methods(&strings(&["fedbpt"])).unwrap()[0].config(&pycma_base);
        assert_eq!(reference.cma, CmaFlavour::Pycma);
    }

    fn finished(cfg: &Config, final_acc: f64) -> Finished {
        let summary = FedSummary {
            format: 0,
            model: "m".into(),
            task: "mr".into(),
            aggregation: cfg.aggregation,
            iid: cfg.iid,
            seed: cfg.seed,
            metric: Default::default(),
            zero_shot_test_acc: 0.775,
            zero_prompt_test_acc: 0.813,
            zero_prompt_dev_acc: 0.7,
            final_test_acc: final_acc,
            best_dev_test_acc: final_acc,
            best_dev_acc: 0.8,
            best_dev_round: 1,
            rounds: 1,
            clients: 10,
            train_examples: 80,
            test_examples: 1000,
            total_bytes_up: 0,
            total_bytes_down: 0,
            bytes_up_per_client_round: 0.0,
            bytes_down_per_client_round: 0.0,
            fedavg_full_model_bytes_per_client_round: 0,
            score_requests: 0,
            score_forwards: 0,
            prepare_requests: 0,
            wall_s: 1.0,
            test_setup_s: 0.0,
            linear_layers: vec!["f32".into()],
            data_fingerprint: String::new(),
            config: cfg.clone(),
        };
        (summary, Vec::new())
    }

    #[test]
    fn a_comparison_of_one_partition_and_method_still_has_its_baselines() {
        // Only non-iid runs of the one perturbing method: the baselines come from them, the
        // iid cells say "not run", and the header does not claim the base config's perturb.
        let base = Config { num_rounds: 1, ..Config::default() };
        let method = select_methods(&strings(&["fedbpt-perturb"])).unwrap();
        let runs = vec![
            vec![Vec::new()],
            vec![vec![finished(&method[0].config(&base), 0.739), finished(&base, 0.66)]],
        ];
        let md = compare_table(&base, "mr", "m", &[42, 43], &method, &runs);
        assert!(!md.contains("NaN"), "{md}");
        assert!(md.contains("| manual prompt (zero-shot) | 77.50 |"), "{md}");
        assert!(md.contains("| z = 0 (placeholders, no search) | 81.30 |"), "{md}");
        assert!(md.contains("| not run | not run | 69.95 ± 3.95 |"), "{md}");
        assert!(!md.contains("perturb false"), "{md}");
    }

    #[test]
    fn the_table_carries_the_diagnostics_of_the_runs_that_have_them() {
        let base = Config { num_rounds: 1, ..Config::default() };
        let method = select_methods(&strings(&["fedbpt"])).unwrap();
        // Dev predictions lean to class 0; the client richest in it ranks first, with the
        // larger weight: correlation 1, lean 0.7 * 7/8 + 0.3 * 1/8 - 1/2 = 0.15.
        let record: fedbpt_actors::round::RoundRecord = serde_json::from_str(
            r#"{"round": 1, "dev_acc": 0.6, "dev_loss": 0.7, "train_loss": 0.5, "sigma": 0.5,
                "clients_ok": 2, "clients_killed": [], "clients_restarted": [],
                "clients_late": [], "clients_excluded": [], "aggregated": true, "retries": 0,
                "bytes_up": 0, "bytes_down": 0, "wall_s": 1.0,
                "clients": [
                  {"client": "site-1", "class_counts": [7, 1], "rank": 1, "weight": 0.7, "fitness": 0.2},
                  {"client": "site-2", "class_counts": [1, 7], "rank": 2, "weight": 0.3, "fitness": 0.9}],
                "dev_confusion": [[38, 2], [22, 18]]}"#,
        )
        .unwrap();
        let (summary, _) = finished(&method[0].config(&base), 0.6);
        // Two rounds: the first sets the class the second started from.
        let runs = vec![Vec::new(), vec![vec![(summary, vec![record.clone(), record])]]];
        let md = compare_table(&base, "mr", "m", &[42], &method, &runs);
        assert!(md.contains("| non-iid | 1.00 ± 0.00 | 15.0 ± 0.0 | 75.0 ± 0.0 |"), "{md}");
        // Runs without diagnostics (made before they existed) add no such table.
        let (old, _) = finished(&method[0].config(&base), 0.6);
        let md = compare_table(
            &base,
            "mr",
            "m",
            &[42],
            &method,
            &[Vec::new(), vec![vec![(old, Vec::new())]]],
        );
        assert!(!md.contains("share-rank correlation"), "{md}");
    }

    #[test]
    fn partitions_run_non_iid_first_and_unknown_ones_are_refused() {
        assert_eq!(select_partitions(&[]).unwrap(), [(1, false), (0, true)]);
        assert_eq!(select_partitions(&strings(&["iid"])).unwrap(), [(0, true)]);
        assert_eq!(select_partitions(&strings(&["non-iid"])).unwrap(), [(1, false)]);
        let err = select_partitions(&strings(&["noniid"])).unwrap_err().to_string();
        assert!(err.contains("noniid"), "{err}");
    }
}
