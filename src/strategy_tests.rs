use super::*;
use crate::local_search::{LocalSearch, Scored};

fn update(client: usize, round: usize, mean: Vec<f32>, fitness: f64) -> ClientUpdate {
    ClientUpdate {
        client,
        round,
        mean,
        fitness,
        loss: fitness,
        sigmas: vec![0.5; 4],
        start_fitness: None,
        class_counts: Vec::new(),
    }
}

fn fedbpt(dim: usize, sigma0: f64, rule: ServerSigma) -> FedBpt {
    FedBpt::new(dim, sigma0, 0, true, rule, 5).unwrap()
}

#[test]
fn fedavg_averages_exactly() {
    let mut agg = FedAvgBbt::new(3, 1.0).unwrap();
    let ups = [
        update(0, 0, vec![1.0, 2.0, 3.0], 0.3),
        update(1, 0, vec![3.0, -2.0, 0.0], 0.1),
        update(2, 0, vec![2.0, 3.0, 0.0], 0.9),
    ];
    agg.aggregate(0, &ups).unwrap();
    assert_eq!(agg.global_mean(), vec![2.0, 1.0, 1.0]);
    let dist = agg.configure(1);
    assert_eq!(dist.round, 1);
    assert_eq!(dist.mean, vec![2.0, 1.0, 1.0]);
    assert_eq!(dist.covariance, None);
    assert!((agg.sigma() - 0.5).abs() < 1e-15);
}

/// One round of the reference rule computed by hand from the tutorial's formulas: two client
/// means in 3 dimensions, the second 30 away along axis 0 (clipped), identity covariance.
#[test]
fn reference_round_matches_the_hand_computation() {
    let n = 3.0f64;
    let mut agg = fedbpt(3, 1.0, ServerSigma::Reference);
    let near = ClientUpdate {
        client: 0,
        round: 1,
        mean: vec![0.2, 0.0, 0.0],
        fitness: 0.5,
        loss: 0.6,
        sigmas: vec![1.0, 0.8],
        start_fitness: None,
        class_counts: Vec::new(),
    };
    let far = ClientUpdate {
        client: 1,
        round: 1,
        mean: vec![30.0, 0.0, 0.0],
        fitness: 0.7,
        loss: 0.7,
        sigmas: vec![1.0, 0.6],
        start_fitness: None,
        class_counts: Vec::new(),
    };
    // Listed worse first: ranking is by fitness, not by arrival.
    agg.aggregate(1, &[far.clone(), near.clone()]).unwrap();

    // Eq. 6 over the 2 replies, mu_local = 2 (popsize 5).
    let s6 = ((1.0 + 0.64 + 1.0 + 0.36) / (2.0 * 2.0f64)).sqrt();
    // Weights of 2 candidates, all of them parents: ln(2.5) - ln(i), normalized.
    let raw = [2.5f64.ln(), 2.5f64.ln() - 2f64.ln()];
    let w = [raw[0] / (raw[0] + raw[1]), raw[1] / (raw[0] + raw[1])];
    let mueff = 1.0 / (w[0] * w[0] + w[1] * w[1]);
    // Steps in units of s6; the far one is clipped to sqrt(3) + 6/5.
    let limit = n.sqrt() + 2.0 * n / (n + 2.0);
    let y_near = f64::from(0.2f32) / s6;
    let y_far = (30.0 / s6).min(limit);
    assert!(30.0 / s6 > limit, "the far mean must be clipped");
    let yw = w[0] * y_near + w[1] * y_far;
    let mean0 = s6 * yw;
    let m = agg.global_mean();
    assert!((f64::from(m[0]) - mean0).abs() < 1e-6, "{} vs {mean0}", m[0]);
    assert_eq!(&m[1..], &[0.0, 0.0]);

    // Step-size path and factor.
    let cs = (mueff + 2.0) / (n + mueff + 5.0);
    let damps = 1.0 + 2.0 * (((mueff - 1.0) / (n + 1.0)).sqrt() - 1.0).max(0.0) + cs;
    let chi_n = n.sqrt() * (1.0 - 1.0 / (4.0 * n) + 1.0 / (21.0 * n * n));
    let ps = (cs * (2.0 - cs) * mueff).sqrt() * yw;
    let factor = ((cs / damps) * (ps / chi_n - 1.0)).min(1.0).exp();
    // The sent sigma was 1.0: next round's is the factor times it, not s6 and not a mean of
    // the clients' sigmas.
    assert!((agg.sigma() - factor).abs() < 1e-12, "{} vs {factor}", agg.sigma());
    assert_eq!(agg.configure(2).sigma, agg.sigma());

    // Covariance along axis 0: rank-one (h_sigma holds at this path length) plus rank-mu.
    let cc = (4.0 + mueff / n) / (n + 4.0 + 2.0 * mueff / n);
    let c1 = 2.0 / ((n + 1.3).powi(2) + mueff);
    let cmu = (1.0 - c1).min(2.0 * (mueff - 2.0 + 1.0 / mueff) / ((n + 2.0).powi(2) + mueff));
    let bias = (1.0 - (1.0 - cs).powi(2)).sqrt();
    assert!(ps / bias / chi_n < 1.4 + 2.0 / (n + 1.0), "h_sigma");
    let pc = (cc * (2.0 - cc) * mueff).sqrt() * yw;
    let c00 =
        (1.0 - c1 - cmu) + c1 * pc * pc + cmu * (w[0] * y_near * y_near + w[1] * y_far * y_far);
    let c = agg.strategy().covariance();
    assert!((c[(0, 0)] - c00).abs() < 1e-12, "{} vs {c00}", c[(0, 0)]);
    assert!((c[(1, 1)] - (1.0 - c1 - cmu)).abs() < 1e-12);
    assert_eq!(c[(0, 1)], 0.0);

    // The factor carries: round 2's sigma is round 2's factor times the sigma sent in round 2.
    let sent2 = agg.sigma();
    let mut twin = agg.clone();
    let mut second = near.clone();
    second.round = 2;
    second.mean = agg.global_mean();
    second.sigmas = vec![sent2, sent2];
    agg.aggregate(2, &[second.clone()]).unwrap();
    let s6_2 = (2.0 * sent2 * sent2 / 2.0).sqrt();
    twin.es.set_sigma(s6_2).unwrap();
    twin.es.tell_injected(&means(&[&second]), &[second.fitness]).unwrap();
    let expected = twin.es.sigma() / s6_2 * sent2;
    assert!((agg.sigma() - expected).abs() < 1e-15, "{} vs {expected}", agg.sigma());
}

