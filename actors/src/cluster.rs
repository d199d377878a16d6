//! The federation across processes and hosts, on ractor_cluster: `fedbpt serve` runs the
//! server, evaluator and data loader of [`crate::federation`] with a [`RemoteRoster`] in place
//! of the client supervisor; `fedbpt join` runs some of the clients, with their own
//! forward-worker pool, under their own supervisor.
//!
//! - Nodes authenticate with a shared cookie (ractor_cluster's challenge); there is no default.
//! - A client process asks the server's registry (process group `fedbpt/server`) to admit its
//!   sites, sending its configuration: the server refuses one that differs outside the
//!   per-process sections (`runtime`, `cluster`) and names the key.
//! - Its clients then join `fedbpt/site-N`; the server reaches them through those groups.
//! - No example crosses the wire: every process derives the same partition from the seed.
//! - The server's round deadline, not the connection, decides who is late (ractor_cluster does
//!   not time out a hung peer); a process that dies drops out of its groups, and one started
//!   again rejoins them and takes part from the next round.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use fedbpt::config::Config;
use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef};
use ractor_cluster::node::NodeConnectionMode;
use ractor_cluster::{NodeServer, NodeServerMessage, RactorClusterMessage};
use serde_json::Value;
use tokio::sync::mpsc::UnboundedSender;

use crate::messages::{RegistryMsg, SupervisorMsg};
use crate::remote_roster::{site_group, RemoteRoster, RemoteRosterArgs};
use crate::transport::{SocketBytes, SocketCounters};
use crate::wire::{Join, JoinReply, JoinRequest};
use ractor::RpcReplyPort;

/// The server's registry joins this group.
pub const SERVER_GROUP: &str = "fedbpt/server";
/// Every client process's watcher joins this group, to hear that the run has finished.
pub const PROCESS_GROUP: &str = "fedbpt/processes";

/// The cookie nodes authenticate with: the first line of `file`, or `$FEDBPT_COOKIE`.
pub fn cookie(file: Option<&Path>) -> Result<String> {
    let cookie = match file {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("reading the cookie file {}", path.display()))?
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .to_string(),
        None => std::env::var("FEDBPT_COOKIE").unwrap_or_default().trim().to_string(),
    };
    if cookie.is_empty() {
        match file {
            Some(path) => bail!("the cookie file {} is empty", path.display()),
            None => bail!(
                "no cookie: give --cookie-file FILE or set FEDBPT_COOKIE (every node of a \
                 federation needs the same secret; there is no default)"
            ),
        }
    }
    Ok(cookie)
}

/// Starts this process's node. Its own listener binds an ephemeral loopback port that nothing
/// uses: connections come in through [`crate::transport::listen`] and go out through
/// [`crate::transport::connect`], both counted.
pub async fn start_node(
    name: &str,
    cookie: String,
    cfg: &Config,
) -> Result<ActorRef<NodeServerMessage>> {
    let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
    // Isolated: a client process talks to its server only, not to the other client processes.
    let mode = Some(NodeConnectionMode::Isolated);
    let server = NodeServer::new(0, cookie, name.to_string(), loopback.to_string(), None, mode)
        .with_listen_addr(loopback)
        .with_max_inbound_frame_size(cfg.cluster.max_frame_bytes);
    let (node, _) =
        Actor::spawn(None, server, ()).await.context("starting this process's cluster node")?;
    Ok(node)
}

