//! Fault injection on the stand-in backend (seconds, no language model): killed clients, a
//! killed forward worker, panics, dropped and late replies, retried rounds, stale rounds, and
//! kill -9 of the whole process followed by `--resume`. Every run finishes every round; nothing
//! hangs; nothing finished is lost.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use fedbpt::config::{ClientRound, Config, KillClient, KillWhen, Straggler};
use fedbpt_actors::federation::{self, Env};
use fedbpt_actors::server::RoundRecord;

const STAND_IN: &[&str] = &[
    "model_name=stand-in",
    "weights=\"f32\"",
    "num_users=4",
    "k_shot=8",
    "test_size=40",
    "intrinsic_dim=12",
    "n_prompt_tokens=2",
    "local_iter=4",
    "local_popsize=4",
    "eval_every=1",
    "seed=9",
];

fn sets(extra: &[&str]) -> Vec<String> {
    STAND_IN.iter().chain(extra).map(|s| s.to_string()).collect()
}

fn cfg(extra: &[&str]) -> Config {
    let text = std::fs::read_to_string("../configs/quickstart.toml").unwrap();
    Config::from_toml_str(&text, &sets(extra)).unwrap()
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

fn env(cfg: &Config) -> Env {
    Env::load(cfg, &mut |l| eprintln!("{l}")).unwrap()
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

fn kill(client: &str, round: usize, when: KillWhen) -> KillClient {
    KillClient { client: client.into(), round, when }
}

#[test]
fn killed_clients_are_restarted_and_rounds_finish() {
    let base = cfg(&["num_rounds=3"]);
    let mut env = env(&base);
    let baseline = run(&base, &mut env);
    assert!(baseline.iter().all(|r| r.clients_ok == 4 && r.clients_killed.is_empty()));

    // A named client killed before round 1 and another during round 2.
    let mut named = base.clone();
    named.faults.kill =
        vec![kill("site-2", 1, KillWhen::Before), kill("site-3", 2, KillWhen::During)];
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
    let frac = cfg(&["num_rounds=3", "faults.kill_fraction=0.3"]);
    let r = run(&frac, &mut env);
    assert!(r.iter().all(|x| x.clients_killed.len() == 1 && x.clients_ok == 3 && x.aggregated));
    assert_eq!(without_wall(&r), without_wall(&run(&frac, &mut env)), "fault plans are seeded");

    // A restart limit of 0: killed once, excluded from then on.
    let mut limited = named.clone();
    limited.faults.restart_limit = 0;
    let r = run(&limited, &mut env);
    assert_eq!(r[1].clients_ok, 2);
    assert!(
        r[2].clients_excluded.iter().any(|e| e.starts_with("site-2: down (restart limit reached")),
        "{:?}",
        r[2]
    );
}

#[test]
fn worker_killed_mid_batch_is_replaced_and_nothing_changes() {
    let clean_cfg = cfg(&["num_rounds=2"]);
    let mut env = env(&clean_cfg);
    let clean = run(&clean_cfg, &mut env);
    // Request 30 lands inside round 1's local searches.
    let faulty = cfg(&["num_rounds=2", "faults.kill_worker_at_request=30"]);
    assert_eq!(
        without_wall(&clean),
        without_wall(&run(&faulty, &mut env)),
        "the retried request computes the same thing"
    );
    // With merging, the dying worker holds several clients' requests: each is retried.
    let merged = cfg(&[
        "num_rounds=2",
        "faults.kill_worker_at_request=30",
        "runtime.max_batch_examples=256",
    ]);
    assert_eq!(
        without_wall(&clean),
        without_wall(&run(&merged, &mut env)),
        "every request of the lost batch retried"
    );
}

#[test]
fn panics_dropped_and_late_replies_are_excluded_not_fatal() {
    let mut c = cfg(&["num_rounds=2", "min_clients=1", "runtime.round_timeout_s=1"]);
    c.faults.panic = vec![ClientRound { client: "site-1".into(), round: 1 }];
    c.faults.drop_reply = vec![ClientRound { client: "site-2".into(), round: 1 }];
    c.faults.stragglers =
        vec![Straggler { client: "site-4".into(), delay_s: 60.0, jitter_s: 0.0, rounds: vec![2] }];
    let mut env = env(&c);
    let t = Instant::now();
    let r = run(&c, &mut env);
    assert_eq!(r[0].clients_ok, 2);
    assert!(r[0].clients_excluded.iter().any(|e| e.starts_with("site-1")));
    assert!(r[0].clients_excluded.iter().any(|e| e.starts_with("site-2")));
    assert_eq!(r[1].clients_restarted, vec!["site-1"], "the panicked client was restarted");
    assert_eq!(r[1].clients_late, vec!["site-4"]);
    assert_eq!(r[1].clients_ok, 3);
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "the deadline bounds a round: {:?}",
        t.elapsed()
    );
}

/// A straggler held back past the deadline gives up its stale round at the deadline, so its
/// next round's request does not wait behind it: it replies in time in round 3.
#[test]
fn a_late_client_drops_its_stale_round_and_takes_part_in_the_next() {
    let mut c = cfg(&["num_rounds=3", "runtime.round_timeout_s=1.5"]);
    c.faults.stragglers =
        vec![Straggler { client: "site-3".into(), delay_s: 4.0, jitter_s: 0.0, rounds: vec![2] }];
    let mut env = env(&c);
    let r = run(&c, &mut env);
    assert_eq!(r[1].clients_late, vec!["site-3"]);
    assert!(r[2].clients_late.is_empty(), "round 3: {:?}", r[2]);
    assert_eq!(r[2].clients_ok, 4, "{:?}", r[2].clients_excluded);
}

/// A retried round (quorum of all four, one killed before the round) asks the supervisor for a
/// fresh roster after the restart and reaches the restarted client through its new handle.
#[test]
fn a_retried_round_reaches_clients_restarted_since_it_began() {
    let mut c = cfg(&[
        "num_rounds=2",
        "min_clients=4",
        "faults.quorum_policy=\"retry\"",
        "faults.max_round_retries=1",
    ]);
    c.faults.kill = vec![kill("site-2", 2, KillWhen::Before)];
    let mut env = env(&c);
    let r = run(&c, &mut env);
    assert_eq!(r[1].clients_killed, vec!["site-2"]);
    assert_eq!(r[1].retries, 1);
    assert!(r[1].aggregated, "the retry had its quorum: {:?}", r[1].clients_excluded);
    assert_eq!(r[1].clients_ok, 4);
    // The restart the retry waited for is in the round's record.
    assert_eq!(r[1].clients_restarted, vec!["site-2"]);
    // Under "skip" the same round is not aggregated.
    let mut skip = c.clone();
    skip.faults.quorum_policy = fedbpt::strategy::QuorumPolicy::Skip;
    let r = run(&skip, &mut env);
    assert!(!r[1].aggregated && r[1].retries == 0 && r[1].clients_ok == 3);
}

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_fedbpt")
}