#[test]
fn eq6_divides_by_the_replies_that_arrived() {
    let mut one = update(3, 0, vec![0.0; 2], 1.0);
    one.sigmas = vec![0.6, 0.8];
    // One reply of ten configured: (0.36 + 0.64) / (1 * 2), not / (10 * 2).
    assert!((eq6_sigma(&[one.clone()], 2).unwrap().unwrap() - 0.5f64.sqrt()).abs() < 1e-15);
    let mut two = one.clone();
    two.client = 4;
    assert_eq!(eq6_sigma(&[one.clone(), two], 2).unwrap(), eq6_sigma(&[one.clone()], 2).unwrap());
    one.sigmas.clear();
    assert_eq!(eq6_sigma(&[one], 2).unwrap(), None);
}

/// Eight rounds in which every client moves the same way, each reporting a local sigma that
/// shrank: the reference's sigma grows with the progress, the client-RMS sigma decays anyway.
#[test]
fn reference_sigma_follows_progress_client_rms_follows_the_clients() {
    let dim = 10;
    let mut reference = fedbpt(dim, 0.5, ServerSigma::Reference);
    let mut client_rms = fedbpt(dim, 0.5, ServerSigma::ClientRms);
    for round in 1..=8 {
        for agg in [&mut reference, &mut client_rms] {
            let sent = agg.sigma();
            let m = agg.global_mean();
            let ups: Vec<ClientUpdate> = (0..4)
                .map(|k| {
                    let mut mean = m.clone();
                    mean[0] += (3.0 * sent) as f32;
                    mean[1 + k] += (0.1 * sent) as f32;
                    ClientUpdate {
                        client: k,
                        round,
                        mean,
                        fitness: k as f64,
                        loss: k as f64,
                        sigmas: vec![sent, 0.9 * sent, 0.8 * sent, 0.7 * sent],
                        start_fitness: None,
                        class_counts: Vec::new(),
                    }
                })
                .collect();
            agg.aggregate(round, &ups).unwrap();
        }
    }
    assert!(reference.sigma() > 0.5, "reference sigma {}", reference.sigma());
    assert!(client_rms.sigma() < 0.2, "client-rms sigma {}", client_rms.sigma());
}