/// `3-4`, `site-3,site-4` or `3,4` as client indices (0-based), checked against `num_users`.
pub fn parse_sites(spec: &str, num_users: usize) -> Result<Vec<usize>> {
    let number = |s: &str| -> Result<usize> {
        let s = s.trim();
        let digits = s.strip_prefix("site-").unwrap_or(s);
        match digits.parse::<usize>() {
            Ok(n) if (1..=num_users).contains(&n) => Ok(n - 1),
            Ok(n) => bail!("--sites: site {n} is not in 1 ..= {num_users} (num_users)"),
            Err(_) => bail!("--sites: `{s}` is not a site (give 3-4, site-3,site-4 or 3,4)"),
        }
    };
    let mut sites = Vec::new();
    for part in spec.split(',').filter(|p| !p.trim().is_empty()) {
        match part.split_once('-').filter(|(a, _)| !a.trim().is_empty() && a.trim() != "site") {
            Some((a, b)) if !part.trim().starts_with("site-") => {
                let (a, b) = (number(a)?, number(b)?);
                if a > b {
                    bail!("--sites: the range `{part}` is empty");
                }
                sites.extend(a..=b);
            }
            _ => sites.push(number(part)?),
        }
    }
    sites.sort_unstable();
    sites.dedup();
    if sites.is_empty() {
        bail!("--sites: no site in `{spec}`");
    }
    Ok(sites)
}

/// The first key (in sorted order) where a client process's configuration differs from the
/// server's, outside the per-process sections, with both values.
pub fn config_difference(server: &Value, client: &Value) -> Option<String> {
    fn walk(path: &str, a: &Value, b: &Value) -> Option<String> {
        match (a, b) {
            (Value::Object(x), Value::Object(y)) => {
                let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
                keys.sort();
                keys.dedup();
                keys.into_iter().find_map(|k| {
                    if path.is_empty() && matches!(k.as_str(), "runtime" | "cluster") {
                        return None;
                    }
                    let sub = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                    walk(&sub, x.get(k).unwrap_or(&Value::Null), y.get(k).unwrap_or(&Value::Null))
                })
            }
            _ if a == b => None,
            _ => Some(format!("`{path}`: the server has {a}, this process {b}")),
        }
    }
    walk("", server, client)
}

/// The server process's registry: admits client processes.
pub struct Registry;

pub struct RegistryArgs {
    pub config: Value,
    /// The server's corpus fingerprint, which every client process's must equal.
    pub data_fingerprint: String,
    pub num_users: usize,
    pub roster: ActorRef<SupervisorMsg>,
    /// The server's node: which peers are connected.
    pub node: ActorRef<NodeServerMessage>,
}

pub struct RegistryState {
    args: RegistryArgs,
    /// The node each site was admitted for.
    holders: Vec<Option<String>>,
}

impl Actor for Registry {
    type Msg = RegistryMsg;
    type State = RegistryState;
    type Arguments = RegistryArgs;

    async fn pre_start(
        &self,
        me: ActorRef<RegistryMsg>,
        args: RegistryArgs,
    ) -> Result<RegistryState, ActorProcessingErr> {
        ractor::pg::join(SERVER_GROUP.to_string(), vec![me.get_cell()]);
        let n = args.num_users;
        Ok(RegistryState { args, holders: vec![None; n] })
    }

    async fn handle(
        &self,
        _me: ActorRef<RegistryMsg>,
        msg: RegistryMsg,
        state: &mut RegistryState,
    ) -> Result<(), ActorProcessingErr> {
        let RegistryMsg::Join(request, reply) = msg;
        let answer = match request {
            JoinRequest::Valid(join) => {
                let connected = connected_peers(&state.args.node).await;
                admit(state, join, &connected)
            }
            JoinRequest::Rejected(why) => Err(format!("join request rejected: {why}")),
        };
        if let Err(why) = &answer {
            tracing::warn!("refused a client process: {why}");
        }
        let _ = reply.send(JoinReply(answer));
        Ok(())
    }
}

/// The names of the nodes connected to the server now (`name@host` without the host).
async fn connected_peers(node: &ActorRef<NodeServerMessage>) -> Vec<String> {
    match node.call(NodeServerMessage::GetSessions, Some(Duration::from_secs(5))).await {
        Ok(ractor::rpc::CallResult::Success(sessions)) => sessions
            .values()
            .filter_map(|s| s.peer_name.as_ref())
            .map(|n| n.name.rsplit_once('@').map_or(n.name.clone(), |(name, _)| name.to_string()))
            .collect(),
        _ => Vec::new(),
    }
}

