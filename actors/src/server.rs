//! The server: owns the aggregation rule, runs rounds (send the search distribution, gather the
//! replies that arrive before the deadline, aggregate over them when the quorum is met), asks
//! the evaluator to score the global mean, injects the configured faults, writes a checkpoint
//! after every round, and reports one record per round.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fedbpt::config::{client_index, Config, KillWhen, QuorumPolicy};
use fedbpt::objective::BestOnDev;
use fedbpt::protocol::ClientUpdate;
use fedbpt::seeds::{derive, tag};
use fedbpt::strategy::{sample_clients, Aggregator};
use ractor::rpc::CallResult;
use ractor::{Actor, ActorProcessingErr, ActorRef, ActorStatus};
use rand::seq::index::sample;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc::UnboundedSender;

use crate::messages::{wire_size, ClientFault, ClientMsg, EvalMsg, ServerMsg, SupervisorMsg};
use crate::profile::{self, MessageInfo, Stamp};
use crate::supervisor::{take_restarted, Registry, RestartLog};

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RoundRecord {
    pub round: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_acc: Option<f64>,
    pub dev_acc: f64,
    pub dev_loss: f64,
    /// Mean over the replies of each client's loss at its final local mean (none without replies).
    pub train_loss: Option<f64>,
    /// The step size sent to the clients of the next round.
    pub sigma: f64,
    pub clients_ok: usize,
    /// The clients sampled for this round (`clients_per_round`; empty when all take part).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clients_sampled: Vec<String>,
    /// Killed by fault injection this round (before or during their local search).
    pub clients_killed: Vec<String>,
    /// Restarted by the supervisor since the previous round.
    pub clients_restarted: Vec<String>,
    /// No reply before the deadline.
    pub clients_late: Vec<String>,
    /// Not aggregated this round, with why (`site-N: reason`).
    pub clients_excluded: Vec<String>,
    /// Whether the round had its quorum (`min_clients`) and was aggregated.
    pub aggregated: bool,
    /// Extra attempts of this round under `quorum_policy = "retry"`.
    pub retries: usize,
    pub bytes_up: usize,
    pub bytes_down: usize,
    pub wall_s: f64,
}

/// Version of [`Checkpoint`]'s layout and of the round it continues. Format 2: the FedBPT
/// server follows the reference rule, clients upload their loss beside their fitness, and the
/// best-on-dev record keeps its dev loss. Earlier checkpoints (no `format` key) are refused.
pub const CHECKPOINT_FORMAT: u32 = 2;

/// The server's durable state after a round: enough to continue the run bit for bit.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Checkpoint {
    #[serde(default)]
    pub format: u32,
    pub round: usize,
    pub aggregator: serde_json::Value,
    pub best_dev: Option<BestOnDev>,
    pub records: Vec<RoundRecord>,
    pub config: Config,
}

impl Checkpoint {
    /// Reads a checkpoint's JSON, refusing other formats (earlier versions of fedbpt wrote
    /// none) with a message that says why.
    pub fn parse(text: &str) -> Result<Checkpoint, String> {
        let v: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("not a fedbpt checkpoint: {e}"))?;
        let format = v.get("format").and_then(|f| f.as_u64()).unwrap_or(1);
        if format != u64::from(CHECKPOINT_FORMAT) {
            return Err(format!(
                "checkpoint format {format}, this fedbpt writes format {CHECKPOINT_FORMAT}: it was \
                 written before the FedBPT server followed the reference rule (and before clients \
                 uploaded their loss), so it cannot continue the run it began; start the run again"
            ));
        }
        serde_json::from_value(v).map_err(|e| format!("not a fedbpt checkpoint: {e}"))
    }
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
    pub registry: Registry,
    pub restarted: RestartLog,
    pub supervisor: ActorRef<SupervisorMsg>,
    pub evaluator: ActorRef<EvalMsg>,
    pub events: UnboundedSender<ServerEvent>,
    pub started: Instant,
    /// Dev metric and loss of the starting mean (round 0), so best-on-dev can keep it.
    pub initial_dev: Option<BestOnDev>,
    /// Where to write `checkpoint.json` after every round.
    pub checkpoint_dir: Option<PathBuf>,
    /// Continue from this checkpoint.
    pub resume: Option<Checkpoint>,
}

