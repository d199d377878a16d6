//! One round of the federation, in the order the server runs it:
//!
//! 1. the roster: the clients that are up once pending restarts finished, and who restarted;
//! 2. this round's faults ([`crate::fault_plan`]) and the kills before the round;
//! 3. the sampled clients and the search distribution they start from;
//! 4. attempts: send the distribution, gather the replies before the deadline, and let the
//!    round's rule ([`QuorumRule`]) decide to aggregate, retry (with a fresh roster: restarted
//!    clients have new handles) or skip;
//! 5. the aggregation, the evaluation of the global mean, best-on-dev, and the round's record.
//!
//! With `traffic = "replay"` the attempts exchange digests and uploads instead
//! ([`crate::replay::server`]), and the round's digest is logged after the aggregation.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use fedbpt::config::Config;
use fedbpt::objective::BestOnDev;
use fedbpt::protocol::{ClientUpdate, SearchDistribution};
use fedbpt::replay::Upload;
use fedbpt::strategy::{check_update, sample_clients, QuorumRule, RoundDecision, Told};
use ractor::rpc::CallResult;
use ractor::ActorRef;
use serde::{Deserialize, Serialize};

pub(crate) use crate::exchange::{Exchanged, Outcome, Received};
use crate::fault_plan::{plan_faults, RoundFaults};
use crate::messages::{
    now_ms, wire_size, ClientFault, ClientMsg, EvalMsg, Evaluation, Roster, SupervisorMsg,
};
use crate::profile::{self, MessageInfo};
use crate::replay::server::{exchange, ReplayServer};
use crate::server_strategy::ServerStrategy;
use crate::wire::{Train, TrainReply, TrainRequest};

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
    /// Restarted by the supervisor since the previous round's clients finished (during that
    /// round's end, before this round, or before one of its retries).
    pub clients_restarted: Vec<String>,
    /// No reply before the deadline.
    pub clients_late: Vec<String>,
    /// Not aggregated this round, with why (`site-N: reason`).
    pub clients_excluded: Vec<String>,
    /// `traffic = "replay"`: clients whose replica diverged and got the server's state.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clients_resynced: Vec<String>,
    /// Whether the round had its quorum (`min_clients`) and was aggregated.
    pub aggregated: bool,
    /// Extra attempts of this round under `quorum_policy = "retry"`.
    pub retries: usize,
    pub bytes_up: usize,
    pub bytes_down: usize,
    pub wall_s: f64,
    /// The aggregated clients, by client: their shard's classes, rank, weight and fitness.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clients: Vec<ClientDiagnostics>,
    /// The global model's dev predictions: rows the true class, columns the predicted one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dev_confusion: Vec<Vec<usize>>,
}

/// One aggregated client in a round's record.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ClientDiagnostics {
    pub client: String,
    /// Examples of each class in its shard.
    pub class_counts: Vec<u32>,
    /// Its place in the server's ranking, 1 for the best.
    pub rank: usize,
    /// Its weight in the server's update (a round's weights sum to 1).
    pub weight: f64,
    /// The fitness it reported.
    pub fitness: f64,
    /// What the server ranked it by, where that is not its fitness (`server_fitness`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ranked_by: Option<f64>,
}

/// The record of each told client, its class counts padded to the task's `n_classes`.
fn diagnostics(
    told: &[Told],
    updates: &[ClientUpdate],
    n_classes: usize,
) -> Vec<ClientDiagnostics> {
    told.iter()
        .filter_map(|t| {
            let u = updates.iter().find(|u| u.client == t.client)?;
            let mut class_counts = u.class_counts.clone();
            if class_counts.len() < n_classes {
                class_counts.resize(n_classes, 0);
            }
            Some(ClientDiagnostics {
                client: site(t.client),
                class_counts,
                rank: t.rank,
                weight: t.weight,
                fitness: u.fitness,
                ranked_by: (t.ranked_by != u.fitness).then_some(t.ranked_by),
            })
        })
        .collect()
}

