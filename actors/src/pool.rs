//! Forward workers own the model replicas (one copy of the weights per device, shared by the
//! workers of that device) and serialize forward passes; [`ForwardPool`] routes each request to
//! the least-loaded worker of the caller's device. A worker that dies holding a request is
//! replaced and the request retried, so no client waits forever.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use fedbpt::data::Example;
use fedbpt::models::{Prepared, PromptModel, ScoreJob, TokenNoise};
use fedbpt::task::TaskSpec;
use ractor::rpc::CallResult;
use ractor::{Actor, ActorProcessingErr, ActorRef};

use crate::messages::{Reply, WorkerMsg};
use crate::profile::{self, MessageInfo, Stamp};

/// A forward worker: runs one forward at a time on a blocking thread, so the async runtime
/// keeps moving messages meanwhile. With merging on (`max_batch_examples > 1`), `Score`
/// requests are queued and served by `Flush`: the requests that arrived while a forward ran are
/// merged into the next one. Without, each `Score` is served in its own handler.
pub struct ForwardWorker;

pub struct WorkerState {
    pub model: Arc<dyn PromptModel>,
    pub task: Arc<TaskSpec>,
    /// `forward-worker-<device>-<index>` (for profiles and logs).
    pub name: String,
    /// Most example x prompt pairs merged into one forward (a larger single request runs alone).
    pub max_batch_examples: usize,
    queue: VecDeque<QueuedScore>,
    counters: Arc<Counters>,
}

struct QueuedScore {
    batch: Arc<Prepared>,
    prompts: Arc<Vec<Vec<f32>>>,
    from: String,
    reply: Reply<Vec<Vec<Vec<f32>>>>,
}

/// What the pool's workers served: requests and the forwards that served them.
#[derive(Debug, Default)]
struct Counters {
    prepare_requests: AtomicUsize,
    score_requests: AtomicUsize,
    score_forwards: AtomicUsize,
}

impl WorkerState {
    /// Runs `jobs` as one forward and answers each.
    async fn serve(&self, jobs: Vec<QueuedScore>) {
        if jobs.is_empty() {
            return;
        }
        self.counters.score_forwards.fetch_add(1, Ordering::SeqCst);
        let model = self.model.clone();
        let started = Instant::now();
        let examples = jobs.iter().map(|j| j.batch.len()).sum();
        let tokens = jobs.iter().map(|j| j.batch.tokens_per_pass * j.prompts.len()).sum();
        let candidates = jobs.iter().map(|j| j.prompts.len()).sum();
        let served = jobs.iter().map(|j| j.from.as_str()).collect::<Vec<_>>().join("+");
        let inputs: Vec<_> = jobs.iter().map(|j| (j.batch.clone(), j.prompts.clone())).collect();
        let r = tokio::task::spawn_blocking(move || {
            let refs: Vec<Vec<&[f32]>> =
                inputs.iter().map(|(_, p)| p.iter().map(|v| v.as_slice()).collect()).collect();
            let batch: Vec<ScoreJob<'_>> = inputs
                .iter()
                .zip(&refs)
                .map(|((b, _), p)| ScoreJob { batch: b.as_ref(), prompts: p.as_slice() })
                .collect();
            model.scores_jobs(&batch)
        })
        .await;
        profile::forward(&self.name, started, examples, tokens, candidates, &served);
        match flatten(r) {
            Ok(all) => {
                for (job, scores) in jobs.into_iter().zip(all) {
                    let _ = job.reply.send(Ok(scores));
                }
            }
            Err(e) => {
                for job in jobs {
                    let _ = job.reply.send(Err(e.clone()));
                }
            }
        }
    }

    /// The longest run of queued requests that fits `max_batch_examples` (at least one).
    fn take_batch(&mut self) -> Vec<QueuedScore> {
        let mut taken: Vec<QueuedScore> = Vec::new();
        let mut pairs = 0;
        while let Some(next) = self.queue.front() {
            let size = next.batch.len() * next.prompts.len();
            if !taken.is_empty() && pairs + size > self.max_batch_examples {
                break;
            }
            pairs += size;
            taken.extend(self.queue.pop_front());
        }
        taken
    }
}

impl Actor for ForwardWorker {
    type Msg = WorkerMsg;
    type State = WorkerState;
    type Arguments = WorkerState;

    async fn pre_start(
        &self,
        _me: ActorRef<Self::Msg>,
        args: WorkerState,
    ) -> Result<WorkerState, ActorProcessingErr> {
        Ok(args)
    }

