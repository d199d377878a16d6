//! Replayed rounds (issue 29): a round's traffic as seeds and rankings instead of means and
//! covariances.
//!
//! CMA-ES is rank-based: a tell uses the fitness values only through their ranking (the update
//! reads [`crate::cmaes::ranking`] of them; only the record of the best point keeps a value,
//! which no [`ClientUpdate`] carries). So a client's local search is fully determined by the
//! distribution it started from, its seed, and the ranking of each iteration's candidates, in
//! both flavours: pycma's mirrors are the worst-ranked candidates of the previous tell and their
//! rescaling draws from the same seeded generator. The server's tell is determined by the told
//! means (replayed), the values it ranks them by and its own seeded state.
//!
//! Three messages, each with a strict codec ([`codec`]):
//! - [`Upload`], client to server: the round, the client, its seed, a digest of the distribution
//!   it searched from, one ranking per local iteration, and the values the records and the
//!   server's ranking need (final fitness and loss, the received mean's fitness, class counts).
//!   [`replay_upload`] turns it back into the client's [`ClientUpdate`], bit for bit.
//! - [`RoundDigest`], server to clients: the told clients' rankings and fitness values, and the
//!   hash of the server's state after the round. A [`Replica`] replays every told search and
//!   the server's aggregation, and compares the hash.
//! - [`StateTransfer`], server to a client whose replica diverged or fell too far behind: the
//!   whole strategy, once.
//!
//! Exactness needs the same binary on every party (the same floating-point operations in the
//! same order); the hash catches anything else.

mod codec;
mod error;
mod global;
mod memo;
pub mod traffic;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::cmaes::{ranking, CmaFlavour};
use crate::local_search::{LocalSearch, Scored};
use crate::protocol::{ClientUpdate, SearchDistribution};
use crate::seeds::{derive, tag};
use crate::strategy::{Aggregator, FedAvgBbt, FedBpt, Told};

pub use error::ReplayError;
pub use global::GlobalStrategy;
pub use memo::ReplayMemo;

use codec::Kind;

// Bounds above any configurable run (an upload is a ranking per iteration, a digest one record
// per told client, a transfer two `d x d` f64 matrices: 1.6 GB at the largest d, 10,000), so a
// peer cannot make a party read more. An upload is held to its run's own bound too
// ([`ReplayContext::max_upload_len`]).
const UPLOAD: Kind = Kind { what: "replay upload", tag: 0x51, max_len: 1 << 24 };
const DIGEST: Kind = Kind { what: "round digest", tag: 0x52, max_len: 1 << 30 };
const TRANSFER: Kind = Kind { what: "state transfer", tag: 0x53, max_len: 1 << 31 };

/// Classes an upload's class counts may name, for [`ReplayContext::max_upload_len`].
const MAX_CLASSES: usize = 1 << 12;

/// What every party must agree on to replay a client's search: the run seed its search seed
/// derives from, and the local search's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayContext {
    /// The run's seed (`seed` in the configuration).
    pub run_seed: u64,
    /// Candidates per local iteration (`local_popsize`).
    pub popsize: usize,
    /// Local iterations per round (`local_iter`).
    pub iterations: usize,
    /// The local CMA-ES (`cma`).
    pub flavour: CmaFlavour,
}

impl ReplayContext {
    /// The seed of `client`'s local search in `round`, as the runtime's client derives it.
    pub fn search_seed(&self, client: usize, round: usize) -> u64 {
        derive(self.run_seed, &[tag::CLIENT_SEARCH, client as u64, round as u64])
    }

    /// The most bytes an upload of this run can take: its fixed fields (at most 10 bytes
    /// each), one ranking per iteration (a length and an index per candidate, at most 5 bytes
    /// each) and up to [`MAX_CLASSES`] class counts.
    pub fn max_upload_len(&self) -> usize {
        let ranking = 5 * (1 + self.popsize);
        1 + 10 * 12 + self.iterations * ranking + 5 * (1 + MAX_CLASSES)
    }
}

/// The first bytes of the SHA-256 of a search distribution's encoding: enough to tell that a
/// client searched from another distribution than the server's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartDigest(pub [u8; 8]);

