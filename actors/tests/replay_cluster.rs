//! `traffic = "replay"` across processes on loopback, on the stand-in backend: a `fedbpt serve`
//! process and two `fedbpt join` processes record what the one-process run shipping
//! distributions records (but the wall clock, the bytes and the resyncs), with client sampling,
//! a client that panics (restarted with a new replica), a replica corrupted on purpose and the
//! server killed with kill -9 and resumed (a client process killed: `tests/cluster.rs`); and a
//! client process whose uploads lie (a ranking of the wrong length, a repeated index, a seed for
//! another round, more bytes than an upload can take) is refused with its reason while the run
//! finishes.

use std::time::Duration;

use fedbpt::replay::{ReplayContext, SearchRecord, StartDigest, Upload};
use fedbpt_actors::messages::ClientMsg;
use fedbpt_actors::replay::client::{new_replica, start_round, ClientReplica, Start};
use fedbpt_actors::replay::{Answer, ReplayReply, ReplayRequest};
use fedbpt_actors::server::RoundRecord;
use fedbpt_actors::wire::JoinReply;
use ractor::rpc::CallResult;
use ractor::ActorRef;

mod common;

use common::*;

/// What the two traffic modes must agree on: the record but the wall clock, the bytes and the
/// replicas resynced.
fn comparable(r: &RoundRecord) -> serde_json::Value {
    let mut v = serde_json::to_value(r).unwrap();
    for key in ["wall_s", "bytes_up", "bytes_down", "clients_resynced"] {
        v.as_object_mut().unwrap().remove(key);
    }
    v
}

#[test]
fn replayed_rounds_across_processes_record_what_shipped_rounds_record() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Sampled (seed 11): round 2 has site-3 and site-5, round 3 site-1 and site-9, round 4
    // site-4 and site-9, round 5 site-4. site-5 panics in round 2 (site-3 holds round 2 open
    // for its restart): the restart is recorded in round 3, the round the server is killed in,
    // from the checkpoint. site-1 holds its round-3 reply back so that the server is killed
    // inside round 3; site-4 panics in round 4 (restarted, its new replica catches up in
    // round 5).
    let extra = [
        "num_rounds=5",
        "clients_per_round=6",
        "runtime.round_timeout_s=30",
        "faults.stragglers=[{client=\"site-3\", delay_s=1.0, rounds=[2]}, \
         {client=\"site-1\", delay_s=3.0, rounds=[3]}]",
        "faults.panic=[{client=\"site-5\", round=2}, {client=\"site-4\", round=4}]",
    ];
    let shipped = run_alone(d, "one", &extra);
    // site-9's replica is moved one ulp off before round 4's digest.
    let mut replayed = extra.to_vec();
    replayed
        .extend(["traffic=\"replay\"", "faults.corrupt_replica=[{client=\"site-9\", round=4}]"]);

    let served = served_with_server_killed_in_round_3(d, &replayed);
    assert_eq!(served.len(), 5);
    for (s, r) in shipped.iter().zip(&served) {
        assert_eq!(comparable(s), comparable(r), "round {}", s.round);
    }
    // The run exercised what it claims: sampling, the kill, and the corrupted replica found
    // by the hash and resynced (and nothing else resynced).
    assert!(served.iter().all(|r| r.clients_sampled.len() == 6 && r.aggregated));
    assert_eq!(served[2].clients_restarted, vec!["site-5".to_string()]);
    assert_eq!(served[4].clients_restarted, vec!["site-4".to_string()]);
    assert!(served[4].clients.iter().any(|c| c.client == "site-4"), "{:?}", served[4]);
    for r in &served {
        let expected: Vec<String> = if r.round == 4 { vec!["site-9".into()] } else { Vec::new() };
        assert_eq!(r.clients_resynced, expected, "round {}", r.round);
    }
    assert!(log(&d.join("b.log")).contains("site-9: replica out of sync"));
    // Uploads are smaller even at d = 12 (about 60 bytes against 100).
    for (s, r) in shipped.iter().zip(&served) {
        assert!(r.bytes_up < s.bytes_up, "round {}: {} vs {}", r.round, r.bytes_up, s.bytes_up);
    }
}

