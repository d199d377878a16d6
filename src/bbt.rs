//! Centralized black-box prompt tuning (BBT): one party, CMA-ES over z, fitness = loss of the
//! prompt `A z` on the party's k-shot training set.

use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::data::split::{minibatches, Split};
use crate::data::Example;
use crate::local_search::{LocalSearch, Objective};
use crate::models::{Prepared, PromptModel};
use crate::objective::{accuracy, BestOnDev};
use crate::projection::Projection;
use crate::protocol::SearchDistribution;
use crate::seeds::{derive, tag};
use crate::task::TaskSpec;
use crate::{Error, Result};

/// One CMA-ES iteration's line in `metrics.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IterRecord {
    pub iteration: usize,
    pub evaluations: usize,
    /// Best and mean fitness (training loss) of this population.
    pub best_train_loss: f64,
    pub mean_train_loss: f64,
    pub sigma: f64,
    /// Dev accuracy and loss of the current CMA-ES mean (on iterations that evaluate it, see
    /// `dev_every`).
    pub dev_acc: Option<f64>,
    pub dev_loss: Option<f64>,
    pub wall_s: f64,
}

/// `summary.json` of a BBT run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BbtSummary {
    pub model: String,
    pub task: String,
    pub seed: u64,
    /// The template alone: no soft prompt and no placeholders (the paper's "manual prompt").
    pub zero_shot_test_acc: f64,
    /// Placeholders present, z = 0.
    pub zero_prompt_test_acc: f64,
    /// The same two baselines on the dev set: for choosing templates and placeholders without
    /// looking at the test set.
    pub zero_shot_dev_acc: f64,
    pub zero_prompt_dev_acc: f64,
    pub final_test_acc: f64,
    pub best_dev_test_acc: f64,
    pub best_dev_acc: f64,
    pub best_dev_iteration: usize,
    pub final_train_acc: f64,
    pub final_dev_acc: f64,
    pub evaluations: usize,
    pub iterations: usize,
    pub train_examples: usize,
    pub dev_examples: usize,
    pub test_examples: usize,
    pub projection_std: f32,
    pub wall_s: f64,
    /// Seconds spent scoring candidates (the forward passes of the search).
    pub search_forward_s: f64,
    pub config: Config,
}

/// Builds the projection A for `cfg` on `model` (seeded: every party derives the same A).
pub fn projection_for(cfg: &Config, model: &dyn PromptModel) -> Result<Projection> {
    let info = model.info();
    let std_hat = info.embedding_std * cfg.projection_gain;
    Projection::new(
        cfg.intrinsic_dim,
        cfg.n_prompt_tokens * info.hidden_size,
        std_hat,
        1.0,
        cfg.seed,
    )
}

/// The task's metric (accuracy, or F1 for MRPC) and loss of one prompt (`None` = manual
/// prompt) on a prepared set.
pub fn evaluate(
    model: &dyn PromptModel,
    set: &Prepared,
    prompt: Option<&[f32]>,
    objective: Objective,
) -> Result<(f64, f64)> {
    let scores = model.scores(set, prompt)?;
    let metric = objective.metric.eval(&scores, &set.labels, set.n_classes);
    Ok((metric, objective.score(&scores, &set.labels, None)?.loss))
}

/// The training set as the search scores it: class-balanced minibatches (one, the whole set,
/// unless `batch_size` asks for smaller ones), each prepared once.
struct TrainBatches {
    batches: Vec<Prepared>,
}

