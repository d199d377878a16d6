//! Bytes per client-round of each way of running a round, as the messages encode (docs/traffic.md
//! prints [`markdown`] of [`table`]).
//!
//! The distribution mode's sizes are the bincode payloads `metrics.jsonl` counts today; the
//! replay mode's are the [`super::codec`] encodings; the reference's download is an estimate of
//! its pickled pycma object, counting only its two `d x d` float64 matrices (covariance and
//! eigenbasis), and its upload the paper's count, `d` float64s.

use crate::cmaes::CmaFlavour;
use crate::protocol::{pack_upper, ClientUpdate, SearchDistribution};
use crate::strategy::{FedBpt, ServerSigma};

use super::{
    ReplayContext, ReplayError, RoundDigest, SearchRecord, StartDigest, StateHash, StateTransfer,
    ToldRecord, Upload,
};

/// The run the sizes are for: the paper's 200 rounds (the last one numbered 199), a local search
/// of `iterations` x `popsize`, a two-class task.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub dim: usize,
    pub clients: usize,
    pub popsize: usize,
    pub iterations: usize,
}

const ROUND: usize = 199;

/// Bytes of each message for one [`Shape`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrafficRow {
    pub dim: usize,
    pub clients: usize,
    /// Replay mode: one [`Upload`] per client-round.
    pub replay_up: usize,
    /// Replay mode: one [`RoundDigest`] of every client per client-round.
    pub replay_down: usize,
    /// Distribution mode: one [`ClientUpdate`].
    pub distribution_up: usize,
    /// Distribution mode: one [`SearchDistribution`] with the packed covariance.
    pub distribution_down: usize,
    /// The reference's upload, as the paper counts it: `8 d`.
    pub reference_up: usize,
    /// The reference's download, at least: `16 d^2` (covariance and eigenbasis in float64).
    pub reference_down: usize,
    /// Replay mode, once per resynchronized client: the whole FedBPT strategy.
    pub state_transfer: usize,
}

/// The last client's upload of the last round, with the seed it would derive.
fn upload(shape: &Shape, ctx: &ReplayContext) -> Upload {
    let client = shape.clients.saturating_sub(1);
    Upload {
        round: ROUND,
        client,
        seed: ctx.search_seed(client, ROUND),
        start: StartDigest([0xa5; 8]),
        record: record(shape),
        loss: 0.75,
        class_counts: vec![8, 8],
    }
}

fn record(shape: &Shape) -> SearchRecord {
    let order: Vec<u32> = (0..shape.popsize as u32).rev().collect();
    SearchRecord { rankings: vec![order; shape.iterations], fitness: 0.5432, start_fitness: None }
}

/// The sizes for one shape (deterministic: they depend on the values only through the
/// variable-length integers, which these values make as long as a real run's).
pub fn row(shape: &Shape) -> Result<TrafficRow, ReplayError> {
    let ctx = ReplayContext {
        run_seed: 42,
        popsize: shape.popsize,
        iterations: shape.iterations,
        flavour: CmaFlavour::Tutorial,
    };
    let told =
        (0..shape.clients).map(|client| ToldRecord { client, record: record(shape) }).collect();
    let digest = RoundDigest { round: ROUND, told, state: StateHash([0x5a; 32]) };
    let d = shape.dim;
    let strategy = FedBpt::new(d, 1.0, 7, true, ServerSigma::Reference, shape.popsize)?;
    let dist = SearchDistribution {
        round: ROUND,
        mean: vec![0.123; d],
        sigma: 0.5,
        covariance: Some(pack_upper(strategy.strategy().covariance())),
    };
    let update = ClientUpdate {
        client: shape.clients.saturating_sub(1),
        round: ROUND,
        mean: vec![0.123; d],
        fitness: 0.5432,
        loss: 0.75,
        sigmas: vec![0.9; shape.iterations],
        start_fitness: None,
        class_counts: vec![8, 8],
    };
    Ok(TrafficRow {
        dim: d,
        clients: shape.clients,
        replay_up: upload(shape, &ctx).encoded_len()?,
        replay_down: digest.encoded_len()?,
        distribution_up: bincode_len(&update)?,
        distribution_down: bincode_len(&dist)?,
        reference_up: 8 * d,
        reference_down: 16 * d * d,
        state_transfer: StateTransfer::new(ROUND + 1, &strategy)?.encoded_len()?,
    })
}

fn bincode_len<T: serde::Serialize>(value: &T) -> Result<usize, ReplayError> {
    bincode::serde::encode_to_vec(value, bincode::config::standard()).map(|v| v.len()).map_err(
        |e| ReplayError::Encode { what: "distribution-mode message", reason: e.to_string() },
    )
}

/// The rows of docs/traffic.md: d = 100 and 500, 10 and 100 clients, 4 local iterations of 5.
pub fn table() -> Result<Vec<TrafficRow>, ReplayError> {
    let mut rows = Vec::new();
    for dim in [100, 500] {
        for clients in [10, 100] {
            rows.push(row(&Shape { dim, clients, popsize: 5, iterations: 4 })?);
        }
    }
    Ok(rows)
}

/// The rows as a markdown table, bytes per client-round.
pub fn markdown(rows: &[TrafficRow]) -> String {
    let mut out = String::from(
        "| d | clients | replay up | replay down | distribution up | distribution down \
         | reference up | reference down (at least) | replay resync (once) |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.dim,
            r.clients,
            r.replay_up,
            r.replay_down,
            r.distribution_up,
            r.distribution_down,
            r.reference_up,
            r.reference_down,
            r.state_transfer
        ));
    }
    out
}
