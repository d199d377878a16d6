//! A small federation end to end on the real default model (SmolLM2, fetched on first use):
//! every round completes, the traffic is what the method promises, and runs are reproducible.
//! The message-flow trace is checked on the stand-in backend (same runtime, no model cost).

use fedbpt::config::Config;
use fedbpt_actors::federation::{self, Env};
use fedbpt_actors::server::RoundRecord;

/// A federation small enough for CI on the real model.
const TINY: &[&str] = &[
    "num_users=3",
    "k_shot=6",
    "test_size=40",
    "intrinsic_dim=20",
    "local_iter=2",
    "local_popsize=4",
    "num_rounds=2",
    "eval_every=1",
    "seed=5",
];

fn tiny(extra: &[&str]) -> Config {
    let overrides: Vec<String> = TINY.iter().chain(extra).map(|s| s.to_string()).collect();
    Config::from_toml_str(
        &std::fs::read_to_string("../configs/quickstart.toml").expect("quickstart config"),
        &overrides,
    )
    .expect("valid config")
}

fn run(cfg: &Config, env: &mut Env) -> (federation::FedSummary, Vec<RoundRecord>) {
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(federation::run(cfg, env, Default::default(), &mut |_| {}))
        .expect("federation runs")
}

/// Round records without the wall clock.
fn comparable(records: &[RoundRecord]) -> Vec<String> {
    records
        .iter()
        .map(|r| {
            let mut v = serde_json::to_value(r).unwrap();
            v.as_object_mut().unwrap().remove("wall_s");
            v.to_string()
        })
        .collect()
}

#[test]
fn federation_runs_reproducibly_and_moves_only_a_few_kilobytes() {
    let cfg = tiny(&[]);
    let mut env = Env::load(&cfg, &mut |l| eprintln!("{l}")).expect("env loads");
    let (s, records) = run(&cfg, &mut env);
    assert_eq!(records.len(), 2);
    for r in &records {
        assert_eq!(r.clients_ok, 3, "{:?}", r.clients_excluded);
        assert!(r.aggregated);
        assert!(r.test_acc.is_some());
        assert!(r.train_loss.is_some_and(f64::is_finite) && r.sigma > 0.0);
        // Upload: d floats + fitness + per-iteration sigmas + small framing, per client.
        assert!(
            r.bytes_up <= 3 * (cfg.intrinsic_dim * 4 + 8 * cfg.local_iter + 64),
            "up {}",
            r.bytes_up
        );
        assert!(r.bytes_down > 0);
    }
    assert!(s.zero_shot_test_acc > 0.55, "manual prompt {}", s.zero_shot_test_acc);
    assert_eq!(s.rounds, 2);
    assert_eq!(s.train_examples, 12);
    assert!(
        s.bytes_up_per_client_round < (s.fedavg_full_model_bytes_per_client_round / 1000) as f64
    );

    // Same seed and config: the same metrics, bit for bit.
    let (s2, records2) = run(&cfg, &mut env);
    assert_eq!(comparable(&records), comparable(&records2));
    assert_eq!(s.final_test_acc.to_bits(), s2.final_test_acc.to_bits());

    // Without merging, one forward per request; with it (the default), workers serve the
    // clients' concurrent requests in fewer forwards, and the metrics are the same, bit for bit.
    let unmerged = tiny(&["runtime.max_batch_examples=1"]);
    let (s1, records1) = run(&unmerged, &mut env);
    assert_eq!(s1.score_forwards, s1.score_requests);
    assert!(s.score_forwards < s.score_requests, "{} of {}", s.score_forwards, s.score_requests);
    assert_eq!(comparable(&records), comparable(&records1));
    assert_eq!(s.final_test_acc.to_bits(), s1.final_test_acc.to_bits());

    // Two workers instead of one: the same accuracies, losses within 1e-5 relative.
    let two = tiny(&["runtime.workers_per_device=2"]);
    let (s3, records3) = run(&two, &mut env);
    assert_eq!(s.final_test_acc, s3.final_test_acc);
    for (a, b) in records.iter().zip(&records3) {
        let (x, y) = (a.train_loss.unwrap(), b.train_loss.unwrap());
        assert!((x - y).abs() <= 1e-5 * x.abs(), "{x} vs {y}");
        assert_eq!(a.dev_acc, b.dev_acc);
    }

    // FedAvg-BBT, non-iid: runs too, and differs.
    let fedavg = tiny(&["aggregation=\"fedavg\"", "iid=false", "perturb=true"]);
    let (s4, records4) = run(&fedavg, &mut env);
    assert_eq!(s4.rounds, 2);
    assert!(records4.iter().all(|r| r.clients_ok == 3));
    assert_ne!(comparable(&records), comparable(&records4));
}

#[test]
fn bad_configs_fail_before_any_work() {
    let e = Config::from_toml_str("num_users = 0", &[]).unwrap_err().to_string();
    assert!(e.contains("num_users"), "{e}");
    let e = Config::from_toml_str("min_clients = 20\nnum_users = 10", &[]).unwrap_err().to_string();
    assert!(e.contains("min_clients"), "{e}");
    let e = Config::from_toml_str("aggregation = \"fedprox\"", &[]).unwrap_err().to_string();
    assert!(e.contains("fedprox") || e.contains("aggregation"), "{e}");
}