#[test]
fn client_rms_sigma_is_rms_of_reported_sigmas() {
    let mut ups = vec![update(0, 5, vec![0.0; 2], 1.0), update(1, 5, vec![0.0; 2], 2.0)];
    ups[0].sigmas = vec![1.0, 2.0, 3.0];
    ups[1].sigmas = vec![4.0];
    let mut silent = update(2, 5, vec![1.0; 2], 0.5);
    silent.sigmas.clear();
    ups.push(silent);
    let expected = ((1.0 + 4.0 + 9.0 + 16.0) / 4.0f64).sqrt();
    let mut bpt = fedbpt(2, 1.0, ServerSigma::ClientRms);
    bpt.aggregate(5, &ups).unwrap();
    assert!((bpt.sigma() - expected).abs() < 1e-12);
    let mut avg = FedAvgBbt::new(2, 1.0).unwrap();
    avg.aggregate(5, &ups).unwrap();
    assert!((avg.sigma() - expected).abs() < 1e-12);

    // Nobody reported a sigma: keep it.
    let mut quiet = update(0, 6, vec![0.0; 2], 1.0);
    quiet.sigmas.clear();
    bpt.aggregate(6, &[quiet]).unwrap();
    assert!((bpt.sigma() - expected).abs() < 1e-12);
}

#[test]
fn fedbpt_moves_toward_better_clients() {
    for rule in [ServerSigma::Reference, ServerSigma::ClientRms] {
        let mut agg = fedbpt(4, 1.0, rule);
        let mut better = vec![0.0; 4];
        better[0] = 1.0;
        let mut worse = vec![0.0; 4];
        worse[0] = -1.0;
        agg.aggregate(0, &[update(7, 0, worse, 2.0), update(3, 0, better, 1.0)]).unwrap();
        let m = agg.global_mean();
        assert!(m[0] > 0.0, "mean {m:?}");
        assert!(m[1..].iter().all(|v| *v == 0.0));
        let dist = agg.configure(1);
        let cov = dist.covariance.expect("send_covariance").unpack().unwrap();
        assert_eq!(cov.shape(), (4, 4));
        // The client step was along axis 0: that is where the covariance grew.
        assert!(cov[(0, 0)] > cov[(1, 1)]);
    }
}

#[test]
fn fewer_replies_than_clients() {
    let mut bpt = fedbpt(3, 1.0, ServerSigma::Reference);
    let mut avg = FedAvgBbt::new(3, 1.0).unwrap();
    for round in 0..5 {
        // Ten clients configured, between one and three reply.
        let ups: Vec<ClientUpdate> = (0..1 + round % 3)
            .map(|k| update(k, round, vec![0.1 * k as f32; 3], k as f64))
            .collect();
        bpt.aggregate(round, &ups).unwrap();
        avg.aggregate(round, &ups).unwrap();
    }
    assert_eq!(bpt.strategy().generation(), 5);
    assert!(bpt.global_mean().iter().all(|v| v.is_finite()));
}

#[test]
fn rejects_bad_updates() {
    let mut bpt = fedbpt(3, 1.0, ServerSigma::Reference);
    let mut avg = FedAvgBbt::new(3, 1.0).unwrap();
    let good = update(0, 2, vec![0.0; 3], 1.0);
    let mut bad_dim = good.clone();
    bad_dim.mean.pop();
    let mut nan_mean = good.clone();
    nan_mean.mean[1] = f32::NAN;
    let mut nan_fit = good.clone();
    nan_fit.fitness = f64::NAN;
    let mut nan_loss = good.clone();
    nan_loss.loss = f64::INFINITY;
    let mut bad_sigma = good.clone();
    bad_sigma.sigmas[2] = f64::INFINITY;
    let mut stale = good.clone();
    stale.round = 1;
    let cases: Vec<Vec<ClientUpdate>> = vec![
        vec![],
        vec![bad_dim],
        vec![nan_mean],
        vec![nan_fit],
        vec![nan_loss],
        vec![bad_sigma],
        vec![stale],
        vec![good.clone(), good.clone()],
    ];
    for ups in &cases {
        assert!(bpt.aggregate(2, ups).is_err(), "{ups:?}");
        assert!(avg.aggregate(2, ups).is_err(), "{ups:?}");
    }
    // Nothing was folded.
    assert_eq!(bpt.strategy().generation(), 0);
    assert_eq!(bpt.sigma(), 1.0);
    assert_eq!(avg.global_mean(), vec![0.0; 3]);
    assert!(FedBpt::new(0, 1.0, 0, false, ServerSigma::Reference, 5).is_err());
    assert!(FedAvgBbt::new(3, 0.0).is_err());
}

