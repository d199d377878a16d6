//! The roster of a federation whose clients live in other processes: it answers the server's
//! [`SupervisorMsg::Roster`] as the client supervisor does in one process, from the process
//! groups `fedbpt/site-N` that the clients of admitted client processes join (through
//! ractor_cluster, a remote member is a handle that forwards over its node's connection).
//!
//! A site whose member changed since the previous roster was restarted (its process, or the
//! client inside it); a site that is missing is down. A roster asked with `wait` waits for every
//! site to be present: up to `cluster.join_timeout_s` for the first roster (before round 1),
//! then up to `cluster.rejoin_wait_s` (a client process restarting).

use std::time::Duration;

use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};

use crate::messages::{ClientMsg, Roster, SupervisorMsg};
use crate::profile::{self, MessageInfo};

/// The process group of client `i` (`site-{i+1}`).
pub fn site_group(i: usize) -> String {
    format!("fedbpt/site-{}", i + 1)
}

pub struct RemoteRoster;

pub struct RemoteRosterArgs {
    pub num_users: usize,
    pub join_timeout: Duration,
    pub rejoin_wait: Duration,
}

pub struct RemoteRosterState {
    args: RemoteRosterArgs,
    /// Sites a client process was admitted for.
    admitted: Vec<bool>,
    /// The member each site had in the previous roster.
    last: Vec<Option<ActorId>>,
    /// A roster was answered: later waits are rejoin waits.
    complete_once: bool,
    /// Roster requests waiting for missing sites, by index.
    waiting: Vec<(u64, RpcReplyPort<Roster>)>,
    next_wait: u64,
}

impl RemoteRosterState {
    fn members(&self) -> Vec<Option<ActorRef<ClientMsg>>> {
        (0..self.args.num_users)
            .map(|i| {
                if !self.admitted[i] {
                    return None;
                }
                // A site has one client; a second member is a stale incarnation still leaving.
                let mut cells = ractor::pg::get_members(&site_group(i));
                cells.sort_by_key(|c| c.get_id());
                cells.pop().map(ActorRef::from)
            })
            .collect()
    }

    fn complete(&self) -> bool {
        self.members().iter().all(Option::is_some)
    }

    /// The roster now; the restart log starts over.
    fn roster(&mut self) -> Roster {
        let clients = self.members();
        let mut restarted = Vec::new();
        for (i, c) in clients.iter().enumerate() {
            let id = c.as_ref().map(|a| a.get_id());
            if let (Some(old), Some(new)) = (self.last[i], id) {
                if old != new {
                    restarted.push(i);
                }
            }
            if id.is_some() {
                self.last[i] = id;
            }
        }
        // After the first roster (complete, or when the join timeout ran out) a missing site
        // is waited for only `rejoin_wait`.
        self.complete_once = true;
        Roster { clients, restarted }
    }

    fn answer_waiting(&mut self) {
        if self.waiting.is_empty() || !self.complete() {
            return;
        }
        let roster = self.roster();
        for (_, reply) in std::mem::take(&mut self.waiting) {
            let _ = reply.send(roster.clone());
        }
    }
}

impl Actor for RemoteRoster {
    type Msg = SupervisorMsg;
    type State = RemoteRosterState;
    type Arguments = RemoteRosterArgs;

    async fn pre_start(
        &self,
        me: ActorRef<SupervisorMsg>,
        args: RemoteRosterArgs,
    ) -> Result<RemoteRosterState, ActorProcessingErr> {
        for i in 0..args.num_users {
            ractor::pg::monitor(site_group(i), me.get_cell());
        }
        let n = args.num_users;
        Ok(RemoteRosterState {
            args,
            admitted: vec![false; n],
            last: vec![None; n],
            complete_once: false,
            waiting: Vec::new(),
            next_wait: 0,
        })
    }

    async fn handle(
        &self,
        me: ActorRef<SupervisorMsg>,
        msg: SupervisorMsg,
        state: &mut RemoteRosterState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::Roster { wait, stamp, reply } => {
                let _span = profile::handling(stamp, || MessageInfo {
                    sender: "server".into(),
                    receiver: "remote-roster".into(),
                    message: "Roster",
                    round: None,
                    bytes: 0,
                });
                if wait && !state.complete() {
                    let index = state.next_wait;
                    state.next_wait += 1;
                    state.waiting.push((index, reply));
                    let patience = if state.complete_once {
                        state.args.rejoin_wait
                    } else {
                        state.args.join_timeout
                    };
                    me.send_after(patience, move || SupervisorMsg::WaitOver(index));
                } else {
                    let _ = reply.send(state.roster());
                }
            }
            SupervisorMsg::Admitted { node, sites } => {
                tracing::info!("node {node}: admitted for sites {sites:?}");
                for i in sites {
                    if let Some(a) = state.admitted.get_mut(i) {
                        *a = true;
                    }
                }
                state.answer_waiting();
            }
            SupervisorMsg::WaitOver(index) => {
                if let Some(at) = state.waiting.iter().position(|(i, _)| *i == index) {
                    let (_, reply) = state.waiting.remove(at);
                    let roster = state.roster();
                    let missing: Vec<String> = roster
                        .clients
                        .iter()
                        .enumerate()
                        .filter(|(_, c)| c.is_none())
                        .map(|(i, _)| format!("site-{}", i + 1))
                        .collect();
                    tracing::warn!(
                        "the round starts without {}: not connected",
                        missing.join(", ")
                    );
                    let _ = reply.send(roster);
                }
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _me: ActorRef<SupervisorMsg>,
        evt: SupervisionEvent,
        state: &mut RemoteRosterState,
    ) -> Result<(), ActorProcessingErr> {
        if let SupervisionEvent::ProcessGroupChanged(_) = evt {
            state.answer_waiting();
        }
        Ok(())
    }
}
