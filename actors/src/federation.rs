//! A simulated federation in one process: loads the model once per device, spawns the data
//! loader, the forward-worker pool, the evaluator, `num_users` clients and the server, runs the
//! rounds, and collects the per-round records and the summary.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use fedbpt::bbt::projection_for;
use fedbpt::config::{client_index, Aggregation, Config};
use fedbpt::data::{Dataset, Example};
use fedbpt::experiment;
use fedbpt::local_search::Objective;
use fedbpt::models::linear::LinearFormat;
use fedbpt::models::{Prepared, PromptModel};
use fedbpt::objective::{BestOnDev, Metric};
use fedbpt::task::TaskSpec;
use ractor::rpc::CallResult;
use ractor::{Actor, ActorCell, ActorRef};
use serde::{Deserialize, Serialize};

use crate::client::ClientArgs;
use crate::data_loader::{DataLoader, DataState};
use crate::evaluator::{EvalArgs, Evaluator};
use crate::messages::{DataMsg, EvalMsg, ServerMsg, SupervisorMsg};
use crate::pool::ForwardPool;
use crate::profile;
use crate::server::{Checkpoint, RoundRecord, Server, ServerArgs, ServerEvent, ServerStrategy};
use crate::supervisor::{stop_and_wait, ClientSupervisor, SupervisorArgs};

/// `summary.json` of a federated run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FedSummary {
    /// The layout and method version ([`crate::server::CHECKPOINT_FORMAT`]): a finished run is
    /// reused (by `compare`, `bench-faults`) only if it was made by this version.
    #[serde(default)]
    pub format: u32,
    pub model: String,
    pub task: String,
    pub aggregation: Aggregation,
    pub iid: bool,
    pub seed: u64,
    /// What every `_acc` field measures: the task's metric (accuracy, or F1 for MRPC).
    pub metric: Metric,
    /// The template alone: no soft prompt, no placeholders (the paper's "manual prompt").
    pub zero_shot_test_acc: f64,
    /// Placeholders present, z = 0 (the starting point, round 0), on the test and dev sets.
    pub zero_prompt_test_acc: f64,
    pub zero_prompt_dev_acc: f64,
    pub final_test_acc: f64,
    pub best_dev_test_acc: f64,
    pub best_dev_acc: f64,
    pub best_dev_round: usize,
    pub rounds: usize,
    pub clients: usize,
    pub train_examples: usize,
    pub test_examples: usize,
    pub total_bytes_up: usize,
    pub total_bytes_down: usize,
    /// Mean bytes one client uploads / downloads per round.
    pub bytes_up_per_client_round: f64,
    pub bytes_down_per_client_round: f64,
    /// What FedAvg of the full model would move per client and round, each way (parameters x 4).
    pub fedavg_full_model_bytes_per_client_round: usize,
    /// Scoring requests the forward workers served, and the forwards that served them (fewer
    /// when workers merged several clients' requests).
    pub score_requests: usize,
    pub score_forwards: usize,
    /// Batches this process's forward workers prepared: shards (prepared when a client is
    /// sampled, unless every client takes part in every round), perturbed copies, the
    /// evaluator's sets.
    #[serde(default)]
    pub prepare_requests: usize,
    pub wall_s: f64,
    /// Part of `wall_s` spent preparing the test set and scoring its baselines; 0 when an earlier
    /// run in this process did it (`compare` and `bench-faults` run many).
    #[serde(default)]
    pub test_setup_s: f64,
    /// How each device's linear layers ran: `f32`, `quantized` or `bf16-<kernel>` (the kernel
    /// `weights = "auto"` or `"bf16"` chose, or `FEDBPT_KERNEL` forced).
    #[serde(default)]
    pub linear_layers: Vec<String>,
    /// [`fedbpt::data::Dataset::fingerprint`] of the corpus the run drew its data from.
    #[serde(default)]
    pub data_fingerprint: String,
    pub config: Config,
}

/// The fixed test set, prepared, with its manual-prompt and z = 0 accuracies.
type PreparedTest = (Arc<Vec<Example>>, Arc<Prepared>, (f64, f64));

