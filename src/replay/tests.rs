use super::*;
use crate::protocol::PackedCovariance;
use crate::strategy::{sample_clients, ServerFitness, ServerSigma, ServerWeights};

const DIM: usize = 6;

fn ctx(flavour: CmaFlavour) -> ReplayContext {
    ReplayContext { run_seed: 11, popsize: 5, iterations: 4, flavour }
}

/// Client `k`'s test function: a quadratic with its own centre and axis scales, so clients rank
/// differently and the server's ranking matters.
fn fitness_of(client: usize, x: &[f64]) -> f64 {
    x.iter()
        .enumerate()
        .map(|(i, v)| {
            let centre = ((client * 7 + i * 3) % 5) as f64 * 0.3 - 0.6;
            let scale = 1.0 + ((client + 2 * i) % 4) as f64;
            scale * (v - centre).powi(2)
        })
        .sum()
}

fn score_of(client: usize, mean: &[f32]) -> Scored {
    let x: Vec<f64> = mean.iter().map(|&v| f64::from(v)).collect();
    let f = fitness_of(client, &x);
    Scored { fitness: f, loss: f + 0.25 }
}

fn bytes<T: Serialize>(v: &T) -> Vec<u8> {
    bincode::serde::encode_to_vec(v, bincode::config::standard()).unwrap()
}

/// The distribution mode's client, as the runtime runs it: a [`LocalSearch`] seeded from the
/// run seed, the client and the round, told every population's fitness.
fn live_update(
    ctx: &ReplayContext,
    dist: &SearchDistribution,
    client: usize,
    improvement: bool,
) -> ClientUpdate {
    let seed = derive(ctx.run_seed, &[tag::CLIENT_SEARCH, client as u64, dist.round as u64]);
    let mut s = LocalSearch::start(dist, ctx.popsize, ctx.iterations, seed, ctx.flavour).unwrap();
    while let Some(xs) = s.ask() {
        let fs: Vec<f64> = xs.iter().map(|x| fitness_of(client, x)).collect();
        s.tell(&xs, &fs).unwrap();
    }
    let final_score = score_of(client, &s.mean());
    let mut u = s.finish(client, dist.round, final_score).unwrap();
    u.start_fitness = improvement.then(|| score_of(client, &dist.mean).fitness);
    u.class_counts = vec![client as u32 + 1, 3];
    u
}

/// The replay mode's client: the same search, recorded.
fn recorded(
    ctx: &ReplayContext,
    dist: &SearchDistribution,
    client: usize,
    improvement: bool,
) -> (ClientUpdate, Upload) {
    let mut s = RecordedSearch::start(ctx, dist, client).unwrap();
    while let Some(xs) = s.ask() {
        let fs: Vec<f64> = xs.iter().map(|x| fitness_of(client, x)).collect();
        s.tell(&fs).unwrap();
    }
    let final_score = score_of(client, &s.search().mean());
    let start = improvement.then(|| score_of(client, &dist.mean).fitness);
    s.finish(final_score, start, vec![client as u32 + 1, 3]).unwrap()
}

/// A start distribution with a covariance that is not the identity (as the server sends after
/// a few rounds), rounded to `f32` as on the wire.
fn dist_with_covariance(round: usize) -> SearchDistribution {
    let mut upper = Vec::new();
    for i in 0..DIM {
        for j in i..DIM {
            upper.push(if i == j { 1.0 + 0.1 * i as f32 } else { 0.05 / (1 + i + j) as f32 });
        }
    }
    SearchDistribution {
        round,
        mean: (0..DIM).map(|i| 0.1 * i as f32 - 0.2).collect(),
        sigma: 0.7,
        covariance: Some(PackedCovariance { dim: DIM, upper }),
    }
}

