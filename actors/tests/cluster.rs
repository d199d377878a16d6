//! The federation across processes on loopback, on the stand-in backend: a `fedbpt serve`
//! process and two `fedbpt join` processes of 5 clients each. Their metrics equal the
//! one-process run's bit for bit; a client process killed with kill -9 mid-round drops out of
//! that round and takes part again once restarted; garbage, a wrong cookie, an oversize frame and
//! a valid frame of the wrong message type are refused and logged while the federation finishes.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fedbpt::config::Config;
use fedbpt::protocol::SearchDistribution;
use fedbpt_actors::cluster::start_node;
use fedbpt_actors::messages::RegistryMsg;
use fedbpt_actors::server::RoundRecord;
use fedbpt_actors::wire::{Join, JoinReply, JoinRequest, Train, TrainRequest};
use ractor::rpc::CallResult;
use ractor::{ActorRef, RpcReplyPort};
use ractor_cluster::RactorClusterMessage;

mod common;

use common::*;

#[test]
fn two_client_processes_match_the_one_process_run_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let extra = ["num_rounds=4"];
    let alone = run_alone(d, "one", &extra);

    let port = free_port();
    let mut server = serve(d, port, &extra);
    let mut a = join(d, port, "1-5", &extra, "a.log", COOKIE);
    let mut b = join(d, port, "site-6,site-7,site-8,site-9,site-10", &extra, "b.log", COOKIE);
    finish_federation(d, [&mut server, &mut a, &mut b]);

    let served = records(&d.join("served/metrics.jsonl"));
    assert_eq!(alone.len(), 4);
    assert!(alone.iter().all(|r| r.clients_ok == 10), "{alone:?}");
    assert_eq!(without_wall(served), without_wall(alone));
    let summary = |p: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(d.join(p)).unwrap()).unwrap()
    };
    let (s1, s2) = (summary("one/summary.json"), summary("served/summary.json"));
    for key in ["final_test_acc", "best_dev_test_acc", "best_dev_round", "zero_prompt_dev_acc"] {
        assert_eq!(s1[key], s2[key], "{key}");
    }
    assert!(log(&d.join("a.log")).contains("the run finished"));
}

#[test]
fn a_client_process_killed_mid_round_drops_out_and_rejoins_the_next_round() {
    client_process_killed_mid_round(&[]);
}

/// Replaying, the restarted process's clients start new replicas and catch up from the log.
#[test]
fn a_killed_client_process_rejoins_a_replayed_run_and_catches_up() {
    let r = client_process_killed_mid_round(&["traffic=\"replay\""]);
    assert!(r.iter().all(|r| r.clients_resynced.is_empty()), "{r:?}");
    // The same records as shipping distributions, but the wall clock, the bytes and the
    // wording of why a dead process's sites were left out (which the kill's timing decides).
    let shipped = client_process_killed_mid_round(&[]);
    let comparable = |r: &RoundRecord| {
        let mut v = serde_json::to_value(r).unwrap();
        let o = v.as_object_mut().unwrap();
        for key in ["wall_s", "bytes_up", "bytes_down", "clients_excluded"] {
            o.remove(key);
        }
        let sites: Vec<String> = r
            .clients_excluded
            .iter()
            .filter_map(|e| e.split(':').next())
            .map(String::from)
            .collect();
        (v, sites)
    };
    for (s, p) in shipped.iter().zip(&r) {
        assert_eq!(comparable(s), comparable(p), "round {}", s.round);
    }
    // Round 3's download to the new replicas is a catch-up: more bytes than round 4's.
    assert!(r[2].bytes_down > r[3].bytes_down, "{} vs {}", r[2].bytes_down, r[3].bytes_down);
}

