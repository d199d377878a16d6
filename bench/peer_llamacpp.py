"""Peer for the causal backend: llama.cpp (through llama-cpp-python's low-level bindings) on the
same GGUF, its weights as stored (SmolLM2's Q4_1: integer dot products against activations that
ggml quantizes on the fly), on the CPU backend at `--threads` threads.

Usage: python peer_llamacpp.py GGUF_FILE [--batch 64] [--seq 36] [--new 8] [--iters 3] [--threads 2]
       [--no-extra-bufts]

Measures, at the shapes `fedbpt bench` passes (uniform rows, as in peer_causal.py):
- prefix placement: one llama_decode of batch x seq tokens, the rows as `batch` independent
  sequences of one llama_batch (context with n_seq_max = batch, per-sequence key/value streams),
  logits at each sequence's last position only; the memory is cleared before each pass;
- suffix placement: the key/value cache of batch x (seq - new) tokens computed once, then per
  candidate one llama_decode of batch x new tokens over it, whose cells are then removed again
  (llama_memory_seq_rm).
Prints one JSON line per placement: tokens/s and GFLOP/s (2 x non-embedding params per token,
counted from the GGUF's tensors as peer_causal.py counts the model's parameters), the weights'
number formats, the buffers llama.cpp put them in (a repacked or AMX buffer means its own
kernels for this CPU) and the CPU features it was built with.
Needs llama-cpp-python built from source for this CPU (GGML_NATIVE) and gguf. Build it with
clang, not GCC 12: GCC 12's _tile_loadconfig tells the compiler it reads only 8 bytes of the tile
config, so ggml's AMX kernels load a half-written one and die of a general protection fault on
CPUs with AMX. Clang 14 spells the macros __AMXINT8__/__AMXTILE__, so pass -D__AMX_INT8__
-D__AMX_TILE__ in CMAKE_C_FLAGS/CMAKE_CXX_FLAGS or ggml leaves its AMX kernels out (`weight_buffers`
then has no AMX). `--no-extra-bufts` keeps the weights out of llama.cpp's repacked/AMX buffers (its
AVX-512 VNNI kernels then) for such a build, and says so in the tag.
"""
import argparse, ctypes, json, re, sys

import gguf
import numpy as np
import llama_cpp as L
from timing import mean_seconds  # bench/timing.py, beside this script

ap = argparse.ArgumentParser()
ap.add_argument("gguf"); ap.add_argument("--batch", type=int, default=64)
ap.add_argument("--seq", type=int, default=36); ap.add_argument("--new", type=int, default=8)
ap.add_argument("--iters", type=int, default=3); ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--no-extra-bufts", action="store_true", help="no repacked or AMX weight buffers")
a = ap.parse_args()
if not 0 < a.new < a.seq:
    sys.exit(f"--new must be in 1..{a.seq - 1}")


def weight_formats(path):
    """Non-embedding parameters (the token embedding, a separate output matrix and RoPE factors
    are not the forward's matmul work) and how many of them each GGML type holds."""
    skip = {"token_embd.weight", "output.weight", "rope_freqs.weight"}
    types = {}
    for t in gguf.GGUFReader(path).tensors:
        if t.name not in skip:
            name = t.tensor_type.name.lower()
            types[name] = types.get(name, 0) + int(t.n_elements)
    return sum(types.values()), dict(sorted(types.items(), key=lambda kv: -kv[1]))


nonemb, types = weight_formats(a.gguf)
dtype = next(iter(types))  # the format most of the work runs in (norms stay f32)

# llama.cpp's log, kept for the lines that say where the weights went and whether flash
# attention was resolved on; everything else is dropped (the caller reads stdout only).
log = []


@L.llama_log_callback
def on_log(level, text, user_data):
    log.append(text.decode(errors="replace"))


L.llama_log_set(on_log, ctypes.c_void_p())
L.llama_backend_init()
mp = L.llama_model_default_params()
mp.n_gpu_layers = 0
mp.use_extra_bufts = not a.no_extra_bufts
model = L.llama_model_load_from_file(a.gguf.encode(), mp)
if not model:
    sys.exit(f"llama.cpp could not load {a.gguf}: {''.join(log[-3:]).strip()}")
if a.batch > 256:  # LLAMA_MAX_SEQ: one sequence per row
    sys.exit(f"--batch {a.batch}: llama.cpp holds at most 256 sequences per context")