#[test]
fn a_replayed_search_is_the_live_search_bit_for_bit() {
    for flavour in [CmaFlavour::Tutorial, CmaFlavour::Pycma] {
        let ctx = ctx(flavour);
        let mut plain = dist_with_covariance(3);
        plain.covariance = None;
        for dist in [dist_with_covariance(3), plain] {
            for client in [0, 4] {
                for improvement in [false, true] {
                    let live = live_update(&ctx, &dist, client, improvement);
                    let (recorded_update, upload) = recorded(&ctx, &dist, client, improvement);
                    assert_eq!(bytes(&recorded_update), bytes(&live), "recording changes nothing");
                    let decoded = Upload::decode(&upload.encode().unwrap()).unwrap();
                    let replayed = replay_upload(&ctx, &dist, client, &decoded).unwrap();
                    assert_eq!(bytes(&replayed), bytes(&live), "{flavour:?} client {client}");
                    assert_eq!(replayed.sigmas.len(), ctx.iterations);
                }
            }
        }
    }
}

#[test]
fn the_pycma_search_mirrors_and_still_replays() {
    // Below popsize 6 pycma mirrors the worst candidate: the replay must see the same mirrors.
    let ctx = ctx(CmaFlavour::Pycma);
    let dist = dist_with_covariance(0);
    let mut s = RecordedSearch::start(&ctx, &dist, 2).unwrap();
    let mut mirrored = 0;
    while let Some(xs) = s.ask() {
        mirrored += s.search().strategy().mirrors_asked();
        let fs: Vec<f64> = xs.iter().map(|x| fitness_of(2, x)).collect();
        s.tell(&fs).unwrap();
    }
    assert!(mirrored > 0, "the test must exercise the mirrors");
    let final_score = score_of(2, &s.search().mean());
    let (live, upload) = s.finish(final_score, None, Vec::new()).unwrap();
    let replayed = replay_upload(&ctx, &dist, 2, &upload).unwrap();
    assert_eq!(bytes(&replayed), bytes(&live));
}

#[test]
fn another_ranking_replays_another_search() {
    // The replay follows the rankings: swapping the best two of one iteration moves the mean.
    let ctx = ctx(CmaFlavour::Tutorial);
    let dist = dist_with_covariance(1);
    let (live, mut upload) = recorded(&ctx, &dist, 1, false);
    upload.record.rankings[1].swap(0, 1);
    let replayed = replay_upload(&ctx, &dist, 1, &upload).unwrap();
    assert_ne!(replayed.mean, live.mean);
}

fn fedbpt(flavour: CmaFlavour, fitness: ServerFitness, weights: ServerWeights) -> FedBpt {
    FedBpt::new(DIM, 0.8, 5, true, ServerSigma::Reference, 5)
        .unwrap()
        .with_flavour(flavour, 3)
        .unwrap()
        .with_ranking(fitness, weights)
}

fn snapshot_text<S: Aggregator>(s: &S) -> String {
    s.snapshot().unwrap().to_string()
}

