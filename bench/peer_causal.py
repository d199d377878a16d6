"""Peer for the causal backend: PyTorch + HF transformers on the same GGUF, dequantized to f32,
run in f32 or with the weights cast to bfloat16 (`--dtype bf16`).

Usage: python peer_causal.py GGUF_FILE [--batch 64] [--seq 36] [--new 8] [--iters 3] [--threads 2]
       [--dtype f32|bf16]

Measures, at the shapes `fedbpt bench` passes (uniform rows, so none of the peer's work is padding):
- prefix placement: a full forward of batch x seq tokens, logits at the last position only;
- suffix placement: the key/value cache of batch x (seq - new) tokens computed once, then per
  candidate a forward of batch x new tokens over that cache (cropped back after each).
Prints one JSON line per placement: tokens/s and GFLOP/s (2 x non-embedding params per token).
Needs torch, transformers, accelerate and gguf (pip install into a venv).
"""
import argparse, json, os
import torch
from transformers import AutoModelForCausalLM, DynamicCache
from timing import mean_seconds  # bench/timing.py, beside this script

ap = argparse.ArgumentParser()
ap.add_argument("gguf"); ap.add_argument("--batch", type=int, default=64)
ap.add_argument("--seq", type=int, default=36); ap.add_argument("--new", type=int, default=8)
ap.add_argument("--iters", type=int, default=3); ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
a = ap.parse_args()
torch.set_num_threads(a.threads)
model = AutoModelForCausalLM.from_pretrained(
    os.path.dirname(os.path.abspath(a.gguf)), gguf_file=os.path.basename(a.gguf), dtype=torch.float32
).eval()
if a.dtype == "bf16":
    model = model.to(torch.bfloat16)
cfg = model.config
nonemb = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "lm_head" not in n)
g = torch.Generator().manual_seed(0)
ids = torch.randint(1000, cfg.vocab_size, (a.batch, a.seq), generator=g)
tag = f"torch {torch.__version__} eager {a.dtype} (transformers, GGUF dequantized)"

with torch.inference_mode():
    dt = mean_seconds(lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1), a.iters)
    tok = a.batch * a.seq / dt
    print(json.dumps({"peer": tag, "dtype": a.dtype, "placement": "prefix", "batch": a.batch, "seq": a.seq, "threads": a.threads,
                      "s_per_candidate": dt, "tokens_per_s": round(tok), "gflops": round(tok * 2 * nonemb / 1e9, 1)}))
    ctx = a.seq - a.new
    cache = DynamicCache()
    model(input_ids=ids[:, :ctx], past_key_values=cache, use_cache=True, logits_to_keep=1)
    mask = torch.ones(a.batch, a.seq, dtype=torch.long)

    def candidate():
        model(input_ids=ids[:, ctx:], past_key_values=cache, attention_mask=mask, use_cache=True, logits_to_keep=1)
        cache.crop(-a.new)  # drop the candidate's tokens again

    dt = mean_seconds(candidate, a.iters)
    tok = a.batch * a.new / dt
    print(json.dumps({"peer": tag, "dtype": a.dtype, "placement": "suffix", "batch": a.batch, "context": ctx, "new_tokens": a.new,
                      "threads": a.threads, "s_per_candidate": dt, "tokens_per_s": round(tok),
                      "gflops": round(tok * 2 * nonemb / 1e9, 1)}))