impl StartDigest {
    pub fn of(dist: &SearchDistribution) -> Result<Self, ReplayError> {
        let full = sha256_of("search distribution", dist)?;
        let mut out = [0u8; 8];
        out.copy_from_slice(&full[..8]);
        Ok(Self(out))
    }
}

impl std::fmt::Display for StartDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

/// SHA-256 of a strategy's whole state (bincode encoding: every `f64` by its bits, the random
/// generator included).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateHash(pub [u8; 32]);

impl StateHash {
    pub fn of<S: Serialize>(state: &S) -> Result<Self, ReplayError> {
        sha256_of("strategy state", state).map(Self)
    }
}

impl std::fmt::Display for StateHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

fn sha256_of<T: Serialize>(what: &'static str, value: &T) -> Result<[u8; 32], ReplayError> {
    // Streamed: at d = 500 the state is 4 MB, hashed every round by every party.
    let mut hasher = HashWriter(Sha256::new());
    codec::encode_into(what, value, &mut hasher)?;
    Ok(hasher.0.finalize().into())
}

/// A SHA-256 fed by bincode's encoder.
struct HashWriter(Sha256);

impl bincode::enc::write::Writer for HashWriter {
    fn write(&mut self, bytes: &[u8]) -> Result<(), bincode::error::EncodeError> {
        self.0.update(bytes);
        Ok(())
    }
}

/// What a local search leaves to be replayed: each iteration's ranking (candidate indices,
/// best first) and the values the server ranks the client by.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SearchRecord {
    pub rankings: Vec<Vec<u32>>,
    /// Fitness of the final mean ([`ClientUpdate::fitness`]).
    pub fitness: f64,
    /// Fitness of the received mean ([`ClientUpdate::start_fitness`]).
    pub start_fitness: Option<f64>,
}

/// A client's compact upload for a round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Upload {
    pub round: usize,
    pub client: usize,
    /// The seed its search used; must be [`ReplayContext::search_seed`].
    pub seed: u64,
    /// The distribution it searched from.
    pub start: StartDigest,
    pub record: SearchRecord,
    /// Plain loss of the final mean (for the records only).
    pub loss: f64,
    /// Examples per class of its shard (for the records only).
    pub class_counts: Vec<u32>,
}

impl Upload {
    pub fn encode(&self) -> Result<Vec<u8>, ReplayError> {
        codec::encode(&UPLOAD, self)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, ReplayError> {
        codec::decode(&UPLOAD, bytes)
    }

    /// [`Upload::decode`], first refusing bytes beyond what an upload of this run can take:
    /// decoded, an upload can take some 24 times its bytes (an empty ranking is one byte on the
    /// wire and a `Vec` in memory), so the kind's 16 MiB alone would let a peer make the server
    /// allocate 400 MB.
    pub fn decode_in(ctx: &ReplayContext, bytes: &[u8]) -> Result<Self, ReplayError> {
        let max = ctx.max_upload_len();
        if bytes.len() > max {
            return Err(ReplayError::TooLong { what: UPLOAD.what, len: bytes.len(), max });
        }
        Self::decode(bytes)
    }

    /// Bytes of [`Upload::encode`].
    pub fn encoded_len(&self) -> Result<usize, ReplayError> {
        codec::encoded_len(&UPLOAD, self)
    }
}

/// A local search that records its rankings: [`LocalSearch`] seeded as the runtime's client
/// seeds it, telling the candidates it asked.
#[derive(Debug, Clone)]
pub struct RecordedSearch {
    search: LocalSearch,
    client: usize,
    round: usize,
    seed: u64,
    start: StartDigest,
    asked: Option<Vec<Vec<f64>>>,
    rankings: Vec<Vec<u32>>,
}

impl RecordedSearch {
    /// `client`'s search of `dist.round` from `dist`.
    pub fn start(
        ctx: &ReplayContext,
        dist: &SearchDistribution,
        client: usize,
    ) -> Result<Self, ReplayError> {
        let seed = ctx.search_seed(client, dist.round);
        let search = LocalSearch::start(dist, ctx.popsize, ctx.iterations, seed, ctx.flavour)?;
        let start = StartDigest::of(dist)?;
        let rankings = Vec::with_capacity(ctx.iterations);
        Ok(Self { search, client, round: dist.round, seed, start, asked: None, rankings })
    }

