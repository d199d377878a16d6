//! The client supervisor: spawns the clients linked to itself and restarts one that dies (killed
//! or panicked), with a restart limit and a doubling backoff. A restarted client fetches its
//! shard from the data loader again and rejoins at the next round. ractor's default supervisor
//! would stop when a child dies; this one overrides `handle_supervisor_evt`.
//!
//! It owns the clients' handles; the server learns them from a [`Roster`] it asks for each
//! round, so the same server works whoever keeps the clients.

use std::time::Duration;

use ractor::{
    Actor, ActorCell, ActorProcessingErr, ActorRef, ActorStatus, RpcReplyPort, SupervisionEvent,
};

use crate::client::{Client, ClientArgs};
use crate::messages::{ClientMsg, Roster, SupervisorMsg};
use crate::profile::{self, MessageInfo};

/// One client's place in the federation.
#[derive(Clone)]
struct ClientSlot {
    actor: Option<ActorRef<ClientMsg>>,
    restarts: usize,
    /// Restart limit reached: excluded from then on.
    given_up: bool,
}

impl ClientSlot {
    /// Running, or given up: nothing pending.
    fn settled(&self) -> bool {
        self.given_up || self.actor.as_ref().is_some_and(|a| a.get_status() == ActorStatus::Running)
    }
}

pub struct ClientSupervisor;

pub struct SupervisorArgs {
    pub clients: Vec<ClientArgs>,
    pub restart_limit: usize,
    pub backoff: Duration,
}

pub struct SupervisorState {
    args: SupervisorArgs,
    slots: Vec<ClientSlot>,
    /// Restarted since the last roster.
    restarted: Vec<usize>,
    /// Roster requests waiting for the pending restarts.
    waiting: Vec<RpcReplyPort<Roster>>,
    stopping: bool,
}

impl SupervisorState {
    fn settled(&self) -> bool {
        self.slots.iter().all(ClientSlot::settled)
    }

    /// The roster now; the restart log starts over.
    fn roster(&mut self) -> Roster {
        let mut restarted = std::mem::take(&mut self.restarted);
        restarted.sort_unstable();
        restarted.dedup();
        Roster {
            clients: self
                .slots
                .iter()
                .map(|s| if s.given_up { None } else { s.actor.clone() })
                .collect(),
            restarted,
        }
    }

    /// Answers the waiting roster requests once nothing is pending.
    fn answer_waiting(&mut self) {
        if self.waiting.is_empty() || !self.settled() {
            return;
        }
        let roster = self.roster();
        for reply in std::mem::take(&mut self.waiting) {
            let _ = reply.send(roster.clone());
        }
    }
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
            let (actor, _) = Actor::spawn_linked(None, Client, c.clone(), me.get_cell()).await?;
            slots.push(ClientSlot { actor: Some(actor), restarts: 0, given_up: false });
        }
        Ok(SupervisorState {
            args,
            slots,
            restarted: Vec::new(),
            waiting: Vec::new(),
            stopping: false,
        })
    }

    async fn handle(
        &self,
        _me: ActorRef<SupervisorMsg>,
        msg: SupervisorMsg,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            // Supervision events outrank messages, so by the time this runs every death already
            // reported has been handled (and its restart awaited). A death not reported yet
            // shows as a handle that is not running: the answer then waits for its event.
            SupervisorMsg::Roster { wait, stamp, reply } => {
                let _span = profile::handling(stamp, || MessageInfo {
                    sender: "server".into(),
                    receiver: "client-supervisor".into(),
                    message: "Roster",
                    round: None,
                    bytes: 0,
                });
                if wait && !state.settled() {
                    state.waiting.push(reply);
                } else {
                    let _ = reply.send(state.roster());
                }
            }
            // The remote roster's; this supervisor's clients are its own children.
            SupervisorMsg::Admitted { .. } | SupervisorMsg::WaitOver(_) => {}
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
        // A restarted client reports itself started after its spawn returned: that, too, may
        // settle the roster.
        let Some(cell) = dead else {
            state.answer_waiting();
            return Ok(());
        };
        if state.stopping {
            return Ok(());
        }
        let index = state
            .slots
            .iter()
            .position(|s| s.actor.as_ref().is_some_and(|a| a.get_id() == cell.get_id()));
        let Some(i) = index else { return Ok(()) };
        restart(&me, state, i).await;
        state.answer_waiting();
        Ok(())
    }

    async fn post_stop(
        &self,
        _me: ActorRef<SupervisorMsg>,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        state.stopping = true;
        let clients: Vec<ActorCell> =
            state.slots.iter().filter_map(|s| s.actor.as_ref().map(|a| a.get_cell())).collect();
        // Waited for, so that no client outlives the run.
        for c in clients {
            stop_and_wait(c).await;
        }
        Ok(())
    }
}

/// Restarts client `i` after its backoff, or gives it up (restart limit, failed restart).
async fn restart(me: &ActorRef<SupervisorMsg>, state: &mut SupervisorState, i: usize) {
    let restarts = state.slots[i].restarts;
    if restarts >= state.args.restart_limit {
        state.slots[i].actor = None;
        state.slots[i].given_up = true;
        tracing::warn!("{}: restart limit {} reached, excluded", name(i), state.args.restart_limit);
        return;
    }
    tokio::time::sleep(state.args.backoff * 2u32.saturating_pow(restarts.min(10) as u32)).await;
    let args = state.args.clients[i].clone();
    match Actor::spawn_linked(None, Client, args, me.get_cell()).await {
        Ok((actor, _)) => {
            state.slots[i].actor = Some(actor);
            state.slots[i].restarts += 1;
            state.restarted.push(i);
            tracing::info!("{}: restarted ({} so far)", name(i), restarts + 1);
        }
        Err(e) => {
            state.slots[i].actor = None;
            state.slots[i].given_up = true;
            tracing::warn!("{}: restart failed ({e}), excluded", name(i));
        }
    }
}

/// Stops an actor and waits until it is gone (and its name free); kills it if it does not stop.
pub async fn stop_and_wait(cell: ActorCell) {
    let grace = Some(std::time::Duration::from_secs(10));
    if cell.stop_and_wait(None, grace).await.is_err() {
        let _ = cell.kill_and_wait(grace).await;
    }
}
