"""Decode tokens/s and KV bytes: PagedCache ("cpuattn", paged pages of each
kv_dtype) against DynamicCache + "sdpa", on a random-weight Llama shaped as
SmolLM2-135M (30 layers, 9 query / 3 kv heads, head_dim 64, vocab 49152).

Per (context, batch) case every cache is prefilled once, untimed, with the
same random prompt; then --rounds rounds interleave the caches: each decodes
the same --steps teacher-forced tokens (timed) and is cropped back to the
context, so drift on this shared machine hits all alike. tokens/s = batch *
steps / median round time. KV MB: DynamicCache's tensors against
PagedCache.nbytes (pages its sequences use, scales included) and
QuantizedCache("fp8")'s codes (transformers' own low-bit cache, which
dequantises all of it for every attention call; quanto / HQQ are not
installed here). max |dlogit|: the largest logit difference over the decoded
positions against float32 pages (float32 pages and QuantizedCache: against
DynamicCache + "sdpa").

    python bench/hf_paged_decode.py --threads 2
    python bench/hf_paged_decode.py --cases 512x1,4096x1 --steps 16
"""
import argparse
import copy
import statistics
import sys
import time

import torch
import transformers

import cpuattn
from cpuattn.integrations import hf

SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                    max_position_embeddings=8192, rope_theta=100000.0,
                    tie_word_embeddings=True)
KV_DTYPES = ["float32", "bfloat16", "int8", "int4", "float8_e4m3fn"]


def kv_bytes(cache):
    """Bytes of K/V a cache holds (QuantizedCache: its fp8 codes)."""
    if isinstance(cache, transformers.QuantizedCache):
        return sum(layer._quantized_keys[0].nbytes + layer._quantized_values[0].nbytes
                   for layer in cache.layers)
    if isinstance(cache, hf.PagedCache):
        return cache.nbytes
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def rewind(cache, steps):
    """Drop the last `steps` tokens. QuantizedCache's fp8 layers have no
    working crop: cut their codes by hand (transformers 5.25 internals)."""
    if not isinstance(cache, transformers.QuantizedCache):
        cache.crop(-steps)
        return
    for layer in cache.layers:
        for name in ("_quantized_keys", "_quantized_values"):
            codes, scale = getattr(layer, name)
            setattr(layer, name, (codes[..., :-steps, :], scale))
        layer.cumulative_length -= steps


def decode(model, cache, mask, tokens):
    """Feed tokens (batch, steps) one step at a time; returns (seconds, last logits)."""
    logits = []
    t0 = time.perf_counter()
    for t in range(tokens.shape[1]):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        out = model(tokens[:, t:t + 1], attention_mask=mask, past_key_values=cache)
        logits.append(out.logits[:, -1])
    return time.perf_counter() - t0, torch.stack(logits)


def run_case(models, context, batch, args, log):
    cfg = models["sdpa"].config
    g = torch.Generator().manual_seed(context + batch)
    ids = torch.randint(1, cfg.vocab_size, (batch, context), generator=g)
    mask = torch.ones_like(ids)
    tokens = torch.randint(1, cfg.vocab_size, (batch, args.steps), generator=g)
    caches = {"DynamicCache+sdpa": (models["sdpa"], transformers.DynamicCache(config=cfg)),
              # transformers' low-bit cache: dequantises all of it for every attention call
              "QuantizedCache fp8": (models["sdpa"], transformers.QuantizedCache("fp8", cfg))}
    for dt in KV_DTYPES:
        caches[f"Paged {dt}"] = (models["cpuattn"], hf.PagedCache(
            models["cpuattn"].config, max_tokens=batch * (context + args.steps),
            kv_dtype=dt, page_size=args.page_size, batch_size=batch))
    for name, (model, cache) in caches.items():
        log(f"  prefill {context}x{batch} {name}")
        model(ids, attention_mask=mask, past_key_values=cache)
    times = {name: [] for name in caches}
    logits = {}
    for r in range(args.rounds):
        for name, (model, cache) in caches.items():
            sec, out = decode(model, cache, mask, tokens)
            times[name].append(sec)
            logits.setdefault(name, out)
            rewind(cache, args.steps)
        log(f"  round {r + 1}/{args.rounds}")
    rows = []
    for name, (model, cache) in caches.items():
        ref = "DynamicCache+sdpa" if name == "Paged float32" else \
            "Paged float32" if name.startswith("Paged") else "DynamicCache+sdpa"
        diff = None if name == "DynamicCache+sdpa" else \
            (logits[name] - logits[ref]).abs().max().item()
        rows.append((name, batch * args.steps / statistics.median(times[name]),
                     kv_bytes(cache), diff))
    scale = logits["Paged float32"].abs().max().item()
    return rows, scale


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cases", default="512x1,512x4,4096x1",
                   help="comma-separated CONTEXTxBATCH")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--quick", action="store_true", help="one small case, 2 rounds")
    args = p.parse_args(argv)
    if args.quick:
        args.cases, args.steps, args.rounds = "128x1", 4, 2
    torch.set_num_threads(args.threads)
    cpuattn.set_num_threads(args.threads)
    hf.register()
    cfg = transformers.LlamaConfig(**SMOLLM2_135M)
    torch.manual_seed(0)
    models = {impl: transformers.AutoModelForCausalLM.from_config(
        copy.deepcopy(cfg), attn_implementation=impl).eval() for impl in ("sdpa", "cpuattn")}
    models["cpuattn"].load_state_dict(models["sdpa"].state_dict())

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, cpuattn "
          f"{cpuattn.__version__} ({cpuattn.info()['simd']}), {args.threads} threads, "
          f"SmolLM2-135M shape (random weights, float32), {args.steps} decode steps, "
          f"median of {args.rounds} interleaved rounds, page_size {args.page_size}")
    with torch.no_grad():
        for case in args.cases.split(","):
            context, batch = (int(x) for x in case.split("x"))
            rows, scale = run_case(models, context, batch, args, log)
            base_rate, base_bytes = rows[0][1], rows[0][2]
            print(f"\ncontext {context}, batch {batch} (logits up to {scale:.3g})")
            print(f"{'cache':20} {'tok/s':>8} {'vs sdpa':>8} {'KV MB':>8} {'vs fp32':>8} "
                  f"{'max |dlogit|':>13}")
            for name, rate, nbytes, diff in rows:
                d = "" if diff is None else f"{diff:13.2e}"
                print(f"{name:20} {rate:8.1f} {rate / base_rate:8.2f} {nbytes / 2**20:8.2f} "
                      f"{nbytes / base_bytes:8.3f} {d}")


if __name__ == "__main__":
    main()
