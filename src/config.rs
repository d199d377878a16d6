//! Run configuration: TOML files with the reference job's knob names, `--set key=value`
//! overrides, unknown keys and out-of-range values rejected with the key named.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::cmaes::CmaFlavour;
use crate::data::sources::Columns;
use crate::models::linear::WeightFormat;
use crate::models::{Placement, PromptMode};
use crate::objective::{ClientLoss, LossType};
use crate::strategy::{QuorumPolicy, ServerFitness, ServerSigma, ServerWeights};
use crate::task::TaskSpec;
use crate::{Error, Result};

/// Which backend reads a model directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// Decide from the model (GGUF or `model_type` = llama: causal; MLM head keys: mlm; else encoder).
    #[default]
    Auto,
    Causal,
    Mlm,
    Encoder,
}

/// Server-side aggregation rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Aggregation {
    #[default]
    Fedbpt,
    Fedavg,
}

/// What a round moves between server and clients (issue 29, docs/traffic.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Traffic {
    /// The server sends the search distribution, clients send their updates.
    #[default]
    Distribution,
    /// Clients send seeds and rankings, the server each round's digest; every party replays.
    Replay,
}

/// How a non-iid partition draws each client's share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum NoniidSplit {
    /// The reference's `Dirichlet_noniid`: each client's class mix ~ Dirichlet(alpha x prior),
    /// client sizes chosen so every example is used.
    #[default]
    ClientMix,
    /// Per class, shares over the clients ~ Dirichlet(alpha): milder skew, very unequal sizes.
    ClassShares,
}

impl NoniidSplit {
    /// The name a config file gives it.
    pub fn as_str(self) -> &'static str {
        match self {
            NoniidSplit::ClientMix => "client-mix",
            NoniidSplit::ClassShares => "class-shares",
        }
    }
}

/// A user-supplied data file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataFile {
    pub path: PathBuf,
    /// `tsv` (GLUE), `csv` or `jsonl`.
    pub format: String,
    /// For `csv` / `jsonl`: column names.
    #[serde(default)]
    pub columns: Option<Columns>,
}

/// The `[runtime]` section (used by the federation runtime).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Runtime {
    /// Devices for forward workers: "cpu", "cuda:0", ...
    pub devices: Vec<String>,
    pub workers_per_device: usize,
    /// Most example x prompt pairs one forward serves when a worker merges the queued scoring
    /// requests of several clients (1 = no merging; a larger single request runs alone).
    /// Merged scores equal the lone ones (tested); on 2 CPU cores merging is neutral within
    /// noise (0.98-1.10x, `fedbpt bench`, `merge` lines), on GPUs it saves per-pass costs.
    pub max_batch_examples: usize,
    /// tokio worker threads.
    pub tokio_threads: usize,
    /// Compute threads for candle (0 = all cores).
    pub compute_threads: usize,
    /// Seconds the server waits for replies in a round.
    pub round_timeout_s: f64,
}

impl Default for Runtime {
    fn default() -> Self {
        Self {
            devices: vec!["cpu".into()],
            workers_per_device: 1,
            max_batch_examples: 512,
            tokio_threads: 2,
            compute_threads: 0,
            round_timeout_s: 600.0,
        }
    }
}

/// The `[cluster]` section: a federation across processes (`fedbpt serve` / `fedbpt join`).
/// Per process, like `[runtime]`: a client process may differ here from its server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Cluster {
    /// Seconds `serve` waits for every site to join before round 1; also how long a client
    /// process keeps trying to connect again to a server that went away.
    pub join_timeout_s: f64,
    /// Seconds a round waits, before it starts, for sites that were up earlier and are now
    /// missing (a client process restarting); then it runs without them.
    pub rejoin_wait_s: f64,
    /// Largest frame a node accepts from a peer, bytes (checked before it is decoded).
    pub max_frame_bytes: u64,
    /// TLS on the server: its certificate chain and private key (PEM). Both or neither.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// TLS on a client process: the CA certificates (PEM) it trusts the server's certificate
    /// with; set, the client connects over TLS.
    pub tls_ca: Option<PathBuf>,
    /// The name the server's certificate must carry (default: the host of `--connect`).
    pub tls_server_name: Option<String>,
    /// Sites whose training shard this process reads from its own file instead of taking its
    /// part of the corpus (in a federation across processes, the data stays with its client).
    pub shards: Vec<SiteShard>,
}

/// `[[cluster.shards]]`: one site's training examples from a file (formats as `[data]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteShard {
    pub site: String,
    pub path: PathBuf,
    pub format: String,
    #[serde(default)]
    pub columns: Option<Columns>,
}

impl SiteShard {
    pub fn file(&self) -> DataFile {
        DataFile {
            path: self.path.clone(),
            format: self.format.clone(),
            columns: self.columns.clone(),
        }
    }
}

