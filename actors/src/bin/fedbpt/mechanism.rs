//! What a run's diagnostics say about the non-iid mechanism, in three numbers per run: does the
//! server's ranking follow the clients' class mix, do its weights lean the update to one class,
//! and does the global model drift to that class. Each is measured against the class the global
//! model the clients started from predicts most on dev (the "favoured" class), so that the
//! numbers mean the same whichever class a seed drifts to.

use fedbpt_actors::round::{ClientDiagnostics, RoundRecord};

/// The three numbers of one run (`None` where its records carry no diagnostics).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Mechanism {
    /// Mean over rounds of the rank correlation between a told client's share of the favoured
    /// class and its place in the server's ranking: +1 when the clients richest in the class the
    /// model already over-predicts always come first, 0 when the ranking ignores the class mix.
    pub skew_rank: Option<f64>,
    /// Mean over rounds of the favoured class's share in the clients' shards weighted by the
    /// server's weights, minus its share with equal weights: how far the update leans to it.
    pub lean: Option<f64>,
    /// The share of dev examples the final global model predicts as its most predicted class
    /// (0.5 for an unbiased model on a balanced binary dev set; 1 for a constant predictor).
    pub final_majority: Option<f64>,
}

impl Mechanism {
    pub fn of(records: &[RoundRecord]) -> Self {
        let mean = |v: Vec<f64>| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
        let favoured = favoured_before(records);
        Mechanism {
            skew_rank: mean(
                favoured.iter().filter_map(|&(r, c)| skew_rank_correlation(r, c)).collect(),
            ),
            lean: mean(favoured.iter().filter_map(|&(r, c)| weight_lean(r, c)).collect()),
            final_majority: records.iter().rev().find_map(majority_prediction_share),
        }
    }
}

/// Each round from the second on, with the class the global model it started from (the one
/// evaluated after the round before) predicted most on dev. A round's own `dev_confusion` is
/// measured after its update, so comparing its ranking with that would count the effect of the
/// ranking as its cause.
pub(crate) fn favoured_before(records: &[RoundRecord]) -> Vec<(&RoundRecord, usize)> {
    records.windows(2).filter_map(|w| favoured_class(&w[0]).map(|c| (&w[1], c))).collect()
}

/// Dev examples predicted as each class (the confusion matrix's column sums).
fn predicted_per_class(r: &RoundRecord) -> Vec<usize> {
    let n = r.dev_confusion.len();
    (0..n)
        .map(|c| r.dev_confusion.iter().map(|row| row.get(c).copied().unwrap_or(0)).sum())
        .collect()
}

/// The class the global model predicts most on dev this round (the lowest index on a tie).
fn favoured_class(r: &RoundRecord) -> Option<usize> {
    let predicted = predicted_per_class(r);
    let top = *predicted.iter().max()?;
    (top > 0).then(|| predicted.iter().position(|&n| n == top)).flatten()
}

fn majority_prediction_share(r: &RoundRecord) -> Option<f64> {
    let predicted = predicted_per_class(r);
    let total: usize = predicted.iter().sum();
    (total > 0).then(|| *predicted.iter().max().unwrap_or(&0) as f64 / total as f64)
}

/// A client's share of class `c` in its shard (0 for an empty shard).
pub(crate) fn share(client: &ClientDiagnostics, c: usize) -> f64 {
    let total: u32 = client.class_counts.iter().sum();
    match client.class_counts.get(c) {
        Some(&n) if total > 0 => f64::from(n) / f64::from(total),
        _ => 0.0,
    }
}

/// Spearman's correlation between the told clients' shares of class `c` and minus their ranks
/// (ties get their average rank); `None` with fewer than two clients or no spread in either.
fn skew_rank_correlation(r: &RoundRecord, c: usize) -> Option<f64> {
    let ranked: Vec<&ClientDiagnostics> = r.clients.iter().filter(|cl| cl.rank >= 1).collect();
    if ranked.len() < 2 {
        return None;
    }
    let shares: Vec<f64> = ranked.iter().map(|cl| share(cl, c)).collect();
    let places: Vec<f64> = ranked.iter().map(|cl| -(cl.rank as f64)).collect();
    pearson(&average_ranks(&shares), &average_ranks(&places))
}

/// The favoured class's weighted share minus its equal-weight share, over the told clients (all
/// of a round's `clients` were told; only the correlation needs their ranks).
fn weight_lean(r: &RoundRecord, c: usize) -> Option<f64> {
    let total_weight: f64 = r.clients.iter().map(|cl| cl.weight).sum();
    if r.clients.is_empty() || total_weight <= 0.0 {
        return None;
    }
    let weighted = r.clients.iter().map(|cl| cl.weight * share(cl, c)).sum::<f64>() / total_weight;
    let equal = r.clients.iter().map(|cl| share(cl, c)).sum::<f64>() / r.clients.len() as f64;
    Some(weighted - equal)
}

/// 1-based ranks of `v` in ascending order, tied values sharing their average rank.
fn average_ranks(v: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..v.len()).collect();
    order.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
    let mut ranks = vec![0.0; v.len()];
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        while end < order.len() && v[order[end]] == v[order[start]] {
            end += 1;
        }
        let average = (start + end + 1) as f64 / 2.0;
        for &i in &order[start..end] {
            ranks[i] = average;
        }
        start = end;
    }
    ranks
}