impl RoundRecord {
    /// Whether the record's values are in their ranges (accuracies in [0, 1], losses, sigma and
    /// times finite and not negative): a restored or re-read record that is not is refused.
    pub fn check(&self) -> Result<(), String> {
        let in_unit = |name: &str, v: f64| {
            if (0.0..=1.0).contains(&v) {
                Ok(())
            } else {
                Err(format!("round {}: {name} {v} is not in [0, 1]", self.round))
            }
        };
        let non_negative = |name: &str, v: f64| {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                Err(format!("round {}: {name} {v} is not a finite non-negative number", self.round))
            }
        };
        in_unit("dev_acc", self.dev_acc)?;
        if let Some(t) = self.test_acc {
            in_unit("test_acc", t)?;
        }
        non_negative("dev_loss", self.dev_loss)?;
        if let Some(l) = self.train_loss {
            non_negative("train_loss", l)?;
        }
        non_negative("sigma", self.sigma)?;
        for c in &self.clients {
            in_unit(&format!("{}'s weight", c.client), c.weight)?;
        }
        non_negative("wall_s", self.wall_s)
    }
}

/// What a round reads and changes of the server's state.
pub struct RoundContext<'a> {
    pub cfg: &'a Config,
    pub strategy: &'a mut ServerStrategy,
    pub supervisor: &'a ActorRef<SupervisorMsg>,
    pub evaluator: &'a ActorRef<EvalMsg>,
    pub started: Instant,
    pub best_dev: &'a mut Option<BestOnDev>,
    /// How long the roster may take to answer: the round's deadline for the local supervisor;
    /// a remote roster waits for client processes itself (`[cluster]`), longer.
    pub roster_patience: Duration,
    /// Clients restarted during the previous round, as the roster said at its end: recorded in
    /// this round's `clients_restarted`, and kept in the checkpoint so that a resumed run
    /// records them too.
    pub restarted_before: &'a mut Vec<usize>,
}

pub(crate) fn site(i: usize) -> String {
    format!("site-{}", i + 1)
}