/// Things that outlive one run in a process (the `compare` command runs many): the model
/// replicas, the corpus, the prepared test set and its baselines.
pub struct Env {
    pub replicas: Vec<Arc<dyn PromptModel>>,
    /// What each replica's linear layers were built as.
    pub formats: Vec<LinearFormat>,
    /// [`fedbpt::data::Dataset::fingerprint`] of `dataset`.
    pub data_fingerprint: String,
    pub task: Arc<TaskSpec>,
    pub dataset: Dataset,
    test: Option<PreparedTest>,
}

impl Env {
    /// Loads the configured model on every configured device and the corpus.
    pub fn load(cfg: &Config, progress: &mut dyn FnMut(&str)) -> Result<Env> {
        let (mut replicas, mut formats) = (Vec::new(), Vec::new());
        for name in &cfg.runtime.devices {
            let device = experiment::device(name)?;
            let format = cfg.weights.resolve(&device)?;
            replicas.push(experiment::load_model_as(cfg, format, &device, progress)?);
            formats.push(format);
        }
        let dataset = experiment::load_dataset(cfg, progress)?;
        for w in &dataset.warnings {
            progress(&format!("data warning: {w}"));
        }
        if let Some(w) = experiment::test_size_for(cfg, dataset.examples.len())?.1 {
            progress(&format!("warning: {w}"));
        }
        let task = cfg.task_spec()?;
        if task.n_classes() != dataset.label_names.len() {
            bail!(
                "task `{}` has {} classes but the data has {} ({:?})",
                task.name,
                task.n_classes(),
                dataset.label_names.len(),
                dataset.label_names
            );
        }
        let data_fingerprint = dataset.fingerprint();
        Ok(Env { replicas, formats, data_fingerprint, task: Arc::new(task), dataset, test: None })
    }
}

/// The training pool split across clients, the dev set, and the fixed test set.
struct Data {
    shards: Vec<Arc<Vec<Example>>>,
    dev: Arc<Vec<Example>>,
    test: Arc<Vec<Example>>,
}

/// The library's federated split ([`experiment::federated_split`]), shared as the actors hold
/// it.
fn partition(cfg: &Config, ds: &Dataset) -> Result<Data> {
    let split = experiment::federated_split(cfg, ds)?;
    Ok(Data {
        shards: split.shards.into_iter().map(Arc::new).collect(),
        dev: Arc::new(split.dev),
        test: Arc::new(split.test),
    })
}

/// The CMA-ES matrices of a round (each running search holds a `d x d` covariance and
/// eigenbasis, and its `set_covariance` a copy; the server a few more) must fit the machine.
fn check_search_memory(cfg: &Config) -> Result<()> {
    let d = cfg.intrinsic_dim as u64;
    let per_round = if cfg.clients_per_round > 0 { cfg.clients_per_round } else { cfg.num_users };
    let matrices = 3 * per_round as u64 + 4;
    let bytes = d.checked_mul(d).and_then(|n| n.checked_mul(8 * matrices));
    let what =
        format!("{matrices} CMA-ES matrices of {d} x {d} f64 ({per_round} searches per round)");
    Ok(fedbpt::machine::check_fits("intrinsic_dim", &what, bytes)?)
}

/// Who keeps a run's clients.
#[derive(Default)]
pub enum Clients {
    /// Actors of this process, under the client supervisor.
    #[default]
    Local,
    /// Other processes' ([`crate::cluster`]), reached through this roster.
    Remote(ActorRef<SupervisorMsg>),
}

/// Durability of a run (where the server checkpoints, and a checkpoint to continue from) and
/// where its clients live.
#[derive(Default)]
pub struct RunOptions {
    pub checkpoint_dir: Option<PathBuf>,
    pub resume: Option<Checkpoint>,
    pub clients: Clients,
}