fn pearson(a: &[f64], b: &[f64]) -> Option<f64> {
    let n = a.len() as f64;
    let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let cov: f64 = a.iter().zip(b).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let va: f64 = a.iter().map(|x| (x - ma).powi(2)).sum();
    let vb: f64 = b.iter().map(|y| (y - mb).powi(2)).sum();
    (va > 0.0 && vb > 0.0).then(|| cov / (va * vb).sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(counts: [u32; 2], rank: usize, weight: f64) -> ClientDiagnostics {
        ClientDiagnostics {
            client: format!("site-{rank}"),
            class_counts: counts.to_vec(),
            rank,
            weight,
            fitness: rank as f64,
            ranked_by: None,
        }
    }

    fn record(clients: Vec<ClientDiagnostics>, dev_confusion: Vec<Vec<usize>>) -> RoundRecord {
        RoundRecord {
            round: 1,
            test_acc: None,
            dev_acc: 0.5,
            dev_loss: 0.7,
            train_loss: None,
            sigma: 0.5,
            clients_ok: clients.len(),
            clients_sampled: Vec::new(),
            clients_killed: Vec::new(),
            clients_restarted: Vec::new(),
            clients_late: Vec::new(),
            clients_excluded: Vec::new(),
            clients_resynced: Vec::new(),
            aggregated: true,
            retries: 0,
            bytes_up: 0,
            bytes_down: 0,
            wall_s: 0.0,
            clients,
            dev_confusion,
        }
    }

    #[test]
    fn clients_rich_in_the_over_predicted_class_ranked_first_give_plus_one_and_a_lean() {
        // The model predicts class 1 for 30 of 40 dev examples; the clients richest in class 1
        // rank first and get the largest weights.
        let clients = vec![client([1, 7], 1, 0.5), client([4, 4], 2, 0.3), client([7, 1], 3, 0.2)];
        let r = record(clients, vec![vec![8, 12], vec![2, 18]]);
        // The first round only sets the class the second started from.
        let m = Mechanism::of(&[r.clone(), r]);
        assert_eq!(m.skew_rank, Some(1.0));
        // Class 1 shares 7/8, 4/8, 1/8: weighted .5*.875 + .3*.5 + .2*.125 = .6125, equal .5.
        let lean = m.lean.unwrap();
        assert!((lean - 0.1125).abs() < 1e-12, "{lean}");
        assert_eq!(m.final_majority, Some(30.0 / 40.0));

        // The same clients ranked the other way round correlate at -1 and lean away.
        let reversed = vec![client([1, 7], 3, 0.2), client([4, 4], 2, 0.3), client([7, 1], 1, 0.5)];
        let r = record(reversed, vec![vec![8, 12], vec![2, 18]]);
        let m = Mechanism::of(&[r.clone(), r]);
        assert_eq!(m.skew_rank, Some(-1.0));
        assert!(m.lean.unwrap() < 0.0);
    }

    #[test]
    fn equal_weights_do_not_lean_and_tied_shares_get_their_average_rank() {
        let clients = vec![
            client([2, 6], 1, 0.25),
            client([2, 6], 2, 0.25),
            client([6, 2], 3, 0.25),
            client([6, 2], 4, 0.25),
        ];
        // Favoured class 0 (25 of 40): its richest clients rank last.
        let r = record(clients, vec![vec![15, 5], vec![10, 10]]);
        let m = Mechanism::of(&[r.clone(), r]);
        assert!(m.lean.unwrap().abs() < 1e-12);
        // Shares of class 0: ranks (1.5, 1.5, 3.5, 3.5) against places (4, 3, 2, 1): -0.894.
        let rho = m.skew_rank.unwrap();
        assert!((rho + 2.0 / 5f64.sqrt()).abs() < 1e-12, "{rho}");
    }

    #[test]
    fn the_favoured_class_is_the_one_the_round_started_from() {
        // Round 1's model favours class 0; round 2 ranks the class-0 shards first, and its own
        // update turns the model to class 1. Measured against class 0: +1; against its own
        // round's class 1 it would be -1.
        let before = record(Vec::new(), vec![vec![30, 10], vec![20, 20]]);
        let clients = vec![client([7, 1], 1, 0.6), client([1, 7], 2, 0.4)];
        let after = record(clients, vec![vec![10, 30], vec![0, 40]]);
        let m = Mechanism::of(&[before, after.clone()]);
        assert_eq!(m.skew_rank, Some(1.0));
        assert!(m.lean.unwrap() > 0.0);
        // A lone round has nothing before it.
        assert_eq!(Mechanism::of(&[after]).skew_rank, None);
    }

    #[test]
    fn records_without_diagnostics_give_no_numbers() {
        let m = Mechanism::of(&[record(Vec::new(), Vec::new())]);
        assert_eq!(m, Mechanism { skew_rank: None, lean: None, final_majority: None });
        assert_eq!(Mechanism::of(&[]).skew_rank, None);
    }
}