    /// The next population, or `None` once every iteration has been told.
    pub fn ask(&mut self) -> Option<Vec<Vec<f64>>> {
        let xs = self.search.ask()?;
        self.asked = Some(xs.clone());
        Some(xs)
    }

    /// Fitness (lower is better) of the population the last ask returned.
    pub fn tell(&mut self, fitness: &[f64]) -> Result<(), ReplayError> {
        let asked = self
            .asked
            .as_ref()
            .ok_or_else(|| crate::Error::Optimizer("tell without a pending ask".into()))?;
        self.search.tell(asked, fitness)?;
        self.asked = None;
        let order = ranking(fitness).into_iter().map(index_u32).collect::<Result<_, _>>()?;
        self.rankings.push(order);
        Ok(())
    }

    /// The search so far (its mean is the prompt to score last).
    pub fn search(&self) -> &LocalSearch {
        &self.search
    }

    /// The update the distribution mode uploads and the upload that replays it.
    pub fn finish(
        self,
        final_score: Scored,
        start_fitness: Option<f64>,
        class_counts: Vec<u32>,
    ) -> Result<(ClientUpdate, Upload), ReplayError> {
        let mut update = self.search.finish(self.client, self.round, final_score)?;
        update.start_fitness = start_fitness;
        update.class_counts = class_counts.clone();
        let upload = Upload {
            round: self.round,
            client: self.client,
            seed: self.seed,
            start: self.start,
            record: SearchRecord {
                rankings: self.rankings,
                fitness: final_score.fitness,
                start_fitness,
            },
            loss: final_score.loss,
            class_counts,
        };
        Ok((update, upload))
    }
}

fn index_u32(k: usize) -> Result<u32, ReplayError> {
    u32::try_from(k)
        .map_err(|_| crate::Error::Optimizer(format!("candidate index {k} beyond u32")).into())
}

/// The server's side of an upload from `from`: checks it against the distribution the server
/// sent for the round and replays the search, giving the [`ClientUpdate`] the client computed.
pub fn replay_upload(
    ctx: &ReplayContext,
    dist: &SearchDistribution,
    from: usize,
    upload: &Upload,
) -> Result<ClientUpdate, ReplayError> {
    let round = dist.round;
    if upload.round != round {
        return Err(ReplayError::WrongRound { expected: round, found: upload.round });
    }
    if upload.client != from {
        return Err(ReplayError::WrongClient { round, expected: from, found: upload.client });
    }
    let expected = ctx.search_seed(from, round);
    if upload.seed != expected {
        return Err(ReplayError::WrongSeed { round, client: from, expected, found: upload.seed });
    }
    let start = StartDigest::of(dist)?;
    if upload.start != start {
        return Err(ReplayError::WrongStart {
            round,
            client: from,
            expected: start.to_string(),
            found: upload.start.to_string(),
        });
    }
    finite(round, from, "loss", upload.loss)?;
    let mut update = replay_search(ctx, dist, from, &upload.record)?;
    update.loss = upload.loss;
    update.class_counts = upload.class_counts.clone();
    Ok(update)
}

/// Replays `client`'s search of `dist.round` from its record. The loss and class counts, which
/// only the records read, are left at zero and empty.
pub fn replay_search(
    ctx: &ReplayContext,
    dist: &SearchDistribution,
    client: usize,
    record: &SearchRecord,
) -> Result<ClientUpdate, ReplayError> {
    let round = dist.round;
    check_record(ctx, round, client, record)?;
    let seed = ctx.search_seed(client, round);
    let mut search = LocalSearch::start(dist, ctx.popsize, ctx.iterations, seed, ctx.flavour)?;
    for order in &record.rankings {
        let asked = search.ask().ok_or_else(|| {
            crate::Error::Optimizer(format!("round {round}, client {client}: search ended early"))
        })?;
        // Any values with this ranking give the same tell; these have no ties.
        let mut fitness = vec![0.0; order.len()];
        for (place, &k) in order.iter().enumerate() {
            fitness[k as usize] = place as f64;
        }
        search.tell(&asked, &fitness)?;
    }
    let score = Scored { fitness: record.fitness, loss: 0.0 };
    let mut update = search.finish(client, round, score)?;
    update.start_fitness = record.start_fitness;
    Ok(update)
}

fn finite(round: usize, client: usize, what: &'static str, value: f64) -> Result<(), ReplayError> {
    if value.is_finite() {
        Ok(())
    } else {
        Err(ReplayError::NonFinite { round, client, what, value })
    }
}

/// One ranking per iteration, each a permutation of the population; finite values.
fn check_record(
    ctx: &ReplayContext,
    round: usize,
    client: usize,
    record: &SearchRecord,
) -> Result<(), ReplayError> {
    let found = record.rankings.len();
    if found != ctx.iterations {
        return Err(ReplayError::IterationCount { round, client, expected: ctx.iterations, found });
    }
    let popsize = ctx.popsize;
    for (iteration, order) in record.rankings.iter().enumerate() {
        if order.len() != popsize {
            return Err(ReplayError::RankingLength {
                round,
                client,
                iteration,
                expected: popsize,
                found: order.len(),
            });
        }
        let mut seen = vec![false; popsize];
        for &index in order {
            let slot = seen.get_mut(index as usize).ok_or(ReplayError::IndexOutOfRange {
                round,
                client,
                iteration,
                index,
                popsize,
            })?;
            if *slot {
                return Err(ReplayError::RepeatedIndex { round, client, iteration, index });
            }
            *slot = true;
        }
    }
    finite(round, client, "fitness", record.fitness)?;
    if let Some(start) = record.start_fitness {
        finite(round, client, "fitness of the received mean", start)?;
    }
    Ok(())
}

/// One told client in a [`RoundDigest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToldRecord {
    pub client: usize,
    pub record: SearchRecord,
}