#[test]
fn snapshot_restore_gives_identical_configure() {
    let mut a = fedbpt(5, 0.8, ServerSigma::Reference);
    for round in 0..3 {
        let ups: Vec<ClientUpdate> = (0..4)
            .map(|k| update(k, round, vec![0.3 * k as f32 - 0.4; 5], (k as f64 - 1.5).abs()))
            .collect();
        a.aggregate(round, &ups).unwrap();
    }
    let snap = a.snapshot().unwrap();
    let mut b = fedbpt(5, 1.0, ServerSigma::Reference);
    b.restore(snap.clone()).unwrap();
    assert_eq!(a.configure(3), b.configure(3));
    // And they keep agreeing.
    let ups: Vec<ClientUpdate> =
        (0..3).map(|k| update(k, 3, vec![k as f32; 5], k as f64)).collect();
    a.aggregate(3, &ups).unwrap();
    b.aggregate(3, &ups).unwrap();
    assert_eq!(a.configure(4), b.configure(4));

    let mut avg = FedAvgBbt::new(5, 1.0).unwrap();
    avg.aggregate(0, &[update(0, 0, vec![1.0; 5], 0.0)]).unwrap();
    let mut avg2 = FedAvgBbt::new(5, 1.0).unwrap();
    avg2.restore(avg.snapshot().unwrap()).unwrap();
    assert_eq!(avg.configure(1), avg2.configure(1));

    // A checkpoint edited into a malformed state (the covariance, basis or a path of a
    // 3-dimensional strategy spliced into this 5-dimensional one) is refused by restore, not
    // by a panic in the next round.
    let mut small = fedbpt(3, 1.0, ServerSigma::Reference);
    small
        .aggregate(0, &[update(0, 0, vec![0.1; 3], 0.5), update(1, 0, vec![0.2; 3], 0.4)])
        .unwrap();
    let small_snap = small.snapshot().unwrap();
    for field in ["cov", "basis", "ps", "mean"] {
        let mut edited = snap.clone();
        edited["state"]["es"][field] = small_snap["state"]["es"][field].clone();
        let mut c = fedbpt(5, 1.0, ServerSigma::Reference);
        let err = c.restore(edited).unwrap_err().to_string();
        assert!(err.contains("shape"), "{field}: {err}");
    }

    // Wrong rule, step-size rule or dimension.
    assert!(avg2.restore(snap.clone()).is_err());
    assert!(fedbpt(5, 1.0, ServerSigma::ClientRms).restore(snap.clone()).is_err());
    assert!(fedbpt(6, 1.0, ServerSigma::Reference).restore(snap).is_err());
}

#[test]
fn sampling_is_seeded_per_round() {
    let a = sample_clients(42, 3, 1000, 10);
    assert_eq!(a.len(), 10);
    assert!(a.windows(2).all(|w| w[0] < w[1]), "sorted and distinct: {a:?}");
    assert!(a.iter().all(|&c| c < 1000));
    assert_eq!(sample_clients(42, 3, 1000, 10), a, "same seed and round, same clients");
    assert_ne!(sample_clients(42, 4, 1000, 10), a, "another round, other clients");
    assert_ne!(sample_clients(43, 3, 1000, 10), a, "another seed, other clients");
    // Over many rounds every client is drawn about equally often.
    let mut hits = vec![0usize; 20];
    for round in 0..2000 {
        for c in sample_clients(7, round, 20, 5) {
            hits[c] += 1;
        }
    }
    assert!(hits.iter().all(|&h| (400..600).contains(&h)), "{hits:?}");
    // FedOne: one client per round.
    assert_eq!(sample_clients(1, 1, 100, 1).len(), 1);
    assert_eq!(sample_clients(1, 1, 4, 0), vec![0, 1, 2, 3]);
    assert_eq!(sample_clients(1, 1, 4, 9), vec![0, 1, 2, 3]);
}