/// Runs one federation to the end. `on_round` sees every round's record as it lands (with a
/// resumed run, the checkpoint's records first).
pub async fn run(
    cfg: &Config,
    env: &mut Env,
    opts: RunOptions,
    on_round: &mut dyn FnMut(&RoundRecord),
) -> Result<(FedSummary, Vec<RoundRecord>)> {
    let started = Instant::now();
    let cfg = Arc::new(cfg.clone());
    check_search_memory(&cfg)?;
    if let Some(recorded) = opts.resume.as_ref().and_then(|cp| cp.data_fingerprint.as_deref()) {
        if recorded != env.data_fingerprint {
            let source = match &cfg.data {
                Some(d) => format!("config key `data.path` ({})", d.path.display()),
                None => format!("the embedded data set `{}`", cfg.task_name),
            };
            bail!(
                "{source} holds other data than the checkpoint's run trained on (fingerprint \
                 {}..., the checkpoint's {}...): continue it on the same data, or start anew",
                &env.data_fingerprint[..12],
                &recorded[..recorded.len().min(12)]
            );
        }
    }
    let data = partition(&cfg, &env.dataset)?;
    let train_examples: usize = data.shards.iter().map(|s| s.len()).sum();
    let pool = spawn_pool(&cfg, env).await?;
    let mut ctx = RunContext { data: &data, pool: &pool, started, spawned: Vec::new() };
    let result = run_with_pool(&cfg, env, &mut ctx, opts, on_round).await;
    // Stopped and waited for, so that nothing of this run outlives it.
    for cell in ctx.spawned.into_iter().rev() {
        stop_and_wait(cell).await;
    }
    pool.stop();
    let (mut summary, records) = result?;
    summary.train_examples = train_examples;
    Ok((summary, records))
}

/// What one run's actors share, and the actors it spawned (stopped when the run ends).
struct RunContext<'a> {
    data: &'a Data,
    pool: &'a ForwardPool,
    started: Instant,
    spawned: Vec<ActorCell>,
}

async fn run_with_pool(
    cfg: &Arc<Config>,
    env: &mut Env,
    ctx: &mut RunContext<'_>,
    opts: RunOptions,
    on_round: &mut dyn FnMut(&RoundRecord),
) -> Result<(FedSummary, Vec<RoundRecord>)> {
    let (pool, started) = (ctx.pool, ctx.started);
    let model = env.replicas.first().ok_or_else(|| anyhow!("no model replica"))?.clone();
    let objective =
        Objective { loss: cfg.loss_type, metric: env.task.metric, balance: cfg.client_loss };
    let projection = Arc::new(projection_for(cfg, model.as_ref())?);
    let data_ref = spawn_data_loader(ctx.data).await?;
    ctx.spawned.push(data_ref.get_cell());
    let eval = start_evaluation(cfg, env, ctx, &data_ref, &projection, objective).await?;

    let deadline = Duration::from_secs_f64(cfg.runtime.round_timeout_s);
    let (supervisor, roster_patience) = match opts.clients {
        Clients::Remote(roster) => {
            let waits = cfg.cluster.join_timeout_s.max(cfg.cluster.rejoin_wait_s);
            (roster, deadline.max(Duration::from_secs_f64(waits + 5.0)))
        }
        Clients::Local => {
            let clients = client_args(cfg, pool, &data_ref, &projection, objective);
            let supervisor = spawn_supervisor(cfg, clients).await?;
            ctx.spawned.push(supervisor.get_cell());
            (supervisor, deadline)
        }
    };

    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let (server, _) = Actor::spawn(
        None,
        Server,
        ServerArgs {
            cfg: cfg.clone(),
            aggregator: ServerStrategy::for_config(cfg)?,
            supervisor,
            evaluator: eval.evaluator.clone(),
            events: tx,
            started,
            initial_dev: Some(BestOnDev {
                metric: eval.initial.dev_acc,
                loss: eval.initial.dev_loss,
                step: 0,
                z: vec![0f32; cfg.intrinsic_dim],
            }),
            checkpoint_dir: opts.checkpoint_dir,
            resume: opts.resume.clone(),
            roster_patience,
            data_fingerprint: env.data_fingerprint.clone(),
        },
    )
    .await?;
    ctx.spawned.push(server.get_cell());
    let (records, finished) =
        drive_rounds(cfg, &server, rx, opts.resume.as_ref(), on_round).await?;
    let summary = summarize(cfg, env, ctx, &eval, &records, finished).await?;
    Ok((summary, records))
}

