//! What the loopback tests share: the binary's `serve`, `join` and `run` as child processes on
//! the stand-in backend, and their records.
#![allow(dead_code)] // each test binary uses its own share of these

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fedbpt::config::Config;
use fedbpt_actors::cluster::{start_node, SERVER_GROUP};
use fedbpt_actors::messages::RegistryMsg;
use fedbpt_actors::server::RoundRecord;
use fedbpt_actors::wire::{Join, JoinReply, JoinRequest};
use ractor::rpc::CallResult;
use ractor::ActorRef;
use ractor_cluster::NodeServerMessage;

pub const BIN: &str = env!("CARGO_BIN_EXE_fedbpt");
pub const COOKIE: &str = "loopback-test-cookie";

pub const STAND_IN: &[&str] = &[
    "model_name=stand-in",
    "weights=\"f32\"",
    "num_users=10",
    "min_clients=5",
    "k_shot=8",
    "test_size=40",
    "intrinsic_dim=12",
    "n_prompt_tokens=2",
    "local_iter=4",
    "local_popsize=4",
    "eval_every=1",
    "seed=11",
    "iid=false",
];

pub fn config() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/quickstart.toml")
}

pub fn sets(extra: &[&str]) -> Vec<String> {
    STAND_IN.iter().chain(extra).flat_map(|s| ["--set".to_string(), s.to_string()]).collect()
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A child process of the binary, its stderr kept in a file.
pub fn spawn(args: &[String], log: &Path, cookie: &str) -> Child {
    let err = std::fs::File::create(log).unwrap();
    Command::new(BIN)
        .args(args)
        .env("FEDBPT_COOKIE", cookie)
        .stdout(Stdio::null())
        .stderr(err)
        .spawn()
        .unwrap()
}

pub fn serve(dir: &Path, port: u16, extra: &[&str]) -> Child {
    serve_with(dir, port, extra, &[])
}

/// `serve` with settings of its own process (`own`: the `[cluster]` section).
pub fn serve_with(dir: &Path, port: u16, extra: &[&str], own: &[&str]) -> Child {
    let mut args = vec![
        "serve".to_string(),
        config().display().to_string(),
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        "--out".into(),
        dir.join("served").display().to_string(),
    ];
    args.extend(sets(extra));
    args.extend(own.iter().flat_map(|s| ["--set".to_string(), s.to_string()]));
    spawn(&args, &dir.join("serve.log"), COOKIE)
}

pub fn join(dir: &Path, port: u16, sites: &str, extra: &[&str], log: &str, cookie: &str) -> Child {
    let mut args = vec![
        "join".to_string(),
        config().display().to_string(),
        "--connect".into(),
        format!("127.0.0.1:{port}"),
        "--sites".into(),
        sites.into(),
    ];
    args.extend(sets(extra));
    spawn(&args, &dir.join(log), cookie)
}

/// Waits for a child to exit (at most `limit`), killing it past that.
pub fn finish(child: &mut Child, what: &str, limit: Duration) -> std::process::ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            panic!("{what} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits for a child to exit successfully within 120 s; its log otherwise.
pub fn finished_ok(child: &mut Child, what: &str, log_file: &Path) {
    let status = finish(child, what, Duration::from_secs(120));
    assert!(status.success(), "{what}: {}", log(log_file));
}

/// Waits for the server and the client processes of sites 1-5 and 6-10 (logs `serve.log`,
/// `a.log`, `b.log`) to finish successfully.
pub fn finish_federation(d: &Path, [server, a, b]: [&mut Child; 3]) {
    finished_ok(server, "serve", &d.join("serve.log"));
    finished_ok(a, "join 1-5", &d.join("a.log"));
    finished_ok(b, "join 6-10", &d.join("b.log"));
}

/// The one-process run of the same config into `d/out`, and its records.
pub fn run_alone(d: &Path, out: &str, extra: &[&str]) -> Vec<RoundRecord> {
    let mut args = vec!["run".to_string(), config().display().to_string()];
    args.extend(["--out".into(), d.join(out).display().to_string()]);
    args.extend(sets(extra));
    let log_file = d.join(format!("{out}.log"));
    let status = spawn(&args, &log_file, COOKIE).wait().unwrap();
    assert!(status.success(), "one-process run: {}", log(&log_file));
    records(&d.join(out).join("metrics.jsonl"))
}

/// The server's registry, once this process's node has joined the server's (30 s at most).
pub async fn registry() -> ractor::ActorCell {
    let started = Instant::now();
    loop {
        if let Some(cell) = ractor::pg::get_members(&SERVER_GROUP.to_string()).pop() {
            return cell;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "no registry in sight");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn log(path: &Path) -> String {
    let mut text = String::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let _ = f.read_to_string(&mut text);
    }
    text
}

pub fn records(path: &Path) -> Vec<RoundRecord> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

pub fn without_wall(mut rs: Vec<RoundRecord>) -> Vec<RoundRecord> {
    for r in &mut rs {
        r.wall_s = 0.0;
    }
    rs
}

pub fn sites(range: std::ops::RangeInclusive<usize>) -> Vec<String> {
    range.map(|i| format!("site-{i}")).collect()
}

/// `STAND_IN` with `extra`, as a child process reads it.
pub fn stand_in_config(extra: &[&str]) -> Config {
    let text = std::fs::read_to_string(config()).unwrap();
    let all: Vec<String> = STAND_IN.iter().chain(extra).map(|s| s.to_string()).collect();
    Config::from_toml_str(&text, &all).unwrap()
}

/// A node of this (test) process named `name`, connected to the server listening on `port`
/// (30 s at most), and the server's registry.
pub async fn connect_node(
    name: &str,
    cfg: &Config,
    port: u16,
) -> (ActorRef<NodeServerMessage>, ActorRef<RegistryMsg>) {
    let node = start_node(name, COOKIE.into(), cfg).await.unwrap();
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(started.elapsed() < Duration::from_secs(30), "the server does not listen");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ractor_cluster::client_connect(&node, format!("127.0.0.1:{port}")).await.unwrap();
    (node, registry().await.into())
}

/// The registry's answer to node `name` asking for `site` (0-based) over data `data`.
pub async fn ask_to_join(
    registry: &ActorRef<RegistryMsg>,
    name: &str,
    cfg: &Config,
    data: &str,
    site: usize,
) -> CallResult<JoinReply> {
    let join = Join {
        node: name.into(),
        sites: vec![site],
        config: serde_json::to_string(cfg).unwrap(),
        data: data.into(),
    };
    registry
        .call(
            |reply| RegistryMsg::Join(JoinRequest::Valid(join), reply),
            Some(Duration::from_secs(20)),
        )
        .await
        .unwrap()
}

/// Runs `extra`'s federation as a server and the client processes of sites 1-5 and 6-10 (logs
/// `a.log`, `b.log`), kills the server with kill -9 once round 2 is recorded (inside round 3,
/// which a straggler of the config must hold open), resumes it (`resumed.log`) and waits for
/// all of them. Returns the served records.
pub fn served_with_server_killed_in_round_3(d: &Path, extra: &[&str]) -> Vec<RoundRecord> {
    let port = free_port();
    let mut server = serve(d, port, extra);
    let mut a = join(d, port, "1-5", extra, "a.log", COOKIE);
    let mut b = join(d, port, "6-10", extra, "b.log", COOKIE);
    let partial = d.join("served/metrics.jsonl.partial");
    let started = Instant::now();
    while records(&partial).len() < 2 {
        assert!(started.elapsed() < Duration::from_secs(60), "round 2 did not finish");
        assert!(server.try_wait().unwrap().is_none(), "{}", log(&d.join("serve.log")));
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    server.kill().unwrap(); // SIGKILL, inside round 3
    let _ = server.wait();
    let resume = vec![
        "serve".to_string(),
        "--resume".into(),
        d.join("served").display().to_string(),
        "--listen".into(),
        format!("127.0.0.1:{port}"),
    ];
    let mut resumed = spawn(&resume, &d.join("resumed.log"), COOKIE);
    finished_ok(&mut resumed, "serve --resume", &d.join("resumed.log"));
    finished_ok(&mut a, "join 1-5", &d.join("a.log"));
    finished_ok(&mut b, "join 6-10", &d.join("b.log"));
    records(&d.join("served/metrics.jsonl"))
}
