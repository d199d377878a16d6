//! The server: owns the aggregation rule and the run's records, runs the rounds one after the
//! other (each in [`crate::round`]), writes a checkpoint after every round, and reports one
//! record per round to its owner.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use fedbpt::config::Config;
use fedbpt::objective::BestOnDev;
use fedbpt::replay::RoundDigest;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc::UnboundedSender;

use crate::messages::{EvalMsg, ServerMsg, SupervisorMsg};
use crate::profile::{self, MessageInfo};
pub use crate::round::RoundRecord;
use crate::round::{run_round, RoundContext};
pub use crate::server_strategy::ServerStrategy;

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
    /// [`fedbpt::data::Dataset::fingerprint`] of the data the run trained on (absent in
    /// checkpoints written before it was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_fingerprint: Option<String>,
    /// `traffic = "replay"`: the digest of every round so far, from which the clients' new
    /// replicas catch up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay_log: Option<Vec<RoundDigest>>,
    /// Clients restarted during the checkpoint's round, for the next round's record.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub restarted_after: Vec<usize>,
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
        let cp: Checkpoint =
            serde_json::from_value(v).map_err(|e| format!("not a fedbpt checkpoint: {e}"))?;
        cp.check()?;
        Ok(cp)
    }

    /// Whether the checkpoint is one its own configuration could have written: a valid config
    /// with rounds left, one record per round done, and an aggregator state and best-on-dev
    /// vector of the configured rule and dimension. Runs before any actor starts.
    pub fn check(&self) -> Result<(), String> {
        let cfg = &self.config;
        cfg.validate().map_err(|e| format!("its configuration: {e}"))?;
        if self.round == 0 || self.round > cfg.num_rounds {
            return Err(format!("round {} is not in 1 .. {}", self.round, cfg.num_rounds));
        }
        if self.round == cfg.num_rounds {
            return Err(format!("the run it checkpoints has finished ({} rounds)", self.round));
        }
        if self.records.len() != self.round
            || self.records.iter().enumerate().any(|(i, r)| r.round != i + 1)
        {
            let rounds: Vec<usize> = self.records.iter().map(|r| r.round).collect();
            return Err(format!("records for rounds {rounds:?} after round {}", self.round));
        }
        for r in &self.records {
            r.check()?;
        }
        if let Some(i) = self.restarted_after.iter().find(|&&i| i >= cfg.num_users) {
            return Err(format!(
                "restarted_after names client index {i}, beyond the run's {} clients",
                cfg.num_users
            ));
        }
        if let Some(b) = &self.best_dev {
            let in_range = (0.0..=1.0).contains(&b.metric) && b.loss.is_finite() && b.loss >= 0.0;
            if !in_range {
                return Err(format!(
                    "best-on-dev metric {} (not in [0, 1]) or loss {} (not a finite \
                     non-negative number)",
                    b.metric, b.loss
                ));
            }
            if b.z.len() != cfg.intrinsic_dim {
                return Err(format!(
                    "best-on-dev vector of dimension {}, intrinsic_dim is {}",
                    b.z.len(),
                    cfg.intrinsic_dim
                ));
            }
            if b.step > self.round {
                return Err(format!(
                    "best-on-dev from round {} after round {}",
                    b.step, self.round
                ));
            }
        }
        let mut strategy = ServerStrategy::for_config(cfg).map_err(|e| e.to_string())?;
        self.restore_into(&mut strategy)
    }

    /// Puts the checkpoint's server state into `strategy` (built from its configuration): the
    /// aggregator's, and with `traffic = "replay"` the digest log, checked against it.
    pub fn restore_into(&self, strategy: &mut ServerStrategy) -> Result<(), String> {
        strategy
            .aggregator_mut()
            .restore(self.aggregator.clone())
            .map_err(|e| format!("aggregator state: {e}"))?;
        match (strategy.replay_mut(), &self.replay_log) {
            (Some(book), Some(log)) => book.resume(self.round, log.clone()),
            (Some(_), None) => Err("traffic = \"replay\" but no replay_log: the clients' new \
                                    replicas could not catch up"
                .into()),
            (None, Some(_)) => {
                Err("a replay_log, but traffic = \"distribution\": written by another run".into())
            }
            (None, None) => Ok(()),
        }
    }
}

/// What the server tells its owner.
#[derive(Debug)]
pub enum ServerEvent {
    Round(Box<RoundRecord>),
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
    pub aggregator: ServerStrategy,
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
    /// How long a roster request may take ([`RoundContext::roster_patience`]).
    pub roster_patience: std::time::Duration,
    /// Recorded in every checkpoint.
    pub data_fingerprint: String,
}

pub struct ServerState {
    args: ServerArgs,
    best_dev: Option<BestOnDev>,
    records: Vec<RoundRecord>,
    restarted_before: Vec<usize>,
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
        let mut restarted_before = Vec::new();
        if let Some(cp) = args.resume.take() {
            cp.restore_into(&mut args.aggregator)?;
            best_dev = cp.best_dev;
            records = cp.records;
            restarted_before = cp.restarted_after;
        }
        Ok(ServerState { args, best_dev, records, restarted_before })
    }

    async fn handle(
        &self,
        me: ActorRef<ServerMsg>,
        msg: ServerMsg,
        state: &mut ServerState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ServerMsg::RunRound { round, stamp } => match round_of(state, round, stamp).await {
                Ok(record) => {
                    state.records.push(record.clone());
                    if let Err(e) = write_checkpoint(state, round) {
                        let _ = state
                            .args
                            .events
                            .send(ServerEvent::Failed(format!("round {round}: checkpoint: {e}")));
                        return Ok(());
                    }
                    let _ = state.args.events.send(ServerEvent::Round(Box::new(record)));
                    if round < state.args.cfg.num_rounds {
                        me.send_message(ServerMsg::RunRound {
                            round: round + 1,
                            stamp: profile::stamp(),
                        })?;
                    } else {
                        let final_z = state.args.aggregator.aggregator().global_mean();
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
        aggregator: state.args.aggregator.aggregator().snapshot().map_err(|e| e.to_string())?,
        best_dev: state.best_dev.clone(),
        records: state.records.clone(),
        config: (*state.args.cfg).clone(),
        data_fingerprint: Some(state.args.data_fingerprint.clone()),
        replay_log: state.args.aggregator.replay().map(|book| book.log().to_vec()),
        restarted_after: state.restarted_before.clone(),
    };
    let path = dir.join("checkpoint.json");
    let tmp = dir.join("checkpoint.json.tmp");
    let bytes = serde_json::to_vec(&cp).map_err(|e| e.to_string())?;
    std::fs::write(&tmp, bytes).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, &path).map_err(|e| format!("{}: {e}", path.display()))
}

/// Runs `round` on the server's state, inside the span of its `RunRound` message.
async fn round_of(
    state: &mut ServerState,
    round: usize,
    stamp: profile::Stamp,
) -> Result<RoundRecord, String> {
    let sender = if round == 1 || state.records.is_empty() { "main" } else { "server" };
    let _span = profile::handling(stamp, || MessageInfo {
        sender: sender.into(),
        receiver: "server".into(),
        message: "RunRound",
        round: Some(round),
        bytes: 0,
    });
    let a = &mut state.args;
    let mut ctx = RoundContext {
        cfg: &a.cfg,
        strategy: &mut a.aggregator,
        supervisor: &a.supervisor,
        evaluator: &a.evaluator,
        started: a.started,
        best_dev: &mut state.best_dev,
        roster_patience: a.roster_patience,
        restarted_before: &mut state.restarted_before,
    };
    run_round(&mut ctx, round).await
}