/// Runs `rounds` rounds of `strategy` with 5 clients, 3 sampled per round, one sampled client's
/// reply lost in round 1 and round 2 short of its quorum (not aggregated), three ways: the
/// distribution mode's server (live updates), the replay mode's server (replayed uploads) and a
/// client's replica fed the encoded digests; a second replica catches up once at the end.
/// Checks they agree bit for bit after every round.
fn replicate<S: Replayable>(strategy: S, flavour: CmaFlavour, improvement: bool, rounds: usize) {
    let ctx = ctx(flavour);
    let mut dist_server = strategy.clone();
    let mut replay_server = strategy.clone();
    let mut replica = Replica::new(strategy.clone(), ctx, 0);
    let mut late = Replica::new(strategy, ctx, 0);
    let mut log = Vec::new();
    for round in 0..rounds {
        let dist = dist_server.configure(round);
        assert_eq!(bytes(&replica.distribution(round).unwrap()), bytes(&dist));
        let mut sampled = sample_clients(3, round, 5, 3);
        if round == 1 {
            sampled.remove(0);
        }
        let mut live = Vec::new();
        let mut uploads = Vec::new();
        let mut replayed = Vec::new();
        for &client in &sampled {
            live.push(live_update(&ctx, &dist, client, improvement));
            let client_dist = replica.distribution(round).unwrap();
            let (_, upload) = recorded(&ctx, &client_dist, client, improvement);
            let decoded = Upload::decode(&upload.encode().unwrap()).unwrap();
            replayed.push(replay_upload(&ctx, &dist, client, &decoded).unwrap());
            uploads.push(decoded);
        }
        let aggregated = round != 2;
        let told = if aggregated {
            let told = dist_server.aggregate(round, &live).unwrap();
            assert_eq!(replay_server.aggregate(round, &replayed).unwrap(), told);
            told
        } else {
            uploads.clear();
            Vec::new()
        };
        assert_eq!(snapshot_text(&replay_server), snapshot_text(&dist_server));
        let digest = RoundDigest::after_round(round, &uploads, &replay_server).unwrap();
        let digest = RoundDigest::decode(&digest.encode().unwrap()).unwrap();
        assert_eq!(replica.apply(&digest).unwrap(), told, "round {round}");
        assert_eq!(replica.state_hash().unwrap(), StateHash::of(&dist_server).unwrap());
        assert_eq!(snapshot_text(replica.strategy()), snapshot_text(&dist_server));
        assert_eq!(bytes(replica.strategy()), bytes(&dist_server));
        log.push(digest);
    }
    assert_ne!(
        StateHash::of(late.strategy()).unwrap(),
        StateHash::of(&dist_server).unwrap(),
        "the rounds moved the state"
    );
    match catch_up(&log, late.next_round(), rounds, &dist_server).unwrap() {
        CatchUp::Replay(missed) => {
            assert_eq!(missed.len(), rounds);
            for d in &missed {
                late.apply(d).unwrap();
            }
        }
        CatchUp::State(transfer) => late.resync(&transfer).unwrap(),
    }
    assert_eq!(late.next_round(), rounds);
    assert_eq!(bytes(late.strategy()), bytes(&dist_server));
}

#[test]
fn a_replica_follows_the_fedbpt_server_bit_for_bit() {
    for flavour in [CmaFlavour::Tutorial, CmaFlavour::Pycma] {
        for fitness in [ServerFitness::Loss, ServerFitness::Permuted, ServerFitness::Improvement] {
            for weights in [ServerWeights::Rank, ServerWeights::Equal] {
                let improvement = fitness == ServerFitness::Improvement;
                replicate(fedbpt(flavour, fitness, weights), flavour, improvement, 5);
            }
        }
    }
}

#[test]
fn a_replica_follows_a_pycma_server_in_40_dimensions() {
    // More coordinates than candidates: the covariance is far from the identity and the
    // eigendecompositions lag, as in a real run.
    let strategy = FedBpt::new(40, 0.8, 5, true, ServerSigma::Reference, 5)
        .unwrap()
        .with_flavour(CmaFlavour::Pycma, 3)
        .unwrap()
        .with_ranking(ServerFitness::Improvement, ServerWeights::Rank);
    replicate(strategy, CmaFlavour::Pycma, true, 4);
}

#[test]
fn a_replica_follows_the_client_rms_rule_and_fedavg() {
    let rms = FedBpt::new(DIM, 0.8, 5, true, ServerSigma::ClientRms, 5).unwrap();
    replicate(rms, CmaFlavour::Tutorial, false, 4);
    replicate(FedAvgBbt::new(DIM, 0.8).unwrap(), CmaFlavour::Tutorial, false, 4);
    replicate(FedAvgBbt::new(DIM, 0.8).unwrap(), CmaFlavour::Pycma, false, 4);
}

/// Adds `delta` to the first number under `v`.
fn nudge_first_number(v: &mut serde_json::Value, delta: f64) -> bool {
    match v {
        serde_json::Value::Number(n) => match n.as_f64() {
            Some(x) => {
                *v = serde_json::json!(x + delta);
                true
            }
            None => false,
        },
        serde_json::Value::Array(items) => items.iter_mut().any(|i| nudge_first_number(i, delta)),
        serde_json::Value::Object(map) => map.values_mut().any(|i| nudge_first_number(i, delta)),
        _ => false,
    }
}