impl Default for Cluster {
    fn default() -> Self {
        Self {
            join_timeout_s: 600.0,
            rejoin_wait_s: 30.0,
            max_frame_bytes: 16 << 20,
            tls_cert: None,
            tls_key: None,
            tls_ca: None,
            tls_server_name: None,
            shards: Vec::new(),
        }
    }
}

impl Cluster {
    fn validate(&self, num_users: usize) -> Result<()> {
        let mut seen = Vec::new();
        for s in &self.shards {
            match client_index(&s.site, num_users) {
                Some(i) if seen.contains(&i) => {
                    return Err(Error::config("cluster.shards", format!("`{}` twice", s.site)))
                }
                Some(i) => seen.push(i),
                None => {
                    return Err(Error::config(
                        "cluster.shards",
                        format!("`{}` is not a client (site-1 .. site-{num_users})", s.site),
                    ))
                }
            }
        }
        for (key, v) in [
            ("cluster.join_timeout_s", self.join_timeout_s),
            ("cluster.rejoin_wait_s", self.rejoin_wait_s),
        ] {
            if !(0.0..=MAX_SECONDS).contains(&v) {
                return Err(Error::config(key, format!("must be in [0, {MAX_SECONDS}] seconds")));
            }
        }
        if !(1024..=1 << 30).contains(&self.max_frame_bytes) {
            return Err(Error::config("cluster.max_frame_bytes", "must be in [1 KiB, 1 GiB]"));
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err(Error::config("cluster.tls_cert", "tls_cert and tls_key go together"));
        }
        Ok(())
    }
}

/// When an injected kill strikes a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum KillWhen {
    /// Before the round's request reaches it.
    #[default]
    Before,
    /// In the middle of its local search (after half its local iterations).
    During,
}

/// Kill one named client (`site-N`) at one round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KillClient {
    pub client: String,
    pub round: usize,
    #[serde(default)]
    pub when: KillWhen,
}

/// A client-side fault at one round (`panic` inside the handler, or a dropped reply).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientRound {
    pub client: String,
    pub round: usize,
}

/// A straggler: the client's reply is held back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Straggler {
    pub client: String,
    /// Fixed delay, seconds.
    #[serde(default)]
    pub delay_s: f64,
    /// Extra uniform random delay in [0, jitter_s) seconds (seeded).
    #[serde(default)]
    pub jitter_s: f64,
    /// Rounds it straggles in (empty: every round).
    #[serde(default)]
    pub rounds: Vec<usize>,
}

/// The `[faults]` section: fault-injection experiments and the supervision that answers them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Faults {
    pub kill: Vec<KillClient>,
    /// Fraction of clients killed each round (drawn with a seeded generator), before the round.
    pub kill_fraction: f64,
    pub panic: Vec<ClientRound>,
    pub drop_reply: Vec<ClientRound>,
    /// `traffic = "replay"`: the client's replica is moved one ulp off the server's state just
    /// before the first digest it applies in the round (as another build's rounding would), so
    /// that the hash check and the resync are exercised. Round 2 on: round 1 has no digest.
    pub corrupt_replica: Vec<ClientRound>,
    pub stragglers: Vec<Straggler>,
    /// Kill the forward worker serving the N-th forward request of the run (1-based) while it
    /// holds that batch; 0 = never.
    pub kill_worker_at_request: usize,
    /// Restarts allowed per client.
    pub restart_limit: usize,
    /// Wait before a restart, milliseconds (doubles with each restart of the same client).
    pub restart_backoff_ms: u64,
    pub quorum_policy: QuorumPolicy,
    pub max_round_retries: usize,
}

impl Default for Faults {
    fn default() -> Self {
        Self {
            kill: Vec::new(),
            kill_fraction: 0.0,
            panic: Vec::new(),
            drop_reply: Vec::new(),
            corrupt_replica: Vec::new(),
            stragglers: Vec::new(),
            kill_worker_at_request: 0,
            restart_limit: 10,
            restart_backoff_ms: 50,
            quorum_policy: QuorumPolicy::Skip,
            max_round_retries: 1,
        }
    }
}

/// `site-N` (1-based) to a client index.
pub fn client_index(name: &str, num_users: usize) -> Option<usize> {
    let n: usize = name.strip_prefix("site-")?.parse().ok()?;
    (1..=num_users).contains(&n).then(|| n - 1)
}

