//! The `serve` and `join` commands: one federation across processes ([`fedbpt_actors::cluster`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use fedbpt::config::Config;
use fedbpt_actors::cluster::{self, ClientSide, ServerSide};
use fedbpt_actors::federation::{self, Clients, Env};

use crate::fed::{print_summary, run_one, run_setup, runtime};
use crate::say;

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
    overrides: &[String],
) -> Result<()> {
    let listen = address("--listen", listen)?;
    let cookie = cluster::cookie(cookie_file)?;
    let (cfg, out, checkpoint) = run_setup(config, resume, out, overrides)?;
    let rt = runtime(&cfg)?;
    let side = rt.block_on(ServerSide::start(&cfg, listen, cookie))?;
    say(&format!(
        "serve: listening on {listen} for {} sites, {} rounds -> {}",
        cfg.num_users,
        cfg.num_rounds,
        out.display()
    ));
    let result = Env::load(&cfg, &mut |m| say(m)).and_then(|mut env| {
        run_one(
            &rt,
            &cfg,
            &mut env,
            &out,
            "serve",
            checkpoint,
            Clients::Remote(side.roster.clone()),
        )
    });
    let why = match &result {
        Ok(_) => "the run finished".to_string(),
        Err(e) => format!("the server failed: {e:#}"),
    };
    rt.block_on(side.finish(&why));
    let (s, _) = result?;
    print_summary(&s, &out);
    Ok(())
}

/// `fedbpt join`: the clients of `sites`, for the server at `connect`.
pub fn join(
    config: &Path,
    connect: &str,
    sites: &str,
    name: Option<String>,
    cookie_file: Option<&Path>,
    overrides: &[String],
) -> Result<()> {
    let cookie = cluster::cookie(cookie_file)?;
    let cfg = Config::load(config, overrides)?;
    let sites = cluster::parse_sites(sites, cfg.num_users)?;
    let names: Vec<String> = sites.iter().map(|i| (i + 1).to_string()).collect();
    // Stable across restarts of the same process, so that it takes its sites back.
    let name = name.unwrap_or_else(|| format!("sites-{}", names.join("_")));
    let rt = runtime(&cfg)?;
    let env = Env::load(&cfg, &mut |m| say(m))?;
    let done = rt.block_on(async {
        let mut side = ClientSide::join(&cfg, connect, cookie, &name, &sites).await?;
        say(&format!(
            "join: node `{name}` admitted for site-{} at {connect}",
            names.join(", site-")
        ));
        let result = federation::run_sites(&cfg, &env, &sites, side.until_finished()).await;
        side.stop().await;
        result
    });
    let why = done.context(format!("node `{name}`"))?;
    say(&format!("join: node `{name}`: {why}"));
    Ok(())
}