/// Runs `round` to its record.
pub async fn run_round(ctx: &mut RoundContext<'_>, round: usize) -> Result<RoundRecord, String> {
    let cfg = ctx.cfg;
    let deadline = Duration::from_secs_f64(cfg.runtime.round_timeout_s);
    let patience = ctx.roster_patience;
    // 1. The clients that are up.
    let mut roster = settled_roster(ctx.supervisor, patience).await?;
    note_restarts(ctx.strategy, &roster);
    // Rounds without a single client would only record nothing, and overwrite a finished run.
    if roster.clients.iter().all(Option::is_none) {
        return Err("no client is up: none connected (across processes, within \
                    cluster.join_timeout_s or rejoin_wait_s), or all past their restart limit"
            .into());
    }
    // Restarted since the previous round: during it (its closing roster), and since.
    let mut restarted = std::mem::take(ctx.restarted_before);
    restarted.extend(&roster.restarted);
    // 2. Faults, and the kills before the round.
    let faults = plan_faults(cfg, round);
    let mut killed = kill_before(&roster, &faults).await;
    // 3. Who takes part, from where.
    let sampled = sample_clients(cfg.seed, round, cfg.num_users, cfg.clients_per_round);
    let global = Instant::now();
    let dist = ctx.strategy.aggregator().configure(round);
    profile::phase("server", "global CMA-ES", global);
    // Clients that will kill themselves mid-search are counted as killed this round.
    for (&i, fault) in &faults.inside {
        let takes_part = sampled.binary_search(&i).is_ok()
            && roster.clients.get(i).is_some_and(Option::is_some)
            && !faults.kill_before.contains(&i);
        if *fault == ClientFault::DieMidSearch && takes_part {
            killed.push(site(i));
        }
    }
    killed.sort();
    // 4. Attempts until the rule decides.
    let rule = QuorumRule {
        min_clients: cfg.min_clients,
        policy: cfg.faults.quorum_policy,
        max_retries: cfg.faults.max_round_retries,
    };
    let mut retries = 0;
    let (attempt, decision) = loop {
        // A retried round runs without the injected faults: they were this round's events.
        let first = retries == 0;
        let (participants, excluded) = participants(&roster, &sampled, &faults, first);
        let faults_now = if first { Some(&faults) } else { None };
        let replay = ctx.strategy.replay();
        let attempt = gather(&participants, &dist, faults_now, deadline, excluded, replay).await;
        match rule.decide(attempt.updates.len(), retries) {
            RoundDecision::Retry => {
                retries += 1;
                roster = settled_roster(ctx.supervisor, patience).await?;
                note_restarts(ctx.strategy, &roster);
                restarted.extend(&roster.restarted);
            }
            decision => break (attempt, decision),
        }
    };
    // 5. Aggregate, evaluate, record.
    let aggregated = decision == RoundDecision::Aggregate;
    let mut told = Vec::new();
    if aggregated {
        let global = Instant::now();
        let aggregator = ctx.strategy.aggregator_mut();
        told = aggregator.aggregate(round, &attempt.updates).map_err(|e| e.to_string())?;
        profile::phase("server", "global CMA-ES", global);
    }
    if let Some(book) = ctx.strategy.replay_mut() {
        let told = if aggregated { attempt.uploads.as_slice() } else { &[] };
        let uploaded: Vec<usize> = attempt.updates.iter().map(|u| u.client).collect();
        book.close_round(round, told, &uploaded)?;
    }
    let z = ctx.strategy.aggregator().global_mean();
    // Restarts of this round's clients, once they finished: for the next round's record, and
    // the checkpoint (a run resumed from it records them as the uninterrupted run does).
    if round < cfg.num_rounds {
        if let Ok(r) = settled_roster(ctx.supervisor, patience).await {
            note_restarts(ctx.strategy, &r);
            *ctx.restarted_before = r.restarted;
        }
    }
    let with_test = round.is_multiple_of(cfg.eval_every) || round == cfg.num_rounds;
    let eval = evaluate(ctx.evaluator, &z, with_test).await?;
    BestOnDev::offer(ctx.best_dev, eval.dev_acc, eval.dev_loss, round, &z);
    let updates = attempt.updates;
    let train_loss = (!updates.is_empty())
        .then(|| updates.iter().map(|u| u.loss).sum::<f64>() / updates.len() as f64);
    let clients_sampled = if sampled.len() < cfg.num_users {
        sampled.iter().map(|&i| site(i)).collect()
    } else {
        Vec::new()
    };
    restarted.sort_unstable();
    restarted.dedup();
    Ok(RoundRecord {
        round,
        test_acc: eval.test_acc,
        dev_acc: eval.dev_acc,
        dev_loss: eval.dev_loss,
        train_loss,
        sigma: ctx.strategy.aggregator().sigma(),
        clients_ok: updates.len(),
        clients_sampled,
        clients_killed: killed,
        clients_restarted: restarted.into_iter().map(site).collect(),
        clients_late: attempt.late.iter().map(|&i| site(i)).collect(),
        clients_excluded: attempt.excluded,
        clients_resynced: attempt.resynced.iter().map(|&i| site(i)).collect(),
        aggregated,
        retries,
        bytes_up: attempt.bytes_up,
        bytes_down: attempt.bytes_down,
        wall_s: ctx.started.elapsed().as_secs_f64(),
        clients: diagnostics(&told, &updates, eval.dev_confusion.len()),
        dev_confusion: eval.dev_confusion,
    })
}

/// A restarted client's replica starts over from the configuration.
fn note_restarts(strategy: &mut ServerStrategy, roster: &Roster) {
    if let Some(book) = strategy.replay_mut() {
        book.restarted(&roster.restarted);
    }
}

/// The roster as it stands (restarts still pending are not waited for).
async fn roster_now(
    supervisor: &ActorRef<SupervisorMsg>,
    timeout: Duration,
) -> Result<CallResult<Roster>, ractor::MessagingErr<SupervisorMsg>> {
    supervisor
        .call(
            move |reply| SupervisorMsg::Roster { wait: false, stamp: profile::stamp(), reply },
            Some(timeout),
        )
        .await
}