impl Faults {
    fn validate(&self, num_users: usize, num_rounds: usize) -> Result<()> {
        let check = |key: &str, name: &str| {
            client_index(name, num_users).map(|_| ()).ok_or_else(|| {
                Error::config(key, format!("`{name}` is not a client (site-1 .. site-{num_users})"))
            })
        };
        // A fault for a round that never comes would be silently ignored.
        let in_run = |key: &str, round: usize| {
            if (1..=num_rounds).contains(&round) {
                Ok(())
            } else {
                Err(Error::config(
                    key,
                    format!("round {round} never comes: rounds are 1 .. {num_rounds}"),
                ))
            }
        };
        for k in &self.kill {
            check("faults.kill.client", &k.client)?;
            in_run("faults.kill.round", k.round)?;
        }
        for p in &self.panic {
            check("faults.panic.client", &p.client)?;
            in_run("faults.panic.round", p.round)?;
        }
        for d in &self.drop_reply {
            check("faults.drop_reply.client", &d.client)?;
            in_run("faults.drop_reply.round", d.round)?;
        }
        for c in &self.corrupt_replica {
            check("faults.corrupt_replica.client", &c.client)?;
            in_run("faults.corrupt_replica.round", c.round)?;
            if c.round < 2 {
                return Err(Error::config(
                    "faults.corrupt_replica.round",
                    "round 1 has no digest to check a replica against: round 2 on",
                ));
            }
        }
        for s in &self.stragglers {
            check("faults.stragglers.client", &s.client)?;
            for &r in &s.rounds {
                in_run("faults.stragglers.rounds", r)?;
            }
            let ok = |v: f64| v.is_finite() && (0.0..=MAX_SECONDS).contains(&v);
            if !(ok(s.delay_s) && ok(s.jitter_s)) {
                return Err(Error::config(
                    "faults.stragglers",
                    format!("delay_s and jitter_s must be in [0, {MAX_SECONDS}] seconds"),
                ));
            }
        }
        if self.restart_backoff_ms > MAX_BACKOFF_MS {
            return Err(Error::config(
                "faults.restart_backoff_ms",
                format!(
                    "{} exceeds {MAX_BACKOFF_MS} (it doubles with each restart)",
                    self.restart_backoff_ms
                ),
            ));
        }
        if !(0.0..=1.0).contains(&self.kill_fraction) {
            return Err(Error::config("faults.kill_fraction", "must be in [0, 1]"));
        }
        Ok(())
    }
}

/// Longest wait any timeout or delay may ask for: a week. Longer values are mistakes, and
/// beyond about 1.8e19 seconds a `Duration` cannot hold them at all.
pub const MAX_SECONDS: f64 = 7.0 * 24.0 * 3600.0;
/// Largest restart backoff, milliseconds (it doubles up to 1,024 times).
pub const MAX_BACKOFF_MS: u64 = 600_000;
/// Most threads of either pool: more only thrash (and tens of thousands hang the machine).
pub const MAX_THREADS: usize = 1024;
/// Largest intrinsic dimension: every CMA-ES holds `d x d` covariance and eigenbasis matrices
/// in f64 (1.6 GB at d = 10,000), one per running search.
pub const MAX_INTRINSIC_DIM: usize = 10_000;
/// Largest CMA-ES population (a population is `d x popsize` f64, and each candidate a forward).
pub const MAX_POPSIZE: usize = 10_000;

/// A u64 from a TOML integer (up to 2^63 - 1) or a string of digits (any u64).
/// `cma`, with an error that names the key and its values (serde's names neither the key nor,
/// on some paths, the values).
fn cma_flavour<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<CmaFlavour, D::Error> {
    let name = String::deserialize(d)?;
    match name.as_str() {
        "tutorial" => Ok(CmaFlavour::Tutorial),
        "pycma" => Ok(CmaFlavour::Pycma),
        other => Err(serde::de::Error::custom(format!(
            "cma = \"{other}\": expected \"tutorial\" or \"pycma\""
        ))),
    }
}

fn traffic<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Traffic, D::Error> {
    let name = String::deserialize(d)?;
    match name.as_str() {
        "distribution" => Ok(Traffic::Distribution),
        "replay" => Ok(Traffic::Replay),
        other => Err(serde::de::Error::custom(format!(
            "traffic = \"{other}\": expected \"distribution\" or \"replay\""
        ))),
    }
}

fn u64_or_string<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Int(u64),
        Text(String),
    }
    match Raw::deserialize(d)? {
        Raw::Int(v) => Ok(v),
        Raw::Text(t) => t.trim().parse().map_err(|_| {
            serde::de::Error::custom(format!("`{t}` is not a whole number from 0 to {}", u64::MAX))
        }),
    }
}