    async fn handle(
        &self,
        me: ActorRef<Self::Msg>,
        msg: WorkerMsg,
        state: &mut WorkerState,
    ) -> Result<(), ActorProcessingErr> {
        let name = state.name.clone();
        let info = |from: &str, message: &'static str| MessageInfo {
            sender: from.to_string(),
            receiver: name.clone(),
            message,
            round: None,
            bytes: 0,
        };
        match msg {
            WorkerMsg::Prepare { examples, noise, from, stamp, reply } => {
                let _span = profile::handling(stamp, || info(&from, "Prepare"));
                state.counters.prepare_requests.fetch_add(1, Ordering::SeqCst);
                let (model, task) = (state.model.clone(), state.task.clone());
                let started = Instant::now();
                let n = examples.len();
                let r = tokio::task::spawn_blocking(move || model.prepare(&task, &examples, noise))
                    .await;
                let r = flatten(r);
                if let Ok(b) = &r {
                    profile::forward(&state.name, started, n, b.tokens_per_pass, 0, &from);
                }
                let _ = reply.send(r.map(Arc::new));
            }
            WorkerMsg::Score { batch, prompts, from, stamp, reply } => {
                let _span = profile::handling(stamp, || info(&from, "Score"));
                state.counters.score_requests.fetch_add(1, Ordering::SeqCst);
                state.queue.push_back(QueuedScore { batch, prompts, from, reply });
                if state.max_batch_examples > 1 {
                    me.send_message(WorkerMsg::Flush)?;
                } else {
                    // No merging: serve it now, so the message's span covers its forward.
                    let jobs = state.take_batch();
                    state.serve(jobs).await;
                }
            }
            WorkerMsg::Flush => {
                let jobs = state.take_batch();
                state.serve(jobs).await;
            }
            WorkerMsg::Manual { batch, from, stamp, reply } => {
                let _span = profile::handling(stamp, || info(&from, "Manual"));
                let model = state.model.clone();
                let started = Instant::now();
                let (n, tokens) = (batch.len(), batch.tokens_per_pass);
                let r = tokio::task::spawn_blocking(move || model.scores(&batch, None)).await;
                profile::forward(&state.name, started, n, tokens, 1, &from);
                let _ = reply.send(flatten(r));
            }
        }
        Ok(())
    }
}

fn flatten<T>(r: Result<fedbpt::Result<T>, tokio::task::JoinError>) -> Result<T, String> {
    match r {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(format!("forward worker task failed: {e}")),
    }
}

struct Slot {
    worker: RwLock<ActorRef<WorkerMsg>>,
    device: usize,
    index: usize,
    in_flight: AtomicUsize,
}

struct Inner {
    slots: Vec<Slot>,
    replicas: Vec<Arc<dyn PromptModel>>,
    task: Arc<TaskSpec>,
    n_devices: usize,
    max_batch_examples: usize,
    counters: Arc<Counters>,
    requests: AtomicUsize,
    kill_at_request: usize,
}

/// Handle to the workers; cheap to clone.
#[derive(Clone)]
pub struct ForwardPool {
    inner: Arc<Inner>,
}

/// Decrements a worker's in-flight count when the request ends, however it ends.
struct InFlight<'a>(&'a AtomicUsize);
impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Attempts per request: the first, then retries on a replaced worker.
const ATTEMPTS: usize = 3;

async fn spawn_worker(
    device: usize,
    index: usize,
    model: Arc<dyn PromptModel>,
    inner: &Inner,
) -> anyhow::Result<ActorRef<WorkerMsg>> {
    // Unregistered: a replacement must not collide with the name of the worker it replaces.
    let state = WorkerState {
        model,
        task: inner.task.clone(),
        name: format!("forward-worker-{device}-{index}"),
        max_batch_examples: inner.max_batch_examples,
        queue: VecDeque::new(),
        counters: inner.counters.clone(),
    };
    let (worker, _) = Actor::spawn(None, ForwardWorker, state).await?;
    Ok(worker)
}

impl ForwardPool {
    /// Spawns `per_device` workers for each model replica (one replica per device); each merges
    /// queued requests up to `max_batch_examples` example x prompt pairs per forward.
    /// `kill_at_request` (fault injection) kills the worker serving that request, 1-based.
    pub async fn spawn(
        replicas: Vec<Arc<dyn PromptModel>>,
        task: Arc<TaskSpec>,
        per_device: usize,
        max_batch_examples: usize,
        kill_at_request: usize,
    ) -> anyhow::Result<Self> {
        let mut inner = Inner {
            slots: Vec::new(),
            n_devices: replicas.len(),
            replicas,
            task,
            max_batch_examples,
            counters: Arc::default(),
            requests: AtomicUsize::new(0),
            kill_at_request,
        };
        for device in 0..inner.replicas.len() {
            for index in 0..per_device {
                let model = inner.replicas[device].clone();
                let worker = spawn_worker(device, index, model, &inner).await?;
                inner.slots.push(Slot {
                    worker: RwLock::new(worker),
                    device,
                    index,
                    in_flight: AtomicUsize::new(0),
                });
            }
        }
        Ok(Self { inner: Arc::new(inner) })
    }

