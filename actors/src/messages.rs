//! Every message of the runtime, one enum per actor kind. Payloads that would cross a process
//! boundary (the server-client traffic) serialize with bincode; [`wire_size`] counts their bytes.

use std::sync::Arc;

use fedbpt::data::Example;
use fedbpt::models::{Prepared, TokenNoise};
use ractor::{ActorRef, RpcReplyPort};
use ractor_cluster::{RactorClusterMessage, RactorMessage};
use serde::Serialize;

pub use crate::profile::now_ms;
use crate::profile::Stamp;
use crate::replay::{ReplayReply, ReplayRequest};
pub use crate::wire::ClientFault;
use crate::wire::{JoinReply, JoinRequest, TrainReply, TrainRequest};

/// Replies carry the callee's error as text: it crosses actor (and, later, process) boundaries.
pub type Reply<T> = RpcReplyPort<Result<T, String>>;

/// Bytes of `value` on the wire (bincode 2, standard configuration).
pub fn wire_size(value: &impl Serialize) -> usize {
    bincode::serde::encode_to_vec(value, bincode::config::standard()).map(|v| v.len()).unwrap_or(0)
}

/// To a forward worker.
#[derive(RactorMessage)]
pub enum WorkerMsg {
    /// Tokenize and template examples; with noise for FedBPT's perturbation.
    Prepare {
        examples: Arc<Vec<Example>>,
        noise: Option<TokenNoise>,
        from: String,
        stamp: Stamp,
        reply: Reply<Arc<Prepared>>,
    },
    /// Class scores of every prompt on a prepared batch: `[prompt][example][class]`.
    Score {
        batch: Arc<Prepared>,
        prompts: Arc<Vec<Vec<f32>>>,
        from: String,
        stamp: Stamp,
        reply: Reply<Vec<Vec<Vec<f32>>>>,
    },
    /// Scores of the manual prompt (template only, no placeholders): `[example][class]`.
    Manual { batch: Arc<Prepared>, from: String, stamp: Stamp, reply: Reply<Vec<Vec<f32>>> },
    /// To itself, one per queued `Score`: serve the queued requests (several clients' at once
    /// where the batch limit allows).
    Flush,
}

/// Dev and test examples.
pub type EvalSets = (Arc<Vec<Example>>, Arc<Vec<Example>>);

/// To the data loader.
#[derive(RactorMessage)]
pub enum DataMsg {
    /// The training shard of client `client`.
    Shard { client: usize, stamp: Stamp, reply: RpcReplyPort<Arc<Vec<Example>>> },
    /// Dev and test sets for the evaluator.
    EvalSets { stamp: Stamp, reply: RpcReplyPort<EvalSets> },
}

/// To a client; the one message that crosses to client processes (its payloads are
/// [`crate::wire`]'s).
#[derive(RactorClusterMessage)]
pub enum ClientMsg {
    /// Run the local search of one round from the server's distribution, and give up at the
    /// request's deadline (the server's round deadline): a search still running then is
    /// abandoned between iterations, and a request that waited past it is dropped, so a late
    /// client does not carry a stale round into the next one.
    #[rpc]
    Train(TrainRequest, RpcReplyPort<TrainReply>),
    /// `Train` with `traffic = "replay"`: what the client's replica misses instead of the
    /// distribution, its upload (or what its replica needs first) in the reply.
    #[rpc]
    Replay(ReplayRequest, RpcReplyPort<ReplayReply>),
}

/// To the server process's registry, from client processes (`fedbpt join`).
#[derive(RactorClusterMessage)]
pub enum RegistryMsg {
    /// Admit a client process's sites, if its configuration matches the server's.
    #[rpc]
    Join(JoinRequest, RpcReplyPort<JoinReply>),
}

/// The clients as the supervisor knows them.
#[derive(Clone, Debug, Default)]
pub struct Roster {
    /// A handle per client; `None` once its restart limit was reached.
    pub clients: Vec<Option<ActorRef<ClientMsg>>>,
    /// Clients restarted since the previous roster, in increasing order.
    pub restarted: Vec<usize>,
}

/// To whoever keeps the clients: the client supervisor in one process, the remote roster
/// (`crate::cluster`) when they live in other processes.
#[derive(RactorMessage)]
pub enum SupervisorMsg {
    /// The roster. With `wait`, answered once no restart is pending (every client running or
    /// given up; remotely: every site is connected, or the join or rejoin wait passed);
    /// without, at once.
    Roster { wait: bool, stamp: Stamp, reply: RpcReplyPort<Roster> },
    /// Remote roster only: the registry admitted these sites of this node.
    Admitted { node: String, sites: Vec<usize> },
    /// Remote roster only: a roster request waited long enough (its index).
    WaitOver(u64),
}

/// What the evaluator reports for one global mean.
#[derive(Debug, Clone, Serialize)]
pub struct Evaluation {
    pub dev_acc: f64,
    pub dev_loss: f64,
    pub test_acc: Option<f64>,
    /// Dev examples by true class (rows) and predicted class (columns).
    pub dev_confusion: Vec<Vec<usize>>,
}

/// To the evaluator.
#[derive(RactorMessage)]
pub enum EvalMsg {
    /// Accuracy of the manual prompt and of z = 0 on the test set.
    Baselines { stamp: Stamp, reply: Reply<(f64, f64)> },
    /// Dev metrics of `z`, and test accuracy when `with_test`.
    Evaluate {
        z: Vec<f32>,
        with_test: bool,
        from: &'static str,
        stamp: Stamp,
        reply: Reply<Evaluation>,
    },
}

/// To the server.
#[derive(RactorMessage)]
pub enum ServerMsg {
    /// Run round `round` (the server sends itself the next one).
    RunRound { round: usize, stamp: Stamp },
}