/// Every knob of a run. Names follow the reference job where it has one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub task_name: String,
    /// `smollm2`, `minilm`, a local path (GGUF file or model directory) or a hub id.
    pub model_name: String,
    pub backend: BackendKind,
    /// Linear layers in bf16 on the CPU's fastest kernel (`auto`, the default; f32 where that
    /// kernel would be the portable loop, and off the CPU), f32, bf16, or, for GGUF files, kept
    /// quantized.
    pub weights: WeightFormat,
    pub n_prompt_tokens: usize,
    pub intrinsic_dim: usize,
    pub k_shot: usize,
    /// Dev examples per class; 0 means `k_shot`, as the reference draws them. Smaller keeps the
    /// per-round evaluation fixed when `k_shot` grows with the number of clients.
    pub dev_k_shot: usize,
    /// Any u64; TOML integers stop at 2^63 - 1, so larger seeds are written as strings
    /// (`seed = "18446744073709551615"`, or `--set seed=18446744073709551615`).
    #[serde(deserialize_with = "u64_or_string")]
    pub seed: u64,
    pub loss_type: LossType,
    pub cat_or_add: PromptMode,
    pub placement: Placement,
    /// Text whose tokens fill the placeholders.
    pub placeholder: Option<String>,
    /// Initial CMA-ES step size (and BBT's projection sigma stays 1).
    pub sigma: f64,
    /// Multiplies the projection's std (BBT's std_hat = std of the word-embedding matrix).
    pub projection_gain: f32,
    /// Centralized BBT: CMA-ES population and evaluation budget.
    pub popsize: usize,
    pub budget: usize,
    /// Centralized BBT: training examples that score one CMA-ES population (class-balanced
    /// minibatches taken in turn); 0 scores every population on the whole training set.
    pub batch_size: usize,
    /// Centralized BBT: iterations between dev evaluations of the CMA-ES mean.
    pub dev_every: usize,
    /// Held-out test sentences (fixed split, independent of `seed`).
    pub test_size: usize,
    /// Longest text kept, in tokens.
    pub max_text_tokens: usize,
    // Federation knobs (reference names).
    pub num_users: usize,
    pub iid: bool,
    pub alpha_dir: f64,
    /// How `iid = false` partitions the training set.
    pub noniid_split: NoniidSplit,
    pub local_iter: usize,
    pub local_popsize: usize,
    pub perturb: bool,
    pub perturb_rate: f32,
    /// The client (`site-N`) whose device evaluates the global model (the reference's site-1).
    pub eval_clients: String,
    pub min_clients: usize,
    /// Clients sampled to take part in each round (seeded per round; the reference's `frac`);
    /// 0 means all of them.
    pub clients_per_round: usize,
    pub num_rounds: usize,
    pub eval_every: usize,
    pub aggregation: Aggregation,
    /// How FedBPT's server sets the step size it sends (`aggregation = "fedbpt"` only).
    pub server_sigma: ServerSigma,
    /// What FedBPT's server ranks the client means by (`aggregation = "fedbpt"` only).
    pub server_fitness: ServerFitness,
    /// How FedBPT's server weighs the ranked client means (`aggregation = "fedbpt"` only).
    pub server_weights: ServerWeights,
    /// How a client averages its loss over its shard to rank its candidates.
    pub client_loss: ClientLoss,
    /// Which CMA-ES the local searches and FedBPT's server run: "tutorial" (this project's) or
    /// "pycma" (pycma 3.4.0's defaults, as the reference; docs/pycma-flavour.md).
    #[serde(deserialize_with = "cma_flavour")]
    pub cma: CmaFlavour,
    /// What crosses between server and clients: "distribution" (the default) or "replay"
    /// (seeds and rankings, replayed by every party; one process only for now).
    #[serde(deserialize_with = "traffic")]
    pub traffic: Traffic,
    pub runtime: Runtime,
    pub cluster: Cluster,
    /// Fault injection (none by default).
    pub faults: Faults,
    /// Overrides of the built-in task definition.
    pub task: Option<TaskSpec>,
    /// A user-supplied data file instead of the built-in corpus.
    pub data: Option<DataFile>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            task_name: "mr".into(),
            model_name: "smollm2".into(),
            backend: BackendKind::Auto,
            weights: WeightFormat::Auto,
            n_prompt_tokens: 5,
            intrinsic_dim: 100,
            k_shot: 32,
            dev_k_shot: 0,
            seed: 42,
            loss_type: LossType::Ce,
            cat_or_add: PromptMode::Add,
            placement: Placement::Suffix,
            placeholder: None,
            sigma: 1.0,
            projection_gain: 1.0,
            popsize: 20,
            budget: 800,
            batch_size: 0,
            dev_every: 1,
            test_size: 1000,
            max_text_tokens: 128,
            num_users: 10,
            iid: true,
            alpha_dir: 1.0,
            noniid_split: NoniidSplit::ClientMix,
            local_iter: 8,
            local_popsize: 5,
            perturb: false,
            perturb_rate: 0.5,
            eval_clients: "site-1".into(),
            min_clients: 1,
            clients_per_round: 0,
            num_rounds: 20,
            eval_every: 1,
            aggregation: Aggregation::Fedbpt,
            server_sigma: ServerSigma::Reference,
            server_fitness: ServerFitness::Loss,
            server_weights: ServerWeights::Rank,
            client_loss: ClientLoss::Mean,
            cma: CmaFlavour::Tutorial,
            traffic: Traffic::Distribution,
            runtime: Runtime::default(),
            cluster: Cluster::default(),
            faults: Faults::default(),
            task: None,
            data: None,
        }
    }
}

impl Config {
    /// Dev examples per class: `dev_k_shot`, or `k_shot` when it is 0.
    pub fn dev_per_class(&self) -> usize {
        if self.dev_k_shot == 0 {
            self.k_shot
        } else {
            self.dev_k_shot
        }
    }

