//! The `serve` and `join` commands: one federation across processes ([`fedbpt_actors::cluster`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};

use fedbpt::config::Config;
use fedbpt_actors::cluster::{self, ClientSide, ServerSide};
use fedbpt_actors::federation::{self, Clients, Env};
use fedbpt_actors::profile::{merge_chrome_traces, Profiler};
use fedbpt_actors::run_dir::RunDir;

use crate::cmd::run::{check_trace, print_summary, run_one, run_setup, runtime, write_profile};
use crate::output::say;

fn address(flag: &str, text: &str) -> Result<SocketAddr> {
    text.parse().map_err(|_| {
        anyhow!("{flag}: `{text}` is not HOST:PORT with a numeric host (e.g. 0.0.0.0:7700)")
    })
}

/// `fedbpt serve`: the server, evaluator and data loader, with clients from other processes.
pub fn serve(
    config: Option<&Path>,
    resume: Option<&Path>,
    listen: &str,
    out: Option<PathBuf>,
    cookie_file: Option<&Path>,
    trace: Option<&Path>,
    overrides: &[String],
) -> Result<()> {
    let listen = address("--listen", listen)?;
    let cookie = cluster::cookie(cookie_file)?;
    let (cfg, out, checkpoint) = run_setup(config, resume, out, overrides)?;
    let dir = RunDir::open(&out, "--out")?;
    check_trace(trace)?;
    let rt = runtime(&cfg)?;
    // The corpus alone (seconds), so that client processes are checked against it while the
    // model loads.
    let fingerprint = fedbpt::experiment::load_dataset(&cfg, &mut |_| {})?.fingerprint();
    let side = rt.block_on(ServerSide::start(&cfg, listen, cookie, fingerprint))?;
    say(&format!(
        "serve: listening on {listen} for {} sites, {} rounds -> {}",
        cfg.num_users,
        cfg.num_rounds,
        out.display()
    ));
    let profiler = trace.map(|_| Profiler::start());
    let result = Env::load(&cfg, &mut |m| say(m)).and_then(|mut env| {
        run_one(
            &rt,
            &cfg,
            &mut env,
            &dir,
            "serve",
            checkpoint,
            Clients::Remote(side.roster.clone()),
        )
    });
    let outcome = match &result {
        Ok(_) => Ok("the run finished".to_string()),
        Err(e) => Err(format!("{e:#}")),
    };
    let bytes = side.socket_bytes();
    rt.block_on(side.finish(outcome));
    say(&format!("serve: {} B sent, {} B received on its sockets", bytes.sent, bytes.received));
    Profiler::stop();
    let (s, _) = result?;
    if let (Some(p), Some(trace)) = (profiler, trace) {
        write_profile(&p, trace, &out.join("messages.csv"))?;
    }
    print_summary(&s, &out);
    Ok(())
}

/// `fedbpt join`: the clients of `sites`, for the server at `connect`.
/// How a client process names itself, authenticates, and reports.
pub struct JoinOptions<'a> {
    pub name: Option<String>,
    pub cookie_file: Option<&'a Path>,
    /// Socket byte counts and wall time, as JSON, at the end.
    pub stats: Option<&'a Path>,
    pub trace: Option<&'a Path>,
}

pub fn join(
    config: &Path,
    connect: &str,
    sites: &str,
    opts: JoinOptions<'_>,
    overrides: &[String],
) -> Result<()> {
    let JoinOptions { name, cookie_file, stats, trace } = opts;
    let started = std::time::Instant::now();
    let cookie = cluster::cookie(cookie_file)?;
    let cfg = Config::load(config, overrides)?;
    check_trace(trace)?;
    let sites = cluster::parse_sites(sites, cfg.num_users)?;
    let names: Vec<String> = sites.iter().map(|i| (i + 1).to_string()).collect();
    // Stable across restarts of the same process, so that it takes its sites back.
    let name = name.unwrap_or_else(|| format!("sites-{}", names.join("_")));
    let rt = runtime(&cfg)?;
    let env = Env::load(&cfg, &mut |m| say(m))?;
    let profiler = trace.map(|_| Profiler::start());
    let done = rt.block_on(async {
        let mut side =
            ClientSide::join(&cfg, connect, cookie, &name, &sites, &env.data_fingerprint).await?;
        say(&format!(
            "join: node `{name}` admitted for site-{} at {connect}",
            names.join(", site-")
        ));
        let result = federation::run_sites(&cfg, &env, &sites, side.until_finished()).await;
        let bytes = side.socket_bytes();
        side.stop().await;
        result.map(|why| (why, bytes))
    });
    Profiler::stop();
    let (why, bytes) = done.context(format!("node `{name}`"))?;
    if let (Some(p), Some(trace)) = (profiler, trace) {
        write_profile(&p, trace, &trace.with_extension("messages.csv"))?;
    }
    say(&format!(
        "join: node `{name}`: {why}; {} B sent, {} B received on its socket",
        bytes.sent, bytes.received
    ));
    if let Some(path) = stats {
        let line = serde_json::json!({
            "node": name,
            "sites": sites.len(),
            "rounds": cfg.num_rounds,
            "socket_bytes_sent": bytes.sent,
            "socket_bytes_received": bytes.received,
            "wall_s": started.elapsed().as_secs_f64(),
        });
        crate::output::write_json_atomic(path, &line)?;
    }
    Ok(())
}

