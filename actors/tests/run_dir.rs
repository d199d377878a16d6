//! The run directory against a hostile user (stand-in backend, seconds): two runs into one
//! directory, a partial `metrics.jsonl` under `plot`, restored values out of range, repeated
//! seeds, and unusable `--out` and `--trace` paths. Each is refused with the flag, file or key
//! named, and nothing finished is lost.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const STAND_IN: &[&str] = &[
    "model_name=stand-in",
    "num_users=4",
    "k_shot=8",
    "test_size=40",
    "intrinsic_dim=12",
    "n_prompt_tokens=2",
    "local_iter=2",
    "local_popsize=4",
    "eval_every=1",
    "seed=9",
];

fn fedbpt(args: &[&str], extra: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fedbpt"));
    cmd.args(args);
    for s in STAND_IN.iter().chain(extra) {
        cmd.args(["--set", s]);
    }
    cmd.output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn finished_run(dir: &Path, rounds: usize) {
    let d = dir.to_str().unwrap();
    let nr = format!("num_rounds={rounds}");
    let ok = fedbpt(&["run", "../configs/quickstart.toml", "--out", d], &[&nr]);
    assert!(ok.status.success(), "{}", stderr(&ok));
}

#[test]
fn a_second_run_into_a_busy_directory_is_refused_naming_the_first() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("same");
    let d = dir.to_str().unwrap();
    // The first run straggles so that it is still running when the second starts.
    let mut first = Command::new(env!("CARGO_BIN_EXE_fedbpt"));
    first.args(["run", "../configs/quickstart.toml", "--out", d]);
    for s in STAND_IN.iter().chain(&[
        "num_rounds=3",
        "faults.stragglers=[{ client = \"site-1\", delay_s = 0.5 }]",
        "runtime.round_timeout_s=30",
    ]) {
        first.args(["--set", s]);
    }
    let mut first = first
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !dir.join(".fedbpt.lock").exists() {
        assert!(Instant::now() < deadline, "the first run took no lock");
        std::thread::sleep(Duration::from_millis(10));
    }
    let second = fedbpt(&["run", "../configs/quickstart.toml", "--out", d], &["num_rounds=2"]);
    assert!(!second.status.success());
    let err = stderr(&second);
    assert!(err.contains("--out") && err.contains(&format!("pid {}", first.id())), "{err}");
    assert!(first.wait().unwrap().success());
    // The first run's files, whole and its own: 3 rounds of JSON lines.
    let metrics = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 3);
    for l in metrics.lines() {
        serde_json::from_str::<serde_json::Value>(l).unwrap();
    }
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["rounds"], 3);
    assert!(!dir.join(".fedbpt.lock").exists(), "the lock outlived its run");
}

#[test]
fn plot_refuses_records_that_do_not_cover_the_summary() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    finished_run(&dir, 3);
    let png = std::fs::read(dir.join("accuracy.png")).unwrap();
    let metrics = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let d = dir.to_str().unwrap();
    for partial in
        [metrics.lines().take(2).map(|l| format!("{l}\n")).collect::<String>(), String::new()]
    {
        std::fs::write(dir.join("metrics.jsonl"), &partial).unwrap();
        let o = Command::new(env!("CARGO_BIN_EXE_fedbpt")).args(["plot", d]).output().unwrap();
        assert!(!o.status.success());
        assert!(
            stderr(&o).contains("metrics.jsonl") && stderr(&o).contains("3 rounds"),
            "{}",
            stderr(&o)
        );
        assert_eq!(std::fs::read(dir.join("accuracy.png")).unwrap(), png, "accuracy.png changed");
    }
    // Whole again: redrawn.
    std::fs::write(dir.join("metrics.jsonl"), &metrics).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_fedbpt")).args(["plot", d]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn a_checkpoint_with_values_out_of_range_is_refused_on_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    finished_run(&dir, 2);
    let text = std::fs::read_to_string(dir.join("checkpoint.json")).unwrap();
    let cp: serde_json::Value = serde_json::from_str(&text).unwrap();
    let d = dir.to_str().unwrap();
    type Break = fn(&mut serde_json::Value);
    let cases: [(&str, Break); 2] = [
        ("best-on-dev metric 7.5", |cp| cp["best_dev"]["metric"] = 7.5.into()),
        ("dev_acc -3", |cp| cp["records"][0]["dev_acc"] = (-3.0).into()),
    ];
    for (said, break_it) in cases {
        let mut bad = cp.clone();
        // One more round to go, so that the checkpoint could continue a run.
        bad["config"]["num_rounds"] = 3.into();
        break_it(&mut bad);
        std::fs::write(dir.join("checkpoint.json"), bad.to_string()).unwrap();
        let o = Command::new(env!("CARGO_BIN_EXE_fedbpt")).args(["run", "--resume", d]).output();
        let o = o.unwrap();
        assert!(!o.status.success(), "{said}: resumed");
        assert!(
            stderr(&o).contains("checkpoint.json") && stderr(&o).contains(said),
            "{}",
            stderr(&o)
        );
    }
}