/// The roster once restarts finished (at most `timeout`; then the roster as it stands).
async fn settled_roster(
    supervisor: &ActorRef<SupervisorMsg>,
    timeout: Duration,
) -> Result<Roster, String> {
    let settled = supervisor.call(
        move |reply| SupervisorMsg::Roster { wait: true, stamp: profile::stamp(), reply },
        Some(timeout),
    );
    match settled.await {
        Ok(CallResult::Success(r)) => Ok(r),
        Ok(CallResult::Timeout) => match roster_now(supervisor, timeout).await {
            Ok(CallResult::Success(r)) => Ok(r),
            _ => Err("the client supervisor did not answer".into()),
        },
        _ => Err("the client supervisor is gone".into()),
    }
}

/// Kills the clients the plan kills before the round; returns their names.
async fn kill_before(roster: &Roster, faults: &RoundFaults) -> Vec<String> {
    let mut killed = Vec::new();
    for &i in &faults.kill_before {
        if let Some(Some(a)) = roster.clients.get(i) {
            let _ = a.get_cell().kill_and_wait(Some(Duration::from_secs(10))).await;
            killed.push(site(i));
        }
    }
    killed
}

/// The sampled clients this attempt contacts, and the reasons the others are left out. The
/// first attempt leaves out the clients killed before it; a retry contacts them (restarted).
fn participants(
    roster: &Roster,
    sampled: &[usize],
    faults: &RoundFaults,
    first: bool,
) -> (Vec<(usize, ActorRef<ClientMsg>)>, Vec<String>) {
    let mut contacted = Vec::new();
    let mut excluded = Vec::new();
    for &i in sampled {
        match roster.clients.get(i) {
            _ if first && faults.kill_before.contains(&i) => {
                excluded.push(format!("{}: killed before the round", site(i)))
            }
            Some(Some(a)) => contacted.push((i, a.clone())),
            _ => excluded
                .push(format!("{}: down (restart limit reached, or not connected)", site(i))),
        }
    }
    (contacted, excluded)
}

/// The replies of one attempt.
struct Attempt {
    /// In increasing client order.
    updates: Vec<ClientUpdate>,
    /// `traffic = "replay"`: the uploads of `updates`, in the same order.
    uploads: Vec<Upload>,
    /// No reply within the deadline, in increasing order.
    late: Vec<usize>,
    /// Left out or failed, with why, sorted.
    excluded: Vec<String>,
    /// Replicas that diverged and got the state, in increasing order.
    resynced: Vec<usize>,
    /// Payload bytes of the accepted replies, and of everything sent.
    bytes_up: usize,
    bytes_down: usize,
}

/// A client's round in distribution mode: the distribution down, the update up.
async fn ship(
    client: ActorRef<ClientMsg>,
    dist: SearchDistribution,
    fault: Option<ClientFault>,
    deadline_ms: u64,
    deadline: Duration,
) -> Exchanged {
    let bytes_down = wire_size(&dist);
    let request = Train { dist, fault, deadline_ms, stamp: profile::stamp() };
    let outcome = match client
        .call(|reply| ClientMsg::Train(TrainRequest::Valid(request), reply), Some(deadline))
        .await
    {
        Ok(CallResult::Success(TrainReply(Ok((update, stamp))))) => {
            let bytes_up = wire_size(&update);
            Outcome::Ok(Box::new(Received { update, upload: None, bytes_up }), stamp)
        }
        Ok(CallResult::Success(TrainReply(Err(e)))) => Outcome::Failed(e),
        Ok(CallResult::Timeout) => Outcome::Late,
        Ok(CallResult::SenderError) => Outcome::Failed("stopped or dropped its reply".into()),
        Err(e) => Outcome::Failed(format!("unreachable: {e}")),
    };
    Exchanged { outcome, bytes_down, resynced: false }
}