impl TrainBatches {
    fn new(
        model: &dyn PromptModel,
        task: &TaskSpec,
        train: &[Example],
        size: usize,
    ) -> Result<Self> {
        let labels: Vec<usize> = train.iter().map(|e| e.label).collect();
        let batches = minibatches(&labels, size)
            .into_iter()
            .map(|idx| {
                let examples: Vec<Example> = idx.iter().map(|&i| train[i].clone()).collect();
                model.prepare(task, &examples, None)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { batches })
    }

    /// The batch that scores the population of `iteration` (0-based): taken in turn, so every
    /// example counts equally over a pass.
    fn for_iteration(&self, iteration: usize) -> &Prepared {
        &self.batches[iteration % self.batches.len()]
    }

    /// Accuracy (not the task metric: a mean over minibatches) of `prompt` on the whole training set.
    fn accuracy(&self, model: &dyn PromptModel, prompt: &[f32]) -> Result<f64> {
        let (mut correct, mut total) = (0.0, 0usize);
        for b in &self.batches {
            correct += accuracy(&model.scores(b, Some(prompt))?, &b.labels) * b.len() as f64;
            total += b.len();
        }
        Ok(correct / total.max(1) as f64)
    }
}

/// Runs centralized BBT. `on_iter` sees every iteration (progress bars, metrics files).
pub fn run(
    cfg: &Config,
    model: &dyn PromptModel,
    task: &TaskSpec,
    split: &Split,
    on_iter: &mut dyn FnMut(&IterRecord),
) -> Result<BbtSummary> {
    let started = Instant::now();
    let train = TrainBatches::new(model, task, &split.train, cfg.batch_size)?;
    let dev = model.prepare(task, &split.dev, None)?;
    let test = model.prepare(task, &split.test, None)?;
    let projection = projection_for(cfg, model)?;
    let objective =
        Objective { loss: cfg.loss_type, metric: task.metric, balance: cfg.client_loss };
    let (zero_shot_test_acc, _) = evaluate(model, &test, None, objective)?;
    let zero = vec![0f32; projection.out_dim()];
    let (zero_prompt_test_acc, _) = evaluate(model, &test, Some(&zero), objective)?;
    let (zero_shot_dev_acc, _) = evaluate(model, &dev, None, objective)?;
    let (zero_prompt_dev_acc, _) = evaluate(model, &dev, Some(&zero), objective)?;

    // The search draws from its own stream, not the one that shuffled the k-shot sets.
    let start = SearchDistribution {
        round: 0,
        mean: vec![0.0; cfg.intrinsic_dim],
        sigma: cfg.sigma,
        covariance: None,
    };
    let iterations = cfg.budget.div_ceil(cfg.popsize);
    let seed = derive(cfg.seed, &[tag::BBT_SEARCH]);
    let mut search = LocalSearch::start(&start, cfg.popsize, iterations, seed, cfg.cma)?;
    let mut best_dev: Option<BestOnDev> = None;
    let mut evaluations = 0;
    let mut search_forward_s = 0.0;
    while let Some(candidates) = search.ask() {
        let iteration = search.iteration();
        let prompts = candidates
            .iter()
            .map(|z| projection.project(&z.iter().map(|&v| v as f32).collect::<Vec<_>>()))
            .collect::<Result<Vec<_>>>()?;
        let refs: Vec<&[f32]> = prompts.iter().map(|p| p.as_slice()).collect();
        let batch = train.for_iteration(iteration - 1);
        let t = Instant::now();
        let all_scores = model.scores_many(batch, &refs)?;
        search_forward_s += t.elapsed().as_secs_f64();
        let fitness = all_scores
            .iter()
            .map(|s| objective.score(s, &batch.labels, None).map(|f| f.fitness))
            .collect::<Result<Vec<_>>>()?;
        search.tell(&candidates, &fitness)?;
        evaluations += candidates.len();

        let mean = search.mean();
        let mut dev_eval = None;
        if iteration % cfg.dev_every == 0 || search.is_done() {
            let (metric, dev_loss) =
                evaluate(model, &dev, Some(&projection.project(&mean)?), objective)?;
            BestOnDev::offer(&mut best_dev, metric, dev_loss, iteration, &mean);
            dev_eval = Some((metric, dev_loss));
        }
        let best = fitness.iter().cloned().fold(f64::INFINITY, f64::min);
        let mean_fit = fitness.iter().sum::<f64>() / fitness.len() as f64;
        on_iter(&IterRecord {
            iteration,
            evaluations,
            best_train_loss: best,
            mean_train_loss: mean_fit,
            sigma: search.strategy().sigma(),
            dev_acc: dev_eval.map(|d| d.0),
            dev_loss: dev_eval.map(|d| d.1),
            wall_s: started.elapsed().as_secs_f64(),
        });
    }
    let iteration = search.iteration();
    let best_dev = best_dev.ok_or_else(|| Error::Optimizer("no dev evaluation ran".into()))?;
    let final_z = search.mean();
    let final_prompt = projection.project(&final_z)?;
    let (final_test_acc, _) = evaluate(model, &test, Some(&final_prompt), objective)?;
    let final_train_acc = train.accuracy(model, &final_prompt)?;
    let (final_dev_acc, _) = evaluate(model, &dev, Some(&final_prompt), objective)?;
    let (best_dev_test_acc, _) =
        evaluate(model, &test, Some(&projection.project(&best_dev.z)?), objective)?;
    Ok(BbtSummary {
        model: model.info().name.clone(),
        task: task.name.clone(),
        seed: cfg.seed,
        zero_shot_test_acc,
        zero_prompt_test_acc,
        zero_shot_dev_acc,
        zero_prompt_dev_acc,
        final_test_acc,
        best_dev_test_acc,
        best_dev_acc: best_dev.metric,
        best_dev_iteration: best_dev.step,
        final_train_acc,
        final_dev_acc,
        evaluations,
        iterations: iteration,
        train_examples: split.train.len(),
        dev_examples: split.dev.len(),
        test_examples: split.test.len(),
        projection_std: projection.std(),
        wall_s: started.elapsed().as_secs_f64(),
        search_forward_s,
        config: cfg.clone(),
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::models::{ModelInfo, PromptSettings};

    /// A stand-in backend: each example's text is its sign (+1 positive, -1 negative) and the
    /// class scores are `[-s p0, s p0]`, so any prompt with `p0 > 0` classifies everything right.
    /// It logs the texts of every population it scores.
    struct SignModel {
        info: ModelInfo,
        settings: PromptSettings,
        scored: Mutex<Vec<Vec<String>>>,
    }

    struct Signs(Vec<(String, f32)>);

    impl SignModel {
        fn new() -> Self {
            Self {
                info: ModelInfo {
                    name: "sign".into(),
                    family: "test".into(),
                    hidden_size: 2,
                    vocab_size: 2,
                    n_params: 0,
                    embedding_std: 1.0,
                },
                settings: PromptSettings {
                    n_prompt_tokens: 1,
                    mode: Default::default(),
                    placement: Default::default(),
                    placeholder: None,
                },
                scored: Mutex::new(Vec::new()),
            }
        }
    }

    impl PromptModel for SignModel {
        fn info(&self) -> &ModelInfo {
            &self.info
        }
        fn settings(&self) -> &PromptSettings {
            &self.settings
        }
        fn prepare(
            &self,
            _task: &TaskSpec,
            examples: &[Example],
            _noise: Option<crate::models::TokenNoise>,
        ) -> Result<Prepared> {
            let signs = examples
                .iter()
                .map(|e| (e.text.clone(), if e.label == 1 { 1.0 } else { -1.0 }))
                .collect();
            Ok(Prepared {
                labels: examples.iter().map(|e| e.label).collect(),
                n_classes: 2,
                tokens_per_pass: examples.len(),
                inner: Box::new(Signs(signs)),
            })
        }
        fn scores(&self, batch: &Prepared, prompt: Option<&[f32]>) -> Result<Vec<Vec<f32>>> {
            let signs = crate::models::downcast::<Signs>(batch, "sign")?;
            let p0 = prompt.map_or(0.0, |p| p[0]);
            Ok(signs.0.iter().map(|&(_, s)| vec![-s * p0, s * p0]).collect())
        }
        fn scores_many(&self, batch: &Prepared, prompts: &[&[f32]]) -> Result<Vec<Vec<Vec<f32>>>> {
            let signs = crate::models::downcast::<Signs>(batch, "sign")?;
            if let Ok(mut log) = self.scored.lock() {
                log.push(signs.0.iter().map(|(t, _)| t.clone()).collect());
            }
            prompts.iter().map(|p| self.scores(batch, Some(p))).collect()
        }
    }

    fn examples(prefix: &str, n: usize) -> Vec<Example> {
        (0..n)
            .map(|i| Example { text: format!("{prefix}{i}"), text_b: None, label: i % 2 })
            .collect()
    }

    #[test]
    fn minibatches_take_turns_and_dev_is_scored_every_dev_every() {
        let model = SignModel::new();
        let cfg = Config {
            intrinsic_dim: 4,
            n_prompt_tokens: 1,
            popsize: 4,
            budget: 40,
            batch_size: 4,
            dev_every: 3,
            ..Config::default()
        };
        let split = Split {
            train: examples("train", 12),
            dev: examples("dev", 6),
            test: examples("test", 8),
        };
        let task = TaskSpec::builtin("mr").unwrap();
        let mut records = Vec::new();
        let s = run(&cfg, &model, &task, &split, &mut |r| records.push(r.clone())).unwrap();

        let scored = model.scored.into_inner().unwrap();
        assert_eq!(scored.len(), 10, "one population per iteration");
        for (i, batch) in scored.iter().enumerate() {
            assert_eq!(batch.len(), 4);
            let positives =
                batch.iter().filter(|t| split.train.iter().any(|e| &e.text == *t && e.label == 1));
            assert_eq!(positives.count(), 2, "class-balanced: {batch:?}");
            assert_eq!(batch, &scored[i % 3], "three batches taken in turn");
        }
        let mut seen: Vec<&String> = scored[..3].iter().flatten().collect();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 12, "one pass covers the training set");

        let with_dev: Vec<usize> =
            records.iter().filter(|r| r.dev_acc.is_some()).map(|r| r.iteration).collect();
        assert_eq!(with_dev, vec![3, 6, 9, 10], "every 3rd iteration and the last");
        assert!([3, 6, 9, 10].contains(&s.best_dev_iteration));
        assert_eq!(s.zero_shot_test_acc, 0.5, "no prompt: ties, class 0 everywhere");
        assert_eq!((s.final_train_acc, s.final_test_acc), (1.0, 1.0), "the search finds p0 > 0");
    }
}