#[test]
fn trace_and_message_table_account_for_every_server_client_byte() {
    let bin = env!("CARGO_BIN_EXE_fedbpt");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let trace = tmp.path().join("trace.json");
    let mut cmd = std::process::Command::new(bin);
    cmd.args(["run", "../configs/quickstart.toml", "--out"]).arg(&out).arg("--trace").arg(&trace);
    for s in TINY.iter().chain(&["model_name=stand-in", "weights=\"f32\"", "n_prompt_tokens=2"]) {
        cmd.args(["--set", s]);
    }
    assert!(cmd.status().unwrap().success());

    // Chrome trace: complete spans with durations; every flow has one start and one end, the
    // end at the start of a span on the receiver's track, the start inside a span of its track.
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&trace).unwrap()).unwrap();
    let events = doc["traceEvents"].as_array().unwrap();
    let spans: Vec<(u64, u64, u64)> = events
        .iter()
        .filter(|e| e["ph"] == "X")
        .map(|e| {
            let (ts, dur) =
                (e["ts"].as_u64().unwrap(), e["dur"].as_u64().expect("every span has its end"));
            (e["tid"].as_u64().unwrap(), ts, ts + dur)
        })
        .collect();
    assert!(spans.len() > 20);
    type At = Option<(u64, u64)>;
    let mut flows: std::collections::HashMap<u64, (At, At)> = Default::default();
    for e in events.iter().filter(|e| e["ph"] == "s" || e["ph"] == "f") {
        let entry = flows.entry(e["id"].as_u64().unwrap()).or_default();
        let at = (e["tid"].as_u64().unwrap(), e["ts"].as_u64().unwrap());
        let slot = if e["ph"] == "s" { &mut entry.0 } else { &mut entry.1 };
        assert!(slot.replace(at).is_none(), "one start and one end per flow");
    }
    assert!(!flows.is_empty());
    for (id, (s, f)) in &flows {
        let (s, f) = (s.expect("flow start"), f.expect("flow end"));
        assert!(s.1 <= f.1, "flow {id} ends before it starts");
        assert!(spans.iter().any(|&(t, a, _)| t == f.0 && a == f.1), "flow {id} ends at no span");
        assert!(
            spans.iter().any(|&(t, a, b)| t == s.0 && a <= s.1 && s.1 <= b),
            "flow {id} starts in no span"
        );
    }
    let names: Vec<&str> =
        events.iter().filter(|e| e["ph"] == "X").filter_map(|e| e["name"].as_str()).collect();
    for want in ["Train", "ClientUpdate", "Score", "forward", "RunRound", "Evaluate"] {
        assert!(names.contains(&want), "no {want} span");
    }

    // messages.csv: the server-client bytes equal the metrics' bytes_up + bytes_down.
    let csv = std::fs::read_to_string(out.join("messages.csv")).unwrap();
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let (snd, rcv, msg, bytes) = (col("sender"), col("receiver"), col("message"), col("bytes"));
    let mut csv_bytes = 0u64;
    for l in lines {
        let f: Vec<&str> = l.split(',').collect();
        let pair = (f[snd], f[rcv]);
        if pair == ("server", "client") || pair == ("client", "server") {
            assert!(f[msg] == "Train" || f[msg] == "ClientUpdate", "{l}");
            csv_bytes += f[bytes].parse::<u64>().unwrap();
        }
    }
    let metrics_bytes: u64 = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["bytes_up"].as_u64().unwrap() + v["bytes_down"].as_u64().unwrap()
        })
        .sum();
    assert!(metrics_bytes > 0);
    assert_eq!(csv_bytes, metrics_bytes);
}