cp = L.llama_context_default_params()
cp.n_ctx = a.batch * a.seq  # llama.cpp pads each sequence's share up to 256 cells
cp.n_batch = cp.n_ubatch = a.batch * a.seq  # one pass, one ubatch
cp.n_seq_max = a.batch
cp.kv_unified = False  # per-sequence streams: each row attends to its own cells only
cp.n_threads = cp.n_threads_batch = a.threads
cp.no_perf = True
ctx = L.llama_init_from_model(model, cp)
if not ctx:
    sys.exit(f"llama.cpp could not create a context: {''.join(log[-3:]).strip()}")
mem = L.llama_get_memory(ctx)

vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
ids = np.random.default_rng(0).integers(1000, vocab, size=(a.batch, a.seq))


def make_batch(cols, p0):
    """A llama_batch of every row's tokens in columns `cols`, at positions from p0, one sequence
    per row, logits at each row's last token."""
    n = len(cols) * a.batch
    b = L.llama_batch_init(n, 0, 1)
    k = 0
    for s in range(a.batch):
        for j, c in enumerate(cols):
            b.token[k] = int(ids[s, c])
            b.pos[k] = p0 + j
            b.n_seq_id[k] = 1
            b.seq_id[k][0] = s
            b.logits[k] = j == len(cols) - 1
            k += 1
    b.n_tokens = n
    return b


def decode(b):
    rc = L.llama_decode(ctx, b)
    if rc != 0:
        sys.exit(f"llama_decode returned {rc}: {''.join(log[-3:]).strip()}")
    L.llama_synchronize(ctx)


c_ggml = L.llama_cpp._lib  # ggml's own symbols resolve through libllama's dependencies
c_ggml.ggml_commit.restype = c_ggml.ggml_version.restype = ctypes.c_char_p
version = f"{c_ggml.ggml_version().decode()} commit {c_ggml.ggml_commit().decode()}"
features = [f for f, on in re.findall(r"(\w+) = (\d+)", L.llama_print_system_info().decode()) if on == "1"]
tag = (f"llama.cpp (ggml {version}, llama-cpp-python {L.__version__}) CPU {dtype}, "
       f"batched: one llama_batch of {a.batch} sequences"
       + (", no extra buffer types (no AMX)" if a.no_extra_bufts else ""))
common = {"peer": tag, "dtype": dtype, "weights": "quantized", "weight_types": types,
          "nonemb_params": nonemb, "threads": a.threads}

full = make_batch(range(a.seq), 0)


def prefix():
    L.llama_memory_clear(mem, False)
    decode(full)


dt = mean_seconds(prefix, a.iters)
tok = a.batch * a.seq / dt
prefix_line = {**common, "placement": "prefix", "batch": a.batch, "seq": a.seq, "s_per_candidate": dt,
               "tokens_per_s": round(tok), "gflops": round(tok * 2 * nonemb / 1e9, 1)}

ctx_len = a.seq - a.new
L.llama_memory_clear(mem, False)
decode(make_batch(range(ctx_len), 0))
cand = make_batch(range(ctx_len, a.seq), ctx_len)


def candidate():
    decode(cand)
    if not L.llama_memory_seq_rm(mem, -1, ctx_len, -1):  # every sequence's candidate cells
        sys.exit("llama_memory_seq_rm failed")


dt = mean_seconds(candidate, a.iters)
tok = a.batch * a.new / dt
suffix_line = {**common, "placement": "suffix", "batch": a.batch, "context": ctx_len, "new_tokens": a.new,
               "s_per_candidate": dt, "tokens_per_s": round(tok), "gflops": round(tok * 2 * nonemb / 1e9, 1)}

def flash_attn():
    """What llama.cpp resolved its default (auto) flash attention to, from its log."""
    said = [l for l in log if "Flash Attention" in l]
    return ("disabled" if "not supported" in said[-1] else "enabled") if said else "auto (not resolved in log)"


notes = {
    "weight_buffers": sorted({m.group(1) for m in map(re.compile(r"(\S+) model buffer size").search, log) if m}),
    "flash_attn": flash_attn(),
    "cpu_features": features,
}
for line in (prefix_line, suffix_line):
    print(json.dumps({**line, **notes}))
