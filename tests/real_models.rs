//! End to end on the real embedded models and data (fetched into `$FEDBPT_HOME` on first use,
//! hash-pinned): small shards and budgets, so the whole file stays within a couple of minutes.

use fedbpt::config::Config;
use fedbpt::experiment;
use fedbpt::objective::accuracy;

fn small(model: &str) -> Config {
    Config::from_toml_str(
        &format!(
            "model_name = \"{model}\"\ntask_name = \"mr\"\nk_shot = 4\ntest_size = 48\nbudget = 20\npopsize = 10\nintrinsic_dim = 20\nseed = 3"
        ),
        &[],
    )
    .expect("valid config")
}

fn run(model: &str) -> fedbpt::bbt::BbtSummary {
    let cfg = small(model);
    let device = experiment::device("cpu").unwrap();
    let m = experiment::load_model(&cfg, &device, &mut |l| eprintln!("{l}")).expect("model loads");
    let (ds, split) = experiment::load_split(&cfg, &mut |l| eprintln!("{l}")).expect("data loads");
    assert_eq!(ds.label_names, vec!["negative", "positive"]);
    // MR: 10,605 rated sentences minus the neutral ones.
    assert!(ds.examples.len() > 10_000, "{}", ds.examples.len());
    assert_eq!((split.train.len(), split.dev.len(), split.test.len()), (8, 8, 48));
    let task = cfg.task_spec().unwrap();
    let mut iters = 0;
    let s =
        fedbpt::bbt::run(&cfg, m.as_ref(), &task, &split, &mut |_| iters += 1).expect("bbt runs");
    assert_eq!(s.evaluations, 20);
    assert_eq!(iters, 2);
    // The summary's baselines are what the model scores on the test sentences, recomputed here
    // from scratch, and every accuracy is a count of the 48 test sentences.
    let test = m.prepare(&task, &split.test, None).unwrap();
    let manual = accuracy(&m.scores(&test, None).unwrap(), &test.labels);
    let zero = vec![0.0; cfg.n_prompt_tokens * m.info().hidden_size];
    let placeholders = accuracy(&m.scores(&test, Some(&zero)).unwrap(), &test.labels);
    assert_eq!((s.zero_shot_test_acc, s.zero_prompt_test_acc), (manual, placeholders));
    for acc in [s.zero_shot_test_acc, s.zero_prompt_test_acc, s.final_test_acc, s.best_dev_test_acc]
    {
        let hits = acc * 48.0;
        assert!((hits - hits.round()).abs() < 1e-9, "{acc} is no share of 48 sentences");
    }
    s
}

#[test]
fn smollm2_bbt_end_to_end() {
    let s = run("smollm2");
    // A wrongly loaded model (tokenizer, RoPE layout, weights) scores at chance; the real one's
    // manual prompt is clearly above it on MR.
    assert!(s.zero_shot_test_acc >= 0.6, "manual prompt accuracy {}", s.zero_shot_test_acc);
}

#[test]
fn minilm_bbt_end_to_end() {
    let s = run("minilm");
    assert!(s.zero_shot_test_acc >= 0.6, "manual prompt accuracy {}", s.zero_shot_test_acc);
}

#[test]
fn offline_hub_id_fails_with_a_clear_message() {
    let mut cfg = small("smollm2");
    cfg.model_name = "HuggingFaceTB/SmolLM2-135M".into();
    std::env::set_var("HF_HUB_OFFLINE", "1");
    let err = match experiment::load_model(&cfg, &experiment::device("cpu").unwrap(), &mut |_| {}) {
        Ok(_) => panic!("no hub here"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("hub") && err.contains("local directory"), "{err}");
}

/// Workers merge several clients' scoring requests into one forward. On the default model the
/// merged scores must be the ones each request gets alone, bit for bit: batching must not change
/// a federation's metrics.
#[test]
fn merged_scoring_jobs_on_smollm2_equal_their_lone_scores_bit_for_bit() {
    let cfg = Config::from_toml_str(
        &std::fs::read_to_string("configs/quickstart.toml").expect("quickstart config"),
        &["k_shot=6".into(), "test_size=24".into()],
    )
    .expect("valid config");
    let device = experiment::device("cpu").unwrap();
    let m = experiment::load_model(&cfg, &device, &mut |l| eprintln!("{l}")).expect("model loads");
    let (_, split) = experiment::load_split(&cfg, &mut |l| eprintln!("{l}")).expect("data loads");
    let task = cfg.task_spec().unwrap();
    let a = m.prepare(&task, &split.train[..5], None).unwrap();
    let b = m.prepare(&task, &split.test, None).unwrap();
    let n = cfg.n_prompt_tokens * m.info().hidden_size;
    let prompt = |seed: u64| -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u64 * 2654435761 + seed) % 1000) as f32 / 1000.0 - 0.5) * 0.1)
            .collect()
    };
    let (pa, pb) = ([prompt(1), prompt(2), prompt(3)], [prompt(4), vec![0.0; n]]);
    let ra: Vec<&[f32]> = pa.iter().map(|p| p.as_slice()).collect();
    let rb: Vec<&[f32]> = pb.iter().map(|p| p.as_slice()).collect();
    let jobs = [
        fedbpt::models::ScoreJob { batch: &a, prompts: &ra },
        fedbpt::models::ScoreJob { batch: &b, prompts: &rb },
    ];
    let merged = m.scores_jobs(&jobs).unwrap();
    for (j, job) in jobs.iter().enumerate() {
        let alone = m.scores_many(job.batch, job.prompts).unwrap();
        assert_eq!(merged[j], alone, "job {j}");
    }
}