fn client_process_killed_mid_round(mode: &[&str]) -> Vec<RoundRecord> {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Sites 6-10 hold their round-2 replies back, so that round 2 is still running when their
    // process is killed; the deadline is far enough that only the kill ends it. The hold is
    // long (the kill ends it, so it costs nothing) so that a loaded machine, which may starve
    // this thread for seconds, cannot see round 2 end on its own.
    let stragglers: Vec<String> = sites(6..=10)
        .iter()
        .map(|s| format!("{{client=\"{s}\", delay_s=40.0, rounds=[2]}}"))
        .collect();
    let stragglers = format!("faults.stragglers=[{}]", stragglers.join(", "));
    let mut extra = vec!["num_rounds=4", "runtime.round_timeout_s=60", "cluster.rejoin_wait_s=60"];
    extra.push(stragglers.as_str());
    extra.extend(mode);
    let port = free_port();
    let mut server = serve(d, port, &extra);
    let mut a = join(d, port, "1-5", &extra, "a.log", COOKIE);
    let mut b = join(d, port, "6-10", &extra, "b.log", COOKIE);
    let partial = d.join("served/metrics.jsonl.partial");
    let started = Instant::now();
    while records(&partial).is_empty() {
        assert!(started.elapsed() < Duration::from_secs(60), "round 1 did not finish");
        assert!(server.try_wait().unwrap().is_none(), "{}", log(&d.join("serve.log")));
        std::thread::sleep(Duration::from_millis(20));
    }
    // Round 2 has begun (the server starts it as soon as round 1 is recorded).
    std::thread::sleep(Duration::from_millis(300));
    // Checked before the kill: after it, the server may close round 2 at once.
    assert_eq!(records(&partial).len(), 1, "round 2 ended before the kill");
    b.kill().unwrap(); // SIGKILL
    let _ = b.wait();
    let mut b2 = join(d, port, "6-10", &extra, "b2.log", COOKIE);
    finished_ok(&mut server, "serve", &d.join("serve.log"));
    finished_ok(&mut a, "join 1-5", &d.join("a.log"));
    finished_ok(&mut b2, "join 6-10 again", &d.join("b2.log"));

    let r = records(&d.join("served/metrics.jsonl"));
    assert_eq!(r.len(), 4, "every round finishes");
    assert_eq!(r[0].clients_ok, 10);
    assert_eq!(r[1].clients_ok, 5, "round 2 closes with the other process's clients: {:?}", r[1]);
    assert!(r[1].aggregated);
    for s in sites(6..=10) {
        assert!(
            r[1].clients_excluded.iter().any(|e| e.starts_with(&format!("{s}:"))),
            "{:?}",
            r[1]
        );
    }
    assert_eq!(r[2].clients_ok, 10, "the restarted process's clients take part: {:?}", r[2]);
    assert_eq!(r[2].clients_restarted, sites(6..=10));
    assert_eq!(r[3].clients_ok, 10);
    assert!(r[3].clients_restarted.is_empty());
    r
}

#[test]
fn hostile_peers_are_refused_and_logged_while_the_federation_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let extra = ["num_rounds=3"];
    let port = free_port();
    let mut server = serve(d, port, &extra);
    let mut a = join(d, port, "1-5", &extra, "a.log", COOKIE);

    // While the server waits for sites 6-10: garbage, and a frame longer than the limit.
    let addr = format!("127.0.0.1:{port}");
    let started = Instant::now();
    let mut garbage = loop {
        match std::net::TcpStream::connect(&addr) {
            Ok(s) => break s,
            Err(_) if started.elapsed() < Duration::from_secs(30) => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(e) => panic!("the server does not listen: {e}"),
        }
    };
    use std::io::Write;
    // A small length prefix, then bytes that are no protobuf message.
    garbage.write_all(&[0, 0, 0, 0, 0, 0, 0, 12]).unwrap();
    garbage.write_all(&[0xff; 12]).unwrap();
    let mut oversize = std::net::TcpStream::connect(&addr).unwrap();
    oversize.write_all(&(1u64 << 40).to_be_bytes()).unwrap();
    oversize.write_all(&[7; 4096]).unwrap();

    // A node with the wrong cookie is refused, and says so.
    let mut intruder = join(d, port, "6-10", &extra, "intruder.log", "not-the-cookie");
    let status = finish(&mut intruder, "join with a wrong cookie", Duration::from_secs(60));
    assert!(!status.success());
    let said = log(&d.join("intruder.log"));
    assert!(said.contains("closed the connection before admitting this process"), "{said}");

    // An authenticated node sends the registry a valid frame of the wrong type, then a frame
    // over the limit.
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let (wrong_type, oversize_answer) = rt.block_on(wrong_frames(&addr));
    assert!(wrong_type.contains("a Train payload where a Join belongs"), "{wrong_type}");
    assert!(oversize_answer.is_err(), "an oversize frame was answered: {oversize_answer:?}");

    let mut b = join(d, port, "6-10", &extra, "b.log", COOKIE);
    finish_federation(d, [&mut server, &mut a, &mut b]);
    let r = records(&d.join("served/metrics.jsonl"));
    assert_eq!(r.len(), 3);
    assert!(r.iter().all(|r| r.clients_ok == 10), "{r:?}");

    let server_log = log(&d.join("serve.log"));
    for needle in [
        "framing error",
        "exceeds configured limit",
        "auth_fail",
        "a Train payload where a Join belongs",
    ] {
        assert!(server_log.contains(needle), "the server's log lacks `{needle}`:\n{server_log}");
    }
}