fn cli(args: &[&str], extra: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(bin());
    cmd.args(args);
    for s in sets(extra) {
        cmd.args(["--set", &s]);
    }
    cmd.output().unwrap()
}

/// Records as written, with only the wall clock cut out: resumed runs must match them byte for
/// byte, not merely after a lossy parse.
fn raw_records(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let start = l.find("\"wall_s\":").expect("wall_s");
            let end = l[start..].find([',', '}']).map_or(l.len(), |e| start + e);
            format!("{}{}", &l[..start], &l[end..])
        })
        .collect()
}

/// The run of `extra` uninterrupted (`tmp/full`), and killed with kill -9 once round 2 is
/// checkpointed and resumed with `run --resume` (`tmp/cut`, its settings `extra` and `cut`).
fn run_killed_and_resumed(tmp: &Path, extra: &[&str], cut_extra: &[&str]) -> (PathBuf, PathBuf) {
    let full = tmp.join("full");
    let full_s = full.to_str().unwrap();
    let out = cli(&["run", "../configs/quickstart.toml", "--out", full_s], extra);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let cut = tmp.join("cut");
    let mut cmd = Command::new(bin());
    cmd.args(["run", "../configs/quickstart.toml", "--out"]).arg(&cut);
    for s in sets(&[extra, cut_extra].concat()) {
        cmd.args(["--set", &s]);
    }
    let mut child = cmd.stderr(std::process::Stdio::null()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
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
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    // Killed inside round 3 (site-1 holds each round open), with site-2's round-2 restart in
    // the checkpoint: the resume must record it.
    let checkpoint: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(cut.join("checkpoint.json")).unwrap())
            .unwrap();
    assert_eq!(checkpoint["round"], 2, "killed inside round 3");
    assert_eq!(checkpoint["restarted_after"], serde_json::json!([1]));
    let status = Command::new(bin()).args(["run", "--resume"]).arg(&cut).output().unwrap();
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    (full, cut)
}