/// Four clients, each minimizing a sphere centred on its own optimum (each 0.71 away from
/// their average, the federated optimum, which lies 6.3 away from the start). Each round
/// every client runs 4 local iterations of popsize 6 from the server's distribution; returns
/// the global mean's distance to the average optimum before and after 30 rounds.
fn federated_sphere(agg: &mut dyn Aggregator, flavour: CmaFlavour) -> (f64, f64) {
    let dim = 10;
    let optima: Vec<Vec<f64>> = (0..4)
        .map(|k| (0..dim).map(|i| 2.0 + 0.2 * (((k + i) % 4) as f64 - 1.5)).collect())
        .collect();
    let target: Vec<f64> =
        (0..dim).map(|i| optima.iter().map(|o| o[i]).sum::<f64>() / 4.0).collect();
    let dist_to_target = |m: &[f32]| -> f64 {
        m.iter().zip(&target).map(|(a, b)| (f64::from(*a) - b).powi(2)).sum::<f64>().sqrt()
    };
    let start = dist_to_target(&agg.global_mean());
    for round in 0..30 {
        let dist = agg.configure(round);
        let mut ups = Vec::new();
        for (k, o) in optima.iter().enumerate() {
            let f = |x: &[f64]| x.iter().zip(o).map(|(a, b)| (a - b).powi(2)).sum::<f64>();
            let seed = (round * 4 + k) as u64;
            let mut search = LocalSearch::start(&dist, 6, 4, seed, flavour).unwrap();
            while let Some(xs) = search.ask() {
                let fs: Vec<f64> = xs.iter().map(|x| f(x)).collect();
                search.tell(&xs, &fs).unwrap();
            }
            let mean: Vec<f64> = search.mean().iter().map(|&v| f64::from(v)).collect();
            let fit = f(&mean);
            ups.push(search.finish(k, round, Scored { fitness: fit, loss: fit }).unwrap());
        }
        agg.aggregate(round, &ups).unwrap();
    }
    (start, dist_to_target(&agg.global_mean()))
}

#[test]
fn federated_sphere_converges() {
    // FedBPT ranks client means by their own (heterogeneous) losses, so it settles within
    // the clients' spread, nearer the clients it favours; FedAvg-BBT lands closer.
    for rule in [ServerSigma::Reference, ServerSigma::ClientRms] {
        let mut bpt = fedbpt(10, 1.0, rule);
        let (start, end) = federated_sphere(&mut bpt, CmaFlavour::Tutorial);
        assert!(end < 0.15 * start, "fedbpt {rule:?}: {start} -> {end}");
    }
    let mut avg = FedAvgBbt::new(10, 1.0).unwrap();
    let (start, end) = federated_sphere(&mut avg, CmaFlavour::Tutorial);
    assert!(end < 0.05 * start, "fedavg-bbt: {start} -> {end}");
    assert!(avg.sigma() < 0.1, "sigma should shrink near the optimum: {}", avg.sigma());
}

#[test]
fn client_update_fits_the_upload_budget() {
    let local_iter = 8;
    let u = ClientUpdate {
        client: 9,
        round: 199,
        mean: vec![0.123; 500],
        fitness: 0.5432,
        loss: 0.61,
        sigmas: vec![0.9; local_iter],
        start_fitness: None,
        class_counts: Vec::new(),
    };
    let bytes = bincode::serde::encode_to_vec(&u, bincode::config::standard()).unwrap();
    assert!(bytes.len() <= 500 * 4 + 8 * local_iter + 64, "{} bytes", bytes.len());
}

#[test]
fn quorum_rule_aggregates_retries_then_skips() {
    let rule = QuorumRule { min_clients: 3, policy: QuorumPolicy::Retry, max_retries: 2 };
    assert_eq!(rule.decide(3, 0), RoundDecision::Aggregate);
    assert_eq!(rule.decide(5, 2), RoundDecision::Aggregate);
    assert_eq!(rule.decide(2, 0), RoundDecision::Retry);
    assert_eq!(rule.decide(2, 1), RoundDecision::Retry);
    assert_eq!(rule.decide(2, 2), RoundDecision::Skip, "retries used up");
    let skip = QuorumRule { policy: QuorumPolicy::Skip, ..rule };
    assert_eq!(skip.decide(2, 0), RoundDecision::Skip);
    // A quorum of 0 still needs one reply: there is nothing to fold without one.
    let none = QuorumRule { min_clients: 0, policy: QuorumPolicy::Skip, max_retries: 0 };
    assert_eq!(none.decide(0, 0), RoundDecision::Skip);
    assert_eq!(none.decide(1, 0), RoundDecision::Aggregate);
}