/// Compute and tokio threads are per process: two runs of the binary, one thread each vs two.
/// The same accuracies; losses equal within 1e-5 relative (the matmuls may split differently).
#[test]
fn thread_counts_change_no_accuracy_and_losses_only_by_rounding() {
    let bin = env!("CARGO_BIN_EXE_fedbpt");
    let tmp = tempfile::tempdir().unwrap();
    let run_with = |threads: usize| -> Vec<serde_json::Value> {
        let out = tmp.path().join(format!("threads-{threads}"));
        let mut cmd = std::process::Command::new(bin);
        cmd.args(["run", "../configs/quickstart.toml", "--out"]).arg(&out);
        for s in TINY {
            cmd.args(["--set", s]);
        }
        for s in [
            format!("runtime.compute_threads={threads}"),
            format!("runtime.tokio_threads={threads}"),
        ] {
            cmd.args(["--set", &s]);
        }
        assert!(cmd.status().unwrap().success());
        std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let (one, two) = (run_with(1), run_with(2));
    assert_eq!(one.len(), 2);
    assert_eq!(one.len(), two.len());
    for (a, b) in one.iter().zip(&two) {
        assert_eq!(a["test_acc"], b["test_acc"]);
        assert_eq!(a["dev_acc"], b["dev_acc"]);
        for key in ["train_loss", "dev_loss", "sigma"] {
            let (x, y) = (a[key].as_f64().unwrap(), b[key].as_f64().unwrap());
            assert!((x - y).abs() <= 1e-5 * x.abs(), "{key}: {x} vs {y}");
        }
    }
}

/// `bench-scale` on the stand-in: all 2,000 clients start, a round contacts (and prepares the
/// shards of) only the sampled ones, and a round's messages do not grow with the idle clients.
#[test]
fn many_clients_start_and_a_round_reaches_only_the_sampled() {
    let bin = env!("CARGO_BIN_EXE_fedbpt");
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("scale.json");
    let mut cmd = std::process::Command::new(bin);
    cmd.args(["bench-scale", "../configs/quickstart.toml", "--clients", "20,2000"]);
    cmd.args(["--per-round", "5", "--shard", "1", "--dev-per-class", "4", "--json"]).arg(&json);
    for s in [
        "model_name=stand-in",
        "weights=\"f32\"",
        "n_prompt_tokens=2",
        "intrinsic_dim=20",
        "local_iter=2",
        "local_popsize=4",
        "num_rounds=3",
        "test_size=40",
    ] {
        cmd.args(["--set", s]);
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(&json)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2);
    for (row, clients) in rows.iter().zip([20u64, 2000]) {
        assert_eq!(row["clients"], clients);
        assert_eq!(row["clients_started"], clients, "{row}");
        assert_eq!(row["train_requests_per_round"], 5.0, "{row}");
        assert_eq!(row["rounds"], 3);
        assert!(row["peak_rss_bytes"].as_u64().unwrap() > 0, "{row}");
    }
    assert_eq!(rows[0]["messages_per_round"], rows[1]["messages_per_round"]);
    // Shards are prepared for the sampled clients only: as many at 2,000 clients as at 20, and
    // no more than the evaluator's sets and one per Train request.
    assert_eq!(rows[0]["prepare_requests"], rows[1]["prepare_requests"]);
    let prepared = rows[1]["prepare_requests"].as_u64().unwrap();
    assert!(prepared <= 2 + 5 * 3, "{prepared} batches prepared for 2,000 clients");
    assert!(rows[1]["rss_bytes_per_added_client"].is_number(), "{}", rows[1]);
}

/// The round's diagnostics on the stand-in backend, non-iid: each aggregated client's recorded
/// class mix is its shard's (the library's split, which every process derives), the ranks are
/// 1..=n with the weights of a round summing to 1 and falling with the rank, the improvement
/// each was ranked by is recorded, and the dev confusion counts every dev example with the
/// recorded dev accuracy on its diagonal.
#[test]
fn diagnostics_record_each_clients_shard_rank_and_the_dev_predictions() {
    let cfg = tiny(&[
        "model_name=stand-in",
        "weights=\"f32\"",
        "n_prompt_tokens=2",
        "num_users=4",
        "k_shot=8",
        "iid=false",
        "alpha_dir=0.3",
        "server_fitness=\"improvement\"",
    ]);
    let mut env = Env::load(&cfg, &mut |l| eprintln!("{l}")).expect("env loads");
    let split = fedbpt::experiment::federated_split(&cfg, &env.dataset).unwrap();
    let (_, records) = run(&cfg, &mut env);
    let n_classes = env.dataset.label_names.len();
    let mut skewed = 0;
    for r in &records {
        assert_eq!(r.clients.len(), r.clients_ok);
        let mut ranks: Vec<usize> = r.clients.iter().map(|c| c.rank).collect();
        ranks.sort_unstable();
        assert_eq!(ranks, (1..=r.clients.len()).collect::<Vec<_>>());
        let total: f64 = r.clients.iter().map(|c| c.weight).sum();
        assert!((total - 1.0).abs() < 1e-12, "{total}");
        for c in &r.clients {
            let i: usize = c.client.trim_start_matches("site-").parse::<usize>().unwrap() - 1;
            let mut want = vec![0u32; n_classes];
            for e in &split.shards[i] {
                want[e.label] += 1;
            }
            assert_eq!(c.class_counts, want, "{}", c.client);
            let total: u32 = want.iter().sum();
            if want.iter().any(|&n| 4 * n >= 3 * total) {
                skewed += 1;
            }
            assert!(c.ranked_by.is_some(), "ranked by improvement: {c:?}");
            let better = r.clients.iter().filter(|o| o.rank < c.rank);
            assert!(better.clone().all(|o| o.weight >= c.weight && o.ranked_by <= c.ranked_by));
        }
        assert_eq!(r.dev_confusion.len(), n_classes);
        let dev: usize = r.dev_confusion.iter().flatten().sum();
        let right: usize = (0..n_classes).map(|k| r.dev_confusion[k][k]).sum();
        assert_eq!(dev, n_classes * cfg.dev_per_class());
        assert_eq!(right as f64 / dev as f64, r.dev_acc);
    }
    assert!(skewed > 0, "alpha 0.3 over 4 clients leaves some shard 3/4 one class");
}