/// One round of `server` with all 5 clients from the replica's distribution; returns the digest.
fn round_of(server: &mut FedBpt, ctx: &ReplayContext, round: usize) -> RoundDigest {
    let dist = server.configure(round);
    let (updates, uploads): (Vec<_>, Vec<_>) =
        (0..5).map(|k| recorded(ctx, &dist, k, false)).unzip();
    server.aggregate(round, &updates).unwrap();
    RoundDigest::after_round(round, &uploads, server).unwrap()
}

#[test]
fn a_corrupted_replica_is_caught_by_the_hash_and_resynchronized() {
    let ctx = ctx(CmaFlavour::Tutorial);
    let strategy = fedbpt(CmaFlavour::Tutorial, ServerFitness::Loss, ServerWeights::Rank);
    let mut server = strategy.clone();
    let mut replica = Replica::new(strategy, ctx, 0);
    let digest = round_of(&mut server, &ctx, 0);
    replica.apply(&digest).unwrap();

    // One coordinate of the replica's mean nudged by one part in a million.
    let mut snap = replica.strategy().snapshot().unwrap();
    assert!(nudge_first_number(&mut snap["state"]["es"]["mean"], 1e-6));
    replica.strategy_mut().restore(snap).unwrap();
    assert_ne!(replica.state_hash().unwrap(), StateHash::of(&server).unwrap());

    // Its client searches from the wrong distribution: the server refuses the upload.
    let stale = replica.distribution(1).unwrap();
    let (_, upload) = recorded(&ctx, &stale, 0, false);
    let err = replay_upload(&ctx, &server.configure(1), 0, &upload).unwrap_err();
    assert!(matches!(err, ReplayError::WrongStart { round: 1, client: 0, .. }), "{err}");

    // The next digest does not reproduce the server's hash.
    let digest = round_of(&mut server, &ctx, 1);
    let err = replica.apply(&digest).unwrap_err();
    assert!(matches!(err, ReplayError::StateMismatch { round: 1, .. }), "{err}");
    assert!(!replica.in_sync());
    assert!(matches!(replica.distribution(2), Err(ReplayError::Desynced { round: 1 })));

    // One state transfer, through its bytes, and the replica follows again.
    let transfer = StateTransfer::new(2, &server).unwrap();
    let transfer = StateTransfer::<FedBpt>::decode(&transfer.encode().unwrap()).unwrap();
    replica.resync(&transfer).unwrap();
    assert!(replica.in_sync());
    assert_eq!(bytes(replica.strategy()), bytes(&server));
    for round in 2..4 {
        assert_eq!(bytes(&replica.distribution(round).unwrap()), bytes(&server.configure(round)));
        let digest = round_of(&mut server, &ctx, round);
        replica.apply(&digest).unwrap();
        assert_eq!(bytes(replica.strategy()), bytes(&server));
    }
}

#[test]
fn a_missed_digest_or_a_bad_transfer_is_refused() {
    let ctx = ctx(CmaFlavour::Tutorial);
    let strategy = fedbpt(CmaFlavour::Tutorial, ServerFitness::Loss, ServerWeights::Rank);
    let mut server = strategy.clone();
    let mut replica = Replica::new(strategy, ctx, 0);
    let _missed = round_of(&mut server, &ctx, 0);
    let next = round_of(&mut server, &ctx, 1);
    let err = replica.apply(&next).unwrap_err();
    assert!(matches!(err, ReplayError::RoundOrder { expected: 0, found: 1 }), "{err}");
    assert!(replica.in_sync(), "refused before replaying: nothing changed");

    let mut tampered = StateTransfer::new(2, &server).unwrap();
    tampered.hash.0[0] ^= 1;
    let err = replica.resync(&tampered).unwrap_err();
    assert!(matches!(err, ReplayError::TransferHash { round: 2, .. }), "{err}");

    // A state of another configuration does not restore into this replica.
    let other = fedbpt(CmaFlavour::Pycma, ServerFitness::Loss, ServerWeights::Rank);
    let err = replica.resync(&StateTransfer::new(2, &other).unwrap()).unwrap_err();
    assert!(matches!(err, ReplayError::Method(_)), "{err}");
    assert_eq!(replica.next_round(), 0);
}