fn admit(state: &mut RegistryState, join: Join, connected: &[String]) -> Result<(), String> {
    let who = format!("node `{}`", join.node);
    let config: Value = serde_json::from_str(&join.config)
        .map_err(|e| format!("{who}: its configuration is not JSON: {e}"))?;
    if let Some(diff) = config_difference(&state.args.config, &config) {
        return Err(format!("{who}: its configuration differs from the server's at {diff}"));
    }
    if join.data != state.args.data_fingerprint {
        let short = |f: &str| f.chars().take(12).collect::<String>();
        return Err(format!(
            "{who}: its data differs from the server's under the same configuration (`data.path` \
             or the embedded data set: fingerprint {}..., the server's {}...)",
            short(&join.data),
            short(&state.args.data_fingerprint)
        ));
    }
    if join.sites.is_empty() {
        return Err(format!("{who}: no sites"));
    }
    for &i in &join.sites {
        if i >= state.args.num_users {
            return Err(format!("{who}: site-{} is not in 1 ..= {}", i + 1, state.args.num_users));
        }
        // A site held by another node that is still connected cannot change hands.
        if let Some(holder) = &state.holders[i] {
            if *holder != join.node && connected.contains(holder) {
                return Err(format!("{who}: site-{} is already run by node `{holder}`", i + 1));
            }
        }
    }
    for &i in &join.sites {
        state.holders[i] = Some(join.node.clone());
    }
    tracing::info!("{who}: admitted for sites {:?}", join.sites);
    state
        .args
        .roster
        .send_message(SupervisorMsg::Admitted { node: join.node, sites: join.sites })
        .map_err(|e| format!("the roster is gone: {e}"))
}

/// To a client process's watcher, acknowledged (so that the server closes its sockets only
/// once every client process heard it).
#[derive(RactorClusterMessage)]
pub enum ProcessMsg {
    /// The server finished the run.
    #[rpc]
    Finished(String, RpcReplyPort<bool>),
    /// The server failed, and says why.
    #[rpc]
    Failed(String, RpcReplyPort<bool>),
}

/// A client process's watcher: tells the process's main task that the run has finished.
pub struct Watcher;

/// How the run ended, as the server said.
pub type RunEnd = Result<String, String>;

impl Actor for Watcher {
    type Msg = ProcessMsg;
    type State = UnboundedSender<RunEnd>;
    type Arguments = UnboundedSender<RunEnd>;

    async fn pre_start(
        &self,
        me: ActorRef<ProcessMsg>,
        tx: UnboundedSender<RunEnd>,
    ) -> Result<Self::State, ActorProcessingErr> {
        ractor::pg::join(PROCESS_GROUP.to_string(), vec![me.get_cell()]);
        Ok(tx)
    }

    async fn handle(
        &self,
        _me: ActorRef<ProcessMsg>,
        msg: ProcessMsg,
        tx: &mut UnboundedSender<RunEnd>,
    ) -> Result<(), ActorProcessingErr> {
        let (end, reply) = match msg {
            ProcessMsg::Finished(why, reply) => (Ok(why), reply),
            ProcessMsg::Failed(why, reply) => (Err(why), reply),
        };
        let _ = tx.send(end);
        let _ = reply.send(true);
        Ok(())
    }
}

/// What a server process keeps running around its federation.
pub struct ServerSide {
    pub node: ActorRef<NodeServerMessage>,
    pub roster: ActorRef<SupervisorMsg>,
    registry: ActorRef<RegistryMsg>,
    listener: tokio::task::JoinHandle<()>,
    counters: SocketCounters,
}