/// A federation on loopback: a `serve` process and `processes` `join` processes of this binary
/// (sites split in contiguous blocks), with a fresh cookie. Each join writes its socket counts
/// to `out/join-K.json`. Returns the wall time until every process exited.
pub fn loopback(
    config: &Path,
    overrides: &[String],
    out: &Path,
    processes: usize,
    trace: Option<&Path>,
) -> Result<f64> {
    let cfg = Config::load(config, overrides)?;
    if processes == 0 || processes > cfg.num_users {
        anyhow::bail!("--processes: {processes} client processes for {} sites", cfg.num_users);
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let exe = std::env::current_exe().context("locating the fedbpt binary")?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .context("finding a free loopback port")?
        .port();
    let addr = format!("127.0.0.1:{port}");
    // A secret for this federation only: from the OS, not from the experiment's seed.
    let cookie = format!("{:032x}", rand::random::<u128>());
    let started = std::time::Instant::now();
    let mut children = Children(Vec::new());
    let mut serve = std::process::Command::new(&exe);
    serve.arg("serve").arg(config).args(["--listen", &addr]).arg("--out").arg(out);
    let mut traces = Vec::new();
    if trace.is_some() {
        traces.push(("serve".to_string(), out.join("trace-serve.json")));
        serve.arg("--trace").arg(out.join("trace-serve.json"));
    }
    children.0.push(("serve".to_string(), spawn_with(serve, overrides, &cookie)?));
    // Blocks as even as they go: the first `num_users % processes` one site larger.
    let (base, larger) = (cfg.num_users / processes, cfg.num_users % processes);
    let mut first = 1;
    for k in 0..processes {
        let last = first + base + usize::from(k < larger) - 1;
        let mut join = std::process::Command::new(&exe);
        join.arg("join").arg(config).args([
            "--connect",
            &addr,
            "--sites",
            &format!("{first}-{last}"),
        ]);
        join.arg("--stats").arg(out.join(format!("join-{}.json", k + 1)));
        if trace.is_some() {
            let file = out.join(format!("trace-join-{}.json", k + 1));
            join.arg("--trace").arg(&file);
            traces.push((format!("join {first}-{last}"), file));
        }
        children.0.push((format!("join {first}-{last}"), spawn_with(join, overrides, &cookie)?));
        first = last + 1;
    }
    // The first failure stops the others: a federation missing a process would wait for it.
    let mut failed = None;
    while !children.0.is_empty() {
        let mut i = 0;
        while i < children.0.len() {
            match children.0[i].1.try_wait()? {
                Some(status) => {
                    let (what, _) = children.0.remove(i);
                    if !status.success() && failed.is_none() {
                        failed = Some(format!("`fedbpt {what}` failed ({status})"));
                    }
                }
                None => i += 1,
            }
        }
        if failed.is_some() {
            children.kill_all();
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    if let Some(why) = failed {
        anyhow::bail!("the loopback federation failed: {why}");
    }
    let wall = started.elapsed().as_secs_f64();
    if let Some(file) = trace {
        merge_chrome_traces(&traces, file)?;
        say(&format!("merged the {} processes' traces into {}", traces.len(), file.display()));
    }
    Ok(wall)
}

/// The processes of a loopback federation, killed if this returns early.
struct Children(Vec<(String, std::process::Child)>);

impl Children {
    fn kill_all(&mut self) {
        for (_, child) in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.0.clear();
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        self.kill_all();
    }
}

fn spawn_with(
    mut cmd: std::process::Command,
    overrides: &[String],
    cookie: &str,
) -> Result<std::process::Child> {
    for o in overrides {
        cmd.arg("--set").arg(o);
    }
    cmd.env("FEDBPT_COOKIE", cookie).spawn().context("starting a fedbpt process")
}
