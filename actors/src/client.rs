//! A client: a local CMA-ES over z on its own shard, started each round from the server's
//! search distribution. It never owns a model: every forward goes through the pool. With
//! `traffic = "replay"` it derives that distribution from its replica of the server's strategy
//! ([`crate::replay::client`]) and uploads its search's rankings.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fedbpt::config::{Config, Traffic};
use fedbpt::data::Example;
use fedbpt::local_search::{Objective, Scored};
use fedbpt::models::{Prepared, TokenNoise};
use fedbpt::projection::Projection;
use fedbpt::protocol::{ClientUpdate, SearchDistribution};
use fedbpt::replay::{RecordedSearch, ReplayContext, Upload};
use fedbpt::seeds::{derive, tag};
use fedbpt::strategy::ServerFitness;
use ractor::{Actor, ActorProcessingErr, ActorRef};

use crate::messages::{now_ms, wire_size, ClientFault, ClientMsg, DataMsg};
use crate::pool::ForwardPool;
use crate::profile::{self, MessageInfo};
use crate::replay::client::{new_replica, start_round, ClientReplica, Start};
use crate::replay::{Answer, ReplayReply, ReplayRequest, ReplayTrain};
use crate::wire::{Train, TrainReply, TrainRequest};

pub struct Client;

#[derive(Clone)]
pub struct ClientArgs {
    pub id: usize,
    pub cfg: Arc<Config>,
    pub pool: ForwardPool,
    pub data: ActorRef<DataMsg>,
    pub projection: Arc<Projection>,
    /// Loss and metric of the task, scored as the reference does (Eq. 7 when perturbing).
    pub objective: Objective,
    /// Process group to join once started (`fedbpt/site-N` in a client process), so that a
    /// server in another process finds this client, and each restarted incarnation of it.
    pub group: Option<String>,
}

pub struct ClientState {
    args: ClientArgs,
    examples: Arc<Vec<Example>>,
    /// The shard prepared for scoring (for a causal model, the text's key/value cache: tens of
    /// MB). Kept while the client takes part in every round; with client sampling it is
    /// prepared when the client is sampled and dropped after its round, so an idle client holds
    /// only its examples.
    shard: Option<Arc<Prepared>>,
    /// `traffic = "replay"`: its copy of the server's strategy (a restarted client starts a new
    /// one from the configuration and catches up).
    replica: Option<ClientReplica>,
}

/// Whether a client takes part in every round, so that its prepared shard is worth keeping.
fn every_round(cfg: &fedbpt::config::Config) -> bool {
    cfg.clients_per_round == 0 || cfg.clients_per_round >= cfg.num_users
}

impl Actor for Client {
    type Msg = ClientMsg;
    type State = ClientState;
    type Arguments = ClientArgs;

    async fn pre_start(
        &self,
        me: ActorRef<ClientMsg>,
        args: ClientArgs,
    ) -> Result<ClientState, ActorProcessingErr> {
        let id = args.id;
        let examples = match args
            .data
            .call(|reply| DataMsg::Shard { client: id, stamp: profile::stamp(), reply }, None)
            .await?
        {
            ractor::rpc::CallResult::Success(s) => s,
            _ => {
                return Err(format!("site-{}: the data loader did not serve a shard", id + 1).into())
            }
        };
        if examples.is_empty() {
            return Err(format!("site-{}: empty shard", id + 1).into());
        }
        let shard = if every_round(&args.cfg) {
            Some(args.pool.prepare(id, &format!("site-{}", id + 1), examples.clone(), None).await?)
        } else {
            None
        };
        if let Some(group) = &args.group {
            ractor::pg::join(group.clone(), vec![me.get_cell()]);
        }
        let replica = match args.cfg.traffic {
            Traffic::Replay => Some(new_replica(&args.cfg)?),
            Traffic::Distribution => None,
        };
        Ok(ClientState { args, examples, shard, replica })
    }

    async fn handle(
        &self,
        me: ActorRef<ClientMsg>,
        msg: ClientMsg,
        state: &mut ClientState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ClientMsg::Train(TrainRequest::Valid(request), reply) => {
                serve_train(&me, request, reply, state).await
            }
            ClientMsg::Train(TrainRequest::Rejected(why), reply) => {
                let _ = reply.send(TrainReply(Err(rejected(state, "Train", &why))));
            }
            ClientMsg::Replay(ReplayRequest::Valid(request), reply) => {
                serve_replay(&me, request, reply, state).await
            }
            ClientMsg::Replay(ReplayRequest::Rejected(why), reply) => {
                let _ = reply.send(ReplayReply(Err(rejected(state, "Replay", &why))));
            }
        }
        Ok(())
    }
}

/// Logs a request that did not decode, and the reply's reason.
fn rejected(state: &ClientState, message: &str, why: &str) -> String {
    tracing::warn!("site-{}: rejected a {message} request: {why}", state.args.id + 1);
    format!("request rejected: {why}")
}