/// The download of a replayed round: the searches the server told (none when the round was not
/// aggregated) and the hash of its state after the round. The same for every client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundDigest {
    pub round: usize,
    /// By increasing client.
    pub told: Vec<ToldRecord>,
    pub state: StateHash,
}

impl RoundDigest {
    /// The digest of `round` once `strategy` has aggregated the updates of `told` (empty for a
    /// round skipped or whose aggregation failed: the state did not change).
    pub fn after_round<S: Serialize>(
        round: usize,
        told: &[Upload],
        strategy: &S,
    ) -> Result<Self, ReplayError> {
        let mut records: Vec<ToldRecord> = Vec::with_capacity(told.len());
        for u in told {
            if u.round != round {
                return Err(ReplayError::WrongRound { expected: round, found: u.round });
            }
            records.push(ToldRecord { client: u.client, record: u.record.clone() });
        }
        records.sort_by_key(|t| t.client);
        check_told_order(round, &records)?;
        Ok(Self { round, told: records, state: StateHash::of(strategy)? })
    }

    pub fn encode(&self) -> Result<Vec<u8>, ReplayError> {
        codec::encode(&DIGEST, self)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, ReplayError> {
        codec::decode(&DIGEST, bytes)
    }

    /// Bytes of [`RoundDigest::encode`].
    pub fn encoded_len(&self) -> Result<usize, ReplayError> {
        codec::encoded_len(&DIGEST, self)
    }
}

fn check_told_order(round: usize, told: &[ToldRecord]) -> Result<(), ReplayError> {
    for pair in told.windows(2) {
        if pair[1].client <= pair[0].client {
            return Err(ReplayError::ToldOrder { round, client: pair[1].client });
        }
    }
    Ok(())
}

/// The whole strategy, for a replica to start over from: what a client gets once when its
/// replica diverged, or when replaying the rounds it missed would take more bytes. (The round's
/// [`SearchDistribution`] alone lets a client search the round, but not replicate the next
/// ones: the global CMA-ES's paths, `f64` covariance and eigenbasis are not in it.)
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StateTransfer<S> {
    /// The round the state starts.
    pub next_round: usize,
    pub state: S,
    pub hash: StateHash,
}

impl<S: Replayable> StateTransfer<S> {
    /// `strategy` as of the start of `next_round`.
    pub fn new(next_round: usize, strategy: &S) -> Result<Self, ReplayError> {
        Ok(Self { next_round, state: strategy.clone(), hash: StateHash::of(strategy)? })
    }