#[test]
fn aggregation_does_not_depend_on_arrival_order() {
    let ups: Vec<ClientUpdate> = (0..4)
        .map(|k| update(k, 1, vec![0.1 * k as f32, -0.2 * k as f32, 0.05], (k as f64 - 1.2).abs()))
        .collect();
    let mut shuffled = ups.clone();
    shuffled.reverse();
    shuffled.swap(0, 2);
    for rule in [ServerSigma::Reference, ServerSigma::ClientRms] {
        let (mut a, mut b) = (fedbpt(3, 0.5, rule), fedbpt(3, 0.5, rule));
        a.aggregate(1, &ups).unwrap();
        b.aggregate(1, &shuffled).unwrap();
        assert_eq!(a.configure(2), b.configure(2));
    }
    let (mut a, mut b) = (FedAvgBbt::new(3, 0.5).unwrap(), FedAvgBbt::new(3, 0.5).unwrap());
    a.aggregate(1, &ups).unwrap();
    b.aggregate(1, &shuffled).unwrap();
    assert_eq!(a.configure(2), b.configure(2));
}

fn with_start(mut u: ClientUpdate, start: f64) -> ClientUpdate {
    u.start_fitness = Some(start);
    u
}

fn ranked(dim: usize, fitness: ServerFitness, weights: ServerWeights) -> FedBpt {
    fedbpt(dim, 0.5, ServerSigma::Reference).with_ranking(fitness, weights)
}

/// The reference's weights for 10 clients (pycma with `CMA_mu` = 10), as the review listed them.
#[test]
fn ten_clients_get_the_reference_weights_by_rank() {
    let ups: Vec<ClientUpdate> =
        (0..10).map(|k| update(k, 1, vec![0.01 * k as f32; 3], 1.0 - 0.05 * k as f64)).collect();
    let told = fedbpt(3, 0.5, ServerSigma::Reference).aggregate(1, &ups).unwrap();
    let expected = [0.2796, 0.1972, 0.1490, 0.1148, 0.0882, 0.0665, 0.0482, 0.0323, 0.0183, 0.0058];
    for t in &told {
        // Client k has the (10 - k)-th lowest fitness.
        assert_eq!(t.rank, 10 - t.client);
        assert!((t.weight - expected[t.rank - 1]).abs() < 5e-5, "{t:?}");
        assert_eq!(t.ranked_by, ups[t.client].fitness);
    }
    assert!((told.iter().map(|t| t.weight).sum::<f64>() - 1.0).abs() < 1e-12);
}

/// Equal weights: with every step inside the clip and identity covariance, the tell moves the
/// mean to the plain average of the client means (computed by hand), whatever their fitness.
#[test]
fn equal_weights_move_the_mean_to_the_average() {
    let means = [vec![0.3f32, -0.2, 0.1], vec![-0.1, 0.4, 0.0], vec![0.2, 0.2, -0.3]];
    let ups: Vec<ClientUpdate> = means
        .iter()
        .enumerate()
        .map(|(k, m)| update(k, 1, m.clone(), [0.9, 0.1, 0.5][k]))
        .collect();
    let mut agg = ranked(3, ServerFitness::Loss, ServerWeights::Equal);
    let told = agg.aggregate(1, &ups).unwrap();
    for (j, got) in agg.global_mean().iter().enumerate() {
        let avg = means.iter().map(|m| f64::from(m[j])).sum::<f64>() / 3.0;
        assert!((f64::from(*got) - avg).abs() < 1e-6, "coordinate {j}: {got} vs {avg}");
    }
    let ranks: Vec<usize> = told.iter().map(|t| t.rank).collect();
    assert_eq!(ranks, [3, 1, 2], "ranked by fitness, though it changes nothing");
    assert!(told.iter().all(|t| (t.weight - 1.0 / 3.0).abs() < 1e-15));
    // The reference weighs the best client most, so its mean differs.
    let mut reference = ranked(3, ServerFitness::Loss, ServerWeights::Rank);
    reference.aggregate(1, &ups).unwrap();
    assert_ne!(reference.global_mean(), agg.global_mean());
}