/// The client's name, and its handling of a round's request in the message trace.
fn open_round(
    state: &ClientState,
    stamp: profile::Stamp,
    message: &'static str,
    round: usize,
    bytes: usize,
) -> (String, profile::Handling) {
    let site = format!("site-{}", state.args.id + 1);
    let span = profile::handling(stamp, || MessageInfo {
        sender: "server".into(),
        receiver: site.clone(),
        message,
        round: Some(round),
        bytes,
    });
    (site, span)
}

/// One round's request: the local search, with the fault the server injected into it.
async fn serve_train(
    me: &ActorRef<ClientMsg>,
    request: Train,
    reply: ractor::RpcReplyPort<TrainReply>,
    state: &mut ClientState,
) {
    let Train { dist, fault, deadline_ms, stamp } = request;
    let (site, _span) = open_round(state, stamp, "Train", dist.round, wire_size(&dist));
    if now_ms() >= deadline_ms {
        // It waited out its round behind an earlier one: nobody awaits the reply.
        drop(reply);
        return;
    }
    // A distribution of another dimension would size the search's matrices by the sender.
    let dim = state.args.cfg.intrinsic_dim;
    let covariance_dim = dist.covariance.as_ref().map_or(dim, |c| c.dim);
    if dist.mean.len() != dim || covariance_dim != dim {
        let why = format!(
            "request rejected: a distribution of dimension {} (covariance {covariance_dim}), \
             intrinsic_dim is {dim}",
            dist.mean.len()
        );
        tracing::warn!("{site}: {why}");
        let _ = reply.send(TrainReply(Err(why)));
        return;
    }
    let r = search_round(me, state, &dist, fault, deadline_ms).await;
    let r = TrainReply(r.map(|(u, _)| (u, profile::stamp())));
    reply_with_fault(reply, r, fault, deadline_ms).await
}

/// One round's request in replay mode: the replica brought up to the round gives the
/// distribution; the reply is the upload, or what the replica needs first.
async fn serve_replay(
    me: &ActorRef<ClientMsg>,
    request: ReplayTrain,
    reply: ractor::RpcReplyPort<ReplayReply>,
    state: &mut ClientState,
) {
    let ReplayTrain { download, fault, deadline_ms, stamp } = request;
    let (site, _span) = open_round(state, stamp, "Replay", download.round, download.bytes());
    if now_ms() >= deadline_ms {
        drop(reply);
        return;
    }
    let Some(replica) = state.replica.as_mut() else {
        let why = "request rejected: this client runs traffic = \"distribution\"".to_string();
        let _ = reply.send(ReplayReply(Err(why)));
        return;
    };
    let corrupt = fault == Some(ClientFault::CorruptReplica);
    let dist = match start_round(replica, &download, corrupt) {
        Ok(Start::Search(dist)) => dist,
        Ok(Start::Ask(answer)) => {
            if let Answer::Diverged { why } = &answer {
                tracing::warn!("{site}: replica out of sync ({why}): asking for the state");
            }
            let _ = reply.send(ReplayReply(Ok((answer, profile::stamp()))));
            return;
        }
        Err(why) => {
            tracing::warn!("{site}: download refused: {why}");
            let _ = reply.send(ReplayReply(Err(format!("download refused: {why}"))));
            return;
        }
    };
    let r = search_round(me, state, &dist, fault, deadline_ms).await;
    let r = r.and_then(|(_, upload)| upload.encode().map_err(|e| e.to_string()));
    let r = ReplayReply(r.map(|bytes| (Answer::Upload(bytes), profile::stamp())));
    reply_with_fault(reply, r, fault, deadline_ms).await
}

/// The local search of a round with the fault the server injected into it: the update the
/// distribution mode sends and the upload the replay mode sends.
async fn search_round(
    me: &ActorRef<ClientMsg>,
    state: &mut ClientState,
    dist: &SearchDistribution,
    fault: Option<ClientFault>,
    deadline_ms: u64,
) -> Result<(ClientUpdate, Upload), String> {
    if fault == Some(ClientFault::Panic) {
        panic!("injected fault: panic in site-{}, round {}", state.args.id + 1, dist.round);
    }
    let die_at =
        (fault == Some(ClientFault::DieMidSearch)).then_some(state.args.cfg.local_iter / 2);
    let r = train(state, dist, die_at, deadline_ms, me).await;
    if !every_round(&state.args.cfg) {
        state.shard = None;
    }
    r
}

