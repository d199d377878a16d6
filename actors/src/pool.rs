//! Forward workers own the model replicas (one copy of the weights per device, shared by the
//! workers of that device) and serialize forward passes; [`ForwardPool`] routes each request to
//! the least-loaded worker of the caller's device.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use fedbpt::data::Example;
use fedbpt::models::{Prepared, PromptModel, TokenNoise};
use fedbpt::task::TaskSpec;
use ractor::{Actor, ActorProcessingErr, ActorRef};

use crate::messages::WorkerMsg;

/// A forward worker: runs one forward at a time on a blocking thread, so the async runtime
/// keeps moving messages meanwhile.
pub struct ForwardWorker;

pub struct WorkerState {
    pub model: Arc<dyn PromptModel>,
    pub task: Arc<TaskSpec>,
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
        _me: ActorRef<Self::Msg>,
        msg: WorkerMsg,
        state: &mut WorkerState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            WorkerMsg::Prepare { examples, noise, reply } => {
                let (model, task) = (state.model.clone(), state.task.clone());
                let r = tokio::task::spawn_blocking(move || model.prepare(&task, &examples, noise))
                    .await;
                let _ = reply.send(flatten(r).map(Arc::new));
            }
            WorkerMsg::Score { batch, prompts, reply } => {
                let model = state.model.clone();
                let r = tokio::task::spawn_blocking(move || {
                    let refs: Vec<&[f32]> = prompts.iter().map(|p| p.as_slice()).collect();
                    model.scores_many(&batch, &refs)
                })
                .await;
                let _ = reply.send(flatten(r));
            }
            WorkerMsg::Manual { batch, reply } => {
                let model = state.model.clone();
                let r = tokio::task::spawn_blocking(move || model.scores(&batch, None)).await;
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
    worker: ActorRef<WorkerMsg>,
    device: usize,
    in_flight: AtomicUsize,
}

/// Handle to the workers; cheap to clone.
#[derive(Clone)]
pub struct ForwardPool {
    slots: Arc<Vec<Slot>>,
    n_devices: usize,
}

/// Decrements a worker's in-flight count when the request ends, however it ends.
struct InFlight<'a>(&'a AtomicUsize);
impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl ForwardPool {
    /// Spawns `per_device` workers for each model replica (one replica per device).
    pub async fn spawn(
        replicas: Vec<Arc<dyn PromptModel>>,
        task: Arc<TaskSpec>,
        per_device: usize,
    ) -> anyhow::Result<Self> {
        let mut slots = Vec::new();
        for (device, model) in replicas.iter().enumerate() {
            for w in 0..per_device {
                let (worker, _) = Actor::spawn(
                    Some(format!("forward-worker-{device}-{w}")),
                    ForwardWorker,
                    WorkerState { model: model.clone(), task: task.clone() },
                )
                .await?;
                slots.push(Slot { worker, device, in_flight: AtomicUsize::new(0) });
            }
        }
        Ok(Self { slots: Arc::new(slots), n_devices: replicas.len() })
    }

    /// The device a party's batches live on (prepared tensors stay on their device).
    pub fn device_of(&self, party: usize) -> usize {
        party % self.n_devices.max(1)
    }

    fn pick(&self, device: usize) -> Result<&Slot, String> {
        self.slots
            .iter()
            .filter(|s| s.device == device)
            .min_by_key(|s| s.in_flight.load(Ordering::SeqCst))
            .ok_or_else(|| format!("no forward worker on device {device}"))
    }

    pub async fn prepare(
        &self,
        party: usize,
        examples: Arc<Vec<Example>>,
        noise: Option<TokenNoise>,
    ) -> Result<Arc<Prepared>, String> {
        let slot = self.pick(self.device_of(party))?;
        slot.in_flight.fetch_add(1, Ordering::SeqCst);
        let _guard = InFlight(&slot.in_flight);
        match slot.worker.call(|reply| WorkerMsg::Prepare { examples, noise, reply }, None).await {
            Ok(ractor::rpc::CallResult::Success(r)) => r,
            Ok(_) => Err("forward worker dropped the request".into()),
            Err(e) => Err(format!("forward worker unreachable: {e}")),
        }
    }

    pub async fn score(
        &self,
        party: usize,
        batch: Arc<Prepared>,
        prompts: Vec<Vec<f32>>,
    ) -> Result<Vec<Vec<Vec<f32>>>, String> {
        let slot = self.pick(self.device_of(party))?;
        slot.in_flight.fetch_add(1, Ordering::SeqCst);
        let _guard = InFlight(&slot.in_flight);
        let prompts = Arc::new(prompts);
        match slot.worker.call(|reply| WorkerMsg::Score { batch, prompts, reply }, None).await {
            Ok(ractor::rpc::CallResult::Success(r)) => r,
            Ok(_) => Err("forward worker dropped the request".into()),
            Err(e) => Err(format!("forward worker unreachable: {e}")),
        }
    }

    pub async fn score_manual(
        &self,
        party: usize,
        batch: Arc<Prepared>,
    ) -> Result<Vec<Vec<f32>>, String> {
        let slot = self.pick(self.device_of(party))?;
        slot.in_flight.fetch_add(1, Ordering::SeqCst);
        let _guard = InFlight(&slot.in_flight);
        match slot.worker.call(|reply| WorkerMsg::Manual { batch, reply }, None).await {
            Ok(ractor::rpc::CallResult::Success(r)) => r,
            Ok(_) => Err("forward worker dropped the request".into()),
            Err(e) => Err(format!("forward worker unreachable: {e}")),
        }
    }

    /// Stops every worker.
    pub fn stop(&self) {
        for s in self.slots.iter() {
            s.worker.stop(None);
        }
    }
}
