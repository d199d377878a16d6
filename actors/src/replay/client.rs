//! A client's side of a replayed round: its replica of the server's strategy, brought up to the
//! round by the download, gives the distribution it searches from.

use fedbpt::config::Config;
use fedbpt::protocol::SearchDistribution;
use std::sync::LazyLock;

use fedbpt::replay::{
    GlobalStrategy, ReplayContext, ReplayMemo, Replica, RoundDigest, StateTransfer,
};

use super::{Answer, Download};

/// This process's replays, shared by its clients' replicas (in a simulation they hold the same
/// state and apply the same digests; a catch-up or a retry may lag a round or two).
static MEMO: LazyLock<ReplayMemo<GlobalStrategy>> = LazyLock::new(|| ReplayMemo::new(4));

/// The first round a replica built from the configuration replays.
pub const FIRST_ROUND: usize = 1;

pub type ClientReplica = Replica<GlobalStrategy>;

/// A replica at the server's starting state, as every (re)started client builds it.
pub fn new_replica(cfg: &Config) -> Result<ClientReplica, String> {
    let strategy = GlobalStrategy::from_config(cfg).map_err(|e| e.to_string())?;
    Ok(Replica::new(strategy, ReplayContext::from_config(cfg), FIRST_ROUND))
}

/// What a client does with a download.
#[derive(Debug)]
pub enum Start {
    /// Its replica is at the round: search from this distribution.
    Search(SearchDistribution),
    /// It needs more from the server first.
    Ask(Answer),
}

/// Applies `download` to `replica`: the state if it carries one, then every digest the replica
/// has not applied yet. A refused message is an error (the reply says why); a replica that
/// falls short of the round, or whose hash differs, asks for what it needs. With `corrupt`
/// (`faults.corrupt_replica`), the replica is moved off the server's state just before the
/// first digest it applies, so that the digest's hash catches it; with none to apply, it is
/// left as it is.
pub fn start_round(
    replica: &mut ClientReplica,
    download: &Download,
    mut corrupt: bool,
) -> Result<Start, String> {
    if let Some(bytes) = &download.transfer {
        let transfer = StateTransfer::<GlobalStrategy>::decode(bytes).map_err(|e| e.to_string())?;
        replica.resync(&transfer).map_err(|e| e.to_string())?;
    }
    for bytes in &download.digests {
        let digest = RoundDigest::decode(bytes).map_err(|e| e.to_string())?;
        // Applied already: the server learns where a replica stands only from its uploads.
        if digest.round < replica.next_round() {
            continue;
        }
        if digest.round > replica.next_round() || !replica.in_sync() {
            break;
        }
        if std::mem::take(&mut corrupt) {
            replica.inject_divergence().map_err(|e| format!("injected fault: {e}"))?;
            tracing::warn!("injected fault: replica moved off the server's state");
        }
        if let Err(e) = replica.apply_memo(&digest, &MEMO) {
            return Ok(Start::Ask(Answer::Diverged { why: e.to_string() }));
        }
    }
    if corrupt && download.transfer.is_none() {
        tracing::warn!("injected fault: no digest to apply, the replica is left as it is");
    }
    if !replica.in_sync() {
        return Ok(Start::Ask(Answer::Diverged { why: "out of sync".into() }));
    }
    let next = replica.next_round();
    if next < download.round {
        return Ok(Start::Ask(Answer::Behind { next_round: next }));
    }
    replica.distribution(download.round).map(Start::Search).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use fedbpt::strategy::Aggregator;

    use super::*;
    use crate::replay::server::{ReplayServer, CATCH_UP_MAX_ROUNDS};

    #[test]
    fn a_replica_behind_asks_for_the_missed_rounds_and_a_diverged_one_for_the_state() {
        let cfg = Config { intrinsic_dim: 6, num_users: 3, ..Config::default() };
        let mut server = ReplayServer::from_config(&cfg).unwrap();
        // Rounds 1 and 2 not aggregated: their digests carry the state's hash.
        server.close_round(1, &[], &[]).unwrap();
        server.close_round(2, &[], &[]).unwrap();
        let dist = server.strategy().configure(3);
        let round = server.round(&dist);
        let search = |s: Start| match s {
            Start::Search(d) => d,
            other => panic!("{other:?}"),
        };

        // Sent only round 2's digest, a new replica (a restarted client) asks from round 1.
        let mut replica = new_replica(&cfg).unwrap();
        let last = round.download(2).unwrap();
        match start_round(&mut replica, &last, false).unwrap() {
            Start::Ask(Answer::Behind { next_round: 1 }) => {}
            other => panic!("{other:?}"),
        }
        let missed = round.download(1).unwrap();
        assert_eq!(search(start_round(&mut replica, &missed, false).unwrap()), dist);

        // A digest whose hash is not the replica's state: it asks for the state, and searches
        // from the server's distribution once it has it.
        let mut replica = new_replica(&cfg).unwrap();
        let mut digest = RoundDigest::decode(&missed.digests[0]).unwrap();
        digest.state.0[0] ^= 1;
        let bad = Download { round: 3, transfer: None, digests: vec![digest.encode().unwrap()] };
        match start_round(&mut replica, &bad, false).unwrap() {
            Start::Ask(Answer::Diverged { why }) => assert!(why.contains("out of sync"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert!(!replica.in_sync());
        assert_eq!(
            search(start_round(&mut replica, &round.state().unwrap(), false).unwrap()),
            dist
        );

        // More missed rounds than a catch-up replays: the state, though the digests are fewer
        // bytes.
        let mut server = ReplayServer::from_config(&cfg).unwrap();
        let last = CATCH_UP_MAX_ROUNDS + 1;
        for r in 1..=last {
            server.close_round(r, &[], &[]).unwrap();
        }
        let far = server.round(&server.strategy().configure(last + 1));
        let d = far.download(1).unwrap();
        assert!(d.transfer.is_some() && d.digests.is_empty(), "{} digests", d.digests.len());
        let near = far.download(2).unwrap();
        assert_eq!((near.transfer.is_none(), near.digests.len()), (true, CATCH_UP_MAX_ROUNDS));

        // Bytes that are no digest are refused with why.
        let garbage = Download { round: 3, transfer: None, digests: vec![vec![0x52, 0xff]] };
        let e = start_round(&mut new_replica(&cfg).unwrap(), &garbage, false).unwrap_err();
        assert!(e.contains("round digest"), "{e}");
    }
}
