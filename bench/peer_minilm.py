"""Peer for the MiniLM backend: PyTorch + transformers' BertModel on the same weights, in f32 or
with the weights cast to bfloat16 (oneDNN then uses the CPU's bf16 units where it has them).

Usage: python peer_minilm.py MODEL_DIR [--batch 32] [--seq 32] [--iters 20] [--threads 2]
       [--dtype f32|bf16]
MODEL_DIR holds config.json + model.safetensors (the minilm asset fedbpt fetches). Rows are
uniform, so none of the work is padding. Prints one JSON line: tokens/s and GFLOP/s
(2 x non-embedding params per token).
"""
import argparse, json
import torch
from transformers import BertConfig, BertModel
from timing import mean_seconds  # bench/timing.py, beside this script

ap = argparse.ArgumentParser()
ap.add_argument("model_dir"); ap.add_argument("--batch", type=int, default=32)
ap.add_argument("--seq", type=int, default=32); ap.add_argument("--iters", type=int, default=20)
ap.add_argument("--threads", type=int, default=2); ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
a = ap.parse_args()
torch.set_num_threads(a.threads)
dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
cfg = BertConfig.from_pretrained(a.model_dir)
model = BertModel.from_pretrained(a.model_dir, config=cfg).eval().to(dtype)
nonemb = sum(p.numel() for n, p in model.named_parameters()
             if not n.startswith("embeddings") and not n.startswith("pooler"))
g = torch.Generator().manual_seed(0)
ids = torch.randint(1000, cfg.vocab_size, (a.batch, a.seq), generator=g)
mask = torch.ones_like(ids)
with torch.inference_mode():
    dt = mean_seconds(lambda: model(input_ids=ids, attention_mask=mask), a.iters, warmup=3)
tok = a.batch * a.seq / dt
print(json.dumps({"peer": f"torch {torch.__version__} eager {a.dtype}", "dtype": a.dtype, "batch": a.batch,
                  "seq": a.seq, "threads": a.threads, "tokens_per_s": round(tok),
                  "gflops": round(tok * 2 * nonemb / 1e9, 1), "nonemb_params": nonemb}))