/// The registry's message as a confused peer would have it: `Join` carrying a Train payload.
#[derive(RactorClusterMessage)]
enum ConfusedRegistryMsg {
    #[rpc]
    Join(TrainRequest, RpcReplyPort<JoinReply>),
}

/// From an authenticated node: the registry's answer to a Train payload sent as a `Join`, and
/// what came of a `Join` frame larger than the server's frame limit.
async fn wrong_frames(addr: &str) -> (String, Result<String, String>) {
    let node = start_node("prober", COOKIE.into(), &Config::default()).await.unwrap();
    ractor_cluster::client_connect(&node, addr).await.unwrap();
    let registry = registry().await;
    let confused: ActorRef<ConfusedRegistryMsg> = registry.clone().into();
    let train = Train {
        dist: SearchDistribution { round: 1, mean: vec![0.0; 12], sigma: 1.0, covariance: None },
        fault: None,
        deadline_ms: fedbpt_actors::messages::now_ms() + 10_000,
        stamp: Default::default(),
    };
    let answer = confused
        .call(
            |reply| ConfusedRegistryMsg::Join(TrainRequest::Valid(train), reply),
            Some(Duration::from_secs(20)),
        )
        .await;
    let wrong_type = match answer {
        Ok(CallResult::Success(JoinReply(Err(why)))) => why,
        other => panic!("the registry answered a Train payload with {other:?}"),
    };
    let real: ActorRef<RegistryMsg> = registry.into();
    let huge = Join {
        node: "prober".into(),
        sites: vec![5],
        config: "x".repeat(17 << 20),
        data: String::new(),
    };
    let oversize = match real
        .call(
            |reply| RegistryMsg::Join(JoinRequest::Valid(huge), reply),
            Some(Duration::from_secs(20)),
        )
        .await
    {
        Ok(CallResult::Success(JoinReply(r))) => r.map(|()| "admitted".to_string()),
        other => Err(format!("{other:?}")),
    };
    node.stop(None);
    (wrong_type, oversize)
}

/// A CA, and a certificate it signed for 127.0.0.1 with its key, as PEM files in `dir`.
fn certificates(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let paths = (dir.join("ca.pem"), dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&paths.0, ca.pem()).unwrap();
    std::fs::write(&paths.1, cert.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    paths
}

#[test]
fn the_federation_runs_over_tls_and_a_plaintext_client_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (ca, cert, key) = certificates(d);
    let extra = ["num_rounds=3"];
    let port = free_port();
    let own = [
        format!("cluster.tls_cert=\"{}\"", cert.display()),
        format!("cluster.tls_key=\"{}\"", key.display()),
    ];
    let own: Vec<&str> = own.iter().map(String::as_str).collect();
    let mut server = serve_with(d, port, &extra, &own);
    // Without TLS the server's handshake fails, and the client says the server hung up.
    let mut plain = join(d, port, "1-5", &extra, "plain.log", COOKIE);
    assert!(!finish(&mut plain, "plaintext join", Duration::from_secs(60)).success());
    assert!(
        log(&d.join("plain.log")).contains("closed the connection"),
        "{}",
        log(&d.join("plain.log"))
    );
    let trust = format!("cluster.tls_ca=\"{}\"", ca.display());
    let with_ca = [extra[0], trust.as_str()];
    let mut a = join(d, port, "1-5", &with_ca, "a.log", COOKIE);
    let mut b = join(d, port, "6-10", &with_ca, "b.log", COOKIE);
    finish_federation(d, [&mut server, &mut a, &mut b]);
    let r = records(&d.join("served/metrics.jsonl"));
    assert_eq!(r.len(), 3);
    assert!(r.iter().all(|r| r.clients_ok == 10), "{r:?}");
}