#[test]
fn a_bad_upload_is_refused_with_its_reason() {
    let ctx = ctx(CmaFlavour::Tutorial);
    let dist = dist_with_covariance(4);
    let (_, good) = recorded(&ctx, &dist, 2, false);
    replay_upload(&ctx, &dist, 2, &good).unwrap();
    let refused = |edit: &dyn Fn(&mut Upload), from: usize| {
        let mut u = good.clone();
        edit(&mut u);
        replay_upload(&ctx, &dist, from, &u).unwrap_err()
    };
    let e = refused(
        &|u| {
            u.record.rankings[2].pop();
        },
        2,
    );
    assert!(matches!(e, ReplayError::RankingLength { iteration: 2, expected: 5, found: 4, .. }));
    let e = refused(&|u| u.record.rankings[1][3] = u.record.rankings[1][0], 2);
    assert!(matches!(e, ReplayError::RepeatedIndex { iteration: 1, .. }), "{e}");
    let e = refused(&|u| u.record.rankings[0][4] = 5, 2);
    assert!(matches!(e, ReplayError::IndexOutOfRange { index: 5, popsize: 5, .. }), "{e}");
    let e = refused(&|u| u.record.rankings.truncate(3), 2);
    assert!(matches!(e, ReplayError::IterationCount { expected: 4, found: 3, .. }), "{e}");
    let e = refused(&|u| u.round = 5, 2);
    assert!(matches!(e, ReplayError::WrongRound { expected: 4, found: 5 }), "{e}");
    let e = refused(&|_| {}, 3);
    assert!(matches!(e, ReplayError::WrongClient { expected: 3, found: 2, .. }), "{e}");
    let e = refused(&|u| u.seed = ctx.search_seed(2, 3), 2);
    assert!(matches!(e, ReplayError::WrongSeed { round: 4, client: 2, .. }), "{e}");
    let e = refused(&|u| u.record.fitness = f64::NAN, 2);
    assert!(matches!(e, ReplayError::NonFinite { what: "fitness", .. }), "{e}");
    let e = refused(&|u| u.loss = f64::INFINITY, 2);
    assert!(matches!(e, ReplayError::NonFinite { what: "loss", .. }), "{e}");
    let e = refused(&|u| u.record.start_fitness = Some(f64::NAN), 2);
    assert!(matches!(e, ReplayError::NonFinite { .. }), "{e}");
    // Every refusal says why.
    assert!(e.to_string().contains("round 4, client 2"), "{e}");
}

#[test]
fn bad_bytes_are_refused_with_their_reason() {
    let ctx = ctx(CmaFlavour::Tutorial);
    let dist = dist_with_covariance(4);
    let (_, upload) = recorded(&ctx, &dist, 2, false);
    let encoded = upload.encode().unwrap();
    assert_eq!(Upload::decode(&encoded).unwrap(), upload);
    for cut in 0..encoded.len() {
        let e = Upload::decode(&encoded[..cut]).unwrap_err();
        assert!(matches!(e, ReplayError::Truncated { .. } | ReplayError::Malformed { .. }), "{e}");
    }
    let e = Upload::decode(&encoded[..encoded.len() - 1]).unwrap_err();
    assert!(matches!(e, ReplayError::Truncated { what: "replay upload" }), "{e}");
    let mut long = encoded.clone();
    long.extend_from_slice(&[0, 0]);
    let e = Upload::decode(&long).unwrap_err();
    assert!(matches!(e, ReplayError::TrailingBytes { extra: 2, .. }), "{e}");
    let strategy = fedbpt(CmaFlavour::Tutorial, ServerFitness::Loss, ServerWeights::Rank);
    let digest = RoundDigest::after_round(4, &[upload], &strategy).unwrap();
    let e = Upload::decode(&digest.encode().unwrap()).unwrap_err();
    assert!(matches!(e, ReplayError::WrongTag { found: 0x52, expected: 0x51, .. }), "{e}");
    let digest_bytes = digest.encode().unwrap();
    let e = RoundDigest::decode(&digest_bytes[..digest_bytes.len() - 3]).unwrap_err();
    assert!(matches!(e, ReplayError::Truncated { what: "round digest" }), "{e}");
    let e = Upload::decode(&vec![0x51; (1 << 24) + 1]).unwrap_err();
    assert!(matches!(e, ReplayError::TooLong { max: 16_777_216, .. }), "{e}");
    // A length far beyond the bytes is refused before it is allocated.
    let e = Upload::decode(&[0x51, 1, 2, 0xfd, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f])
        .unwrap_err();
    assert!(matches!(e, ReplayError::Truncated { .. } | ReplayError::Malformed { .. }), "{e}");
}