pub struct ServerState {
    args: ServerArgs,
    best_dev: Option<BestOnDev>,
    records: Vec<RoundRecord>,
}

impl Actor for Server {
    type Msg = ServerMsg;
    type State = ServerState;
    type Arguments = ServerArgs;

    async fn pre_start(
        &self,
        _me: ActorRef<ServerMsg>,
        mut args: ServerArgs,
    ) -> Result<ServerState, ActorProcessingErr> {
        let mut best_dev = args.initial_dev.clone();
        let mut records = Vec::new();
        if let Some(cp) = args.resume.take() {
            args.aggregator.restore(cp.aggregator)?;
            best_dev = cp.best_dev;
            records = cp.records;
        }
        Ok(ServerState { args, best_dev, records })
    }

    async fn handle(
        &self,
        me: ActorRef<ServerMsg>,
        msg: ServerMsg,
        state: &mut ServerState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ServerMsg::RunRound { round, stamp } => match run_round(state, round, stamp).await {
                Ok(record) => {
                    state.records.push(record.clone());
                    if let Err(e) = write_checkpoint(state, round) {
                        let _ = state
                            .args
                            .events
                            .send(ServerEvent::Failed(format!("round {round}: checkpoint: {e}")));
                        return Ok(());
                    }
                    let _ = state.args.events.send(ServerEvent::Round(record));
                    if round < state.args.cfg.num_rounds {
                        me.send_message(ServerMsg::RunRound {
                            round: round + 1,
                            stamp: profile::stamp(),
                        })?;
                    } else {
                        let final_z = state.args.aggregator.global_mean();
                        let (best_dev_acc, best_dev_round, best_dev_z) =
                            match state.best_dev.clone() {
                                Some(b) => (b.metric, b.step, b.z),
                                None => (f64::NAN, 0, final_z.clone()),
                            };
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

fn write_checkpoint(state: &ServerState, round: usize) -> Result<(), String> {
    let Some(dir) = &state.args.checkpoint_dir else { return Ok(()) };
    let cp = Checkpoint {
        format: CHECKPOINT_FORMAT,
        round,
        aggregator: state.args.aggregator.snapshot().map_err(|e| e.to_string())?,
        best_dev: state.best_dev.clone(),
        records: state.records.clone(),
        config: (*state.args.cfg).clone(),
    };
    let path = dir.join("checkpoint.json");
    let tmp = dir.join("checkpoint.json.tmp");
    let bytes = serde_json::to_vec(&cp).map_err(|e| e.to_string())?;
    std::fs::write(&tmp, bytes).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, &path).map_err(|e| format!("{}: {e}", path.display()))
}

fn site(i: usize) -> String {
    format!("site-{}", i + 1)
}

/// Waits until every client that is not given up runs (restarts finished).
async fn settle(
    supervisor: &ActorRef<SupervisorMsg>,
    registry: &Registry,
    timeout: Duration,
) -> Result<(), String> {
    let give_up_at = Instant::now() + timeout;
    loop {
        match supervisor
            .call(|reply| SupervisorMsg::Settled { stamp: profile::stamp(), reply }, None)
            .await
        {
            Ok(CallResult::Success(())) => {}
            _ => return Err("the client supervisor is gone".into()),
        }
        let all_up = registry.read().map_err(|_| "client registry poisoned")?.iter().all(|s| {
            s.given_up || s.actor.as_ref().is_some_and(|a| a.get_status() == ActorStatus::Running)
        });
        if all_up || Instant::now() > give_up_at {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The faults of one round: kills before the round, and per-client faults inside it.
struct RoundFaults {
    kill_before: Vec<usize>,
    inside: Vec<Option<ClientFault>>,
}

fn plan_faults(cfg: &Config, round: usize) -> RoundFaults {
    let n = cfg.num_users;
    let f = &cfg.faults;
    let mut kill_before = Vec::new();
    let mut inside = vec![None; n];
    for k in f.kill.iter().filter(|k| k.round == round) {
        if let Some(i) = client_index(&k.client, n) {
            match k.when {
                KillWhen::Before => kill_before.push(i),
                KillWhen::During => inside[i] = Some(ClientFault::DieMidSearch),
            }
        }
    }
    if f.kill_fraction > 0.0 {
        let mut rng = ChaCha8Rng::seed_from_u64(derive(cfg.seed, &[tag::FAULTS, round as u64]));
        let k = ((f.kill_fraction * n as f64).round() as usize).min(n);
        kill_before.extend(sample(&mut rng, n, k));
    }
    for p in f.panic.iter().filter(|p| p.round == round) {
        if let Some(i) = client_index(&p.client, n) {
            inside[i] = Some(ClientFault::Panic);
        }
    }
    for d in f.drop_reply.iter().filter(|d| d.round == round) {
        if let Some(i) = client_index(&d.client, n) {
            inside[i] = Some(ClientFault::DropReply);
        }
    }
    for s in &f.stragglers {
        if !s.rounds.is_empty() && !s.rounds.contains(&round) {
            continue;
        }
        if let Some(i) = client_index(&s.client, n) {
            let mut rng = ChaCha8Rng::seed_from_u64(derive(
                cfg.seed,
                &[tag::STRAGGLER, i as u64, round as u64],
            ));
            let jitter = if s.jitter_s > 0.0 { rng.random_range(0.0..s.jitter_s) } else { 0.0 };
            inside[i] = Some(ClientFault::Delay(Duration::from_secs_f64(s.delay_s + jitter)));
        }
    }
    kill_before.sort_unstable();
    kill_before.dedup();
    RoundFaults { kill_before, inside }
}

enum Outcome {
    Ok(Box<ClientUpdate>, Stamp),
    Late,
    Failed(String),
}

async fn run_round(
    state: &mut ServerState,
    round: usize,
    stamp: Stamp,
) -> Result<RoundRecord, String> {
    let sender = if round == 1 || state.records.is_empty() { "main" } else { "server" };
    let _span = profile::handling(stamp, || MessageInfo {
        sender: sender.into(),
        receiver: "server".into(),
        message: "RunRound",
        round: Some(round),
        bytes: 0,
    });
    let cfg = state.args.cfg.clone();
    let (supervisor, registry) = (state.args.supervisor.clone(), state.args.registry.clone());
    let settle_timeout = Duration::from_secs_f64(cfg.runtime.round_timeout_s);
    settle(&supervisor, &registry, settle_timeout).await?;
    let args = &mut state.args;
    let restarted: Vec<String> = {
        let mut r = take_restarted(&args.restarted);
        r.sort_unstable();
        r.into_iter().map(site).collect()
    };
    let faults = plan_faults(&cfg, round);
    let mut killed: Vec<String> = Vec::new();
    let mut excluded: Vec<String> = Vec::new();
    let slots = args.registry.read().map_err(|_| "client registry poisoned")?.clone();
    for &i in &faults.kill_before {
        if let Some(a) = &slots[i].actor {
            let _ = a.get_cell().kill_and_wait(Some(Duration::from_secs(10))).await;
            killed.push(site(i));
        }
    }
    let dist = args.aggregator.configure(round);
    let down_each = wire_size(&dist);
    let deadline = Duration::from_secs_f64(cfg.runtime.round_timeout_s);
    let sampled = sample_clients(cfg.seed, round, cfg.num_users, cfg.clients_per_round);
    let mut participants = Vec::new();
    for &i in &sampled {
        let slot = &slots[i];
        if faults.kill_before.contains(&i) {
            excluded.push(format!("{}: killed before the round", site(i)));
        } else if slot.given_up || slot.actor.is_none() {
            excluded.push(format!("{}: restart limit reached", site(i)));
        } else if let Some(a) = &slot.actor {
            participants.push((i, a.clone()));
        }
    }
    for (i, f) in faults.inside.iter().enumerate() {
        if *f == Some(ClientFault::DieMidSearch) && participants.iter().any(|(p, _)| *p == i) {
            killed.push(site(i));
        }
    }
    killed.sort();

    let mut retries = 0;
    let (updates, late, failed, bytes_down) = loop {
        let mut tasks = tokio::task::JoinSet::new();
        for (i, client) in &participants {
            let (i, client, dist, fault) = (*i, client.clone(), dist.clone(), faults.inside[*i]);
            // A retried round runs without the injected faults: they were this round's events.
            let fault = if retries == 0 { fault } else { None };
            tasks.spawn(async move {
                let r = match client
                    .call(
                        |reply| ClientMsg::Train { dist, fault, stamp: profile::stamp(), reply },
                        Some(deadline),
                    )
                    .await
                {
                    Ok(CallResult::Success(Ok((u, stamp)))) => Outcome::Ok(Box::new(u), stamp),
                    Ok(CallResult::Success(Err(e))) => Outcome::Failed(e),
                    Ok(CallResult::Timeout) => Outcome::Late,
                    Ok(CallResult::SenderError) => {
                        Outcome::Failed("stopped or dropped its reply".into())
                    }
                    Err(e) => Outcome::Failed(format!("unreachable: {e}")),
                };
                (i, r)
            });
        }
        let mut updates: Vec<ClientUpdate> = Vec::new();
        let mut late = Vec::new();
        let mut failed = Vec::new();
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok((i, Outcome::Ok(u, stamp))) if u.round == round => {
                    profile::received(
                        stamp,
                        MessageInfo {
                            sender: site(i),
                            receiver: "server".into(),
                            message: "ClientUpdate",
                            round: Some(round),
                            bytes: wire_size(&*u),
                        },
                    );
                    updates.push(*u)
                }
                Ok((i, Outcome::Ok(u, _))) => {
                    failed.push(format!("{}: reply for round {} discarded", site(i), u.round))
                }
                Ok((i, Outcome::Late)) => late.push(i),
                Ok((i, Outcome::Failed(e))) => failed.push(format!("{}: {e}", site(i))),
                Err(e) => failed.push(format!("a reply task failed: {e}")),
            }
        }
        let bytes_down = down_each * participants.len();
        let quorum = updates.len() >= cfg.min_clients.max(1);
        if quorum
            || cfg.faults.quorum_policy == QuorumPolicy::Skip
            || retries >= cfg.faults.max_round_retries
        {
            break (updates, late, failed, bytes_down);
        }
        retries += 1;
        settle(&supervisor, &registry, settle_timeout).await?;
    };
    // Arrival order varies; aggregation must not.
    let mut updates = updates;
    updates.sort_by_key(|u| u.client);
    let mut late = late;
    late.sort_unstable();
    let clients_late: Vec<String> = late.iter().map(|&i| site(i)).collect();
    excluded.extend(
        clients_late
            .iter()
            .map(|s| format!("{s}: no reply within {:.0} s", deadline.as_secs_f64())),
    );
    excluded.extend(failed);
    excluded.sort();
    let bytes_up: usize = updates.iter().map(wire_size).sum();
    let aggregated = updates.len() >= cfg.min_clients.max(1);
    if aggregated {
        args.aggregator.aggregate(round, &updates).map_err(|e| e.to_string())?;
    }
    let train_loss = (!updates.is_empty())
        .then(|| updates.iter().map(|u| u.loss).sum::<f64>() / updates.len() as f64);
    let z = args.aggregator.global_mean();
    let with_test = round.is_multiple_of(cfg.eval_every) || round == cfg.num_rounds;
    let eval = match args
        .evaluator
        .call(
            |reply| EvalMsg::Evaluate {
                z: z.clone(),
                with_test,
                from: "server",
                stamp: profile::stamp(),
                reply,
            },
            None,
        )
        .await
    {
        Ok(CallResult::Success(r)) => r?,
        _ => return Err("the evaluator did not answer".into()),
    };
    BestOnDev::offer(&mut state.best_dev, eval.dev_acc, eval.dev_loss, round, &z);
    let clients_sampled = if sampled.len() < cfg.num_users {
        sampled.iter().map(|&i| site(i)).collect()
    } else {
        Vec::new()
    };
    Ok(RoundRecord {
        round,
        test_acc: eval.test_acc,
        dev_acc: eval.dev_acc,
        dev_loss: eval.dev_loss,
        train_loss,
        sigma: args.aggregator.sigma(),
        clients_ok: updates.len(),
        clients_sampled,
        clients_killed: killed,
        clients_restarted: restarted,
        clients_late,
        clients_excluded: excluded,
        aggregated,
        retries,
        bytes_up,
        bytes_down,
        wall_s: args.started.elapsed().as_secs_f64(),
    })
}
