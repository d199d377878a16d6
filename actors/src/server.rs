//! The server: owns the aggregation rule, runs rounds (send the search distribution, gather the
//! replies that arrive before the deadline, aggregate over them), asks the evaluator to score the
//! global mean, and reports one record per round.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fedbpt::config::Config;
use fedbpt::strategy::{Aggregator, ClientUpdate};
use ractor::rpc::CallResult;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use serde::Serialize;
use tokio::sync::mpsc::UnboundedSender;

use crate::messages::{wire_size, ClientMsg, EvalMsg, ServerMsg};

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, Serialize)]
pub struct RoundRecord {
    pub round: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub test_acc: Option<f64>,
    pub dev_acc: f64,
    pub dev_loss: f64,
    /// Mean over the replies of each client's loss at its final local mean.
    pub train_loss: f64,
    pub sigma: f64,
    pub clients_ok: usize,
    /// Clients whose reply failed or missed the deadline, as `site-N: why`.
    pub clients_failed: Vec<String>,
    /// Whether the round had its quorum (`min_clients`) and was aggregated.
    pub aggregated: bool,
    pub bytes_up: usize,
    pub bytes_down: usize,
    pub wall_s: f64,
}

/// What the server tells its owner.
#[derive(Debug)]
pub enum ServerEvent {
    Round(RoundRecord),
    /// All rounds done: the final and the best-on-dev global means.
    Finished {
        final_z: Vec<f32>,
        best_dev_z: Vec<f32>,
        best_dev_round: usize,
        best_dev_acc: f64,
    },
    Failed(String),
}

pub struct Server;

pub struct ServerArgs {
    pub cfg: Arc<Config>,
    pub aggregator: Box<dyn Aggregator>,
    pub clients: Vec<ActorRef<ClientMsg>>,
    pub evaluator: ActorRef<EvalMsg>,
    pub events: UnboundedSender<ServerEvent>,
    pub started: Instant,
    /// Dev accuracy of the starting mean (round 0), so best-on-dev can keep it.
    pub initial_dev: Option<(f64, Vec<f32>)>,
}

pub struct ServerState {
    args: ServerArgs,
    best_dev: Option<(f64, usize, Vec<f32>)>,
}

impl Actor for Server {
    type Msg = ServerMsg;
    type State = ServerState;
    type Arguments = ServerArgs;

    async fn pre_start(
        &self,
        _me: ActorRef<ServerMsg>,
        args: ServerArgs,
    ) -> Result<ServerState, ActorProcessingErr> {
        let best_dev = args.initial_dev.clone().map(|(acc, z)| (acc, 0, z));
        Ok(ServerState { args, best_dev })
    }

    async fn handle(
        &self,
        me: ActorRef<ServerMsg>,
        msg: ServerMsg,
        state: &mut ServerState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ServerMsg::RunRound { round } => match run_round(state, round).await {
                Ok(record) => {
                    let _ = state.args.events.send(ServerEvent::Round(record));
                    if round < state.args.cfg.num_rounds {
                        me.send_message(ServerMsg::RunRound { round: round + 1 })?;
                    } else {
                        let final_z = state.args.aggregator.global_mean();
                        let (best_dev_acc, best_dev_round, best_dev_z) =
                            state.best_dev.clone().unwrap_or((f64::NAN, 0, final_z.clone()));
                        let _ = state.args.events.send(ServerEvent::Finished {
                            final_z,
                            best_dev_z,
                            best_dev_round,
                            best_dev_acc,
                        });
                    }
                }
                Err(e) => {
                    let _ =
                        state.args.events.send(ServerEvent::Failed(format!("round {round}: {e}")));
                }
            },
        }
        Ok(())
    }
}

async fn run_round(state: &mut ServerState, round: usize) -> Result<RoundRecord, String> {
    let args = &mut state.args;
    let cfg = args.cfg.clone();
    let dist = args.aggregator.configure(round);
    let down_each = wire_size(&dist);
    let deadline = Duration::from_secs_f64(cfg.runtime.round_timeout_s);
    let mut tasks = tokio::task::JoinSet::new();
    for (i, client) in args.clients.iter().enumerate() {
        let (client, dist) = (client.clone(), dist.clone());
        tasks.spawn(async move {
            let r =
                match client.call(|reply| ClientMsg::Train { dist, reply }, Some(deadline)).await {
                    Ok(CallResult::Success(Ok(u))) => Ok(u),
                    Ok(CallResult::Success(Err(e))) => Err(e),
                    Ok(CallResult::Timeout) => {
                        Err(format!("no reply within {:.0} s", deadline.as_secs_f64()))
                    }
                    Ok(CallResult::SenderError) => Err("client stopped before replying".into()),
                    Err(e) => Err(format!("unreachable: {e}")),
                };
            (i, r)
        });
    }
    let mut updates: Vec<ClientUpdate> = Vec::new();
    let mut failed = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((_, Ok(u))) if u.round == round => updates.push(u),
            Ok((i, Ok(u))) => {
                failed.push(format!("site-{}: reply for round {} discarded", i + 1, u.round))
            }
            Ok((i, Err(e))) => failed.push(format!("site-{}: {e}", i + 1)),
            Err(e) => failed.push(format!("a reply task failed: {e}")),
        }
    }
    // Arrival order varies; aggregation must not.
    updates.sort_by_key(|u| u.client);
    failed.sort();
    let bytes_up: usize = updates.iter().map(wire_size).sum();
    let bytes_down = down_each * args.clients.len();
    let aggregated = updates.len() >= cfg.min_clients.max(1);
    if aggregated {
        args.aggregator.aggregate(round, &updates).map_err(|e| e.to_string())?;
    }
    let train_loss = if updates.is_empty() {
        f64::NAN
    } else {
        updates.iter().map(|u| u.fitness).sum::<f64>() / updates.len() as f64
    };
    let z = args.aggregator.global_mean();
    let with_test = round.is_multiple_of(cfg.eval_every) || round == cfg.num_rounds;
    let eval = match args
        .evaluator
        .call(|reply| EvalMsg::Evaluate { z: z.clone(), with_test, reply }, None)
        .await
    {
        Ok(CallResult::Success(r)) => r?,
        _ => return Err("the evaluator did not answer".into()),
    };
    if state.best_dev.as_ref().is_none_or(|(acc, _, _)| eval.dev_acc > *acc) {
        state.best_dev = Some((eval.dev_acc, round, z));
    }
    Ok(RoundRecord {
        round,
        test_acc: eval.test_acc,
        dev_acc: eval.dev_acc,
        dev_loss: eval.dev_loss,
        train_loss,
        sigma: args.aggregator.sigma(),
        clients_ok: updates.len(),
        clients_failed: failed,
        aggregated,
        bytes_up,
        bytes_down,
        wall_s: args.started.elapsed().as_secs_f64(),
    })
}
