//! Centralized black-box prompt tuning (BBT): one party, CMA-ES over z, fitness = loss of the
//! prompt `A z` on the party's k-shot training set.

use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::cmaes::{Cmaes, CmaesOptions};
use crate::config::Config;
use crate::data::split::Split;
use crate::models::{Prepared, PromptModel};
use crate::objective::{accuracy, loss, LossType};
use crate::projection::Projection;
use crate::task::TaskSpec;
use crate::Result;

/// One CMA-ES iteration's line in `metrics.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IterRecord {
    pub iteration: usize,
    pub evaluations: usize,
    /// Best and mean fitness (training loss) of this population.
    pub best_train_loss: f64,
    pub mean_train_loss: f64,
    pub sigma: f64,
    /// Dev accuracy and loss of the current CMA-ES mean.
    pub dev_acc: f64,
    pub dev_loss: f64,
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

/// The datasets tokenized and prepared once.
pub struct PreparedSplit {
    pub train: Prepared,
    pub dev: Prepared,
    pub test: Prepared,
}

impl PreparedSplit {
    pub fn new(model: &dyn PromptModel, task: &TaskSpec, split: &Split) -> Result<Self> {
        Ok(Self {
            train: model.prepare(task, &split.train, None)?,
            dev: model.prepare(task, &split.dev, None)?,
            test: model.prepare(task, &split.test, None)?,
        })
    }
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

/// Accuracy and loss of one prompt (`None` = manual prompt) on a prepared set.
pub fn evaluate(
    model: &dyn PromptModel,
    set: &Prepared,
    prompt: Option<&[f32]>,
    kind: LossType,
) -> Result<(f64, f64)> {
    let scores = model.scores(set, prompt)?;
    Ok((accuracy(&scores, &set.labels), loss(&scores, &set.labels, kind)?))
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
    let sets = PreparedSplit::new(model, task, split)?;
    let projection = projection_for(cfg, model)?;
    let (zero_shot_test_acc, _) = evaluate(model, &sets.test, None, cfg.loss_type)?;
    let zero = vec![0f32; projection.out_dim()];
    let (zero_prompt_test_acc, _) = evaluate(model, &sets.test, Some(&zero), cfg.loss_type)?;
    let (zero_shot_dev_acc, _) = evaluate(model, &sets.dev, None, cfg.loss_type)?;
    let (zero_prompt_dev_acc, _) = evaluate(model, &sets.dev, Some(&zero), cfg.loss_type)?;

    let mut es = Cmaes::new(
        vec![0.0; cfg.intrinsic_dim],
        cfg.sigma,
        CmaesOptions { popsize: Some(cfg.popsize), seed: cfg.seed, bounds: None },
    )?;
    let mut best_dev = (f64::NEG_INFINITY, vec![0f32; cfg.intrinsic_dim], 0usize);
    let mut iteration = 0;
    let mut evaluations = 0;
    let mut search_forward_s = 0.0;
    while evaluations < cfg.budget {
        let candidates = es.ask();
        let prompts = candidates
            .iter()
            .map(|z| projection.project(&z.iter().map(|&v| v as f32).collect::<Vec<_>>()))
            .collect::<Result<Vec<_>>>()?;
        let refs: Vec<&[f32]> = prompts.iter().map(|p| p.as_slice()).collect();
        let t = Instant::now();
        let all_scores = model.scores_many(&sets.train, &refs)?;
        search_forward_s += t.elapsed().as_secs_f64();
        let fitness = all_scores
            .iter()
            .map(|s| loss(s, &sets.train.labels, cfg.loss_type))
            .collect::<Result<Vec<_>>>()?;
        es.tell(&candidates, &fitness)?;
        evaluations += candidates.len();
        iteration += 1;

        let mean: Vec<f32> = es.mean().iter().map(|&v| v as f32).collect();
        let (dev_acc, dev_loss) =
            evaluate(model, &sets.dev, Some(&projection.project(&mean)?), cfg.loss_type)?;
        // Ties keep the later mean: the search's own loss breaks them.
        if dev_acc >= best_dev.0 {
            best_dev = (dev_acc, mean, iteration);
        }
        let best = fitness.iter().cloned().fold(f64::INFINITY, f64::min);
        let mean_fit = fitness.iter().sum::<f64>() / fitness.len() as f64;
        on_iter(&IterRecord {
            iteration,
            evaluations,
            best_train_loss: best,
            mean_train_loss: mean_fit,
            sigma: es.sigma(),
            dev_acc,
            dev_loss,
            wall_s: started.elapsed().as_secs_f64(),
        });
    }
    let final_z: Vec<f32> = es.mean().iter().map(|&v| v as f32).collect();
    let final_prompt = projection.project(&final_z)?;
    let (final_test_acc, _) = evaluate(model, &sets.test, Some(&final_prompt), cfg.loss_type)?;
    let (final_train_acc, _) = evaluate(model, &sets.train, Some(&final_prompt), cfg.loss_type)?;
    let (final_dev_acc, _) = evaluate(model, &sets.dev, Some(&final_prompt), cfg.loss_type)?;
    let (best_dev_test_acc, _) =
        evaluate(model, &sets.test, Some(&projection.project(&best_dev.1)?), cfg.loss_type)?;
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
        best_dev_acc: best_dev.0,
        best_dev_iteration: best_dev.2,
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