    pub fn encode(&self) -> Result<Vec<u8>, ReplayError> {
        codec::encode(&TRANSFER, self)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, ReplayError> {
        codec::decode(&TRANSFER, bytes)
    }

    /// Bytes of [`StateTransfer::encode`].
    pub fn encoded_len(&self) -> Result<usize, ReplayError> {
        codec::encoded_len(&TRANSFER, self)
    }

    /// Bytes of the transfer of `strategy`, counted without copying or hashing it (bincode
    /// writes a struct as the tuple of its fields).
    pub fn encoded_len_of(next_round: usize, strategy: &S) -> Result<usize, ReplayError> {
        codec::encoded_len(&TRANSFER, &(next_round, strategy, StateHash([0; 32])))
    }
}

/// A server strategy a client can replicate: its whole state serializes (for the hash and the
/// transfer) and it restores from its own snapshots (which check the rule and dimension).
pub trait Replayable: Aggregator + Clone + Serialize + DeserializeOwned {
    /// Moves the state one ulp off (the step size): what another build's rounding could do.
    fn nudge(&mut self) -> crate::Result<()>;
}

impl Replayable for FedBpt {
    fn nudge(&mut self) -> crate::Result<()> {
        self.nudge_sigma()
    }
}

impl Replayable for FedAvgBbt {
    fn nudge(&mut self) -> crate::Result<()> {
        self.nudge_sigma()
    }
}

/// A client's copy of the server's strategy, kept in step by replaying each round's digest.
#[derive(Debug, Clone)]
pub struct Replica<S> {
    strategy: S,
    ctx: ReplayContext,
    /// The round whose digest comes next (whose distribution the replica gives).
    next_round: usize,
    /// The round whose replay diverged, until a resync.
    diverged_at: Option<usize>,
}

impl<S: Replayable> Replica<S> {
    /// A replica of `strategy` (built from the same configuration as the server's, or a
    /// transferred state) that starts with `next_round`.
    pub fn new(strategy: S, ctx: ReplayContext, next_round: usize) -> Self {
        Self { strategy, ctx, next_round, diverged_at: None }
    }

    /// The distribution the server sends for `round`: what this client searches from.
    pub fn distribution(&self, round: usize) -> Result<SearchDistribution, ReplayError> {
        self.check_usable()?;
        if round != self.next_round {
            return Err(ReplayError::RoundOrder { expected: self.next_round, found: round });
        }
        Ok(self.strategy.configure(round))
    }

    /// Replays a round: every told search from the round's distribution, then the server's
    /// aggregation, then the hash. Returns the ranks and weights the server gave. A digest of
    /// another round is refused and changes nothing; a digest that does not replay, or whose
    /// hash differs, marks the replica diverged until [`Replica::resync`].
    pub fn apply(&mut self, digest: &RoundDigest) -> Result<Vec<Told>, ReplayError> {
        self.apply_with(digest, None)
    }

    /// [`Replica::apply`], taking the replay from `memo` when another replica of this process
    /// made it from the same state (and leaving it there for the others).
    pub fn apply_memo(
        &mut self,
        digest: &RoundDigest,
        memo: &ReplayMemo<S>,
    ) -> Result<Vec<Told>, ReplayError> {
        self.apply_with(digest, Some(memo))
    }

    fn apply_with(
        &mut self,
        digest: &RoundDigest,
        memo: Option<&ReplayMemo<S>>,
    ) -> Result<Vec<Told>, ReplayError> {
        self.check_usable()?;
        let round = digest.round;
        if round != self.next_round {
            return Err(ReplayError::RoundOrder { expected: self.next_round, found: round });
        }
        // A digest this replica cannot replay leaves it a round behind for good: like a
        // mismatch, it needs the state.
        let replayed = match memo {
            Some(memo) => memo.replay(self, digest),
            None => self.replay(digest),
        };
        let (next, told) = replayed.inspect_err(|_| self.diverged_at = Some(round))?;
        self.strategy = next;
        self.next_round = round + 1;
        let found = StateHash::of(&self.strategy)?;
        if found != digest.state {
            self.diverged_at = Some(round);
            return Err(ReplayError::StateMismatch {
                round,
                expected: digest.state.to_string(),
                found: found.to_string(),
            });
        }
        Ok(told)
    }