/// Sends a round's reply, unless the fault drops or holds it back.
async fn reply_with_fault<R: ractor::Message>(
    reply: ractor::RpcReplyPort<R>,
    r: R,
    fault: Option<ClientFault>,
    deadline_ms: u64,
) {
    match fault {
        Some(ClientFault::DropReply) => drop(reply),
        Some(ClientFault::Delay(d)) => {
            // Held back, but not for long past the round's deadline (by then the server has
            // marked it late): a straggler's next round must not wait behind this one.
            let left = Duration::from_millis(deadline_ms.saturating_sub(now_ms()));
            let grace = Duration::from_millis(100);
            tokio::time::sleep(d.min(left + grace)).await;
            if d < left {
                let _ = reply.send(r);
            }
        }
        _ => {
            let _ = reply.send(r);
        }
    }
}

async fn train(
    state: &mut ClientState,
    dist: &SearchDistribution,
    die_at: Option<usize>,
    deadline_ms: u64,
    me: &ActorRef<ClientMsg>,
) -> Result<(ClientUpdate, Upload), String> {
    let site = format!("site-{}", state.args.id + 1);
    let shard = match &state.shard {
        Some(shard) => shard.clone(),
        None => {
            let (pool, id) = (&state.args.pool, state.args.id);
            let shard = pool.prepare(id, &site, state.examples.clone(), None).await?;
            state.shard = Some(shard.clone());
            shard
        }
    };
    let state = &*state;
    let a = &state.args;
    let cfg = &a.cfg;
    let round = dist.round as u64;
    // Seeded as the replay derives it (`ReplayContext::search_seed`), recording its rankings.
    let mut search = RecordedSearch::start(&ReplayContext::from_config(cfg), dist, a.id)
        .map_err(|e| e.to_string())?;
    // FedBPT's perturbation: a noisy copy of the shard, fresh each round.
    let perturbed = if cfg.perturb {
        let noise = TokenNoise {
            rate: cfg.perturb_rate,
            seed: derive(cfg.seed, &[tag::PERTURBATION, a.id as u64, round]),
        };
        Some(a.pool.prepare(a.id, &site, state.examples.clone(), Some(noise)).await?)
    } else {
        None
    };
    let score = |prompts: Vec<Vec<f32>>| {
        let (shard, perturbed, site) = (shard.clone(), perturbed.clone(), site.clone());
        async move {
            let real = a.pool.score(a.id, &site, shard.clone(), prompts.clone()).await?;
            let noisy = match &perturbed {
                Some(p) => Some(a.pool.score(a.id, &site, p.clone(), prompts).await?),
                None => None,
            };
            real.iter()
                .enumerate()
                .map(|(k, s)| {
                    let p = match (&noisy, &perturbed) {
                        (Some(n), Some(b)) => Some((n[k].as_slice(), b.labels.as_slice())),
                        _ => None,
                    };
                    a.objective.score(s, &shard.labels, p).map_err(|e| e.to_string())
                })
                .collect::<Result<Vec<Scored>, String>>()
        }
    };
    // Ranked by improvement, the server needs the received mean's fitness on this shard.
    let start_fitness = if cfg.server_fitness == ServerFitness::Improvement {
        let prompt = a.projection.project(&dist.mean).map_err(|e| e.to_string())?;
        Some(score(vec![prompt]).await?[0].fitness)
    } else {
        None
    };
    loop {
        // CMA-ES's own work (ask, project; tell below) is timed apart from the forwards.
        let cma = Instant::now();
        let Some(candidates) = search.ask() else { break };
        if now_ms() >= deadline_ms {
            // A forward in flight cannot be interrupted, but the next one need not start.
            return Err(format!(
                "round {}: deadline passed after {} of {} local iterations",
                dist.round,
                search.search().iteration() - 1,
                cfg.local_iter
            ));
        }
        if die_at == Some(search.search().iteration() - 1) {
            // Killed mid-search: the runtime drops this handler at its next await point.
            me.kill();
            std::future::pending::<()>().await;
        }
        let prompts = candidates
            .iter()
            .map(|z| a.projection.project(&z.iter().map(|&v| v as f32).collect::<Vec<_>>()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        profile::phase(&site, "local CMA-ES", cma);
        let fitness: Vec<f64> = score(prompts).await?.iter().map(|s| s.fitness).collect();
        let cma = Instant::now();
        search.tell(&fitness).map_err(|e| e.to_string())?;
        profile::phase(&site, "local CMA-ES", cma);
    }
    // The upload's fitness is the final mean's, scored as every candidate was (Eq. 7 when
    // perturbing), so the server ranks clients by what their searches minimized.
    let prompt = a.projection.project(&search.search().mean()).map_err(|e| e.to_string())?;
    let final_score = score(vec![prompt]).await?[0];
    search
        .finish(final_score, start_fitness, class_counts(&state.examples))
        .map_err(|e| e.to_string())
}

/// Examples of each class in a shard, up to its largest label (the server pads to the task's
/// classes).
fn class_counts(examples: &[Example]) -> Vec<u32> {
    let mut counts = vec![0u32; examples.iter().map(|e| e.label + 1).max().unwrap_or(0)];
    for e in examples {
        counts[e.label] += 1;
    }
    counts
}