impl ServerSide {
    /// Starts the node, the remote roster and the registry, which admits client processes whose
    /// configuration and corpus (`data_fingerprint`) are the server's.
    pub async fn start(
        cfg: &Config,
        listen: SocketAddr,
        cookie: String,
        data_fingerprint: String,
    ) -> Result<ServerSide> {
        refuse_local_kills(cfg)?;
        let node = start_node("fedbpt-server", cookie, cfg).await?;
        let counters = SocketCounters::default();
        let listener =
            crate::transport::listen(listen, &cfg.cluster, node.clone(), counters.clone()).await?;
        let (roster, _) = Actor::spawn(
            None,
            RemoteRoster,
            RemoteRosterArgs {
                num_users: cfg.num_users,
                join_timeout: Duration::from_secs_f64(cfg.cluster.join_timeout_s),
                rejoin_wait: Duration::from_secs_f64(cfg.cluster.rejoin_wait_s),
            },
        )
        .await?;
        let config = serde_json::to_value(cfg)?;
        let (registry, _) = Actor::spawn(
            None,
            Registry,
            RegistryArgs {
                config,
                data_fingerprint,
                num_users: cfg.num_users,
                roster: roster.clone(),
                node: node.clone(),
            },
        )
        .await?;
        Ok(ServerSide { node, roster, registry, listener, counters })
    }

    /// What crossed the server's sockets so far (every client process's connection).
    pub fn socket_bytes(&self) -> SocketBytes {
        self.counters.bytes()
    }

    /// Tells the client processes the run is over (`Ok`: finished; `Err`: failed, why), waits
    /// for each to acknowledge (a few seconds at most), and stops.
    pub async fn finish(self, outcome: Result<String, String>) {
        let mut acks = tokio::task::JoinSet::new();
        for cell in ractor::pg::get_members(&PROCESS_GROUP.to_string()) {
            let watcher: ActorRef<ProcessMsg> = cell.into();
            let outcome = outcome.clone();
            acks.spawn(async move {
                let message = |reply| match outcome {
                    Ok(why) => ProcessMsg::Finished(why, reply),
                    Err(why) => ProcessMsg::Failed(why, reply),
                };
                let _ = watcher.call(message, Some(Duration::from_secs(5))).await;
            });
        }
        while acks.join_next().await.is_some() {}
        self.listener.abort();
        for cell in [self.registry.get_cell(), self.roster.get_cell(), self.node.get_cell()] {
            crate::supervisor::stop_and_wait(cell).await;
        }
    }
}

/// Kill faults act on the server's handles of local actors; across processes, kill a process.
fn refuse_local_kills(cfg: &Config) -> Result<()> {
    if !cfg.faults.kill.is_empty() || cfg.faults.kill_fraction > 0.0 {
        bail!(
            "faults.kill and faults.kill_fraction kill client actors of this process; with \
             clients in other processes, kill a client process instead (panics, dropped replies \
             and stragglers work across processes)"
        );
    }
    Ok(())
}

/// A client process's connection to its server.
pub struct ClientSide {
    node: ActorRef<NodeServerMessage>,
    watcher: Option<ActorRef<ProcessMsg>>,
    finished: tokio::sync::mpsc::UnboundedReceiver<RunEnd>,
    finished_tx: UnboundedSender<RunEnd>,
    disconnected: tokio::sync::mpsc::UnboundedReceiver<()>,
    connect: String,
    counters: SocketCounters,
    cluster: fedbpt::config::Cluster,
    /// The join request, sent again after a reconnection.
    join: Join,
}

/// How long a client process waits for the server to answer its connection.
const CONNECT_PATIENCE: Duration = Duration::from_secs(30);

impl ClientSide {
    /// Connects to the server at `connect` and asks it to admit `sites`; `data_fingerprint` is
    /// this process's corpus's.
    pub async fn join(
        cfg: &Config,
        connect: &str,
        cookie: String,
        name: &str,
        sites: &[usize],
        data_fingerprint: &str,
    ) -> Result<ClientSide> {
        let node = start_node(name, cookie, cfg).await?;
        let (tx, disconnected) = tokio::sync::mpsc::unbounded_channel();
        node.send_message(NodeServerMessage::SubscribeToEvents {
            id: "fedbpt-join".into(),
            subscription: Box::new(Disconnects(tx)),
        })?;
        let (finished_tx, finished) = tokio::sync::mpsc::unbounded_channel();
        let join = Join {
            node: name.to_string(),
            sites: sites.to_vec(),
            config: serde_json::to_string(cfg)?,
            data: data_fingerprint.to_string(),
        };
        let mut side = ClientSide {
            node,
            watcher: None,
            finished,
            finished_tx,
            disconnected,
            connect: connect.to_string(),
            counters: SocketCounters::default(),
            cluster: cfg.cluster.clone(),
            join,
        };
        side.attach().await?;
        let (watcher, _) = Actor::spawn(None, Watcher, side.finished_tx.clone()).await?;
        side.watcher = Some(watcher);
        Ok(side)
    }