/// An upload of 700,000 empty rankings, each one byte: valid bincode that would allocate 24
/// bytes per ranking (16.8 MB from 0.7 MB).
fn upload_of_empty_rankings() -> Vec<u8> {
    let count: u32 = 700_000;
    let mut bytes = vec![0x51, 1, 2, 0]; // tag, round, client, seed
    bytes.extend_from_slice(&[0; 8]); // start digest
    bytes.push(0xfc); // a u32 length follows
    bytes.extend_from_slice(&count.to_le_bytes());
    bytes.extend(std::iter::repeat_n(0u8, count as usize));
    bytes.extend_from_slice(&0.5f64.to_le_bytes()); // fitness
    bytes.push(0); // no start fitness
    bytes.extend_from_slice(&0.5f64.to_le_bytes()); // loss
    bytes.push(0); // no class counts
    bytes
}

#[test]
fn an_upload_cannot_claim_more_memory_than_its_run_allows() {
    let bytes = upload_of_empty_rankings();
    // Within the kind's bound, it decodes (into 16.8 MB)...
    let decoded = Upload::decode(&bytes).map(|u| u.record.rankings.len());
    assert_eq!(decoded.ok(), Some(700_000));
    // ... so the run's own bound refuses it by its length, before decoding.
    let ctx = ctx(CmaFlavour::Tutorial);
    let e = Upload::decode_in(&ctx, &bytes).unwrap_err();
    let max = ctx.max_upload_len();
    assert!(matches!(e, ReplayError::TooLong { what: "replay upload", .. }), "{e}");
    assert!(max < 30_000, "{max}");
    // An honest upload is well inside it.
    let (_, upload) = recorded(&ctx, &dist_with_covariance(4), 2, false);
    let encoded = upload.encode().unwrap();
    assert!(encoded.len() < max / 100);
    assert_eq!(Upload::decode_in(&ctx, &encoded).unwrap(), upload);
}

#[test]
fn a_digest_with_repeated_or_unordered_clients_is_refused() {
    let ctx = ctx(CmaFlavour::Tutorial);
    let strategy = fedbpt(CmaFlavour::Tutorial, ServerFitness::Loss, ServerWeights::Rank);
    let dist = strategy.configure(0);
    let (_, a) = recorded(&ctx, &dist, 1, false);
    let (_, b) = recorded(&ctx, &dist, 3, false);
    let twice = RoundDigest::after_round(0, &[a.clone(), a.clone()], &strategy).unwrap_err();
    assert!(matches!(twice, ReplayError::ToldOrder { round: 0, client: 1 }), "{twice}");
    let other_round = RoundDigest::after_round(1, std::slice::from_ref(&a), &strategy).unwrap_err();
    assert!(matches!(other_round, ReplayError::WrongRound { expected: 1, found: 0 }));
    let mut digest = RoundDigest::after_round(0, &[a, b], &strategy).unwrap();
    digest.told.swap(0, 1);
    let mut replica = Replica::new(strategy, ctx, 0);
    let e = replica.apply(&digest).unwrap_err();
    assert!(matches!(e, ReplayError::ToldOrder { round: 0, client: 1 }), "{e}");
    assert!(!replica.in_sync(), "a round it cannot replay leaves it behind");
}