/// One client straggles each round, so the run is slow enough to be killed; site-2 panics in
/// round 2, and its restart is recorded in round 3, the round the run is killed in (the
/// checkpoint carries it).
const SLOW: [&str; 4] = [
    "num_rounds=5",
    "faults.stragglers=[{ client = \"site-1\", delay_s = 0.7 }]",
    "runtime.round_timeout_s=30",
    "faults.panic=[{ client = \"site-2\", round = 2 }]",
];

#[test]
fn a_replayed_run_killed_and_resumed_records_what_the_shipped_run_records() {
    let tmp = tempfile::tempdir().unwrap();
    let (full, cut) = run_killed_and_resumed(tmp.path(), &SLOW, &["traffic=\"replay\""]);
    let comparable = |dir: &Path| -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
        text.lines()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                for key in ["wall_s", "bytes_up", "bytes_down"] {
                    v.as_object_mut().unwrap().remove(key);
                }
                v
            })
            .collect()
    };
    let (shipped, replayed) = (comparable(&full), comparable(&cut));
    assert_eq!(shipped.len(), 5);
    assert_eq!(shipped, replayed);
    let checkpoint = std::fs::read_to_string(cut.join("checkpoint.json")).unwrap();
    assert!(checkpoint.contains("\"replay_log\""));
}

#[test]
fn kill_dash_nine_then_resume_gives_the_uninterrupted_records_byte_for_byte() {
    let tmp = tempfile::tempdir().unwrap();
    let (full, cut) = run_killed_and_resumed(tmp.path(), &SLOW, &[]);
    let (a, b) = (raw_records(&full), raw_records(&cut));
    assert_eq!(a.len(), 5);
    assert!(a[2].contains("\"clients_restarted\":[\"site-2\"]"), "{}", a[2]);
    assert_eq!(a, b);
    let summary = |d: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(d.join("summary.json")).unwrap()).unwrap()
    };
    for key in ["final_test_acc", "best_dev_test_acc", "best_dev_round"] {
        assert_eq!(summary(&full)[key], summary(&cut)[key], "{key}");
    }
    // A finished run cannot be resumed, and the refusal names the file.
    let again = Command::new(bin()).args(["run", "--resume"]).arg(&full).output().unwrap();
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(
        !again.status.success() && err.contains("checkpoint.json") && err.contains("finished"),
        "{err}"
    );
}