/// Calls `actor` and waits for its answer; `who` names it in the error when it has none.
async fn ask<M, T>(
    actor: &ActorRef<M>,
    msg: impl FnOnce(ractor::RpcReplyPort<T>) -> M,
    who: &str,
) -> Result<T>
where
    M: ractor::Message,
    T: Send + 'static,
{
    match actor.call(msg, None).await? {
        CallResult::Success(answer) => Ok(answer),
        _ => bail!("the {who} did not answer"),
    }
}

/// The evaluator of a run, with the baselines on the test set and z = 0 on dev.
struct EvalSetup {
    evaluator: ActorRef<EvalMsg>,
    /// The manual prompt's and z = 0's test accuracies.
    baselines: (f64, f64),
    /// z = 0 on dev (round 0).
    initial: crate::messages::Evaluation,
    test_examples: usize,
    /// Time spent preparing the test set and its baselines (0 when `env` had them).
    test_setup_s: f64,
}

/// Prepares the dev and test sets (the test set and its baselines are reused across runs of
/// this process: the test split does not depend on the seed), spawns the evaluator on the
/// device of `eval_clients`, and scores z = 0 on dev.
async fn start_evaluation(
    cfg: &Config,
    env: &mut Env,
    ctx: &mut RunContext<'_>,
    data_ref: &ActorRef<DataMsg>,
    projection: &Arc<fedbpt::projection::Projection>,
    objective: Objective,
) -> Result<EvalSetup> {
    let pool = ctx.pool;
    // Validated by the config.
    let party = client_index(&cfg.eval_clients, cfg.num_users).unwrap_or(0);
    let (dev, test) =
        ask(data_ref, |reply| DataMsg::EvalSets { stamp: profile::stamp(), reply }, "data loader")
            .await?;
    let dev_prepared = pool.prepare(party, "main", dev, None).await.map_err(|e| anyhow!(e))?;
    let test_setup = Instant::now();
    let (test_prepared, cached_baselines) = match &env.test {
        Some((examples, prepared, baselines)) if **examples == *test => {
            (prepared.clone(), Some(*baselines))
        }
        _ => (pool.prepare(party, "main", test.clone(), None).await.map_err(|e| anyhow!(e))?, None),
    };
    let (evaluator, _) = Actor::spawn(
        None,
        Evaluator,
        EvalArgs {
            pool: pool.clone(),
            dev: dev_prepared,
            test: test_prepared.clone(),
            projection: projection.clone(),
            objective,
            party,
        },
    )
    .await?;
    ctx.spawned.push(evaluator.get_cell());
    let baselines = match cached_baselines {
        Some(b) => b,
        None => ask(
            &evaluator,
            |reply| EvalMsg::Baselines { stamp: profile::stamp(), reply },
            "evaluator",
        )
        .await?
        .map_err(|e| anyhow!(e))?,
    };
    let test_setup_s =
        if cached_baselines.is_some() { 0.0 } else { test_setup.elapsed().as_secs_f64() };
    let test_examples = test.len();
    env.test = Some((test, test_prepared, baselines));
    let z0 = vec![0f32; cfg.intrinsic_dim];
    let initial = ask(
        &evaluator,
        |reply| EvalMsg::Evaluate {
            z: z0,
            with_test: false,
            from: "main",
            stamp: profile::stamp(),
            reply,
        },
        "evaluator",
    )
    .await?
    .map_err(|e| anyhow!(e))?;
    Ok(EvalSetup { evaluator, baselines, initial, test_examples, test_setup_s })
}

/// What the server reports when its last round is done.
struct Finished {
    final_z: Vec<f32>,
    best_dev_z: Vec<f32>,
    best_dev_round: usize,
    best_dev_acc: f64,
}

