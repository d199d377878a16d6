//! The peers `fedbpt bench` measures beside its own forwards: PyTorch (held to each kernel's
//! instruction set) and llama.cpp, run as Python scripts under `$FEDBPT_PEER_PYTHON`.

use std::path::Path;
use std::process::Command;

use serde_json::json;

use fedbpt::kernels::Kernel;
use fedbpt::models::linear::LinearFormat;
use fedbpt::peak::Peak;

use crate::bench::share;

/// A way to run a PyTorch peer: its dtype and the instruction set it is held to (oneDNN's
/// `ONEDNN_MAX_CPU_ISA`, MKL's `MKL_ENABLE_INSTRUCTIONS`), for comparing each of our kernels
/// with PyTorch on the same instructions.
pub(crate) struct PeerVariant {
    dtype: &'static str,
    /// `default` (whatever PyTorch picks, AMX included), `avx512_core_bf16` or `avx2`.
    isa: &'static str,
    env: Vec<(&'static str, &'static str)>,
}

impl PeerVariant {
    /// The peer's line with what it was held to, the model and shape it stands beside (for
    /// [`versus`]) and its share of the peak of its dtype.
    pub(crate) fn tag(
        &self,
        mut line: serde_json::Value,
        model: &str,
        candidates: Option<usize>,
        peak: Option<&Peak>,
    ) -> serde_json::Value {
        line["isa"] = json!(self.isa);
        line["beside_model"] = json!(model);
        line["candidates"] = json!(candidates.unwrap_or(1));
        if let Some(g) = line["gflops"].as_f64() {
            let format = match (self.dtype, self.isa) {
                ("bf16", "default") if peak.is_some_and(|p| p.amx_bf16_gflops.is_some()) => {
                    "bf16-amx"
                }
                ("bf16", "avx2") => "bf16-avx2",
                ("bf16", _) => "bf16-avx512bf16",
                _ => "f32",
            };
            line["share_of_peak"] = json!(share(peak, format, g));
        }
        line
    }
}

/// PyTorch f32 and bf16 as it runs by default, and held to the instruction set of each of our
/// kernels being measured below AMX.
pub(crate) fn peer_variants(formats: &[LinearFormat]) -> Vec<PeerVariant> {
    let mut out = vec![
        PeerVariant { dtype: "f32", isa: "default", env: vec![] },
        PeerVariant { dtype: "bf16", isa: "default", env: vec![] },
    ];
    if formats.contains(&LinearFormat::Packed(Kernel::Avx512Bf16)) {
        let env = vec![("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")];
        out.push(PeerVariant { dtype: "bf16", isa: "avx512_core_bf16", env });
    }
    if formats.contains(&LinearFormat::Packed(Kernel::Avx2)) {
        let env = vec![("ONEDNN_MAX_CPU_ISA", "AVX2"), ("MKL_ENABLE_INSTRUCTIONS", "AVX2")];
        out.push(PeerVariant { dtype: "bf16", isa: "avx2", env: env.clone() });
        out.push(PeerVariant { dtype: "f32", isa: "avx2", env });
    }
    out
}

/// The peer ISA each of our formats is compared with.
pub(crate) fn peer_isa_for(format: &str) -> Option<&'static str> {
    match format {
        "f32" | "bf16-amx" => Some("default"),
        "bf16-avx512bf16" => Some("avx512_core_bf16"),
        "bf16-avx2" => Some("avx2"),
        _ => None,
    }
}

/// Runs a peer script of `bench/` with `$FEDBPT_PEER_PYTHON` (default `python3`); its JSON
/// lines, or one line saying why it is unavailable.
fn peer_script(
    script: &str,
    args: &[String],
    env: &[(&str, &str)],
    needs: &str,
) -> Vec<serde_json::Value> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench").join(script);
    let python = std::env::var("FEDBPT_PEER_PYTHON").unwrap_or_else(|_| "python3".into());
    match Command::new(&python).arg(&script).args(args).envs(env.iter().copied()).output() {
        Ok(o) if o.status.success() => {
            let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect();
            if lines.is_empty() {
                vec![json!({"peer": format!("unavailable: {} printed no JSON", script.display())})]
            } else {
                lines
            }
        }
        Ok(o) => {
            let err = String::from_utf8_lossy(&o.stderr);
            let last = err.lines().last().unwrap_or("").to_string();
            vec![
                json!({"peer": format!("unavailable: {python} {} failed: {last} (pip install {needs}, or set FEDBPT_PEER_PYTHON)", script.display())}),
            ]
        }
        Err(e) => vec![json!({"peer": format!("unavailable: cannot run {python}: {e}")})],
    }
}

/// A causal peer's arguments: the GGUF, `rows` x `seq` tokens (prefix) and `rows` x `new`
/// tokens over a cached context (suffix), on `threads` threads (our forwards' count).
fn causal_args(gguf: &Path, rows: usize, seq: usize, new: usize, threads: usize) -> Vec<String> {
    vec![
        gguf.display().to_string(),
        "--threads".into(),
        threads.to_string(),
        "--batch".into(),
        rows.to_string(),
        "--seq".into(),
        seq.to_string(),
        "--new".into(),
        new.to_string(),
    ]
}

/// PyTorch + transformers on the same GGUF (dequantized; weights in `dtype`) at the shapes of
/// `causal_args`.
pub(crate) fn peer_causal(
    gguf: &Path,
    rows: usize,
    seq: usize,
    new: usize,
    threads: usize,
    variant: &PeerVariant,
) -> Vec<serde_json::Value> {
    let mut args = causal_args(gguf, rows, seq, new, threads);
    args.extend(["--dtype".into(), variant.dtype.into()]);
    peer_script("peer_causal.py", &args, &variant.env, "torch transformers accelerate gguf")
}

/// llama.cpp (llama-cpp-python's low-level API) on the same GGUF, weights as stored, at the same
/// shapes and at the thread count our forwards use (`RAYON_NUM_THREADS` or every core).
pub(crate) fn peer_llamacpp(
    gguf: &Path,
    rows: usize,
    seq: usize,
    new: usize,
    threads: usize,
) -> Vec<serde_json::Value> {
    let args = causal_args(gguf, rows, seq, new, threads);
    let needs = "gguf llama-cpp-python (from source, see bench/peer_llamacpp.py)";
    peer_script("peer_llamacpp.py", &args, &[], needs)
}

/// PyTorch's BertModel on the same MiniLM weights and shapes (`batch` rows of `seq` tokens) on
/// `threads` threads.
pub(crate) fn peer(
    model_dir: &Path,
    batch: usize,
    seq: usize,
    threads: usize,
    variant: &PeerVariant,
) -> serde_json::Value {
    let args = [
        model_dir.display().to_string(),
        "--threads".into(),
        threads.to_string(),
        "--batch".into(),
        batch.to_string(),
        "--seq".into(),
        seq.to_string(),
        "--dtype".into(),
        variant.dtype.into(),
    ];
    let mut lines =
        peer_script("peer_minilm.py", &args, &variant.env, "torch transformers").into_iter();
    lines.next().unwrap_or_else(|| json!({"peer": "unavailable: peer_minilm.py printed nothing"}))
}