#[test]
fn replay_messages_fit_the_issues_budget_at_d500_with_10_clients() {
    let row =
        traffic::row(&traffic::Shape { dim: 500, clients: 10, popsize: 5, iterations: 4 }).unwrap();
    assert!(row.replay_up < 150, "{row:?}");
    assert!(row.replay_down < 2048, "{row:?}");
    // Today's messages, for scale: the distribution alone is over 2 KB at d = 500.
    assert!(row.distribution_down > 250 * row.replay_down, "{row:?}");
}

#[test]
fn the_real_upload_is_as_long_as_the_tables() {
    // The table's upload uses made-up values; one recorded from a search must encode the same.
    let ctx = ctx(CmaFlavour::Tutorial);
    let mut dist = dist_with_covariance(199);
    dist.covariance = None;
    let (_, mut upload) = recorded(&ctx, &dist, 9, false);
    upload.class_counts = vec![8, 8];
    let shape = traffic::Shape { dim: DIM, clients: 10, popsize: 5, iterations: 4 };
    assert_eq!(upload.encoded_len().unwrap(), traffic::row(&shape).unwrap().replay_up);
}

#[test]
fn docs_traffic_md_holds_the_measured_table() {
    let table = traffic::markdown(&traffic::table().unwrap());
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/traffic.md"))
        .unwrap_or_default();
    assert!(doc.contains(&table), "docs/traffic.md should contain:\n{table}");
}

#[test]
fn the_configured_strategy_is_the_runtimes_and_replicates() {
    use crate::config::{Aggregation, Config};
    use crate::seeds::{derive, tag};
    let mut cfg = Config { intrinsic_dim: DIM, local_iter: 4, num_users: 5, ..Config::default() };
    let mut cases = vec![cfg.clone()];
    cfg.cma = CmaFlavour::Pycma;
    cfg.clients_per_round = 3;
    cfg.server_fitness = ServerFitness::Permuted;
    cases.push(cfg.clone());
    cfg.aggregation = Aggregation::Fedavg;
    cases.push(cfg);
    for cfg in cases {
        let global = GlobalStrategy::from_config(&cfg).unwrap();
        // The configuration's keys, mapped by hand: the server's seed, the clients per round
        // (0 = all), the flavour and the ranking rule.
        let per_round =
            if cfg.clients_per_round == 0 { cfg.num_users } else { cfg.clients_per_round };
        let expected: Box<dyn Aggregator> = match cfg.aggregation {
            Aggregation::Fedbpt => Box::new(
                FedBpt::new(
                    DIM,
                    cfg.sigma,
                    derive(cfg.seed, &[tag::SERVER]),
                    true,
                    cfg.server_sigma,
                    5,
                )
                .unwrap()
                .with_flavour(cfg.cma, per_round)
                .unwrap()
                .with_ranking(cfg.server_fitness, cfg.server_weights),
            ),
            Aggregation::Fedavg => Box::new(FedAvgBbt::new(DIM, cfg.sigma).unwrap()),
        };
        assert_eq!(global.name(), expected.name());
        assert_eq!(global.snapshot().unwrap(), expected.snapshot().unwrap());
        let ctx = ReplayContext::from_config(&cfg);
        assert_eq!((ctx.run_seed, ctx.popsize, ctx.iterations), (cfg.seed, 5, 4));
        replicate(global, cfg.cma, false, 3);
    }
    // A transferred state of the other rule does not restore.
    let fedavg = GlobalStrategy::FedAvgBbt(FedAvgBbt::new(DIM, 0.8).unwrap());
    let fedbpt = GlobalStrategy::FedBpt(Box::new(fedbpt(
        CmaFlavour::Tutorial,
        ServerFitness::Loss,
        ServerWeights::Rank,
    )));
    let mut replica = Replica::new(fedbpt, ctx(CmaFlavour::Tutorial), 0);
    let err = replica.resync(&StateTransfer::new(0, &fedavg).unwrap()).unwrap_err();
    assert!(err.to_string().contains("fedavg-bbt"), "{err}");
}

