//! The client supervisor: spawns the clients linked to itself and restarts one that dies (killed
//! or panicked), with a restart limit and a doubling backoff. A restarted client fetches its
//! shard from the data loader again and rejoins at the next round. ractor's default supervisor
//! would stop when a child dies; this one overrides `handle_supervisor_evt`.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, SupervisionEvent};

use crate::client::{Client, ClientArgs};
use crate::messages::{ClientMsg, SupervisorMsg};
use crate::profile::{self, MessageInfo};

/// One client's place in the federation.
#[derive(Clone)]
pub struct ClientSlot {
    pub actor: Option<ActorRef<ClientMsg>>,
    pub restarts: usize,
    /// Restart limit reached: excluded from then on.
    pub given_up: bool,
}

/// Shared view of the clients: the server reads it each round.
pub type Registry = Arc<RwLock<Vec<ClientSlot>>>;

/// Restarts since the last [`take_restarted`] call, by client index.
pub type RestartLog = Arc<RwLock<Vec<usize>>>;

pub struct ClientSupervisor;

pub struct SupervisorArgs {
    pub clients: Vec<ClientArgs>,
    pub registry: Registry,
    pub restarted: RestartLog,
    pub restart_limit: usize,
    pub backoff: Duration,
}

pub struct SupervisorState {
    args: SupervisorArgs,
    stopping: bool,
}

fn name(id: usize) -> String {
    format!("site-{}", id + 1)
}

impl Actor for ClientSupervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = SupervisorArgs;

    async fn pre_start(
        &self,
        me: ActorRef<SupervisorMsg>,
        args: SupervisorArgs,
    ) -> Result<SupervisorState, ActorProcessingErr> {
        let mut slots = Vec::with_capacity(args.clients.len());
        for c in &args.clients {
            let (actor, _) =
                Actor::spawn_linked(Some(name(c.id)), Client, c.clone(), me.get_cell()).await?;
            slots.push(ClientSlot { actor: Some(actor), restarts: 0, given_up: false });
        }
        *args.registry.write().map_err(|_| "client registry poisoned")? = slots;
        Ok(SupervisorState { args, stopping: false })
    }

    async fn handle(
        &self,
        _me: ActorRef<SupervisorMsg>,
        msg: SupervisorMsg,
        _state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            // Supervision events outrank messages, so by the time this runs every death already
            // reported has been handled (and its restart awaited).
            SupervisorMsg::Settled { stamp, reply } => {
                let _span = profile::handling(stamp, || MessageInfo {
                    sender: "server".into(),
                    receiver: "client-supervisor".into(),
                    message: "Settled",
                    round: None,
                    bytes: 0,
                });
                let _ = reply.send(());
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        me: ActorRef<SupervisorMsg>,
        evt: SupervisionEvent,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        let dead: Option<ActorCell> = match evt {
            SupervisionEvent::ActorTerminated(cell, _, _) => Some(cell),
            SupervisionEvent::ActorFailed(cell, _) => Some(cell),
            _ => None,
        };
        let Some(cell) = dead else { return Ok(()) };
        if state.stopping {
            return Ok(());
        }
        let registry = state.args.registry.clone();
        let index = {
            let slots = registry.read().map_err(|_| "client registry poisoned")?;
            slots.iter().position(|s| s.actor.as_ref().is_some_and(|a| a.get_id() == cell.get_id()))
        };
        let Some(i) = index else { return Ok(()) };
        let restarts = registry.read().map_err(|_| "client registry poisoned")?[i].restarts;
        if restarts >= state.args.restart_limit {
            let mut slots = registry.write().map_err(|_| "client registry poisoned")?;
            slots[i].actor = None;
            slots[i].given_up = true;
            tracing::warn!(
                "{}: restart limit {} reached, excluded",
                name(i),
                state.args.restart_limit
            );
            return Ok(());
        }
        tokio::time::sleep(state.args.backoff * 2u32.saturating_pow(restarts.min(10) as u32)).await;
        let args = state.args.clients[i].clone();
        // A fresh name per incarnation: the dead one's may not be unregistered yet.
        let incarnation = format!("{}#{}", name(i), restarts + 1);
        let actor = match Actor::spawn_linked(Some(incarnation), Client, args, me.get_cell()).await
        {
            Ok((actor, _)) => actor,
            Err(e) => {
                let mut slots = registry.write().map_err(|_| "client registry poisoned")?;
                slots[i].actor = None;
                slots[i].given_up = true;
                tracing::warn!("{}: restart failed ({e}), excluded", name(i));
                return Ok(());
            }
        };
        {
            let mut slots = registry.write().map_err(|_| "client registry poisoned")?;
            slots[i].actor = Some(actor);
            slots[i].restarts += 1;
        }
        state.args.restarted.write().map_err(|_| "restart log poisoned")?.push(i);
        tracing::info!("{}: restarted ({} so far)", name(i), restarts + 1);
        Ok(())
    }

    async fn post_stop(
        &self,
        _me: ActorRef<SupervisorMsg>,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        state.stopping = true;
        let clients: Vec<ActorCell> = match state.args.registry.read() {
            Ok(slots) => {
                slots.iter().filter_map(|s| s.actor.as_ref().map(|a| a.get_cell())).collect()
            }
            Err(_) => Vec::new(),
        };
        // Waited for, so that their names (`site-N`) are free when this returns.
        for c in clients {
            crate::federation::stop_and_wait(c).await;
        }
        Ok(())
    }
}

/// Drains the restart log.
pub fn take_restarted(log: &RestartLog) -> Vec<usize> {
    log.write().map(|mut v| std::mem::take(&mut *v)).unwrap_or_default()
}
