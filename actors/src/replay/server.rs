//! The server's side of replayed rounds: its strategy as one concrete type (hashed into every
//! digest, sent whole to a diverged replica), the log of its digests, where it knows each
//! client's replica stands, and one client's exchange of a round.

use std::sync::Arc;
use std::time::Duration;

use fedbpt::config::Config;
use fedbpt::protocol::SearchDistribution;
use fedbpt::replay::{
    catch_up, replay_upload, CatchUp, GlobalStrategy, ReplayContext, RoundDigest, StateHash,
    StateTransfer, Upload,
};
use ractor::rpc::CallResult;
use ractor::ActorRef;

use super::client::FIRST_ROUND;
use super::{Answer, Download, ReplayReply, ReplayRequest, ReplayTrain};
use crate::exchange::{Exchanged, Outcome, Received};
use crate::messages::{now_ms, ClientFault, ClientMsg};
use crate::profile;

/// Missed rounds beyond which a replica gets the state rather than the digests, whatever the
/// bytes: a catch-up replays every told search of every missed round inside the round's
/// deadline, and after a resume every client catches up at once.
pub const CATCH_UP_MAX_ROUNDS: usize = 16;

/// The server's state in replay mode.
pub struct ReplayServer {
    strategy: GlobalStrategy,
    ctx: ReplayContext,
    /// Every round's digest, in round order.
    log: Vec<RoundDigest>,
    /// For each client, the round whose digest its replica needs next, as far as the server
    /// knows (from its last upload, or its restart).
    known: Vec<usize>,
}

impl ReplayServer {
    pub fn from_config(cfg: &Config) -> fedbpt::Result<Self> {
        Ok(Self {
            strategy: GlobalStrategy::from_config(cfg)?,
            ctx: ReplayContext::from_config(cfg),
            log: Vec::new(),
            known: vec![FIRST_ROUND; cfg.num_users],
        })
    }

    pub fn strategy(&self) -> &GlobalStrategy {
        &self.strategy
    }

    pub fn strategy_mut(&mut self) -> &mut GlobalStrategy {
        &mut self.strategy
    }

    /// Every round's digest so far, in round order (what a checkpoint keeps).
    pub fn log(&self) -> &[RoundDigest] {
        &self.log
    }

    /// Continues a run after `round` from its checkpoint: the strategy already restored, `log`
    /// its digests, which must be those of rounds 1 to `round` in order and end at the hash of
    /// the restored strategy. Every client is taken to start from a new replica (a client
    /// process that kept its replica skips the digests it applied, or resyncs).
    pub fn resume(&mut self, round: usize, log: Vec<RoundDigest>) -> Result<(), String> {
        let rounds: Vec<usize> = log.iter().map(|d| d.round).collect();
        if !rounds.iter().copied().eq(1..=round) {
            return Err(format!(
                "replay_log holds the digests of rounds {rounds:?}, not of rounds 1 to {round}"
            ));
        }
        let state = StateHash::of(&self.strategy).map_err(|e| e.to_string())?;
        if let Some(last) = log.last().filter(|d| d.state != state) {
            return Err(format!(
                "replay_log's digest of round {round} ends at state {}, the checkpoint's \
                 aggregator state hashes to {state}",
                last.state
            ));
        }
        self.log = log;
        self.known.iter_mut().for_each(|k| *k = FIRST_ROUND);
        Ok(())
    }

    /// Restarted clients start from a replica built from the configuration.
    pub fn restarted(&mut self, clients: &[usize]) {
        for &i in clients {
            if let Some(k) = self.known.get_mut(i) {
                *k = FIRST_ROUND;
            }
        }
    }

    /// What this round's exchanges share: the distribution uploads replay from, and the log and
    /// state a catch-up or resync is built from (a copy: the exchanges run as tasks).
    pub fn round(&self, dist: &SearchDistribution) -> Arc<ReplayRound> {
        Arc::new(ReplayRound {
            ctx: self.ctx,
            dist: dist.clone(),
            strategy: self.strategy.clone(),
            log: self.log.clone(),
        })
    }

    /// The round `client`'s replica needs next, as far as the server knows.
    pub fn known(&self, client: usize) -> usize {
        self.known.get(client).copied().unwrap_or(FIRST_ROUND)
    }

    /// Logs the round's digest once the strategy aggregated `told` (none when the round was not
    /// aggregated), and notes that the clients of `uploaded` replayed up to this round.
    pub fn close_round(
        &mut self,
        round: usize,
        told: &[Upload],
        uploaded: &[usize],
    ) -> Result<(), String> {
        let digest =
            RoundDigest::after_round(round, told, &self.strategy).map_err(|e| e.to_string())?;
        self.log.push(digest);
        for &i in uploaded {
            if let Some(k) = self.known.get_mut(i) {
                *k = round;
            }
        }
        Ok(())
    }
}

/// One round as every exchange of it sees it.
pub struct ReplayRound {
    ctx: ReplayContext,
    dist: SearchDistribution,
    strategy: GlobalStrategy,
    log: Vec<RoundDigest>,
}