/// Improvement: ranked by final minus start fitness (by hand: -0.1, -0.4, -0.1, so client 1
/// first and the tie goes to the lower index), with the weights of three ranks,
/// ln(3.5) - ln(i) normalized.
#[test]
fn improvement_ranks_by_the_drop_in_fitness() {
    let ups = [
        with_start(update(0, 2, vec![0.1, 0.0, 0.0], 0.2), 0.3),
        with_start(update(1, 2, vec![0.0, 0.1, 0.0], 0.5), 0.9),
        with_start(update(2, 2, vec![0.0, 0.0, 0.1], 0.4), 0.5),
    ];
    let mut agg = ranked(3, ServerFitness::Improvement, ServerWeights::Rank);
    let told = agg.aggregate(2, &ups).unwrap();
    let raw: Vec<f64> = (1..=3).map(|i| 3.5f64.ln() - (i as f64).ln()).collect();
    let w: Vec<f64> = raw.iter().map(|r| r / raw.iter().sum::<f64>()).collect();
    let by_client: Vec<(usize, f64, f64)> =
        told.iter().map(|t| (t.rank, t.weight, t.ranked_by)).collect();
    let expect = [(2, w[1], 0.2 - 0.3), (1, w[0], 0.5 - 0.9), (3, w[2], 0.4 - 0.5)];
    for (got, want) in by_client.iter().zip(expect) {
        assert_eq!(got.0, want.0);
        assert!((got.1 - want.1).abs() < 1e-12 && (got.2 - want.2).abs() < 1e-12, "{got:?}");
    }
    // The same tell as the reference rule told those improvements as fitness.
    let as_loss: Vec<ClientUpdate> = ups
        .iter()
        .zip(expect)
        .map(|(u, e)| ClientUpdate { fitness: e.2, start_fitness: None, ..u.clone() })
        .collect();
    let mut reference = ranked(3, ServerFitness::Loss, ServerWeights::Rank);
    reference.aggregate(2, &as_loss).unwrap();
    assert_eq!(reference.configure(3), agg.configure(3));
    // A reply without the received mean's fitness cannot be ranked: refused, state unchanged.
    let before = agg.configure(3);
    let mut missing = ups.to_vec();
    missing[1].start_fitness = None;
    for u in &mut missing {
        u.round = 3;
    }
    let err = agg.aggregate(3, &missing).unwrap_err().to_string();
    assert!(err.contains("client 1") && err.contains("improvement"), "{err}");
    assert_eq!(agg.configure(3), before);
}

/// Permuted: the values ranked are the reported fitnesses in another order, drawn from the
/// round's seed (the same for the same round, different across rounds), and the tell is the
/// reference's tell of those values.
#[test]
fn permuted_fitness_is_a_seeded_permutation_of_the_reported() {
    let ups: Vec<ClientUpdate> = (0..8)
        .map(|k| update(k, 1, vec![0.05 * k as f32, -0.02 * k as f32, 0.01], 0.1 * (k + 1) as f64))
        .collect();
    let mut agg = ranked(3, ServerFitness::Permuted, ServerWeights::Rank);
    let told = agg.aggregate(1, &ups).unwrap();
    let got: Vec<f64> = told.iter().map(|t| t.ranked_by).collect();
    let mut sorted = got.clone();
    sorted.sort_by(f64::total_cmp);
    let reported: Vec<f64> = ups.iter().map(|u| u.fitness).collect();
    assert_eq!(sorted, reported, "a permutation of the reported values");
    assert_ne!(got, reported, "8 values: the identity has odds 1 in 40,320");
    let again = ranked(3, ServerFitness::Permuted, ServerWeights::Rank).aggregate(1, &ups).unwrap();
    assert_eq!(told, again, "the same seed and round draw the same permutation");
    let next: Vec<ClientUpdate> =
        ups.iter().map(|u| ClientUpdate { round: 2, ..u.clone() }).collect();
    let later =
        ranked(3, ServerFitness::Permuted, ServerWeights::Rank).aggregate(2, &next).unwrap();
    assert_ne!(
        later.iter().map(|t| t.ranked_by).collect::<Vec<_>>(),
        got,
        "a fresh draw per round"
    );
    let as_loss: Vec<ClientUpdate> =
        ups.iter().zip(&got).map(|(u, &f)| ClientUpdate { fitness: f, ..u.clone() }).collect();
    let mut reference = ranked(3, ServerFitness::Loss, ServerWeights::Rank);
    reference.aggregate(1, &as_loss).unwrap();
    assert_eq!(reference.configure(2), agg.configure(2));
}