    /// Reads a TOML file, applies `key=value` overrides, validates.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_toml_str(&text, overrides).map_err(|e| match e {
            Error::Config { key, msg } if key.is_empty() => Error::file(path, msg),
            Error::Config { key, msg } => Error::file(path, format!("key `{key}`: {msg}")),
            other => other,
        })
    }

    /// Parses TOML text with overrides (each `dotted.key=value`, the value in TOML syntax or a
    /// bare string).
    pub fn from_toml_str(text: &str, overrides: &[String]) -> Result<Config> {
        // Deserializing the text itself first gives errors with their line.
        if let Err(e) = toml::from_str::<Config>(text) {
            let line = e
                .span()
                .and_then(|s| text.get(..s.start))
                .map(|before| before.matches('\n').count() + 1);
            let msg = e.message().trim().to_string();
            return Err(Error::config(
                "",
                match line {
                    Some(l) => format!("line {l}: {msg}"),
                    None => msg,
                },
            ));
        }
        let mut doc: toml::Table =
            text.parse().map_err(|e: toml::de::Error| Error::config("", e.to_string()))?;
        for ov in overrides {
            let (key, raw) = ov
                .split_once('=')
                .ok_or_else(|| Error::config(ov.clone(), "override must look like key=value"))?;
            let key = key.trim();
            let value: toml::Value = format!("v = {}", raw.trim())
                .parse::<toml::Table>()
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or_else(|| toml::Value::String(raw.trim().to_string()));
            let mut table = &mut doc;
            let parts: Vec<&str> = key.split('.').collect();
            for part in &parts[..parts.len() - 1] {
                let entry = table
                    .entry(part.to_string())
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                table = entry
                    .as_table_mut()
                    .ok_or_else(|| Error::config(key, format!("`{part}` is not a table")))?;
            }
            table.insert(parts[parts.len() - 1].to_string(), value);
            // The text parsed alone and every earlier override with it: a failure now is this
            // override's, and the error names it alone.
            toml::Value::Table(doc.clone())
                .try_into::<Config>()
                .map_err(|e| Error::config(key, format!("--set `{ov}`: {}", e.message().trim())))?;
        }
        let cfg: Config = toml::Value::Table(doc)
            .try_into()
            .map_err(|e: toml::de::Error| Error::config("", e.message().trim().to_string()))?;
        cfg.validate().map_err(|e| match e {
            Error::Config { key, msg } => {
                // The last --set of a key is the one that took effect.
                match overrides
                    .iter()
                    .rev()
                    .find(|o| o.split_once('=').is_some_and(|(k, _)| k.trim() == key))
                {
                    Some(o) => Error::Config { key, msg: format!("{msg} (from --set `{o}`)") },
                    None => Error::Config { key, msg },
                }
            }
            other => other,
        })?;
        Ok(cfg)
    }

    /// Range checks, each naming its key.
    pub fn validate(&self) -> Result<()> {
        let pos = |key: &str, v: usize| {
            if v == 0 {
                Err(Error::config(key, "must be > 0"))
            } else {
                Ok(())
            }
        };
        pos("n_prompt_tokens", self.n_prompt_tokens)?;
        pos("intrinsic_dim", self.intrinsic_dim)?;
        pos("k_shot", self.k_shot)?;
        pos("budget", self.budget)?;
        pos("num_users", self.num_users)?;
        pos("local_iter", self.local_iter)?;
        pos("num_rounds", self.num_rounds)?;
        pos("eval_every", self.eval_every)?;
        pos("dev_every", self.dev_every)?;
        pos("max_text_tokens", self.max_text_tokens)?;
        pos("runtime.workers_per_device", self.runtime.workers_per_device)?;
        pos("runtime.max_batch_examples", self.runtime.max_batch_examples)?;
        pos("runtime.tokio_threads", self.runtime.tokio_threads)?;
        pos("test_size", self.test_size)?;
        let at_most = |key: &str, v: usize, max: usize, why: &str| {
            if v > max {
                Err(Error::config(key, format!("{v} exceeds {max}: {why}")))
            } else {
                Ok(())
            }
        };
        at_most(
            "runtime.tokio_threads",
            self.runtime.tokio_threads,
            MAX_THREADS,
            "too many threads",
        )?;
        at_most(
            "runtime.compute_threads",
            self.runtime.compute_threads,
            MAX_THREADS,
            "too many threads",
        )?;
        at_most(
            "runtime.workers_per_device",
            self.runtime.workers_per_device,
            MAX_THREADS,
            "too many forward workers",
        )?;
        at_most(
            "intrinsic_dim",
            self.intrinsic_dim,
            MAX_INTRINSIC_DIM,
            "each search holds d x d f64 matrices",
        )?;
        at_most("popsize", self.popsize, MAX_POPSIZE, "each population is d x popsize f64")?;
        at_most(
            "local_popsize",
            self.local_popsize,
            MAX_POPSIZE,
            "each population is d x popsize f64",
        )?;
        if self.popsize < 2 {
            return Err(Error::config("popsize", "must be >= 2"));
        }
        if self.local_popsize < 2 {
            return Err(Error::config("local_popsize", "must be >= 2"));
        }
        if !(self.sigma.is_finite() && self.sigma > 0.0) {
            return Err(Error::config("sigma", "must be finite and > 0"));
        }
        if !(self.projection_gain.is_finite() && self.projection_gain > 0.0) {
            return Err(Error::config("projection_gain", "must be finite and > 0"));
        }
        if !(0.0..=1.0).contains(&self.perturb_rate) {
            return Err(Error::config("perturb_rate", "must be in [0, 1]"));
        }
        if !(self.alpha_dir.is_finite() && self.alpha_dir > 0.0) {
            return Err(Error::config("alpha_dir", "must be finite and > 0"));
        }
        if self.min_clients > self.num_users {
            return Err(Error::config(
                "min_clients",
                format!("{} exceeds num_users = {}", self.min_clients, self.num_users),
            ));
        }
        if self.clients_per_round > self.num_users {
            return Err(Error::config(
                "clients_per_round",
                format!("{} exceeds num_users = {}", self.clients_per_round, self.num_users),
            ));
        }
        if self.clients_per_round > 0 && self.min_clients > self.clients_per_round {
            return Err(Error::config(
                "min_clients",
                format!(
                    "{} exceeds clients_per_round = {}: no round could reach its quorum",
                    self.min_clients, self.clients_per_round
                ),
            ));
        }
        let t = self.runtime.round_timeout_s;
        if !(t.is_finite() && t > 0.0 && t <= MAX_SECONDS) {
            return Err(Error::config(
                "runtime.round_timeout_s",
                format!("{t:e} must be > 0 and at most {MAX_SECONDS} seconds (a week)"),
            ));
        }
        if self.runtime.devices.is_empty() {
            return Err(Error::config("runtime.devices", "needs at least one device"));
        }
        if self.aggregation != Aggregation::Fedbpt {
            if self.server_fitness != ServerFitness::Loss {
                return Err(Error::config("server_fitness", "only FedBPT's server ranks clients"));
            }
            if self.server_weights != ServerWeights::Rank {
                return Err(Error::config("server_weights", "only FedBPT's server ranks clients"));
            }
        }
        self.faults.validate(self.num_users, self.num_rounds)?;
        if !self.faults.corrupt_replica.is_empty() && self.traffic != Traffic::Replay {
            return Err(Error::config(
                "faults.corrupt_replica",
                "corrupts the clients' replicas, which only traffic = \"replay\" keeps",
            ));
        }
        self.cluster.validate(self.num_users)?;
        if client_index(&self.eval_clients, self.num_users).is_none() {
            return Err(Error::config(
                "eval_clients",
                format!(
                    "`{}` is not a client (site-1 .. site-{})",
                    self.eval_clients, self.num_users
                ),
            ));
        }
        if let Some(t) = &self.task {
            t.validate()?;
        }
        Ok(())
    }

    /// The task definition: the `[task]` override or the built-in one.
    pub fn task_spec(&self) -> Result<TaskSpec> {
        match &self.task {
            Some(t) => Ok(t.clone()),
            None => TaskSpec::builtin(&self.task_name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_and_out_of_range_keys_are_named() {
        let e = Config::from_toml_str("seed = 3\nintrinsic_dimm = 3", &[]).unwrap_err().to_string();
        assert!(e.contains("intrinsic_dimm") && e.contains("line 2"), "{e}");
        let e = Config::from_toml_str("perturb_rate = 1.5", &[]).unwrap_err().to_string();
        assert!(e.contains("perturb_rate"), "{e}");
        let e = Config::from_toml_str("[runtime]\nworkers = 2", &[]).unwrap_err().to_string();
        assert!(e.contains("workers"), "{e}");
        let e = Config::from_toml_str("k_shot = \"many\"", &[]).unwrap_err().to_string();
        assert!(e.contains("k_shot") || e.contains("invalid type"), "{e}");
    }

    #[test]
    fn overrides_apply_with_types() {
        let c = Config::from_toml_str(
            "seed = 1",
            &[
                "seed=7".into(),
                "runtime.tokio_threads=3".into(),
                "model_name=minilm".into(),
                "iid=false".into(),
            ],
        )
        .unwrap();
        assert_eq!(c.seed, 7);
        assert_eq!(c.runtime.tokio_threads, 3);
        assert_eq!(c.model_name, "minilm");
        assert!(!c.iid);
        assert!(Config::from_toml_str("", &["nokey=1".into()]).is_err());
        assert!(Config::from_toml_str("", &["seed".into()]).is_err());
    }

    #[test]
    fn server_variants_parse_and_belong_to_fedbpt() {
        let sets = [
            "server_fitness=\"improvement\"".into(),
            "server_weights=\"equal\"".into(),
            "client_loss=\"class-balanced\"".into(),
        ];
        let c = Config::from_toml_str("", &sets).unwrap();
        assert_eq!(c.server_fitness, ServerFitness::Improvement);
        assert_eq!(c.server_weights, ServerWeights::Equal);
        assert_eq!(c.client_loss, ClientLoss::ClassBalanced);
        let d = Config::default();
        assert_eq!(
            (d.server_fitness, d.server_weights),
            (ServerFitness::Loss, ServerWeights::Rank)
        );
        assert_eq!(d.client_loss, ClientLoss::Mean);
        let e =
            Config::from_toml_str("aggregation = \"fedavg\"\nserver_fitness = \"permuted\"", &[])
                .unwrap_err()
                .to_string();
        assert!(e.contains("server_fitness"), "{e}");
        let e = Config::from_toml_str("aggregation = \"fedavg\"\nserver_weights = \"equal\"", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("server_weights"), "{e}");
        let e = Config::from_toml_str("server_fitness = \"gain\"", &[]).unwrap_err().to_string();
        assert!(e.contains("server_fitness") || e.contains("gain"), "{e}");
    }

    #[test]
    fn cma_flavour_parses_and_names_its_key() {
        assert_eq!(Config::default().cma, CmaFlavour::Tutorial);
        assert_eq!(Config::from_toml_str("", &[]).unwrap().cma, CmaFlavour::Tutorial);
        let c = Config::from_toml_str("cma = \"pycma\"", &[]).unwrap();
        assert_eq!(c.cma, CmaFlavour::Pycma);
        let c = Config::from_toml_str("", &["cma=tutorial".into()]).unwrap();
        assert_eq!(c.cma, CmaFlavour::Tutorial);
        // A config recorded before the key existed (checkpoints keep theirs) is the tutorial's.
        let mut recorded = serde_json::to_value(Config::default()).unwrap();
        assert_eq!(recorded["cma"], "tutorial");
        recorded.as_object_mut().unwrap().remove("cma");
        let old: Config = serde_json::from_value(recorded).unwrap();
        assert_eq!(old.cma, CmaFlavour::Tutorial);
        let pycma = Config { cma: CmaFlavour::Pycma, ..Config::default() };
        let back: Config = serde_json::from_value(serde_json::to_value(&pycma).unwrap()).unwrap();
        assert_eq!(back.cma, CmaFlavour::Pycma);
        for (text, sets) in [("cma = \"numpy\"", vec![]), ("", vec!["cma=numpy".to_string()])] {
            let e = Config::from_toml_str(text, &sets).unwrap_err().to_string();
            assert!(e.contains("cma") && e.contains("numpy"), "{e}");
            assert!(e.contains("\"tutorial\" or \"pycma\""), "{e}");
        }
    }

    #[test]
    fn traffic_parses_and_names_its_key() {
        assert_eq!(Config::default().traffic, Traffic::Distribution);
        assert_eq!(Config::from_toml_str("", &[]).unwrap().traffic, Traffic::Distribution);
        let c = Config::from_toml_str("traffic = \"replay\"", &[]).unwrap();
        assert_eq!(c.traffic, Traffic::Replay);
        let c = Config::from_toml_str("", &["traffic=distribution".into()]).unwrap();
        assert_eq!(c.traffic, Traffic::Distribution);
        // A config recorded before the key existed (checkpoints keep theirs) ships distributions.
        let mut recorded = serde_json::to_value(Config::default()).unwrap();
        recorded.as_object_mut().unwrap().remove("traffic");
        let old: Config = serde_json::from_value(recorded).unwrap();
        assert_eq!(old.traffic, Traffic::Distribution);
        let replay = Config { traffic: Traffic::Replay, ..Config::default() };
        let back: Config = serde_json::from_value(serde_json::to_value(&replay).unwrap()).unwrap();
        assert_eq!(back.traffic, Traffic::Replay);
        for (text, sets) in [("traffic = \"seeds\"", vec![]), ("", vec!["traffic=seeds".into()])] {
            let e = Config::from_toml_str(text, &sets).unwrap_err().to_string();
            assert!(e.contains("traffic") && e.contains("seeds"), "{e}");
            assert!(e.contains("\"distribution\" or \"replay\""), "{e}");
        }
    }

    #[test]
    fn noniid_split_names_are_the_config_names() {
        for split in [NoniidSplit::ClientMix, NoniidSplit::ClassShares] {
            let set = format!("noniid_split={:?}", split.as_str());
            assert_eq!(Config::from_toml_str("", &[set]).unwrap().noniid_split, split);
        }
    }

    #[test]
    fn set_errors_name_the_override() {
        let e = Config::from_toml_str("", &["k_shot=many".into()]).unwrap_err().to_string();
        assert!(e.contains("k_shot=many"), "{e}");
        let e = Config::from_toml_str("", &["perturb_rate=2".into()]).unwrap_err().to_string();
        assert!(e.contains("perturb_rate") && e.contains("--set `perturb_rate=2`"), "{e}");
        // The last --set of a key is the one in effect, and the one named.
        let sets = ["perturb_rate=0.5".into(), "perturb_rate=2".into()];
        let e = Config::from_toml_str("", &sets).unwrap_err().to_string();
        assert!(e.contains("--set `perturb_rate=2`"), "{e}");
        // Among several overrides, only the one at fault is named.
        let sets = ["seed=3".into(), "k_shot=many".into(), "iid=false".into()];
        let e = Config::from_toml_str("", &sets).unwrap_err().to_string();
        assert!(e.contains("`k_shot=many`") && !e.contains("seed=3") && !e.contains("iid"), "{e}");
    }

    #[test]
    fn a_seed_anywhere_in_the_u64_range_is_accepted() {
        let top = Config::from_toml_str("", &["seed=18446744073709551615".into()]).unwrap();
        assert_eq!(top.seed, u64::MAX);
        let text = Config::from_toml_str("seed = \"18446744073709551615\"", &[]).unwrap();
        assert_eq!(text.seed, u64::MAX);
        // It survives the JSON of summaries and checkpoints.
        let json = serde_json::to_string(&top).unwrap();
        assert_eq!(serde_json::from_str::<Config>(&json).unwrap().seed, u64::MAX);
        let e = Config::from_toml_str("", &["seed=-1".into()]).unwrap_err().to_string();
        assert!(e.contains("seed=-1"), "{e}");
        let e = Config::from_toml_str("", &["seed=18446744073709551616".into()]).unwrap_err();
        assert!(e.to_string().contains("not a whole number"), "{e}");
    }

    #[test]
    fn sizes_that_would_exhaust_the_machine_are_refused() {
        for (set, key) in [
            ("intrinsic_dim=1000000", "intrinsic_dim"),
            ("runtime.tokio_threads=100000", "runtime.tokio_threads"),
            ("runtime.compute_threads=100000", "runtime.compute_threads"),
            ("runtime.workers_per_device=100000", "runtime.workers_per_device"),
            ("runtime.round_timeout_s=1e300", "runtime.round_timeout_s"),
            ("faults.restart_backoff_ms=18446744073709551615", "faults.restart_backoff_ms"),
            ("test_size=0", "test_size"),
            ("popsize=1000000000", "popsize"),
            ("local_popsize=1000000000", "local_popsize"),
        ] {
            let e = Config::from_toml_str("", &[set.into()]).unwrap_err().to_string();
            assert!(e.contains(key), "{set}: {e}");
        }
        let e = Config::from_toml_str(
            "[faults]\nstragglers = [{ client = \"site-1\", delay_s = 1e30 }]",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("faults.stragglers"), "{e}");
    }

    #[test]
    fn faults_for_rounds_that_never_come_are_refused() {
        let text = "num_rounds = 3\n[faults]\nkill = [{ client = \"site-1\", round = 4 }]";
        let e = Config::from_toml_str(text, &[]).unwrap_err().to_string();
        assert!(e.contains("faults.kill.round") && e.contains("round 4 never comes"), "{e}");
        let text = "num_rounds = 3\n[faults]\npanic = [{ client = \"site-1\", round = 0 }]";
        assert!(Config::from_toml_str(text, &[]).is_err());
        let text = "num_rounds = 3\n[faults]\nstragglers = [{ client = \"site-1\", rounds = [9] }]";
        assert!(Config::from_toml_str(text, &[]).is_err());
        let ok = "num_rounds = 3\n[faults]\ndrop_reply = [{ client = \"site-2\", round = 3 }]";
        assert!(Config::from_toml_str(ok, &[]).is_ok());
    }

    #[test]
    fn a_corrupted_replica_needs_replay_and_a_round_with_a_digest() {
        let corrupt =
            |round: usize| format!("faults.corrupt_replica=[{{client=\"site-2\", round={round}}}]");
        let replay = "traffic=\"replay\"".to_string();
        let e = Config::from_toml_str("", &[corrupt(2)]).unwrap_err().to_string();
        assert!(e.contains("faults.corrupt_replica") && e.contains("traffic"), "{e}");
        let e = Config::from_toml_str("", &[replay.clone(), corrupt(1)]).unwrap_err().to_string();
        assert!(e.contains("faults.corrupt_replica.round") && e.contains("round 2"), "{e}");
        assert!(Config::from_toml_str("", &[replay, corrupt(2)]).is_ok());
    }

    #[test]
    fn sampling_and_quorum_must_fit_together() {
        assert!(Config::from_toml_str("num_users = 4\nclients_per_round = 5", &[]).is_err());
        let e = Config::from_toml_str("clients_per_round = 2\nmin_clients = 3", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("min_clients"), "{e}");
        assert!(Config::from_toml_str("clients_per_round = 2\nmin_clients = 2", &[]).is_ok());
    }

    #[test]
    fn bad_file_names_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.toml");
        std::fs::write(&p, "seed = 1\nseed = 2\n").unwrap();
        let e = Config::load(&p, &[]).unwrap_err().to_string();
        assert!(e.contains("bad.toml"), "{e}");
    }
}