impl ReplayRound {
    /// What a replica that needs the digest of `from` next is sent: the missed digests, or the
    /// state when that is fewer bytes (or a digest is not logged).
    pub fn download(&self, from: usize) -> Result<Download, String> {
        let round = self.dist.round;
        if from > round {
            return Err(format!("a replica at round {from}, ahead of round {round}"));
        }
        let logged = |r: usize| self.log.iter().find(|d| d.round == r);
        // One missed round (every round, for a client taking part in each): no state to weigh
        // against.
        let plan = match (round - from, logged(from)) {
            (0, _) => CatchUp::Replay(Vec::new()),
            (1, Some(d)) => CatchUp::Replay(vec![d.clone()]),
            (missed, _) if missed > CATCH_UP_MAX_ROUNDS => CatchUp::State(
                StateTransfer::new(round, &self.strategy).map_err(|e| e.to_string())?,
            ),
            _ => catch_up(&self.log, from, round, &self.strategy).map_err(|e| e.to_string())?,
        };
        Ok(match plan {
            CatchUp::Replay(digests) => Download {
                round,
                transfer: None,
                digests: digests
                    .iter()
                    .map(RoundDigest::encode)
                    .collect::<Result<_, _>>()
                    .map_err(|e| e.to_string())?,
            },
            CatchUp::State(t) => Download {
                round,
                transfer: Some(t.encode().map_err(|e| e.to_string())?),
                digests: Vec::new(),
            },
        })
    }

    /// The whole state at the start of the round, for a diverged replica.
    pub fn state(&self) -> Result<Download, String> {
        let t = StateTransfer::new(self.dist.round, &self.strategy).map_err(|e| e.to_string())?;
        Ok(Download {
            round: self.dist.round,
            transfer: Some(t.encode().map_err(|e| e.to_string())?),
            digests: Vec::new(),
        })
    }

    /// The update an upload from `client` stands for, or why it is refused.
    fn replay(&self, client: usize, bytes: &[u8]) -> Result<Received, String> {
        let upload = Upload::decode_in(&self.ctx, bytes).map_err(|e| e.to_string())?;
        let update =
            replay_upload(&self.ctx, &self.dist, client, &upload).map_err(|e| e.to_string())?;
        Ok(Received { update, upload: Some(upload), bytes_up: bytes.len() })
    }
}

/// `client`'s round in replay mode: the download, then at most one catch-up (its replica was
/// behind) and one state transfer (its replica diverged, possibly found by the catch-up), then
/// its upload replayed. Everything refused is a failure with why, never an end of the run.
pub(crate) async fn exchange(
    (i, client): (usize, ActorRef<ClientMsg>),
    shared: Arc<ReplayRound>,
    first: Download,
    fault: Option<ClientFault>,
    deadline_ms: u64,
) -> Exchanged {
    let mut out = Exchanged { outcome: Outcome::Late, bytes_down: 0, resynced: false };
    let mut download = first;
    let mut caught_up = false;
    loop {
        out.bytes_down += download.bytes();
        let left = Duration::from_millis(deadline_ms.saturating_sub(now_ms()));
        let request = ReplayTrain { download, fault, deadline_ms, stamp: profile::stamp() };
        let answer = match client
            .call(|reply| ClientMsg::Replay(ReplayRequest::Valid(request), reply), Some(left))
            .await
        {
            Ok(CallResult::Success(ReplayReply(Ok((answer, stamp))))) => (answer, stamp),
            Ok(CallResult::Success(ReplayReply(Err(e)))) => {
                out.outcome = Outcome::Failed(e);
                return out;
            }
            Ok(CallResult::Timeout) => return out,
            Ok(CallResult::SenderError) => {
                out.outcome = Outcome::Failed("stopped or dropped its reply".into());
                return out;
            }
            Err(e) => {
                out.outcome = Outcome::Failed(format!("unreachable: {e}"));
                return out;
            }
        };
        let next = match answer {
            (Answer::Upload(bytes), stamp) => {
                out.outcome = match shared.replay(i, &bytes) {
                    Ok(r) => Outcome::Ok(Box::new(r), stamp),
                    Err(why) => {
                        tracing::warn!("site-{}: upload refused: {why}", i + 1);
                        Outcome::Failed(format!("upload refused: {why}"))
                    }
                };
                return out;
            }
            (Answer::Behind { .. }, _) if caught_up || out.resynced => {
                Err("its replica is still behind after a catch-up".into())
            }
            (Answer::Diverged { .. }, _) if out.resynced => {
                Err("its replica still differs after the state".into())
            }
            (Answer::Behind { next_round }, _) => {
                caught_up = true;
                shared.download(next_round)
            }
            (Answer::Diverged { why }, _) => {
                tracing::warn!(
                    "site-{}: replica diverged in round {} ({why}): sending the state",
                    i + 1,
                    shared.dist.round
                );
                out.resynced = true;
                shared.state()
            }
        };
        match next {
            Ok(d) => download = d,
            Err(why) => {
                out.outcome = Outcome::Failed(why);
                return out;
            }
        }
    }
}
