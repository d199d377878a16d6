//! `traffic = "replay"` in one process, on the stand-in backend (seconds, no language model):
//! the records equal those of the same run shipping distributions, field by field but the wall
//! clock and the bytes, with client sampling and killed clients (restarted clients catch up from
//! a new replica), with a resume from a checkpoint, and with a replica corrupted on purpose
//! (detected by the hash and resynced); each upload is smaller. Across processes:
//! `tests/cluster.rs`.

use fedbpt::config::{ClientRound, Config, KillClient, KillWhen, Traffic};
use fedbpt_actors::federation::{self, Env, RunOptions};
use fedbpt_actors::server::{Checkpoint, RoundRecord};

const STAND_IN: &[&str] = &[
    "model_name=stand-in",
    "weights=\"f32\"",
    "num_users=5",
    "k_shot=8",
    "test_size=40",
    "intrinsic_dim=12",
    "n_prompt_tokens=2",
    "local_iter=4",
    "local_popsize=4",
    "eval_every=1",
    "num_rounds=6",
    "clients_per_round=3",
    "seed=13",
];

fn cfg(extra: &[&str]) -> Config {
    let text = std::fs::read_to_string("../configs/quickstart.toml").unwrap();
    let sets: Vec<String> = STAND_IN.iter().chain(extra).map(|s| s.to_string()).collect();
    Config::from_toml_str(&text, &sets).unwrap()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn run(cfg: &Config, env: &mut Env) -> Vec<RoundRecord> {
    let (_, records) = runtime()
        .block_on(federation::run(cfg, env, Default::default(), &mut |_| {}))
        .expect("run finishes");
    assert_eq!(records.len(), cfg.num_rounds, "every round finishes");
    records
}

/// A record without what the traffic mode may change: the wall clock, the bytes and the
/// replicas resynced (checked on their own).
fn comparable(r: &RoundRecord) -> serde_json::Value {
    let mut v = serde_json::to_value(r).unwrap();
    for key in ["wall_s", "bytes_up", "bytes_down", "clients_resynced"] {
        v.as_object_mut().unwrap().remove(key);
    }
    v
}

/// Runs `base` shipping distributions and replaying, and checks the records agree.
fn same_records_fewer_bytes_up(base: &Config, env: &mut Env) -> Vec<RoundRecord> {
    let shipped = run(&Config { traffic: Traffic::Distribution, ..base.clone() }, env);
    let replayed = run(&Config { traffic: Traffic::Replay, ..base.clone() }, env);
    for (s, r) in shipped.iter().zip(&replayed) {
        assert_eq!(comparable(s), comparable(r), "round {}", s.round);
        assert!(r.clients_resynced.is_empty(), "round {}: {:?}", r.round, r.clients_resynced);
        if r.clients_ok > 0 {
            assert!(
                r.bytes_up < s.bytes_up,
                "round {}: up {} replaying, {} shipping",
                r.round,
                r.bytes_up,
                s.bytes_up
            );
            // Round 1 starts every replica where it was built: nothing to send.
            assert_eq!(r.bytes_down > 0, r.round > 1, "round {}", r.round);
        }
    }
    replayed
}

#[test]
fn replayed_rounds_record_what_shipped_rounds_record_with_sampling_and_kills() {
    let mut base = cfg(&[]);
    base.faults.kill = vec![
        KillClient { client: "site-2".into(), round: 2, when: KillWhen::Before },
        KillClient { client: "site-4".into(), round: 3, when: KillWhen::During },
        KillClient { client: "site-1".into(), round: 4, when: KillWhen::During },
    ];
    let mut env = Env::load(&base, &mut |l| eprintln!("{l}")).unwrap();
    let records = same_records_fewer_bytes_up(&base, &mut env);
    // The run exercised what it claims to: sampling, kills, restarted clients that took part
    // again (their replica rebuilt and caught up), and aggregated rounds.
    assert!(records.iter().all(|r| r.clients_sampled.len() == 3 && r.aggregated));
    assert!(records.iter().any(|r| !r.clients_killed.is_empty()));
    let restarted: Vec<&String> = records.iter().flat_map(|r| &r.clients_restarted).collect();
    assert!(!restarted.is_empty());
    let rejoined = records.iter().enumerate().any(|(k, r)| {
        r.clients_restarted
            .iter()
            .any(|c| records[k..].iter().any(|later| later.clients.iter().any(|d| &d.client == c)))
    });
    assert!(rejoined, "a restarted client took part again");

    // FedAvg-BBT replays too (its round is a plain mean).
    let fedavg = Config { aggregation: fedbpt::config::Aggregation::Fedavg, ..cfg(&[]) };
    same_records_fewer_bytes_up(&fedavg, &mut env);
}

#[test]
fn replayed_rounds_record_late_replies_quorum_retries_and_eq7_as_shipped_ones() {
    // Sampled (seed 13): site-2 in round 2, site-3 and site-5 in round 4. site-2 misses round
    // 2's deadline; site-3's and site-5's dropped replies in round 4
    // leave the round short of its quorum of 2, and it is retried; clients perturb their data
    // (Eq. 7).
    let base = cfg(&[
        "perturb=true",
        "min_clients=2",
        "runtime.round_timeout_s=1.5",
        "faults.quorum_policy=\"retry\"",
        "faults.stragglers=[{client=\"site-2\", delay_s=2.5, rounds=[2]}]",
        "faults.drop_reply=[{client=\"site-3\", round=4}, {client=\"site-5\", round=4}]",
    ]);
    let mut env = Env::load(&base, &mut |l| eprintln!("{l}")).unwrap();
    let records = same_records_fewer_bytes_up(&base, &mut env);
    assert_eq!(records[1].clients_late, vec!["site-2".to_string()]);
    assert_eq!(records[3].retries, 1, "round 4 was retried");
    assert_eq!(records[3].clients_ok, 3);
}

/// The checkpoint after `round` of `cfg`'s run (its records after the round land), and the
/// run's records.
fn run_keeping_checkpoint(
    cfg: &Config,
    env: &mut Env,
    round: usize,
) -> (Checkpoint, Vec<RoundRecord>) {
    let dir = tempfile::tempdir().unwrap();
    let opts = RunOptions { checkpoint_dir: Some(dir.path().to_path_buf()), ..Default::default() };
    let mut kept = None;
    let (_, records) = runtime()
        .block_on(federation::run(cfg, env, opts, &mut |r| {
            if r.round == round {
                kept = std::fs::read_to_string(dir.path().join("checkpoint.json")).ok();
            }
        }))
        .expect("run finishes");
    let checkpoint = Checkpoint::parse(&kept.expect("a checkpoint after the round")).unwrap();
    (checkpoint, records)
}

#[test]
fn a_resumed_replayed_run_and_a_corrupted_replica_leave_the_records_unchanged() {
    let mut base = cfg(&[]);
    base.faults.kill =
        vec![KillClient { client: "site-4".into(), round: 2, when: KillWhen::During }];
    let mut env = Env::load(&base, &mut |l| eprintln!("{l}")).unwrap();
    let shipped = run(&base, &mut env);

    // Replayed, with site-2's replica (sampled in round 5) moved one ulp off before round 5.
    let mut replay = Config { traffic: Traffic::Replay, ..base.clone() };
    replay.faults.corrupt_replica = vec![ClientRound { client: "site-2".into(), round: 5 }];
    replay.validate().unwrap();
    let (checkpoint, replayed) = run_keeping_checkpoint(&replay, &mut env, 3);
    let r5 = &replayed[4];
    assert!(r5.clients_sampled.contains(&"site-2".to_string()), "{r5:?}");
    assert_eq!(r5.clients_resynced, vec!["site-2".to_string()], "detected by the hash, resynced");
    for (s, r) in shipped.iter().zip(&replayed) {
        assert_eq!(comparable(s), comparable(r), "round {}", s.round);
        if r.round != 5 {
            assert!(r.clients_resynced.is_empty(), "round {}", r.round);
        }
    }
    // The resync is one state transfer: more bytes down than the round before.
    assert!(
        r5.bytes_down > replayed[3].bytes_down,
        "{} vs {}",
        r5.bytes_down,
        replayed[3].bytes_down
    );

    // Continued after round 3 (every client starts a new replica and catches up from the
    // checkpoint's digest log): the same records.
    let log = checkpoint.replay_log.clone().expect("a replayed run checkpoints its digests");
    assert_eq!(log.iter().map(|d| d.round).collect::<Vec<_>>(), vec![1, 2, 3]);
    let opts = RunOptions { resume: Some(checkpoint.clone()), ..Default::default() };
    let (_, resumed) = runtime()
        .block_on(federation::run(&replay, &mut env, opts, &mut |_| {}))
        .expect("the resumed run finishes");
    assert_eq!(resumed.len(), replay.num_rounds);
    for (s, r) in shipped.iter().zip(&resumed) {
        assert_eq!(comparable(s), comparable(r), "round {}", s.round);
    }
    // The corruption after the resume is caught as before.
    assert_eq!(resumed[4].clients_resynced, vec!["site-2".to_string()]);

    // A checkpoint whose log is cut, or does not end at its aggregator's state, or that has
    // none, is refused before anything starts, naming what is wrong. (An earlier digest
    // altered is not checked here: a replica replaying it finds its hash wrong and resyncs.)
    let mut cut = checkpoint.clone();
    cut.replay_log.as_mut().unwrap().pop();
    let e = cut.check().unwrap_err();
    assert!(e.contains("replay_log") && e.contains("[1, 2]"), "{e}");
    let mut other_end = checkpoint.clone();
    other_end.replay_log.as_mut().unwrap()[2].state.0[0] ^= 1;
    let e = other_end.check().unwrap_err();
    assert!(e.contains("replay_log") && e.contains("round 3"), "{e}");
    let none = Checkpoint { replay_log: None, ..checkpoint.clone() };
    assert!(none.check().unwrap_err().contains("no replay_log"));
    let shipped_cp = Checkpoint { config: base.clone(), ..checkpoint };
    assert!(shipped_cp.check().unwrap_err().contains("traffic = \"distribution\""));
}