#[test]
fn repeated_seeds_and_unusable_paths_are_refused_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("cmp");
    let o = fedbpt(
        &[
            "compare",
            "../configs/quickstart.toml",
            "--seeds",
            "42,42",
            "--out",
            out.to_str().unwrap(),
        ],
        &[],
    );
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--seeds") && stderr(&o).contains("42"), "{}", stderr(&o));
    assert!(!out.exists(), "the refused comparison created its directory");

    let file = tmp.path().join("a-file");
    std::fs::write(&file, "mine").unwrap();
    let o = fedbpt(&["run", "../configs/quickstart.toml", "--out", file.to_str().unwrap()], &[]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("--out") && stderr(&o).contains("not a directory"),
        "{}",
        stderr(&o)
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "mine");

    let started = Instant::now();
    let run = tmp.path().join("run");
    let o = fedbpt(
        &[
            "run",
            "../configs/quickstart.toml",
            "--out",
            run.to_str().unwrap(),
            "--trace",
            tmp.path().to_str().unwrap(),
        ],
        &[],
    );
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("--trace") && stderr(&o).contains("is a directory"),
        "{}",
        stderr(&o)
    );
    assert!(!run.join("summary.json").exists());
    assert!(started.elapsed() < Duration::from_secs(30));

    // A directory no one may create (even root cannot write into /proc): refused at once.
    let o = fedbpt(&["run", "../configs/quickstart.toml", "--out", "/proc/fedbpt-test/run"], &[]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("--out") && stderr(&o).contains("/proc/fedbpt-test"),
        "{}",
        stderr(&o)
    );
    assert!(started.elapsed() < Duration::from_secs(30));
}

/// A disk that fills up while a run publishes its result (a file-size limit stands in for it):
/// the run fails naming the file it could not write, and the finished run in the directory is
/// left as it was, with no staged file behind.
#[test]
fn a_full_disk_while_publishing_leaves_the_finished_run_as_it_was() {
    use std::os::unix::process::CommandExt;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    finished_run(&dir, 2);
    let listing = |d: &Path| {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let files = ["summary.json", "metrics.jsonl", "accuracy.png", "diagnostics.png"];
    let before: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(dir.join(f)).unwrap()).collect();
    let names_before = listing(&dir);
    // Large enough for the checkpoint and the records, too small for a figure.
    let limit = 24 * 1024;
    assert!(before[2].len() > limit, "accuracy.png is {} bytes", before[2].len());
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fedbpt"));
    cmd.args(["run", "../configs/quickstart.toml", "--out", dir.to_str().unwrap()]);
    for s in STAND_IN.iter().chain(&["num_rounds=3", "seed=10"]) {
        cmd.args(["--set", s]);
    }
    // SAFETY: setrlimit is async-signal-safe and touches only the child.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit { rlim_cur: limit as u64, rlim_max: limit as u64 };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    let o = cmd.output().unwrap();
    assert!(!o.status.success(), "the run fit under the limit");
    assert!(o.status.code().is_some(), "killed by a signal, not failed with an error");
    assert!(stderr(&o).contains(".png"), "{}", stderr(&o));
    for (f, b) in files.iter().zip(&before) {
        assert_eq!(&std::fs::read(dir.join(f)).unwrap(), b, "{f} changed");
    }
    let after = listing(&dir);
    assert_eq!(after, names_before, "staged files left behind");
}

#[test]
fn a_resume_on_changed_data_is_refused_naming_the_data_path() {
    let tmp = tempfile::tempdir().unwrap();
    let csv = tmp.path().join("reviews.csv");
    let write = |flip: usize| {
        let mut rows = String::from("text,label\n");
        for i in 0..200 {
            let positive = (i % 2 == 0) != (i == flip);
            let label = if positive { "positive" } else { "negative" };
            rows.push_str(&format!("\"review number {i}\",{label}\n"));
        }
        std::fs::write(&csv, rows).unwrap();
    };
    write(usize::MAX);
    let data = format!(
        "data={{path=\"{}\", format=\"csv\", columns={{text=\"text\", label=\"label\"}}}}",
        csv.display()
    );
    let dir = tmp.path().join("run");
    let d = dir.to_str().unwrap();
    let ok = fedbpt(&["run", "../configs/quickstart.toml", "--out", d], &["num_rounds=2", &data]);
    assert!(ok.status.success(), "{}", stderr(&ok));
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["data_fingerprint"].as_str().map(str::len), Some(64));
    // A checkpoint with a round to go, then one label of the file changed.
    let text = std::fs::read_to_string(dir.join("checkpoint.json")).unwrap();
    let mut cp: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(cp["data_fingerprint"].is_string());
    cp["config"]["num_rounds"] = 3.into();
    std::fs::write(dir.join("checkpoint.json"), cp.to_string()).unwrap();
    write(7);
    let o = Command::new(env!("CARGO_BIN_EXE_fedbpt")).args(["run", "--resume", d]).output();
    let o = o.unwrap();
    assert!(!o.status.success(), "resumed on changed data");
    assert!(
        stderr(&o).contains("data.path") && stderr(&o).contains("reviews.csv"),
        "{}",
        stderr(&o)
    );
    // The same data again: it continues.
    write(usize::MAX);
    let o = Command::new(env!("CARGO_BIN_EXE_fedbpt")).args(["run", "--resume", d]).output();
    let o = o.unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
}