#[test]
fn a_site_reads_its_shard_from_its_own_file_in_its_own_process_only() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let csv = d.join("site-3.csv");
    let mut rows = String::from("text,label\n");
    for i in 0..12 {
        let label = if i % 2 == 0 { "negative" } else { "positive" };
        rows.push_str(&format!("\"a review of my own, number {i}\",{label}\n"));
    }
    std::fs::write(&csv, rows).unwrap();
    let own = format!(
        "cluster.shards=[{{site=\"site-3\", path=\"{}\", format=\"csv\", columns={{text=\"text\", label=\"label\"}}}}]",
        csv.display()
    );
    let extra = ["num_rounds=3"];
    let with_file = [extra[0], own.as_str()];
    let plain = run_alone(d, "plain", &extra);
    let alone = run_alone(d, "alone", &with_file);
    assert_ne!(without_wall(plain), without_wall(alone.clone()), "the file changed nothing");

    // Only the process that runs site-3 has the file; the server and the other process do not.
    let port = free_port();
    let mut server = serve(d, port, &extra);
    let mut a = join(d, port, "1-5", &with_file, "a.log", COOKIE);
    let mut b = join(d, port, "6-10", &extra, "b.log", COOKIE);
    finish_federation(d, [&mut server, &mut a, &mut b]);
    assert_eq!(without_wall(records(&d.join("served/metrics.jsonl"))), without_wall(alone));

    // A shard file that is not there is an error naming the site and the file.
    let missing = own.replace("site-3.csv", "nowhere.csv");
    let mut args = vec!["run".to_string(), config().display().to_string()];
    args.extend(["--out".into(), d.join("missing").display().to_string()]);
    args.extend(sets(&[extra[0], missing.as_str()]));
    let status = spawn(&args, &d.join("missing.log"), COOKIE).wait().unwrap();
    assert!(!status.success());
    let said = log(&d.join("missing.log"));
    assert!(said.contains("site-3") && said.contains("nowhere.csv"), "{said}");
}

#[test]
fn a_server_killed_and_resumed_takes_its_client_processes_back() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // site-1 holds its round-3 reply back, so that the server is killed inside round 3.
    let extra = [
        "num_rounds=4",
        "runtime.round_timeout_s=30",
        "faults.stragglers=[{client=\"site-1\", delay_s=3.0, rounds=[3]}]",
    ];
    let alone = run_alone(d, "one", &extra);
    let served = served_with_server_killed_in_round_3(d, &extra);
    assert!(
        log(&d.join("a.log")).contains("connected to the server at"),
        "{}",
        log(&d.join("a.log"))
    );
    assert_eq!(served.len(), 4);
    assert_eq!(without_wall(served), without_wall(alone));
}

/// A client that answers every round with an update the server must not aggregate.
struct LyingClient;

impl ractor::Actor for LyingClient {
    type Msg = fedbpt_actors::messages::ClientMsg;
    type State = ();
    type Arguments = ();

    async fn pre_start(
        &self,
        me: ActorRef<Self::Msg>,
        _: (),
    ) -> Result<(), ractor::ActorProcessingErr> {
        ractor::pg::join("fedbpt/site-10".to_string(), vec![me.get_cell()]);
        Ok(())
    }

    async fn handle(
        &self,
        _me: ActorRef<Self::Msg>,
        msg: Self::Msg,
        _: &mut (),
    ) -> Result<(), ractor::ActorProcessingErr> {
        // This stand-in client speaks only distribution traffic.
        let fedbpt_actors::messages::ClientMsg::Train(request, reply) = msg else { return Ok(()) };
        let TrainRequest::Valid(train) = request else { return Ok(()) };
        let round = train.dist.round;
        let mut update = fedbpt::protocol::ClientUpdate {
            client: 9,
            round,
            mean: train.dist.mean.clone(),
            fitness: 0.5,
            loss: 0.5,
            sigmas: vec![train.dist.sigma; 4],
            start_fitness: None,
            class_counts: Vec::new(),
        };
        match round {
            1 => update.client = 2, // another site's name
            2 => update.mean[0] = f32::NAN,
            _ => update.mean.push(1.0), // one dimension too many
        }
        let _ = reply.send(fedbpt_actors::wire::TrainReply(Ok((update, Default::default()))));
        Ok(())
    }
}