    /// The strategy after `digest`'s round, and the ranks and weights it gave.
    fn replay(&self, digest: &RoundDigest) -> Result<(S, Vec<Told>), ReplayError> {
        let round = digest.round;
        check_told_order(round, &digest.told)?;
        let dist = self.strategy.configure(round);
        let updates = digest
            .told
            .iter()
            .map(|t| replay_search(&self.ctx, &dist, t.client, &t.record))
            .collect::<Result<Vec<_>, _>>()?;
        let mut next = self.strategy.clone();
        let told = if updates.is_empty() { Vec::new() } else { next.aggregate(round, &updates)? };
        Ok((next, told))
    }

    /// Starts over from the server's state: checks the transfer's hash, restores through the
    /// strategy's own snapshot checks (same rule, flavour, ranking and dimension), and checks the
    /// hash of the result.
    pub fn resync(&mut self, transfer: &StateTransfer<S>) -> Result<(), ReplayError> {
        let round = transfer.next_round;
        let carried = StateHash::of(&transfer.state)?;
        if carried != transfer.hash {
            return Err(ReplayError::TransferHash {
                round,
                expected: transfer.hash.to_string(),
                found: carried.to_string(),
            });
        }
        let mut restored = self.strategy.clone();
        restored.restore(transfer.state.snapshot()?)?;
        let found = StateHash::of(&restored)?;
        if found != transfer.hash {
            return Err(ReplayError::TransferHash {
                round,
                expected: transfer.hash.to_string(),
                found: found.to_string(),
            });
        }
        self.strategy = restored;
        self.next_round = round;
        self.diverged_at = None;
        Ok(())
    }

    fn check_usable(&self) -> Result<(), ReplayError> {
        match self.diverged_at {
            Some(round) => Err(ReplayError::Desynced { round }),
            None => Ok(()),
        }
    }

    /// Whether the last replay matched the server's hash (and no resync is pending).
    pub fn in_sync(&self) -> bool {
        self.diverged_at.is_none()
    }

    pub fn next_round(&self) -> usize {
        self.next_round
    }

    pub fn strategy(&self) -> &S {
        &self.strategy
    }

    pub fn state_hash(&self) -> Result<StateHash, ReplayError> {
        StateHash::of(&self.strategy)
    }

    /// Moves the replica one ulp off the server's state, for fault injection: the next digest
    /// it applies no longer reproduces the server's hash.
    pub fn inject_divergence(&mut self) -> Result<(), ReplayError> {
        Ok(self.strategy.nudge()?)
    }

    /// The strategy, for tests that corrupt a replica on purpose.
    #[cfg(test)]
    pub(crate) fn strategy_mut(&mut self) -> &mut S {
        &mut self.strategy
    }
}

/// How a client that last applied the digest of round `from - 1` catches up to `to`: the
/// missed digests, or the whole state when that is fewer bytes.
#[derive(Debug, Clone)]
pub enum CatchUp<S> {
    Replay(Vec<RoundDigest>),
    State(StateTransfer<S>),
}

/// The smaller catch-up for a client whose replica starts `from` while the server's `strategy`
/// starts `to`; `log` holds the server's digests (any rounds, in any order). The state when a
/// missed digest is not in the log.
pub fn catch_up<S: Replayable>(
    log: &[RoundDigest],
    from: usize,
    to: usize,
    strategy: &S,
) -> Result<CatchUp<S>, ReplayError> {
    let mut missed = Vec::with_capacity(to.saturating_sub(from));
    for round in from..to {
        match log.iter().find(|d| d.round == round) {
            Some(d) => missed.push(d.clone()),
            None => return Ok(CatchUp::State(StateTransfer::new(to, strategy)?)),
        }
    }
    let replay_bytes =
        missed.iter().map(RoundDigest::encoded_len).sum::<Result<usize, ReplayError>>()?;
    if StateTransfer::encoded_len_of(to, strategy)? < replay_bytes {
        Ok(CatchUp::State(StateTransfer::new(to, strategy)?))
    } else {
        Ok(CatchUp::Replay(missed))
    }
}

#[cfg(test)]
mod tests;
