//! `traffic = "replay"` in one process, on the stand-in backend (seconds, no language model):
//! the records equal those of the same run shipping distributions, field by field but the wall
//! clock and the bytes, with client sampling and killed clients (restarted clients catch up from
//! a new replica); each upload is smaller. Where replay is not wired yet (`--resume`, client
//! processes) it is refused, naming the key.

use fedbpt::config::{Config, KillClient, KillWhen, Traffic};
use fedbpt_actors::federation::{self, Env, RunOptions};
use fedbpt_actors::server::{Checkpoint, RoundRecord, CHECKPOINT_FORMAT};

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

/// A record without what the traffic mode may change: the wall clock and the bytes.
fn comparable(r: &RoundRecord) -> serde_json::Value {
    let mut v = serde_json::to_value(r).unwrap();
    for key in ["wall_s", "bytes_up", "bytes_down"] {
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
fn replay_is_refused_where_it_is_not_wired_naming_the_key() {
    let replay = cfg(&["traffic=replay", "num_rounds=2"]);
    let mut env = Env::load(&replay, &mut |l| eprintln!("{l}")).unwrap();
    let checkpoint = Checkpoint {
        format: CHECKPOINT_FORMAT,
        round: 1,
        aggregator: serde_json::Value::Null,
        best_dev: None,
        records: Vec::new(),
        config: replay.clone(),
        data_fingerprint: None,
    };
    // A checkpoint of a replayed run is refused before anything starts...
    let e = checkpoint.check().unwrap_err();
    assert!(e.contains("traffic") && e.contains("--resume"), "{e}");
    // ... and so is continuing one through the library.
    let opts = RunOptions { resume: Some(checkpoint), ..Default::default() };
    let e = runtime()
        .block_on(federation::run(&replay, &mut env, opts, &mut |_| {}))
        .unwrap_err()
        .to_string();
    assert!(e.contains("traffic") && e.contains("--resume"), "{e}");
    // A client process (`fedbpt join`) refuses it too.
    let e = runtime()
        .block_on(federation::run_sites(&replay, &env, &[0], async { Ok(String::new()) }))
        .unwrap_err()
        .to_string();
    assert!(e.contains("traffic") && e.contains("one process"), "{e}");
}

#[test]
fn the_cli_refuses_replay_across_processes_before_starting_any() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let bin = env!("CARGO_BIN_EXE_fedbpt");
    let sets = ["model_name=stand-in", "traffic=replay", "num_users=2"];
    let mut args = vec!["run", "../configs/quickstart.toml", "--processes", "2", "--out"];
    args.push(out.to_str().unwrap());
    for s in sets {
        args.extend(["--set", s]);
    }
    let r = std::process::Command::new(bin).args(&args).output().unwrap();
    assert!(!r.status.success());
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(stderr.contains("traffic") && stderr.contains("one process"), "{stderr}");
    assert!(!out.join("metrics.jsonl").exists());
}