/// Starts the rounds (after a checkpoint's, whose records come first) and collects every
/// round's record until the server finishes or fails.
async fn drive_rounds(
    cfg: &Config,
    server: &ActorRef<ServerMsg>,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<ServerEvent>,
    resume: Option<&Checkpoint>,
    on_round: &mut dyn FnMut(&RoundRecord),
) -> Result<(Vec<RoundRecord>, Finished)> {
    let mut records = Vec::new();
    let first = match resume {
        Some(cp) => {
            for r in &cp.records {
                on_round(r);
                records.push(r.clone());
            }
            cp.round + 1
        }
        None => 1,
    };
    if first > cfg.num_rounds {
        bail!("the checkpoint is of a finished run ({} of {} rounds)", first - 1, cfg.num_rounds);
    }
    server.send_message(ServerMsg::RunRound { round: first, stamp: profile::stamp() })?;
    loop {
        match rx.recv().await {
            Some(ServerEvent::Round(r)) => {
                on_round(&r);
                records.push(*r);
            }
            Some(ServerEvent::Finished { final_z, best_dev_z, best_dev_round, best_dev_acc }) => {
                let finished = Finished { final_z, best_dev_z, best_dev_round, best_dev_acc };
                return Ok((records, finished));
            }
            Some(ServerEvent::Failed(e)) => bail!("server: {e}"),
            None => bail!("the server stopped without finishing"),
        }
    }
}

/// The run's `summary.json`: the final and best-on-dev test accuracies (evaluated now where the
/// last round did not), traffic and forward counts.
async fn summarize(
    cfg: &Arc<Config>,
    env: &Env,
    ctx: &RunContext<'_>,
    eval: &EvalSetup,
    records: &[RoundRecord],
    finished: Finished,
) -> Result<FedSummary> {
    let Finished { final_z, best_dev_z, best_dev_round, best_dev_acc } = finished;
    let final_test_acc = match records.last().and_then(|r| r.test_acc) {
        Some(a) => a,
        None => test_acc(&eval.evaluator, final_z).await?,
    };
    let best_dev_test_acc = if best_dev_round == cfg.num_rounds {
        final_test_acc
    } else {
        test_acc(&eval.evaluator, best_dev_z).await?
    };
    let model = env.replicas.first().ok_or_else(|| anyhow!("no model replica"))?;
    let total_bytes_up: usize = records.iter().map(|r| r.bytes_up).sum();
    let total_bytes_down: usize = records.iter().map(|r| r.bytes_down).sum();
    let client_rounds = (cfg.num_users * records.len()).max(1) as f64;
    let replies: usize = records.iter().map(|r| r.clients_ok).sum();
    let (score_requests, score_forwards) = ctx.pool.score_counts();
    Ok(FedSummary {
        format: crate::server::CHECKPOINT_FORMAT,
        model: model.info().name.clone(),
        task: env.task.name.clone(),
        aggregation: cfg.aggregation,
        iid: cfg.iid,
        seed: cfg.seed,
        metric: env.task.metric,
        zero_shot_test_acc: eval.baselines.0,
        zero_prompt_test_acc: eval.baselines.1,
        zero_prompt_dev_acc: eval.initial.dev_acc,
        final_test_acc,
        best_dev_test_acc,
        best_dev_acc,
        best_dev_round,
        rounds: records.len(),
        clients: cfg.num_users,
        train_examples: 0,
        test_examples: eval.test_examples,
        total_bytes_up,
        total_bytes_down,
        bytes_up_per_client_round: total_bytes_up as f64 / replies.max(1) as f64,
        bytes_down_per_client_round: total_bytes_down as f64 / client_rounds,
        fedavg_full_model_bytes_per_client_round: model.info().n_params * 4,
        score_requests,
        score_forwards,
        prepare_requests: ctx.pool.prepare_count(),
        wall_s: ctx.started.elapsed().as_secs_f64(),
        test_setup_s: eval.test_setup_s,
        linear_layers: env.formats.iter().map(|f| f.name()).collect(),
        data_fingerprint: env.data_fingerprint.clone(),
        config: (**cfg).clone(),
    })
}

