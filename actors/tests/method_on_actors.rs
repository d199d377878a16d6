//! The method as the actors run it, on the stand-in backend (seconds, no language model): a
//! client's upload (Eq. 7 fitness when perturbing), client sampling per round, pycma's CMA-ES
//! (`cma = "pycma"`) through clients and server, and the refusal of checkpoints written before the
//! reference server rule.

use std::sync::Arc;

use fedbpt::cmaes::CmaFlavour;
use fedbpt::config::Config;
use fedbpt::data::Example;
use fedbpt::experiment::{load_model, prompt_settings};
use fedbpt::local_search::Objective;
use fedbpt::models::stand_in::StandIn;
use fedbpt::models::{PromptModel, TokenNoise};
use fedbpt::objective::{fitness_perturbed, loss};
use fedbpt::projection::Projection;
use fedbpt::protocol::SearchDistribution;
use fedbpt::seeds::{derive, tag};
use fedbpt::task::TaskSpec;
use fedbpt_actors::client::{Client, ClientArgs};
use fedbpt_actors::data_loader::{DataLoader, DataState};
use fedbpt_actors::federation::{self, Env};
use fedbpt_actors::messages::{now_ms, ClientMsg};
use fedbpt_actors::pool::ForwardPool;
use fedbpt_actors::profile;
use fedbpt_actors::server::Checkpoint;
use fedbpt_actors::wire::{Train, TrainReply, TrainRequest};
use ractor::rpc::CallResult;
use ractor::Actor;

/// A small federation on the stand-in: 6 clients, 4 rounds.
fn stand_in(extra: &[&str]) -> Config {
    let base = [
        "model_name=stand-in",
        "num_users=6",
        "k_shot=12",
        "test_size=200",
        "intrinsic_dim=10",
        "n_prompt_tokens=2",
        "local_iter=3",
        "local_popsize=4",
        "num_rounds=4",
        "eval_every=2",
        "weights=\"f32\"",
    ];
    let overrides: Vec<String> = base.iter().chain(extra).map(|s| s.to_string()).collect();
    Config::from_toml_str(
        &std::fs::read_to_string("../configs/quickstart.toml").unwrap(),
        &overrides,
    )
    .unwrap()
}

fn examples(n: usize) -> Vec<Example> {
    (0..n).map(|i| Example { text: format!("sentence {i}"), text_b: None, label: i % 2 }).collect()
}

#[test]
fn a_perturbing_client_uploads_the_eq7_ratio_of_its_final_mean() {
    let cfg = stand_in(&["perturb=true", "perturb_rate=0.5"]);
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let model: Arc<dyn PromptModel> = Arc::new(StandIn::new(prompt_settings(&cfg)));
        let task = Arc::new(TaskSpec::builtin("mr").unwrap());
        let pool = ForwardPool::spawn(vec![model.clone()], task.clone(), 1, 512, 0).await.unwrap();
        let shard = Arc::new(examples(10));
        let state = DataState {
            shards: vec![shard.clone()],
            dev: Arc::new(examples(4)),
            test: Arc::new(examples(4)),
        };
        let (data, _) = Actor::spawn(None, DataLoader, state).await.unwrap();
        let info = model.info();
        let projection = Arc::new(
            Projection::new(
                cfg.intrinsic_dim,
                cfg.n_prompt_tokens * info.hidden_size,
                1.0,
                1.0,
                cfg.seed,
            )
            .unwrap(),
        );
        let args = ClientArgs {
            id: 0,
            cfg: Arc::new(cfg.clone()),
            pool: pool.clone(),
            data,
            projection: projection.clone(),
            objective: Objective {
                loss: cfg.loss_type,
                metric: task.metric,
                balance: cfg.client_loss,
            },
            group: None,
        };
        let (client, _) = Actor::spawn(None, Client, args).await.unwrap();
        let dist =
            SearchDistribution { round: 3, mean: vec![0.1; 10], sigma: 0.5, covariance: None };
        let reply = client
            .call(
                |reply| {
                    let train = Train {
                        dist,
                        fault: None,
                        deadline_ms: now_ms() + 60_000,
                        stamp: profile::stamp(),
                    };
                    ClientMsg::Train(TrainRequest::Valid(train), reply)
                },
                None,
            )
            .await
            .unwrap();
        let CallResult::Success(TrainReply(Ok((u, _)))) = reply else {
            panic!("no update: {reply:?}")
        };
        assert_eq!((u.client, u.round, u.sigmas.len()), (0, 3, cfg.local_iter));
        assert_eq!(u.sigmas[0], 0.5, "the first sigma is the one sent, recorded before the ask");

        // The final mean, scored directly on the model: real and perturbed (this round's noise).
        let prompt = projection.project(&u.mean).unwrap();
        let real = model.prepare(&task, &shard, None).unwrap();
        let noise = TokenNoise {
            rate: cfg.perturb_rate,
            seed: derive(cfg.seed, &[tag::PERTURBATION, 0, 3]),
        };
        let noisy = model.prepare(&task, &shard, Some(noise)).unwrap();
        let l_real =
            loss(&model.scores(&real, Some(&prompt)).unwrap(), &real.labels, cfg.loss_type)
                .unwrap();
        let l_noisy =
            loss(&model.scores(&noisy, Some(&prompt)).unwrap(), &noisy.labels, cfg.loss_type)
                .unwrap();
        assert_eq!(u.loss, l_real, "the upload's loss is the plain loss on the real shard");
        assert_eq!(u.fitness, fitness_perturbed(l_real, l_noisy), "the fitness is Eq. 7's ratio");
        assert_ne!(u.fitness, u.loss);
        client.stop(None);
        pool.stop();
    });
}