/// A client that replays honestly but uploads rankings that cannot be replayed.
struct LyingReplayClient;

impl ractor::Actor for LyingReplayClient {
    type Msg = ClientMsg;
    type State = (ClientReplica, ReplayContext);
    type Arguments = fedbpt::config::Config;

    async fn pre_start(
        &self,
        me: ActorRef<Self::Msg>,
        cfg: fedbpt::config::Config,
    ) -> Result<Self::State, ractor::ActorProcessingErr> {
        ractor::pg::join("fedbpt/site-10".to_string(), vec![me.get_cell()]);
        Ok((new_replica(&cfg)?, ReplayContext::from_config(&cfg)))
    }

    async fn handle(
        &self,
        _me: ActorRef<Self::Msg>,
        msg: Self::Msg,
        (replica, ctx): &mut Self::State,
    ) -> Result<(), ractor::ActorProcessingErr> {
        let ClientMsg::Replay(ReplayRequest::Valid(train), reply) = msg else { return Ok(()) };
        let dist = match start_round(replica, &train.download, false)? {
            Start::Search(dist) => dist,
            Start::Ask(answer) => {
                let _ = reply.send(ReplayReply(Ok((answer, Default::default()))));
                return Ok(());
            }
        };
        let round = dist.round;
        let mut upload = Upload {
            round,
            client: 9,
            seed: ctx.search_seed(9, round),
            start: StartDigest::of(&dist)?,
            record: SearchRecord {
                rankings: vec![(0..ctx.popsize as u32).collect(); ctx.iterations],
                fitness: 0.5,
                start_fitness: None,
            },
            loss: 0.5,
            class_counts: Vec::new(),
        };
        match round {
            1 => {
                upload.record.rankings[1].pop(); // a ranking of the wrong length
            }
            2 => upload.record.rankings[2][1] = 0, // candidate 0 twice
            3 => upload.seed = ctx.search_seed(9, round - 1), // last round's seed
            _ => upload.class_counts = vec![0; 30_000], // beyond what an upload can take
        }
        let answer = Answer::Upload(upload.encode()?);
        let _ = reply.send(ReplayReply(Ok((answer, Default::default()))));
        Ok(())
    }
}

#[test]
fn a_client_process_whose_uploads_lie_cannot_end_a_replayed_run() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let extra = ["num_rounds=4", "traffic=\"replay\""];
    let port = free_port();
    let mut server = serve(d, port, &extra);
    let mut honest = join(d, port, "1-9", &extra, "a.log", COOKIE);
    let cfg = stand_in_config(&extra);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let (node, registry) = connect_node("liar", &cfg, port).await;
        let data = fedbpt::experiment::load_dataset(&cfg, &mut |_| {}).unwrap().fingerprint();
        let answer = ask_to_join(&registry, "liar", &cfg, &data, 9).await;
        assert!(matches!(answer, CallResult::Success(JoinReply(Ok(())))), "{answer:?}");
        let (liar, _) = ractor::Actor::spawn(None, LyingReplayClient, cfg.clone()).await.unwrap();
        let limit = Duration::from_secs(120);
        let status =
            tokio::task::spawn_blocking(move || finish(&mut server, "serve", limit)).await.unwrap();
        assert!(status.success(), "{}", log(&d.join("serve.log")));
        liar.stop(None);
        node.stop(None);
    });
    assert!(finish(&mut honest, "join 1-9", Duration::from_secs(60)).success());
    let r = records(&d.join("served/metrics.jsonl"));
    assert_eq!(r.len(), 4, "every round finishes");
    assert!(r.iter().all(|r| r.clients_ok == 9 && r.aggregated), "{r:?}");
    let why = |k: usize| r[k].clients_excluded.join("; ");
    let expected = [
        "iteration 1: ranking of 3 candidates, expected 4",
        "iteration 2: candidate 0 repeated",
        "seed",
        "replay upload: 30",
    ];
    for (k, reason) in expected.iter().enumerate() {
        assert!(
            why(k).contains("site-10: upload refused") && why(k).contains(reason),
            "{}",
            why(k)
        );
    }
    // Logged by the server as it refused them.
    let said = log(&d.join("serve.log"));
    assert!(said.matches("site-10: upload refused").count() >= 4, "{said}");
}