    /// Opens a connection to the server and has this process's sites admitted.
    async fn attach(&mut self) -> Result<()> {
        let connect = self.connect.clone();
        while self.disconnected.try_recv().is_ok() {}
        let stream =
            crate::transport::connect(&connect, &self.cluster, self.counters.clone()).await?;
        ractor_cluster::client_connect_external(&self.node, stream)
            .await
            .map_err(|e| anyhow!("connecting to the server at {connect}: {e:?}"))?;
        let registry = wait_for_server(&mut self.disconnected, &connect).await?;
        let join = self.join.clone();
        let answer = registry
            .call(
                |reply| RegistryMsg::Join(JoinRequest::Valid(join), reply),
                Some(CONNECT_PATIENCE),
            )
            .await
            .map_err(|e| anyhow!("the server at {connect}: {e}"))?;
        match answer {
            ractor::rpc::CallResult::Success(JoinReply(Ok(()))) => Ok(()),
            ractor::rpc::CallResult::Success(JoinReply(Err(why))) => {
                bail!("the server at {connect} refused this process: {why}")
            }
            _ => bail!("the server at {connect} did not answer the join request"),
        }
    }

    /// Waits until the server says the run has finished (`Ok`). A server that goes away before
    /// (killed, restarted with `--resume`) is connected to again for up to
    /// `cluster.join_timeout_s`; past that, `Err`.
    pub async fn until_finished(&mut self) -> Result<String> {
        loop {
            tokio::select! {
                end = self.finished.recv() => {
                    return match end {
                        Some(Ok(why)) => Ok(why),
                        Some(Err(why)) => bail!("the server at {} failed: {why}", self.connect),
                        None => bail!("the watcher stopped"),
                    };
                }
                _ = self.disconnected.recv() => {}
            }
            // A server that has finished closes its sockets right after our acknowledgement.
            if let Ok(Some(end)) =
                tokio::time::timeout(Duration::from_secs(1), self.finished.recv()).await
            {
                return end.map_err(|why| anyhow!("the server at {} failed: {why}", self.connect));
            }
            let patience = Duration::from_secs_f64(self.cluster.join_timeout_s);
            tracing::warn!(
                "lost the server at {}; connecting again for up to {:.0} s",
                self.connect,
                patience.as_secs_f64()
            );
            let started = Instant::now();
            loop {
                match self.attach().await {
                    Ok(()) => {
                        tracing::warn!("connected to the server at {} again", self.connect);
                        break;
                    }
                    Err(e) if started.elapsed() < patience => {
                        tracing::info!("not yet: {e:#}");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    Err(e) => bail!(
                        "lost the server at {} before the run finished, and could not connect \
                         again within {:.0} s: {e:#}",
                        self.connect,
                        patience.as_secs_f64()
                    ),
                }
            }
        }
    }

    /// What crossed this process's socket so far.
    pub fn socket_bytes(&self) -> SocketBytes {
        self.counters.bytes()
    }

    pub async fn stop(self) {
        if let Some(w) = self.watcher {
            crate::supervisor::stop_and_wait(w.get_cell()).await;
        }
        crate::supervisor::stop_and_wait(self.node.get_cell()).await;
    }
}

/// Tells a client process that its connection to the server closed.
struct Disconnects(UnboundedSender<()>);

impl ractor_cluster::NodeEventSubscription for Disconnects {
    fn node_session_opened(&self, _: ractor_cluster::node::NodeServerSessionInformation) {}
    fn node_session_disconnected(&self, ses: ractor_cluster::node::NodeServerSessionInformation) {
        // Only the connection this process opened (to its server) counts.
        if !ses.is_server {
            let _ = self.0.send(());
        }
    }
    fn node_session_authenticated(&self, _: ractor_cluster::node::NodeServerSessionInformation) {}
}

/// The server's registry, once the connection is authenticated and the groups synchronized.
async fn wait_for_server(
    disconnected: &mut tokio::sync::mpsc::UnboundedReceiver<()>,
    connect: &str,
) -> Result<ActorRef<RegistryMsg>> {
    let started = Instant::now();
    loop {
        if let Some(cell) = ractor::pg::get_members(&SERVER_GROUP.to_string()).pop() {
            return Ok(ActorCell::into(cell));
        }
        if disconnected.try_recv().is_ok() {
            bail!(
                "the server at {connect} closed the connection before admitting this process: \
                 a wrong cookie, TLS on one side only, or not a fedbpt server (the server's log \
                 says which)"
            );
        }
        if started.elapsed() > CONNECT_PATIENCE {
            bail!(
                "the peer at {connect} did not offer a fedbpt server within {} s",
                CONNECT_PATIENCE.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The client arguments of the sites a client process runs (their groups set).
pub fn remote_clients(
    all: Vec<crate::client::ClientArgs>,
    sites: &[usize],
) -> Vec<crate::client::ClientArgs> {
    all.into_iter()
        .filter(|c| sites.contains(&c.id))
        .map(|mut c| {
            c.group = Some(site_group(c.id));
            c
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sites_parse_as_ranges_names_and_numbers() {
        assert_eq!(parse_sites("3-4", 10).unwrap(), vec![2, 3]);
        assert_eq!(parse_sites("site-3,site-4", 10).unwrap(), vec![2, 3]);
        assert_eq!(parse_sites("1,5,5,2", 10).unwrap(), vec![0, 1, 4]);
        assert_eq!(parse_sites("6-10", 10).unwrap(), vec![5, 6, 7, 8, 9]);
        for (bad, says) in [
            ("0", "not in 1 ..= 10"),
            ("11", "not in 1 ..= 10"),
            ("4-2", "is empty"),
            ("x", "is not a site"),
            ("site-", "is not a site"),
            ("", "no site"),
            ("3-12", "not in 1 ..= 10"),
        ] {
            let e = parse_sites(bad, 10).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn configurations_differ_at_the_first_shared_key_outside_the_per_process_sections() {
        let a = Config::default();
        let mut b = a.clone();
        b.runtime.tokio_threads = 7;
        b.cluster.rejoin_wait_s = 1.0;
        let (va, vb) = (serde_json::to_value(&a).unwrap(), serde_json::to_value(&b).unwrap());
        assert_eq!(config_difference(&va, &vb), None);
        b.num_rounds = a.num_rounds + 1;
        let vb = serde_json::to_value(&b).unwrap();
        let d = config_difference(&va, &vb).unwrap();
        assert!(d.starts_with("`num_rounds`"), "{d}");
        assert!(d.contains(&format!("server has {}", a.num_rounds)), "{d}");
        let mut c = a.clone();
        c.faults.panic = vec![fedbpt::config::ClientRound { client: "site-1".into(), round: 2 }];
        let d = config_difference(&va, &serde_json::to_value(&c).unwrap()).unwrap();
        assert!(d.starts_with("`faults.panic`"), "{d}");
    }

    #[test]
    fn a_cookie_is_required_and_read_from_the_first_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cookie");
        std::fs::write(&path, "s3cret \nignored\n").unwrap();
        assert_eq!(cookie(Some(&path)).unwrap(), "s3cret");
        std::fs::write(&path, "\n").unwrap();
        assert!(cookie(Some(&path)).unwrap_err().to_string().contains("is empty"));
        let missing = dir.path().join("none");
        assert!(cookie(Some(&missing))
            .unwrap_err()
            .to_string()
            .contains("reading the cookie file"));
    }
}