fn run(cfg: &Config) -> (federation::FedSummary, Vec<fedbpt_actors::server::RoundRecord>) {
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mut env = Env::load(cfg, &mut |_| {}).unwrap();
    rt.block_on(federation::run(cfg, &mut env, Default::default(), &mut |_| {})).unwrap()
}

#[test]
fn clients_per_round_samples_the_same_clients_for_the_same_seed() {
    let cfg = stand_in(&["clients_per_round=2", "num_users=6"]);
    let (_, a) = run(&cfg);
    let (_, b) = run(&cfg);
    assert_eq!(a.len(), 4);
    let sampled: Vec<Vec<String>> = a.iter().map(|r| r.clients_sampled.clone()).collect();
    assert_eq!(sampled, b.iter().map(|r| r.clients_sampled.clone()).collect::<Vec<_>>());
    for r in &a {
        assert_eq!(r.clients_sampled.len(), 2, "{r:?}");
        assert_eq!(r.clients_ok, 2, "only the sampled clients train");
    }
    let distinct: std::collections::HashSet<&Vec<String>> = sampled.iter().collect();
    assert!(distinct.len() > 1, "rounds draw different clients: {sampled:?}");
    let (_, other) = run(&Config { seed: cfg.seed + 1, ..cfg.clone() });
    assert_ne!(sampled, other.iter().map(|r| r.clients_sampled.clone()).collect::<Vec<_>>());
    // All clients every round by default.
    let (_, all) = run(&stand_in(&[]));
    assert!(all.iter().all(|r| r.clients_sampled.is_empty() && r.clients_ok == 6));
}

#[test]
fn cma_pycma_runs_the_federation_reproducibly_and_differently() {
    let cfg = stand_in(&["cma=pycma"]);
    assert_eq!(cfg.cma, CmaFlavour::Pycma);
    let (_, a) = run(&cfg);
    let (_, b) = run(&cfg);
    assert_eq!(a.len(), 4);
    assert!(a.iter().all(|r| r.aggregated && r.clients_ok == 6), "{a:?}");
    let sigmas = |records: &[fedbpt_actors::server::RoundRecord]| -> Vec<u64> {
        records.iter().map(|r| r.sigma.to_bits()).collect()
    };
    assert_eq!(sigmas(&a), sigmas(&b), "same seed, same run");
    let (_, tutorial) = run(&stand_in(&[]));
    assert_ne!(sigmas(&a), sigmas(&tutorial), "the flavour changes the search");
}

#[test]
fn the_stand_in_loads_by_name() {
    let cfg = stand_in(&[]);
    let m = load_model(&cfg, &candle_core::Device::Cpu, &mut |_| {}).unwrap();
    assert_eq!(m.info().name, "stand-in");
}

#[test]
fn a_checkpoint_from_before_the_reference_rule_is_refused_clearly() {
    // The layout earlier versions wrote: no `format`, best_dev as a tuple.
    let old = r#"{"round": 2, "aggregator": {"aggregator": "fedbpt", "state": {}},
        "best_dev": [0.8, 1, [0.0]], "records": [], "config": {}}"#;
    let e = Checkpoint::parse(old).unwrap_err();
    assert!(e.contains("format 1") && e.contains("start the run again"), "{e}");
    assert!(Checkpoint::parse("{").unwrap_err().contains("not a fedbpt checkpoint"));
}