/// The forward-worker pool of this process: the model replicas, workers as configured.
async fn spawn_pool(cfg: &Config, env: &Env) -> Result<ForwardPool> {
    ForwardPool::spawn(
        env.replicas.clone(),
        env.task.clone(),
        cfg.runtime.workers_per_device,
        cfg.runtime.max_batch_examples,
        cfg.faults.kill_worker_at_request,
    )
    .await
}

/// The data loader, serving the shards and the evaluation sets of `data`.
async fn spawn_data_loader(data: &Data) -> Result<ActorRef<DataMsg>> {
    let state =
        DataState { shards: data.shards.clone(), dev: data.dev.clone(), test: data.test.clone() };
    let (loader, _) = Actor::spawn(None, DataLoader, state).await?;
    Ok(loader)
}

/// The client supervisor over `clients`, with the configured restart limit and backoff.
async fn spawn_supervisor(
    cfg: &Config,
    clients: Vec<ClientArgs>,
) -> Result<ActorRef<SupervisorMsg>> {
    let args = SupervisorArgs {
        clients,
        restart_limit: cfg.faults.restart_limit,
        backoff: Duration::from_millis(cfg.faults.restart_backoff_ms),
    };
    let (supervisor, _) =
        Actor::spawn(None, ClientSupervisor, args).await.context("starting the clients")?;
    Ok(supervisor)
}

/// Every client's arguments (in a client process, [`crate::cluster::remote_clients`] keeps its
/// own).
fn client_args(
    cfg: &Arc<Config>,
    pool: &ForwardPool,
    data: &ActorRef<DataMsg>,
    projection: &Arc<fedbpt::projection::Projection>,
    objective: Objective,
) -> Vec<ClientArgs> {
    (0..cfg.num_users)
        .map(|id| ClientArgs {
            id,
            cfg: cfg.clone(),
            pool: pool.clone(),
            data: data.clone(),
            projection: projection.clone(),
            objective,
            group: None,
        })
        .collect()
}

/// A client process's share of a federation: its forward-worker pool and data loader, and the
/// clients of `sites` under their supervisor (each joining its site's group), until `until`
/// resolves. The data is partitioned here as in the server's process, from the seed.
pub async fn run_sites<F>(cfg: &Config, env: &Env, sites: &[usize], until: F) -> Result<String>
where
    F: std::future::Future<Output = Result<String>>,
{
    let cfg = Arc::new(cfg.clone());
    check_search_memory(&cfg)?;
    let data = partition(&cfg, &env.dataset)?;
    let model = env.replicas.first().ok_or_else(|| anyhow!("no model replica"))?.clone();
    let projection = Arc::new(projection_for(&cfg, model.as_ref())?);
    let objective =
        Objective { loss: cfg.loss_type, metric: env.task.metric, balance: cfg.client_loss };
    let pool = spawn_pool(&cfg, env).await?;
    let data_ref = spawn_data_loader(&data).await?;
    let clients = crate::cluster::remote_clients(
        client_args(&cfg, &pool, &data_ref, &projection, objective),
        sites,
    );
    let result = match spawn_supervisor(&cfg, clients).await {
        Ok(supervisor) => {
            let r = until.await;
            stop_and_wait(supervisor.get_cell()).await;
            r
        }
        Err(e) => Err(e),
    };
    stop_and_wait(data_ref.get_cell()).await;
    pool.stop();
    result
}

async fn test_acc(evaluator: &ractor::ActorRef<EvalMsg>, z: Vec<f32>) -> Result<f64> {
    let msg = |reply| EvalMsg::Evaluate {
        z,
        with_test: true,
        from: "main",
        stamp: profile::stamp(),
        reply,
    };
    let result = ask(evaluator, msg, "evaluator").await?.map_err(|e| anyhow!(e))?;
    result.test_acc.ok_or_else(|| anyhow!("no test accuracy"))
}
