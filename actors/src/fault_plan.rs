//! The faults a run injects in one round, from its `[faults]` section: which clients are killed
//! before the round, and which misbehave inside it. Seeded per round, so a rerun (or a resumed
//! run) injects the same faults.

use std::collections::BTreeMap;
use std::time::Duration;

use fedbpt::config::{client_index, Config, KillWhen};
use fedbpt::seeds::{derive, tag};
use rand::seq::index::sample;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::messages::ClientFault;

/// The faults of one round.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RoundFaults {
    /// Clients killed before the round's request reaches them, in increasing order.
    pub kill_before: Vec<usize>,
    /// A fault inside the round, by client (at most one each: a later kind overrides an
    /// earlier one, in the order corrupted replica, kill-during, panic, dropped reply,
    /// straggler).
    pub inside: BTreeMap<usize, ClientFault>,
}

impl RoundFaults {
    /// The fault `client` meets inside the round, if any.
    pub fn inside(&self, client: usize) -> Option<ClientFault> {
        self.inside.get(&client).copied()
    }
}

/// The faults `cfg` injects in `round`. Costs `O(faults)`, whatever the number of clients.
pub fn plan_faults(cfg: &Config, round: usize) -> RoundFaults {
    let n = cfg.num_users;
    let f = &cfg.faults;
    let mut plan = RoundFaults::default();
    for c in f.corrupt_replica.iter().filter(|c| c.round == round) {
        if let Some(i) = client_index(&c.client, n) {
            plan.inside.insert(i, ClientFault::CorruptReplica);
        }
    }
    for k in f.kill.iter().filter(|k| k.round == round) {
        if let Some(i) = client_index(&k.client, n) {
            match k.when {
                KillWhen::Before => plan.kill_before.push(i),
                KillWhen::During => {
                    plan.inside.insert(i, ClientFault::DieMidSearch);
                }
            }
        }
    }
    if f.kill_fraction > 0.0 {
        let mut rng = ChaCha8Rng::seed_from_u64(derive(cfg.seed, &[tag::FAULTS, round as u64]));
        let k = ((f.kill_fraction * n as f64).round() as usize).min(n);
        plan.kill_before.extend(sample(&mut rng, n, k));
    }
    for p in f.panic.iter().filter(|p| p.round == round) {
        if let Some(i) = client_index(&p.client, n) {
            plan.inside.insert(i, ClientFault::Panic);
        }
    }
    for d in f.drop_reply.iter().filter(|d| d.round == round) {
        if let Some(i) = client_index(&d.client, n) {
            plan.inside.insert(i, ClientFault::DropReply);
        }
    }
    for s in &f.stragglers {
        if !s.rounds.is_empty() && !s.rounds.contains(&round) {
            continue;
        }
        if let Some(i) = client_index(&s.client, n) {
            let mut rng = ChaCha8Rng::seed_from_u64(derive(
                cfg.seed,
                &[tag::STRAGGLER, i as u64, round as u64],
            ));
            let jitter = if s.jitter_s > 0.0 { rng.random_range(0.0..s.jitter_s) } else { 0.0 };
            plan.inside.insert(i, ClientFault::Delay(Duration::from_secs_f64(s.delay_s + jitter)));
        }
    }
    plan.kill_before.sort_unstable();
    plan.kill_before.dedup();
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(faults: &str) -> Config {
        Config::from_toml_str(
            &format!("num_users = 10\nnum_rounds = 6\nseed = 3\n[faults]\n{faults}"),
            &[],
        )
        .unwrap()
    }

    #[test]
    fn named_faults_strike_their_round_only() {
        let c = cfg(
            r#"kill = [{ client = "site-3", round = 2 }, { client = "site-4", round = 2, when = "during" }]
panic = [{ client = "site-1", round = 4 }]
drop_reply = [{ client = "site-2", round = 4 }]"#,
        );
        let r2 = plan_faults(&c, 2);
        assert_eq!(r2.kill_before, vec![2]);
        assert_eq!(r2.inside(3), Some(ClientFault::DieMidSearch));
        assert_eq!(r2.inside.len(), 1);
        let r4 = plan_faults(&c, 4);
        assert!(r4.kill_before.is_empty());
        assert_eq!(r4.inside(0), Some(ClientFault::Panic));
        assert_eq!(r4.inside(1), Some(ClientFault::DropReply));
        assert_eq!(plan_faults(&c, 1), RoundFaults::default());
    }

    #[test]
    fn kill_fraction_is_seeded_per_round() {
        let c = cfg("kill_fraction = 0.3");
        let a = plan_faults(&c, 2);
        assert_eq!(a.kill_before.len(), 3);
        assert!(a.kill_before.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(plan_faults(&c, 2), a, "same seed and round, same clients");
        let others: Vec<Vec<usize>> = (3..7).map(|r| plan_faults(&c, r).kill_before).collect();
        assert!(others.iter().any(|o| *o != a.kill_before), "rounds draw their own clients");
        let c2 = Config { seed: 4, ..c.clone() };
        assert!((1..7).any(|r| plan_faults(&c2, r) != plan_faults(&c, r)));
        assert_eq!(
            plan_faults(&cfg("kill_fraction = 1.0"), 1).kill_before,
            (0..10).collect::<Vec<_>>()
        );
    }

    #[test]
    fn stragglers_delay_in_their_rounds_with_seeded_jitter() {
        let c = cfg(
            r#"stragglers = [{ client = "site-5", delay_s = 2.0, jitter_s = 1.0, rounds = [2, 3] }]"#,
        );
        let Some(ClientFault::Delay(d2)) = plan_faults(&c, 2).inside(4) else { panic!("no delay") };
        assert!((2.0..3.0).contains(&d2.as_secs_f64()), "{d2:?}");
        assert_eq!(plan_faults(&c, 2).inside(4), Some(ClientFault::Delay(d2)), "seeded");
        assert_ne!(plan_faults(&c, 3).inside(4), Some(ClientFault::Delay(d2)), "per round");
        assert_eq!(plan_faults(&c, 4).inside(4), None);
        // Without rounds: every round.
        let every = cfg(r#"stragglers = [{ client = "site-5", delay_s = 2.0 }]"#);
        assert!((1..7).all(|r| plan_faults(&every, r).inside(4)
            == Some(ClientFault::Delay(Duration::from_secs(2)))));
    }
}