    /// Scoring requests served so far, and the forwards that served them (fewer when workers
    /// merged requests of several clients).
    pub fn score_counts(&self) -> (usize, usize) {
        let c = &self.inner.counters;
        (c.score_requests.load(Ordering::SeqCst), c.score_forwards.load(Ordering::SeqCst))
    }

    /// Batches prepared so far: clients' shards (and their perturbed copies), the evaluator's
    /// sets.
    pub fn prepare_count(&self) -> usize {
        self.inner.counters.prepare_requests.load(Ordering::SeqCst)
    }

    /// The device a party's batches live on (prepared tensors stay on their device).
    pub fn device_of(&self, party: usize) -> usize {
        party % self.inner.n_devices.max(1)
    }

    fn pick(&self, device: usize) -> Result<&Slot, String> {
        self.inner
            .slots
            .iter()
            .filter(|s| s.device == device)
            .min_by_key(|s| s.in_flight.load(Ordering::SeqCst))
            .ok_or_else(|| format!("no forward worker on device {device}"))
    }

    /// Sends one request (built by `build` with a fresh reply port) to a worker of `party`'s
    /// device; a worker that dies is replaced and the request sent again.
    async fn request<T: Send + 'static>(
        &self,
        party: usize,
        build: impl Fn(Reply<T>, Stamp) -> WorkerMsg,
    ) -> Result<T, String> {
        let mut last_err = String::new();
        for _ in 0..ATTEMPTS {
            let slot = self.pick(self.device_of(party))?;
            slot.in_flight.fetch_add(1, Ordering::SeqCst);
            let _guard = InFlight(&slot.in_flight);
            let worker = slot.worker.read().map_err(|_| "worker slot poisoned")?.clone();
            let n = self.inner.requests.fetch_add(1, Ordering::SeqCst) + 1;
            if n == self.inner.kill_at_request {
                // Fault injection: the worker dies while it holds this request.
                let victim = worker.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    victim.kill();
                });
            }
            match worker.call(|reply| build(reply, profile::stamp()), None).await {
                Ok(CallResult::Success(r)) => return r,
                Ok(_) | Err(_) => {
                    last_err = format!("forward worker {}-{} died", slot.device, slot.index);
                    self.replace(slot, &worker).await?;
                }
            }
        }
        Err(format!("{last_err}; gave up after {ATTEMPTS} attempts"))
    }

    /// Replaces `dead` in `slot` (once, even if several requests saw it die).
    async fn replace(&self, slot: &Slot, dead: &ActorRef<WorkerMsg>) -> Result<(), String> {
        let current = slot.worker.read().map_err(|_| "worker slot poisoned")?.get_id();
        if current != dead.get_id() {
            return Ok(());
        }
        dead.kill();
        let model = self.inner.replicas[slot.device].clone();
        let fresh = spawn_worker(slot.device, slot.index, model, &self.inner)
            .await
            .map_err(|e| format!("cannot replace forward worker: {e}"))?;
        let mut w = slot.worker.write().map_err(|_| "worker slot poisoned")?;
        if w.get_id() == dead.get_id() {
            *w = fresh;
            tracing::warn!("forward worker {}-{} died and was replaced", slot.device, slot.index);
        } else {
            fresh.stop(None);
        }
        Ok(())
    }

    /// `from` names the caller (for profiles).
    pub async fn prepare(
        &self,
        party: usize,
        from: &str,
        examples: Arc<Vec<Example>>,
        noise: Option<TokenNoise>,
    ) -> Result<Arc<Prepared>, String> {
        self.request(party, |reply, stamp| WorkerMsg::Prepare {
            examples: examples.clone(),
            noise,
            from: from.to_string(),
            stamp,
            reply,
        })
        .await
    }

    pub async fn score(
        &self,
        party: usize,
        from: &str,
        batch: Arc<Prepared>,
        prompts: Vec<Vec<f32>>,
    ) -> Result<Vec<Vec<Vec<f32>>>, String> {
        let prompts = Arc::new(prompts);
        self.request(party, |reply, stamp| WorkerMsg::Score {
            batch: batch.clone(),
            prompts: prompts.clone(),
            from: from.to_string(),
            stamp,
            reply,
        })
        .await
    }

    pub async fn score_manual(
        &self,
        party: usize,
        from: &str,
        batch: Arc<Prepared>,
    ) -> Result<Vec<Vec<f32>>, String> {
        self.request(party, |reply, stamp| WorkerMsg::Manual {
            batch: batch.clone(),
            from: from.to_string(),
            stamp,
            reply,
        })
        .await
    }

    /// Stops every worker.
    pub fn stop(&self) {
        for s in &self.inner.slots {
            if let Ok(w) = s.worker.read() {
                w.stop(None);
            }
        }
    }
}
