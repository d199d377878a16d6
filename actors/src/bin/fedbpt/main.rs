//! `fedbpt`: the command line.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

use fedbpt::config::Config;

mod bench;
mod cmd;
mod figures;
mod mechanism;
mod output;

#[derive(Parser)]
#[command(
    name = "fedbpt",
    version,
    about = "Federated black-box prompt tuning of frozen language models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Download and verify assets (models, data) into $FEDBPT_HOME (default ~/.cache/fedbpt).
    Fetch {
        /// Asset names (default: all): smollm2, minilm, mr, bbc.
        names: Vec<String>,
    },
    /// Centralized black-box prompt tuning on one party's k-shot data.
    Bbt {
        config: PathBuf,
        /// Output directory (default runs/<config name>-seed<seed>).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Override a config key: --set key=value (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
    },
    /// A simulated federation (FedBPT or FedAvg-BBT) on the actor runtime.
    Run {
        /// The run's configuration (not with --resume).
        #[arg(required_unless_present = "resume")]
        config: Option<PathBuf>,
        /// Continue the run in DIR from its last checkpoint (after a crash or kill -9), with the
        /// checkpoint's own configuration and directory: --set and --out would be ignored, so
        /// they are refused beside it.
        #[arg(long, value_name = "DIR", conflicts_with_all = ["config", "out", "overrides"])]
        resume: Option<PathBuf>,
        #[arg(long)]
        out: Option<PathBuf>,
        /// Profile message flows: a Chrome trace here, and messages.csv in the output directory.
        #[arg(long, value_name = "FILE")]
        trace: Option<PathBuf>,
        /// Run it across processes on loopback instead: a `serve` process and N `join`
        /// processes (the sites split among them), with a fresh cookie; with --trace, each
        /// process's trace is merged into one, a track group per process.
        #[arg(long, value_name = "N", conflicts_with = "resume")]
        processes: Option<usize>,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
    },
    /// The server of a federation across processes: server, evaluator and data loader, with
    /// clients from `fedbpt join` processes; writes what `run` writes.
    Serve {
        #[arg(required_unless_present = "resume")]
        config: Option<PathBuf>,
        /// Continue the run in DIR from its last checkpoint (the client processes join again).
        #[arg(long, value_name = "DIR", conflicts_with_all = ["config", "out", "overrides"])]
        resume: Option<PathBuf>,
        /// Address to listen on for client processes.
        #[arg(long, value_name = "HOST:PORT")]
        listen: String,
        #[arg(long)]
        out: Option<PathBuf>,
        /// The nodes' shared secret (first line); else $FEDBPT_COOKIE. No default.
        #[arg(long, value_name = "FILE")]
        cookie_file: Option<PathBuf>,
        /// This process's Chrome trace; messages.csv goes to the output directory.
        #[arg(long, value_name = "FILE")]
        trace: Option<PathBuf>,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
    },
    /// Clients of a federation across processes: runs the given sites for the server at
    /// --connect, with this process's own forward-worker pool, until the run finishes.
    Join {
        config: PathBuf,
        #[arg(long, value_name = "HOST:PORT")]
        connect: String,
        /// The sites this process runs: 3-4, site-3,site-4 or 3,4.
        #[arg(long)]
        sites: String,
        /// This node's name (default from its sites, the same when it is started again).
        #[arg(long)]
        name: Option<String>,
        #[arg(long, value_name = "FILE")]
        cookie_file: Option<PathBuf>,
        /// Write this process's socket byte counts and wall time here (JSON) at the end.
        #[arg(long, value_name = "FILE")]
        stats: Option<PathBuf>,
        /// This process's Chrome trace (its messages table beside it, `.messages.csv`).
        #[arg(long, value_name = "FILE")]
        trace: Option<PathBuf>,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
    },
    /// Redraw a finished run's accuracy.png from its summary.json and metrics.jsonl.
    Plot {
        /// The run's directory.
        dir: PathBuf,
    },
    /// Manual prompt vs FedAvg-BBT vs FedBPT, iid and non-iid, over several seeds: a markdown
    /// table and one plot with every curve.
    Compare {
        config: PathBuf,
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long, value_delimiter = ',', default_values_t = vec![42u64, 43, 44])]
        seeds: Vec<u64>,
        /// Methods to run, by directory stem: fedavg-bbt, fedbpt-client-rms, fedbpt,
        /// fedbpt-perturb (the default four); fedbpt-permuted, fedbpt-equal, fedbpt-improvement,
        /// fedbpt-balanced, fedbpt-pycma.
        #[arg(long, value_delimiter = ',')]
        methods: Vec<String>,
        /// Partitions to run: iid, non-iid; both by default.
        #[arg(long, value_delimiter = ',')]
        partitions: Vec<String>,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
    },
    /// Forward-throughput benchmark of the backends at BBT's shapes (JSON lines on stdout).
    Bench {
        /// Models to measure: smollm2, minilm, roberta-large-random (roberta-large's shapes with
        /// random weights, written to a temp dir: needs no model files).
        #[arg(long, value_delimiter = ',', default_values_t = vec!["minilm".to_string(), "smollm2".to_string()])]
        models: Vec<String>,
        /// Weight formats to measure, each beside the first: f32, quantized, bf16 (the kernel
        /// `weights = "bf16"` would use), bf16-KERNEL (amx, avx512bf16, avx2, portable), or
        /// kernels (every kernel this CPU has but the portable loop).
        #[arg(long, value_delimiter = ',', default_values_t = vec!["f32".to_string(), "kernels".to_string()])]
        weights: Vec<String>,
        /// Repetitions per measurement.
        #[arg(long, default_value_t = 5)]
        iters: usize,
        /// Device for the forwards: cpu, or cuda:N in a build with --features cuda (then the
        /// CPU's peak, linear layers and peers are left out).
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Also write the JSON lines here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Final accuracy and wall time versus the fraction of clients killed per round.
    BenchFaults {
        config: PathBuf,
        #[arg(long, value_delimiter = ',', default_values_t = vec![0.0, 0.1, 0.3, 0.5])]
        rates: Vec<f64>,
        #[arg(long, value_delimiter = ',', default_values_t = vec![42u64, 43, 44])]
        seeds: Vec<u64>,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Where the runs, faults.md and faults.png go (default runs/bench-faults).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Per-round overhead of the wire: a federation config in one process and across client
    /// processes on loopback, alternating, with socket bytes per client-round; one JSON object.
    BenchCluster {
        config: PathBuf,
        #[arg(long, default_value_t = 2)]
        processes: usize,
        #[arg(long, default_value_t = 1)]
        pairs: usize,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Where the runs write (default runs/bench-cluster).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Many simulated clients in one process: spawn time, round wall time split into forward,
    /// CMA-ES and messaging plus bookkeeping, mailbox waits, peak memory; one JSON line per row,
    /// each row in its own process.
    BenchScale {
        config: PathBuf,
        /// Client counts, one row each.
        #[arg(long, value_delimiter = ',', default_values_t = vec![10usize, 100, 1000, 10000])]
        clients: Vec<usize>,
        /// Clients sampled per round.
        #[arg(long, default_value_t = 10)]
        per_round: usize,
        /// Training examples each client holds.
        #[arg(long, default_value_t = 1)]
        shard: usize,
        /// Dev examples per class (the same in every row).
        #[arg(long, default_value_t = 16)]
        dev_per_class: usize,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Also write the JSON lines here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Run one row in this process (what the benchmark's child processes do).
        #[arg(long, hide = true)]
        row: Option<usize>,
    },
    /// Wall-time overhead of message-flow tracing: runs a federation config without and with
    /// --trace, each in its own process, alternating, and prints one JSON object.
    BenchTrace {
        config: PathBuf,
        /// Pairs of runs (untraced, traced).
        #[arg(long, default_value_t = 1)]
        pairs: usize,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Where the runs write (default runs/bench-trace).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// Keeps freed memory in the process instead of returning it to the kernel.
///
/// A forward allocates and frees tens of multi-megabyte tensors; glibc hands each one back with
/// `munmap` or a heap trim, and the next allocation pays page faults to get zeroed pages again.
/// The process keeps its peak footprint instead, which it reaches every forward anyway. glibc
/// serves blocks above its largest mmap threshold (32 MB) with `mmap` whatever is asked, so the
/// forwards keep their intermediates below that (`TOKENS_PER_PASS`, `SUFFIX_PASS_ROWS`).
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// A file-size limit (`ulimit -f`, a quota) makes the write that crosses it fail with `EFBIG`
/// instead of killing the process with `SIGXFSZ`: the run then ends with an error naming the
/// file, and its staged files are removed (a killed process would leave them).
fn fail_writes_past_the_size_limit() {
    #[cfg(unix)]
    // SAFETY: ignoring a signal changes no memory; called before any other thread exists.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}

fn main() {
    keep_freed_memory();
    fail_writes_past_the_size_limit();
    if let Err(e) = real_main() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Fetch { names } => cmd::fetch::fetch(&names),
        Command::Bbt { config, out, overrides } => cmd::bbt::bbt(&config, out, &overrides),
        Command::Run {
            config: Some(config), processes: Some(n), out, trace, overrides, ..
        } => {
            let cfg = Config::load(&config, &overrides)?;
            let out = out.unwrap_or_else(|| output::default_out(&config, cfg.seed));
            let wall = cmd::serve::loopback(&config, &overrides, &out, n, trace.as_deref())?;
            output::say(&format!("loopback federation of {n} client processes: {wall:.1} s"));
            Ok(())
        }
        Command::Run { config, resume, out, trace, overrides, .. } => {
            cmd::run::run(config.as_deref(), resume.as_deref(), out, trace.as_deref(), &overrides)
        }
        Command::Serve { config, resume, listen, out, cookie_file, trace, overrides } => {
            cmd::serve::serve(
                config.as_deref(),
                resume.as_deref(),
                &listen,
                out,
                cookie_file.as_deref(),
                trace.as_deref(),
                &overrides,
            )
        }
        Command::Join { config, connect, sites, name, cookie_file, stats, trace, overrides } => {
            let opts = cmd::serve::JoinOptions {
                name,
                cookie_file: cookie_file.as_deref(),
                stats: stats.as_deref(),
                trace: trace.as_deref(),
            };
            cmd::serve::join(&config, &connect, &sites, opts, &overrides)
        }
        Command::Plot { dir } => cmd::plot::plot(&dir),
        Command::Compare { config, out, seeds, methods, partitions, overrides } => {
            cmd::compare::compare(&config, out, &seeds, &methods, &partitions, &overrides)
        }
        Command::Bench { models, weights, iters, device, json } => {
            let formats = bench::forward::parse_formats(&weights)?;
            bench::forward::run(&models, &formats, iters, &device, json.as_deref())
        }
        Command::BenchFaults { config, rates, seeds, overrides, out } => cmd::faults::bench_faults(
            &config,
            out.unwrap_or_else(|| PathBuf::from("runs/bench-faults")),
            &rates,
            &seeds,
            &overrides,
        ),
        Command::BenchCluster { config, processes, pairs, overrides, out } => {
            bench::cluster::cluster_overhead(
                &config,
                processes,
                pairs,
                &overrides,
                out.unwrap_or_else(|| PathBuf::from("runs/bench-cluster")),
            )
        }
        Command::BenchScale {
            config,
            clients,
            per_round,
            shard,
            dev_per_class,
            overrides,
            json,
            row,
        } => {
            let template = bench::scale::Row { clients: 0, per_round, shard, dev_per_class };
            match row {
                Some(n) => bench::scale::run_row(
                    &config,
                    bench::scale::Row { clients: n, ..template },
                    &overrides,
                ),
                None => bench::scale::run(&config, &clients, template, &overrides, json.as_deref()),
            }
        }
        Command::BenchTrace { config, pairs, overrides, out } => bench::trace::trace_overhead(
            &config,
            pairs,
            &overrides,
            out.unwrap_or_else(|| PathBuf::from("runs/bench-trace")),
        ),
    }
}
