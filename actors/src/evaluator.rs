//! The evaluator scores global means on the dev set (every round, for best-on-dev selection)
//! and on the held-out test set (every `eval_every` rounds and at the end), with the task's
//! metric (accuracy, or F1 for MRPC; the fields keep the name `acc`).

use std::sync::Arc;

use fedbpt::local_search::Objective;
use fedbpt::models::Prepared;
use fedbpt::objective::argmax;
use fedbpt::projection::Projection;
use ractor::{Actor, ActorProcessingErr, ActorRef};

use crate::messages::{EvalMsg, Evaluation};
use crate::pool::ForwardPool;
use crate::profile::{self, MessageInfo};

fn info(sender: &str, message: &'static str) -> MessageInfo {
    MessageInfo {
        sender: sender.into(),
        receiver: "evaluator".into(),
        message,
        round: None,
        bytes: 0,
    }
}

pub struct Evaluator;

pub struct EvalArgs {
    pub pool: ForwardPool,
    pub dev: Arc<Prepared>,
    pub test: Arc<Prepared>,
    pub projection: Arc<Projection>,
    /// The task's loss and metric (what `dev_acc` and `test_acc` measure).
    pub objective: Objective,
    /// The party whose device runs the evaluation (`eval_clients`, as the reference's site-1).
    pub party: usize,
}

impl Actor for Evaluator {
    type Msg = EvalMsg;
    type State = EvalArgs;
    type Arguments = EvalArgs;

    async fn pre_start(
        &self,
        _me: ActorRef<EvalMsg>,
        args: EvalArgs,
    ) -> Result<EvalArgs, ActorProcessingErr> {
        Ok(args)
    }

    async fn handle(
        &self,
        _me: ActorRef<EvalMsg>,
        msg: EvalMsg,
        s: &mut EvalArgs,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            EvalMsg::Baselines { stamp, reply } => {
                let _span = profile::handling(stamp, || info("main", "Baselines"));
                let _ = reply.send(baselines(s).await);
            }
            EvalMsg::Evaluate { z, with_test, from, stamp, reply } => {
                let _span = profile::handling(stamp, || info(from, "Evaluate"));
                let _ = reply.send(evaluate(s, &z, with_test).await);
            }
        }
        Ok(())
    }
}

/// Counts of (true class, predicted class): a global model drifting to one class shows as one
/// column filling up.
fn confusion(scores: &[Vec<f32>], labels: &[usize], n_classes: usize) -> Vec<Vec<usize>> {
    let mut m = vec![vec![0; n_classes]; n_classes];
    for (s, &y) in scores.iter().zip(labels) {
        if let (Some(row), Some(p)) = (m.get_mut(y), argmax(s)) {
            if let Some(cell) = row.get_mut(p) {
                *cell += 1;
            }
        }
    }
    m
}

fn metric(s: &EvalArgs, scores: &[Vec<f32>], set: &Prepared) -> f64 {
    s.objective.metric.eval(scores, &set.labels, set.n_classes)
}

async fn baselines(s: &EvalArgs) -> Result<(f64, f64), String> {
    let manual = s.pool.score_manual(s.party, "evaluator", s.test.clone()).await?;
    let zero = vec![0f32; s.projection.out_dim()];
    let zero_scores = s.pool.score(s.party, "evaluator", s.test.clone(), vec![zero]).await?;
    Ok((metric(s, &manual, &s.test), metric(s, &zero_scores[0], &s.test)))
}

async fn evaluate(s: &EvalArgs, z: &[f32], with_test: bool) -> Result<Evaluation, String> {
    let prompt = s.projection.project(z).map_err(|e| e.to_string())?;
    let dev = s.pool.score(s.party, "evaluator", s.dev.clone(), vec![prompt.clone()]).await?;
    let dev_acc = metric(s, &dev[0], &s.dev);
    let dev_loss = s.objective.score(&dev[0], &s.dev.labels, None).map_err(|e| e.to_string())?.loss;
    let test_acc = if with_test {
        let t = s.pool.score(s.party, "evaluator", s.test.clone(), vec![prompt]).await?;
        Some(metric(s, &t[0], &s.test))
    } else {
        None
    };
    let dev_confusion = confusion(&dev[0], &s.dev.labels, s.dev.n_classes);
    Ok(Evaluation { dev_acc, dev_loss, test_acc, dev_confusion })
}