#[test]
fn catch_up_replays_the_missed_rounds_or_sends_the_state() {
    let ctx = ctx(CmaFlavour::Tutorial);
    let strategy = fedbpt(CmaFlavour::Tutorial, ServerFitness::Loss, ServerWeights::Rank);
    let mut server = strategy.clone();
    let log: Vec<RoundDigest> = (0..3).map(|round| round_of(&mut server, &ctx, round)).collect();
    let transfer = StateTransfer::new(3, &server).unwrap();
    let transfer_len = transfer.encoded_len().unwrap();
    // Counted, not written: the same as the bytes.
    assert_eq!(transfer_len, transfer.encode().unwrap().len());
    assert_eq!(StateTransfer::encoded_len_of(3, &server).unwrap(), transfer_len);
    // Streamed into the hasher: the SHA-256 of the encoding.
    let whole = bincode::serde::encode_to_vec(&server, bincode::config::standard()).unwrap();
    let expected: [u8; 32] = sha2::Sha256::digest(&whole).into();
    assert_eq!(StateHash::of(&server).unwrap().0, expected);
    let replay_len: usize = log.iter().map(|d| d.encoded_len().unwrap()).sum();
    assert!(replay_len < transfer_len, "{replay_len} vs {transfer_len}");

    // Three rounds behind: the digests, in order.
    let mut behind = Replica::new(strategy.clone(), ctx, 0);
    match catch_up(&log, 0, 3, &server).unwrap() {
        CatchUp::Replay(missed) => {
            let rounds: Vec<usize> = missed.iter().map(|d| d.round).collect();
            assert_eq!(rounds, [0, 1, 2]);
            for d in &missed {
                behind.apply(d).unwrap();
            }
        }
        CatchUp::State(_) => panic!("the digests are fewer bytes"),
    }
    assert_eq!(bytes(behind.strategy()), bytes(&server));

    // A round no longer in the log: the state.
    let mut lost = Replica::new(strategy, ctx, 0);
    match catch_up(&log[1..], 0, 3, &server).unwrap() {
        CatchUp::State(transfer) => lost.resync(&transfer).unwrap(),
        CatchUp::Replay(_) => panic!("round 0 is not in the log"),
    }
    assert_eq!((lost.next_round(), bytes(lost.strategy())), (3, bytes(&server)));
}

#[test]
fn replicas_sharing_a_memo_end_where_each_alone_ends_and_a_differing_one_is_still_caught() {
    let ctx = ctx(CmaFlavour::Pycma);
    let strategy = fedbpt(CmaFlavour::Pycma, ServerFitness::Loss, ServerWeights::Rank);
    let mut server = strategy.clone();
    let digests: Vec<RoundDigest> = (0..3).map(|r| round_of(&mut server, &ctx, r)).collect();
    let memo = ReplayMemo::new(2);
    let mut alone = Replica::new(strategy.clone(), ctx, 0);
    let mut first = Replica::new(strategy.clone(), ctx, 0);
    let mut second = Replica::new(strategy.clone(), ctx, 0);
    for d in &digests {
        let told = alone.apply(d).unwrap();
        assert_eq!(first.apply_memo(d, &memo).unwrap(), told);
        // The second takes the first's replay: the same state and record.
        assert_eq!(second.apply_memo(d, &memo).unwrap(), told);
        assert_eq!(bytes(second.strategy()), bytes(alone.strategy()));
    }
    assert_eq!(bytes(first.strategy()), bytes(&server));
    // A replica one ulp off does not take the others' replay: its own ends elsewhere, and the
    // digest's hash refuses it.
    let mut server = strategy.clone();
    let d0 = round_of(&mut server, &ctx, 0);
    let mut odd = Replica::new(strategy.clone(), ctx, 0);
    odd.inject_divergence().unwrap();
    Replica::new(strategy, ctx, 0).apply_memo(&d0, &memo).unwrap();
    let e = odd.apply_memo(&d0, &memo).unwrap_err();
    assert!(matches!(e, ReplayError::StateMismatch { round: 0, .. }), "{e}");
}