#[test]
fn a_client_process_that_sends_bad_updates_cannot_end_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let extra = ["num_rounds=3"];
    let port = free_port();
    let mut server = serve(d, port, &extra);
    let mut honest = join(d, port, "1-9", &extra, "a.log", COOKIE);
    let cfg = stand_in_config(&extra);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let (node, registry) = connect_node("liar", &cfg, port).await;
        let data = fedbpt::experiment::load_dataset(&cfg, &mut |_| {}).unwrap().fingerprint();
        // The same configuration over other data (the same path, another machine's file):
        // refused, naming the data.
        let other: String = data.chars().rev().collect();
        match ask_to_join(&registry, "liar", &cfg, &other, 9).await {
            CallResult::Success(JoinReply(Err(why))) => {
                assert!(why.contains("data differs") && why.contains("data.path"), "{why}")
            }
            other => panic!("a join over other data was answered {other:?}"),
        }
        let answer = ask_to_join(&registry, "liar", &cfg, &data, 9).await;
        assert!(matches!(answer, CallResult::Success(JoinReply(Ok(())))), "{answer:?}");
        let (liar, _) = ractor::Actor::spawn(None, LyingClient, ()).await.unwrap();
        let limit = Duration::from_secs(120);
        let status =
            tokio::task::spawn_blocking(move || finish(&mut server, "serve", limit)).await.unwrap();
        assert!(status.success(), "{}", log(&d.join("serve.log")));
        liar.stop(None);
        node.stop(None);
    });
    assert!(finish(&mut honest, "join 1-9", Duration::from_secs(60)).success());
    let r = records(&d.join("served/metrics.jsonl"));
    assert_eq!(r.len(), 3, "every round finishes");
    assert!(r.iter().all(|r| r.clients_ok == 9 && r.aggregated), "{r:?}");
    let why = |k: usize| r[k].clients_excluded.join("; ");
    assert!(why(0).contains("site-10: reply claims to be from client 2"), "{}", why(0));
    assert!(why(1).contains("site-10:") && why(1).contains("non-finite"), "{}", why(1));
    assert!(
        why(2).contains("site-10:") && why(2).contains("dimension 13, expected 12"),
        "{}",
        why(2)
    );
}

#[test]
fn run_with_processes_merges_every_process_trace_on_one_clock() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let merged = d.join("merged.json");
    let mut args = vec!["run".to_string(), config().display().to_string(), "--processes".into()];
    args.extend(["2".into(), "--out".into(), d.join("run").display().to_string()]);
    args.extend(["--trace".into(), merged.display().to_string()]);
    args.extend(sets(&["num_rounds=2"]));
    let status = spawn(&args, &d.join("run.log"), "unused: run --processes makes its own").wait();
    assert!(status.unwrap().success(), "{}", log(&d.join("run.log")));
    assert!(d.join("run/join-1.json").exists() && d.join("run/join-2.json").exists());
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&merged).unwrap()).unwrap();
    let events = doc["traceEvents"].as_array().unwrap();
    let processes: Vec<&str> = events
        .iter()
        .filter(|e| e["name"] == "process_name")
        .map(|e| e["args"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(processes, ["serve", "join 1-5", "join 6-10"]);
    // The clients' Train spans, in the client processes, with the server's send time carried
    // across: their mailbox waits are those of a loopback hop, not of two unrelated clocks.
    let trains: Vec<&serde_json::Value> =
        events.iter().filter(|e| e["cat"] == "handle" && e["name"] == "Train").collect();
    assert_eq!(trains.len(), 20, "10 clients x 2 rounds");
    // The server sends each Train while it handles RunRound: on the merged clock, a Train's
    // send time (its start less its mailbox wait) falls inside one of the server's RunRound
    // spans, which a stamp left on either process's own clock would miss.
    let rounds: Vec<(u64, u64)> = events
        .iter()
        .filter(|e| e["pid"] == 1 && e["cat"] == "handle" && e["name"] == "RunRound")
        .map(|e| {
            let ts = e["ts"].as_u64().unwrap();
            (ts, ts + e["dur"].as_u64().unwrap())
        })
        .collect();
    assert_eq!(rounds.len(), 2);
    for t in &trains {
        assert!(t["pid"] == 2 || t["pid"] == 3, "{t}");
        let wait = t["args"]["wait_us"].as_u64().unwrap();
        assert!(wait > 0, "a Train crossed the wire in no time: its send time was lost");
        let sent = t["ts"].as_u64().unwrap() - wait;
        // 2 ms of slack for the wall clock read against the monotonic one.
        let inside = rounds.iter().any(|&(a, b)| a <= sent + 2_000 && sent <= b + 2_000);
        assert!(inside, "a Train sent at {sent} us, outside the rounds {rounds:?}");
    }
    // And the server received every update, on its own track.
    let updates = events
        .iter()
        .filter(|e| e["cat"] == "handle" && e["name"] == "ClientUpdate" && e["pid"] == 1)
        .count();
    assert_eq!(updates, 20);
}
