//! Fault injection on the real default model (small shards): killed clients, a killed forward
//! worker, panics, dropped and late replies, and kill -9 of the whole process followed by
//! `--resume`. Every run finishes every round; nothing hangs.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use fedbpt::config::Config;
use fedbpt_actors::federation::{self, Env};
use fedbpt_actors::server::RoundRecord;

const TINY: &[&str] = &[
    "num_users=4",
    "k_shot=8",
    "test_size=40",
    "intrinsic_dim=20",
    "local_iter=2",
    "local_popsize=4",
    "eval_every=1",
    "seed=9",
];

fn tiny(extra: &[&str]) -> Config {
    let overrides: Vec<String> = TINY.iter().chain(extra).map(|s| s.to_string()).collect();
    Config::from_toml_str(
        &std::fs::read_to_string("../configs/quickstart.toml").unwrap(),
        &overrides,
    )
    .unwrap()
}

fn run(cfg: &Config, env: &mut Env) -> Vec<RoundRecord> {
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (_, records) = rt
        .block_on(federation::run(cfg, env, Default::default(), &mut |_| {}))
        .expect("run finishes");
    assert_eq!(records.len(), cfg.num_rounds, "every round finishes");
    records
}

fn without_wall(records: &[RoundRecord]) -> Vec<RoundRecord> {
    records
        .iter()
        .cloned()
        .map(|mut r| {
            r.wall_s = 0.0;
            r
        })
        .collect()
}

#[test]
fn killed_clients_are_restarted_and_rounds_finish() {
    let cfg = tiny(&["num_rounds=3"]);
    let mut env = Env::load(&cfg, &mut |l| eprintln!("{l}")).unwrap();
    let baseline = run(&cfg, &mut env);
    assert!(baseline.iter().all(|r| r.clients_ok == 4 && r.clients_killed.is_empty()));

    // A named client killed before round 1 and another during round 2.
    let named = tiny(&["num_rounds=3"]);
    let mut named = named;
    named.faults.kill = vec![
        fedbpt::config::KillClient {
            client: "site-2".into(),
            round: 1,
            when: fedbpt::config::KillWhen::Before,
        },
        fedbpt::config::KillClient {
            client: "site-3".into(),
            round: 2,
            when: fedbpt::config::KillWhen::During,
        },
    ];
    let r = run(&named, &mut env);
    assert_eq!(r[0].clients_killed, vec!["site-2"]);
    assert_eq!(r[0].clients_ok, 3);
    assert_eq!(
        r[1].clients_restarted,
        vec!["site-2"],
        "restarted with its shard, rejoins next round"
    );
    assert_eq!(r[1].clients_killed, vec!["site-3"]);
    assert_eq!(r[1].clients_ok, 3);
    assert_eq!(r[2].clients_restarted, vec!["site-3"]);
    assert_eq!(r[2].clients_ok, 4);

    // 30% of the clients (rounded: 1 of 4) killed every round, seeded.
    let frac = tiny(&["num_rounds=3", "faults.kill_fraction=0.3"]);
    let r = run(&frac, &mut env);
    assert!(r.iter().all(|x| x.clients_killed.len() == 1 && x.clients_ok == 3 && x.aggregated));
    let again = run(&frac, &mut env);
    assert_eq!(without_wall(&r), without_wall(&again), "fault plans are seeded");
}

#[test]
fn worker_killed_mid_batch_is_replaced_and_nothing_changes() {
    let cfg = tiny(&["num_rounds=2"]);
    let mut env = Env::load(&cfg, &mut |l| eprintln!("{l}")).unwrap();
    let clean = run(&cfg, &mut env);
    // Request 30 lands inside round 1's local searches.
    let faulty = tiny(&["num_rounds=2", "faults.kill_worker_at_request=30"]);
    let r = run(&faulty, &mut env);
    assert_eq!(
        without_wall(&clean),
        without_wall(&r),
        "the retried request computes the same thing"
    );
    // With merging, the dying worker holds several clients' requests: each is retried.
    let merged = tiny(&[
        "num_rounds=2",
        "faults.kill_worker_at_request=30",
        "runtime.max_batch_examples=256",
    ]);
    let r = run(&merged, &mut env);
    assert_eq!(without_wall(&clean), without_wall(&r), "every request of the lost batch retried");
}

#[test]
fn panics_dropped_and_late_replies_are_excluded_not_fatal() {
    let mut cfg = tiny(&["num_rounds=2", "min_clients=1", "runtime.round_timeout_s=20"]);
    cfg.faults.panic = vec![fedbpt::config::ClientRound { client: "site-1".into(), round: 1 }];
    cfg.faults.drop_reply = vec![fedbpt::config::ClientRound { client: "site-2".into(), round: 1 }];
    cfg.faults.stragglers = vec![fedbpt::config::Straggler {
        client: "site-4".into(),
        delay_s: 60.0,
        jitter_s: 0.0,
        rounds: vec![2],
    }];
    let mut env = Env::load(&cfg, &mut |l| eprintln!("{l}")).unwrap();
    let t = Instant::now();
    let r = run(&cfg, &mut env);
    assert_eq!(r[0].clients_ok, 2);
    assert!(r[0].clients_excluded.iter().any(|e| e.starts_with("site-1")));
    assert!(r[0].clients_excluded.iter().any(|e| e.starts_with("site-2")));
    assert_eq!(r[1].clients_restarted, vec!["site-1"], "the panicked client was restarted");
    assert_eq!(r[1].clients_late, vec!["site-4"]);
    assert_eq!(r[1].clients_ok, 3);
    assert!(t.elapsed() < Duration::from_secs(300), "the deadline bounds a round");
}

fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("wall_s");
            v
        })
        .collect()
}

#[test]
fn kill_dash_nine_then_resume_gives_the_uninterrupted_metrics() {
    let bin = env!("CARGO_BIN_EXE_fedbpt");
    let tmp = tempfile::tempdir().unwrap();
    let sets: Vec<String> = TINY
        .iter()
        .chain(&["num_rounds=4"])
        .flat_map(|s| ["--set".to_string(), s.to_string()])
        .collect();
    let full = tmp.path().join("full");
    let status = Command::new(bin)
        .args(["run", "../configs/quickstart.toml", "--out"])
        .arg(&full)
        .args(&sets)
        .status()
        .unwrap();
    assert!(status.success());

    let cut = tmp.path().join("cut");
    let mut child = Command::new(bin)
        .args(["run", "../configs/quickstart.toml", "--out"])
        .arg(&cut)
        .args(&sets)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let done = std::fs::read_to_string(cut.join("checkpoint.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v["round"].as_u64())
            .unwrap_or(0);
        if done >= 2 {
            break;
        }
        assert!(Instant::now() < deadline, "no checkpoint");
        assert!(child.try_wait().unwrap().is_none(), "finished before it could be killed");
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let status = Command::new(bin).args(["run", "--resume"]).arg(&cut).status().unwrap();
    assert!(status.success());
    let (a, b) = (metrics(&full), metrics(&cut));
    assert_eq!(a.len(), 4);
    assert_eq!(a, b);
    let sa: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(full.join("summary.json")).unwrap()).unwrap();
    let sb: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(cut.join("summary.json")).unwrap()).unwrap();
    assert_eq!(sa["final_test_acc"], sb["final_test_acc"]);
    assert_eq!(sa["best_dev_test_acc"], sb["best_dev_test_acc"]);
}