#[test]
fn a_snapshot_keeps_its_ranking_rule() {
    let a = ranked(3, ServerFitness::Improvement, ServerWeights::Equal);
    let mut b = ranked(3, ServerFitness::Loss, ServerWeights::Rank);
    let err = b.restore(a.snapshot().unwrap()).unwrap_err().to_string();
    assert!(err.contains("Improvement") && err.contains("Equal"), "{err}");
    let mut c = ranked(3, ServerFitness::Improvement, ServerWeights::Equal);
    c.restore(a.snapshot().unwrap()).unwrap();
}

#[test]
fn fedavg_reports_equal_weights_and_fitness_ranks() {
    let ups = [update(0, 0, vec![1.0; 3], 0.3), update(1, 0, vec![0.0; 3], 0.1)];
    let told = FedAvgBbt::new(3, 1.0).unwrap().aggregate(0, &ups).unwrap();
    assert_eq!(told.iter().map(|t| (t.rank, t.weight)).collect::<Vec<_>>(), [(2, 0.5), (1, 0.5)]);
}

fn pycma_fedbpt(dim: usize, clients: usize) -> FedBpt {
    fedbpt(dim, 1.0, ServerSigma::Reference).with_flavour(CmaFlavour::Pycma, clients).unwrap()
}

#[test]
fn pycma_server_round_is_the_reference_tell() {
    // The round of the reference server (global_es.py) on pycma's CMA-ES, done by hand:
    // sigma = s6, tell the means as unknown points, sigma = after / s6 * sent.
    let mut agg = pycma_fedbpt(4, 3);
    assert_eq!(agg.strategy().flavour(), CmaFlavour::Pycma);
    assert_eq!(agg.strategy().popsize(), 3, "the reference's popsize = CMA_mu = clients");
    let ups = [
        update(0, 1, vec![0.5, 0.0, 0.1, 0.0], 0.3),
        update(1, 1, vec![-0.2, 0.4, 0.0, 0.0], 0.1),
        update(2, 1, vec![9.0, 0.0, 0.0, -3.0], 0.9),
    ];
    let mut es = agg.strategy().clone();
    let told = agg.aggregate(1, &ups).unwrap();
    let s6 = eq6_sigma(&ups, 2).unwrap().unwrap();
    let sent = es.sigma();
    es.set_sigma(s6).unwrap();
    let means: Vec<Vec<f64>> =
        ups.iter().map(|u| u.mean.iter().map(|&v| f64::from(v)).collect()).collect();
    es.tell_injected(&means, &[0.3, 0.1, 0.9]).unwrap();
    es.set_sigma(es.sigma() / s6 * sent).unwrap();
    assert_eq!(agg.strategy().mean(), es.mean());
    assert_eq!(agg.strategy().covariance(), es.covariance());
    assert_eq!(agg.sigma(), es.sigma());
    // Every client is a parent (CMA_mu = popsize): positive weights by rank.
    assert_eq!(told.iter().map(|t| t.rank).collect::<Vec<_>>(), [2, 1, 3]);
    assert!(told.iter().all(|t| t.weight > 0.0));
    assert!((told.iter().map(|t| t.weight).sum::<f64>() - 1.0).abs() < 1e-12);
}

#[test]
fn a_snapshot_keeps_its_cma_flavour() {
    let mut agg = pycma_fedbpt(3, 2);
    agg.aggregate(0, &[update(0, 0, vec![0.1; 3], 0.2), update(1, 0, vec![0.3; 3], 0.1)]).unwrap();
    let snap = agg.snapshot().unwrap();
    let mut fresh = pycma_fedbpt(3, 2);
    fresh.restore(snap.clone()).unwrap();
    assert_eq!(fresh.configure(1), agg.configure(1));
    let mut tutorial = fedbpt(3, 1.0, ServerSigma::Reference);
    let e = tutorial.restore(snap).unwrap_err().to_string();
    assert!(e.contains("Pycma") && e.contains("Tutorial"), "{e}");
}

#[test]
fn federated_sphere_converges_with_pycma() {
    let mut bpt = pycma_fedbpt(10, 4);
    let (start, end) = federated_sphere(&mut bpt, CmaFlavour::Pycma);
    assert!(end < 0.15 * start, "fedbpt, pycma: {start} -> {end}");
}
