"""Decode tokens/s of a random-weight HF Llama: attn_implementation "cpuattn" vs "sdpa".

Both backends run the same model weights in one process at the same thread
count (torch and cpuattn both set to --threads). Each repeat prefills the
prompt (not timed) and then times --steps single-token forward passes with
a DynamicCache; the table shows medians over --repeats.

    python bench/hf_decode.py --threads 2
"""
import argparse
import copy
import statistics
import time

import torch
import transformers

import cpuattn
import cpuattn.integrations.hf as cpuattn_hf

CONFIGS = {
    # the test model: attention is a sliver of the time, per-call overhead shows
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=128),
    # head_dim 64, GQA 4:1: attention over a long cache matters
    "small": dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=2, vocab_size=1024),
}


def decode_rate(model, ids, mask, steps):
    """Tokens/s of `steps` greedy decode steps after an untimed prefill."""
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=True)
        cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(steps):
            mask = torch.cat([mask, torch.ones_like(tok)], dim=1)
            out = model(tok, attention_mask=mask, past_key_values=cache, use_cache=True)
            cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        return ids.shape[0] * steps / (time.perf_counter() - t0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="tiny config only, fewer repeats")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cpuattn.set_num_threads(args.threads)
    cpuattn_hf.register()
    cases = [("tiny", 1, 32, 0), ("tiny", 4, 32, 0), ("tiny", 4, 32, 12)]
    if not args.quick:
        cases += [("small", 1, 1024, 0), ("small", 4, 512, 0), ("small", 4, 512, 200)]
    repeats = 3 if args.quick else args.repeats
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"cpuattn {cpuattn.__version__} ({cpuattn.info()['simd']}), "
          f"{args.threads} threads, {args.steps} steps, median of {repeats}")
    print(f"{'config':6} {'batch':>5} {'prompt':>6} {'pad':>4} {'sdpa tok/s':>11} "
          f"{'cpuattn tok/s':>14} {'ratio':>6}")
    for name, batch, prompt, pad in cases:
        cfg = transformers.LlamaConfig(**CONFIGS[name], max_position_embeddings=4096)
        torch.manual_seed(0)
        models = {}
        for impl in ("sdpa", "cpuattn"):
            models[impl] = transformers.AutoModelForCausalLM.from_config(
                copy.deepcopy(cfg), attn_implementation=impl).eval()
        models["cpuattn"].load_state_dict(models["sdpa"].state_dict())
        ids = torch.randint(1, cfg.vocab_size, (batch, prompt))
        mask = torch.ones_like(ids)
        mask[1:, :pad] = 0                  # left padding on all rows but the first
        rates = {impl: [] for impl in models}
        for _ in range(repeats):            # interleaved, so drift hits both alike
            for impl, model in models.items():
                rates[impl].append(decode_rate(model, ids, mask, args.steps))
        s, c = statistics.median(rates["sdpa"]), statistics.median(rates["cpuattn"])
        print(f"{name:6} {batch:5d} {prompt:6d} {pad:4d} {s:11.1f} {c:14.1f} {c / s:6.2f}")


if __name__ == "__main__":
    main()