/// A run into a directory that holds a finished run, with a setting that fails later (too many
/// clients for the data, a bad resume), leaves the finished run's files as they were.
#[test]
fn a_failing_command_leaves_a_finished_run_untouched() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("done");
    let d = dir.to_str().unwrap();
    let ok = cli(&["run", "../configs/quickstart.toml", "--out", d], &["num_rounds=2"]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let files = ["metrics.jsonl", "summary.json", "accuracy.png", "checkpoint.json"];
    let before: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(dir.join(f)).unwrap()).collect();

    // 500 clients for 16 training examples fails after validation, inside the run.
    let bad =
        cli(&["run", "../configs/quickstart.toml", "--out", d], &["num_rounds=2", "num_users=500"]);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("500 clients"), "{err}");
    // A resume of a finished run, and one beside --set, are refused.
    let r = Command::new(bin()).args(["run", "--resume", d]).output().unwrap();
    assert!(!r.status.success());
    let r = Command::new(bin()).args(["run", "--resume", d, "--set", "seed=1"]).output().unwrap();
    assert!(!r.status.success());
    let r = Command::new(bin()).args(["run", "--resume", d, "--out", d]).output().unwrap();
    assert!(!r.status.success());
    let after: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(dir.join(f)).unwrap()).collect();
    for ((f, a), b) in files.iter().zip(&before).zip(&after) {
        assert!(a == b, "{f} changed");
    }

    // The same for centralized BBT: a finished search, then one that fails on its data.
    let bbt_dir = tmp.path().join("bbt");
    let b = bbt_dir.to_str().unwrap();
    let bbt = |extra: &[&str]| {
        let mut args = vec!["bbt", "../configs/bbt-mr-smollm2.toml", "--out", b];
        for s in ["model_name=stand-in", "budget=40", "test_size=40"].iter().chain(extra) {
            args.extend(["--set", s]);
        }
        Command::new(bin()).args(&args).output().unwrap()
    };
    let ok = bbt(&[]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let files = ["metrics.jsonl", "summary.json"];
    let before: Vec<Vec<u8>> =
        files.iter().map(|f| std::fs::read(bbt_dir.join(f)).unwrap()).collect();
    let bad = bbt(&["k_shot=100000"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("k_shot"));
    let after: Vec<Vec<u8>> =
        files.iter().map(|f| std::fs::read(bbt_dir.join(f)).unwrap()).collect();
    for ((f, a), b) in files.iter().zip(&before).zip(&after) {
        assert!(a == b, "bbt's {f} changed");
    }
}

/// Checkpoints that do not match their own configuration are refused with an error naming
/// `checkpoint.json`, before any actor starts.
#[test]
fn a_checkpoint_that_contradicts_its_config_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    let d = dir.to_str().unwrap();
    let ok = cli(&["run", "../configs/quickstart.toml", "--out", d], &["num_rounds=3"]);
    assert!(ok.status.success());
    let text = std::fs::read_to_string(dir.join("checkpoint.json")).unwrap();
    let mut cp: serde_json::Value = serde_json::from_str(&text).unwrap();
    // Rewind to round 2 so that it is resumable, then break it in several ways.
    cp["round"] = 2.into();
    cp["records"].as_array_mut().unwrap().truncate(2);
    cp["best_dev"]["step"] = 1.into();
    type Breaker = Box<dyn Fn(&mut serde_json::Value)>;
    let cases: Vec<(&str, Breaker)> = vec![
        ("dimension", Box::new(|v| v["config"]["intrinsic_dim"] = 13.into())),
        ("aggregator", Box::new(|v| v["config"]["aggregation"] = "fedavg".into())),
        (
            "records",
            Box::new(|v| {
                v["records"].as_array_mut().unwrap().pop();
            }),
        ),
        ("round", Box::new(|v| v["round"] = 7.into())),
        ("best-on-dev", Box::new(|v| v["best_dev"]["z"] = serde_json::json!([0.0]))),
        ("best-on-dev round", Box::new(|v| v["best_dev"]["step"] = 5.into())),
        (
            "state",
            Box::new(|v| v["aggregator"]["state"]["es"]["mean"] = serde_json::json!({"oops": 1})),
        ),
    ];
    for (what, break_it) in cases {
        let mut bad = cp.clone();
        break_it(&mut bad);
        std::fs::write(dir.join("checkpoint.json"), bad.to_string()).unwrap();
        let r = Command::new(bin()).args(["run", "--resume", d]).output().unwrap();
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(!r.status.success(), "{what}: accepted");
        assert!(err.contains("checkpoint.json"), "{what}: {err}");
        assert!(!err.contains("panicked"), "{what}: {err}");
    }
    // The rewound, intact checkpoint resumes.
    std::fs::write(dir.join("checkpoint.json"), cp.to_string()).unwrap();
    let r = Command::new(bin()).args(["run", "--resume", d]).output().unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
}