/// Sends `dist` (or, replaying, what each replica misses) to every participant and gathers
/// what comes back before `deadline`.
async fn gather(
    participants: &[(usize, ActorRef<ClientMsg>)],
    dist: &SearchDistribution,
    faults: Option<&RoundFaults>,
    deadline: Duration,
    mut excluded: Vec<String>,
    replay: Option<&ReplayServer>,
) -> Attempt {
    let round = dist.round;
    let dim = dist.mean.len();
    let deadline_ms = now_ms().saturating_add(deadline.as_millis() as u64);
    let shared = replay.map(|book| book.round(dist));
    let mut tasks = tokio::task::JoinSet::new();
    for (i, client) in participants {
        let (i, client) = (*i, client.clone());
        let fault = faults.and_then(|f| f.inside(i));
        match (&shared, replay) {
            (Some(shared), Some(book)) => match shared.download(book.known(i)) {
                Ok(first) => {
                    let shared = shared.clone();
                    tasks.spawn(async move {
                        (i, exchange((i, client), shared, first, fault, deadline_ms).await)
                    });
                }
                Err(why) => excluded.push(format!("{}: no download: {why}", site(i))),
            },
            _ => {
                let dist = dist.clone();
                tasks.spawn(
                    async move { (i, ship(client, dist, fault, deadline_ms, deadline).await) },
                );
            }
        }
    }
    let mut received: Vec<Received> = Vec::new();
    let mut late = BTreeSet::new();
    let (mut bytes_down, mut resynced) = (0, Vec::new());
    while let Some(joined) = tasks.join_next().await {
        let (i, outcome) = match joined {
            Ok((i, ex)) => {
                bytes_down += ex.bytes_down;
                if ex.resynced {
                    resynced.push(i);
                }
                (i, ex.outcome)
            }
            Err(e) => {
                excluded.push(format!("a reply task failed: {e}"));
                continue;
            }
        };
        match outcome {
            // A reply that names another client, or that does not fit the round, is left out with
            // why: a peer process must not be able to end the run.
            Outcome::Ok(r, _) if r.update.client != i => excluded.push(format!(
                "{}: reply claims to be from client {}, left out",
                site(i),
                r.update.client
            )),
            Outcome::Ok(r, stamp) if r.update.round == round => {
                if let Err(e) = check_update(dim, round, &r.update) {
                    excluded.push(format!("{}: {e}", site(i)));
                    continue;
                }
                let message = if r.upload.is_some() { "Upload" } else { "ClientUpdate" };
                let (sender, bytes) = (site(i), r.bytes_up);
                let info = MessageInfo {
                    sender,
                    receiver: "server".into(),
                    message,
                    round: Some(round),
                    bytes,
                };
                profile::received(stamp, info);
                received.push(*r)
            }
            Outcome::Ok(r, _) => {
                excluded.push(format!("{}: reply for round {} discarded", site(i), r.update.round))
            }
            Outcome::Late => {
                late.insert(i);
            }
            Outcome::Failed(e) => excluded.push(format!("{}: {e}", site(i))),
        }
    }
    // Arrival order varies; the record must not.
    received.sort_by_key(|r| r.update.client);
    resynced.sort();
    excluded.extend(
        late.iter()
            .map(|&i| format!("{}: no reply within {:.0} s", site(i), deadline.as_secs_f64())),
    );
    excluded.sort();
    let bytes_up = received.iter().map(|r| r.bytes_up).sum();
    let (updates, uploads) =
        received.into_iter().map(|r| (r.update, r.upload)).unzip::<_, _, Vec<_>, Vec<_>>();
    Attempt {
        updates,
        uploads: uploads.into_iter().flatten().collect(),
        late: late.into_iter().collect(),
        excluded,
        resynced,
        bytes_up,
        bytes_down,
    }
}

/// Dev metrics (and test, when asked) of the global mean.
async fn evaluate(
    evaluator: &ActorRef<EvalMsg>,
    z: &[f32],
    with_test: bool,
) -> Result<Evaluation, String> {
    let z = z.to_vec();
    match evaluator
        .call(
            |reply| EvalMsg::Evaluate {
                z,
                with_test,
                from: "server",
                stamp: profile::stamp(),
                reply,
            },
            None,
        )
        .await
    {
        Ok(CallResult::Success(r)) => r,
        _ => Err("the evaluator did not answer".into()),
    }
}
