"""transformers generate(): attn_implementation "cpuattn" against "sdpa".

One random-weight model per shape (real layer counts, head counts and head
dims: a SmolLM2-135M-like and a Llama-3.2-1B-like), switched between the two
attention implementations (``set_attn_implementation``), so both run the
same weights in one process at the same thread count (torch and cpuattn
both set to --threads). Each case is one prompt, or 4 prompts of different
lengths left-padded to one batch; every round runs a greedy ``generate()``
of --new tokens for each implementation, in alternating order, and the
table shows medians over --rounds of:

- tokens/s of the whole ``generate()`` (batch x new tokens over its time);
- time inside the attention function (the registered ``sdpa`` or
  ``cpuattn`` function, timed around each call: mask handling, GQA, layout
  and the kernel), split into prefill (the prompt's forward pass) and
  decode (all single-token steps), in ms per generate.

The compute-loop check (bench/cpu_check.py: 1.0 = 2 free cores) runs before
and after, since this machine may be shared. On a busy machine wall time
inside a function includes the time the process was descheduled there;
``--cpu-time`` times with the process's CPU time instead (meaningful with
--threads 1, where no thread spins or waits for another).

    python bench/hf_decode.py --threads 2
    python bench/hf_decode.py --models smol --rounds 3 --threads 1 --cpu-time
    python bench/hf_decode.py --per-call --threads 1
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import transformers
from transformers import AttentionInterface

import cpuattn
import cpuattn.integrations.hf as cpuattn_hf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cpu_check import _wall  # noqa: E402

SHAPES = {
    # SmolLM2-135M: 30 layers, 9 query heads over 3 kv heads, head_dim 64
    "smol": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                 num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
                 tie_word_embeddings=True),
    # Llama-3.2-1B: 16 layers, 32 query heads over 8 kv heads, head_dim 64
    "llama1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                    vocab_size=128256, tie_word_embeddings=True),
    # the test model, for --quick checks of this script
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=128),
}
IMPLS = ("sdpa", "cpuattn")


CLOCK = time.perf_counter


class AttentionTimer:
    """Wraps the registered attention functions: seconds inside them, by
    prefill (q_len > 1) and decode (q_len == 1) calls."""

    def __init__(self):
        self.prefill = self.decode = 0.0
        self._saved = {}

    def __enter__(self):
        for name in IMPLS:
            fn = self._saved[name] = AttentionInterface._global_mapping[name]
            AttentionInterface._global_mapping[name] = self._timed(fn)
        return self

    def __exit__(self, *exc):
        AttentionInterface._global_mapping.update(self._saved)
        return False

    def _timed(self, fn):
        def timed(module, query, *args, **kwargs):
            t0 = CLOCK()
            res = fn(module, query, *args, **kwargs)
            dt = CLOCK() - t0
            if query.shape[2] > 1:
                self.prefill += dt
            else:
                self.decode += dt
            return res
        return timed


def prompts(batch, length, vocab, seed):
    """Token ids and attention mask: one prompt of `length`, or `batch`
    prompts of lengths spread over [length / 4, length], left-padded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for b in range(1, batch):
        mask[b, :length * b // (batch + 1)] = 0
    return ids.masked_fill(mask == 0, 0), mask


def one_generate(model, impl, ids, mask, new):
    """(seconds of generate(), ms in attention in prefill, in decode)."""
    model.set_attn_implementation(impl)
    with AttentionTimer() as t, torch.no_grad():
        t0 = CLOCK()
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, pad_token_id=0)
        total = CLOCK() - t0
    assert out.shape[1] == ids.shape[1] + new
    return total, t.prefill * 1e3, t.decode * 1e3, out


def per_call(threads):
    """Per decode-layer call, the calling thread's CPU time (preemption does
    not count): cpuattn's and transformers' sdpa attention functions on the
    same SmolLM2-like layer tensors (9:3 heads, D64, 160 cached keys)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    class Layer(torch.nn.Module):
        is_causal, num_key_value_groups = True, 3

    kw = dict(dropout=0.0, scaling=0.125, position_ids=torch.zeros(1, 1, dtype=torch.long),
              use_cache=True)
    for batch in (1, 4):
        q = torch.randn(batch, 1, 9, 64).transpose(1, 2)            # a projection's view
        k, v = torch.randn(batch, 3, 160, 64), torch.randn(batch, 3, 160, 64)
        mask = None
        if batch > 1:                                                # left-padded rows
            mask = torch.ones(batch, 1, 1, 160, dtype=torch.bool)
            mask[1:, ..., :40] = False
        times = {}
        for name, fn in (("sdpa", sdpa_attention_forward),
                         ("cpuattn", cpuattn_hf.attention_forward)):
            rounds = []
            with torch.no_grad():
                for _ in range(9):
                    t0 = time.thread_time()
                    for _ in range(1000):
                        fn(Layer(), q, k, v, mask, **kw)
                    rounds.append((time.thread_time() - t0) * 1e3)       # us per call
            times[name] = statistics.median(rounds)
        print(f"per call B{batch} {'left-padded mask' if mask is not None else 'no mask'}: "
              f"sdpa {times['sdpa']:.1f} us, cpuattn {times['cpuattn']:.1f} us "
              f"({threads} thread(s), thread CPU time, median of 9 x 1000)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--models", default="smol,llama1b", help="comma-separated: smol, llama1b, tiny")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens (the longest one)")
    p.add_argument("--new", type=int, default=32, help="generated tokens")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="the tiny model, 3 rounds")
    p.add_argument("--cpu-time", action="store_true",
                   help="time with the process's CPU time (use with --threads 1)")
    p.add_argument("--per-call", action="store_true",
                   help="only the per-call cost of one decode layer call (use --threads 1)")
    args = p.parse_args(argv)
    global CLOCK
    CLOCK = time.process_time if args.cpu_time else time.perf_counter
    names = ["tiny"] if args.quick else args.models.split(",")
    rounds = 3 if args.quick else args.rounds
    torch.set_num_threads(args.threads)
    cpuattn.set_num_threads(args.threads)
    cpuattn_hf.register()
    if args.per_call:
        return per_call(args.threads)
    check = _wall(2) / _wall(1)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"cpuattn {cpuattn.__version__} ({cpuattn.info()['simd']}), {args.threads} threads, "
          f"prompt {args.prompt}, {args.new} new tokens, median of {rounds} interleaved rounds, "
          f"{'process CPU' if args.cpu_time else 'wall'} time; "
          f"cpu_check before: {check:.2f}")
    head = (f"{'model':8} {'batch':>5} | {'tok/s sdpa':>10} {'cpuattn':>8} {'x':>5} | "
            f"{'prefill attn ms sdpa':>20} {'cpuattn':>8} {'x':>5} | "
            f"{'decode attn ms sdpa':>19} {'cpuattn':>8} {'x':>5}")
    print(head)
    for name in names:
        cfg = transformers.LlamaConfig(**SHAPES[name], max_position_embeddings=4096,
                                       pad_token_id=0)
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
        for batch in (1, 4):
            ids, mask = prompts(batch, args.prompt, cfg.vocab_size, seed=batch)
            runs = {impl: [] for impl in IMPLS}
            outs = {}
            one_generate(model, "cpuattn", ids, mask, 2)        # warm-up (threads, caches)
            for r in range(rounds):
                for impl in (IMPLS if r % 2 == 0 else IMPLS[::-1]):
                    *timing, outs[impl] = one_generate(model, impl, ids, mask, args.new)
                    runs[impl].append(timing)
            med = {impl: [statistics.median(x) for x in zip(*runs[impl])] for impl in IMPLS}
            (ts, sp, sd), (tc, cp, cd) = med["sdpa"], med["cpuattn"]
            toks = batch * args.new
            same = "" if torch.equal(outs["sdpa"], outs["cpuattn"]) else "  (tokens differ)"
            print(f"{name:8} {batch:5d} | {toks / ts:10.1f} {toks / tc:8.1f} {ts / tc:5.2f} | "
                  f"{sp:20.1f} {cp:8.1f} {sp / cp:5.2f} | {sd:19.1f} {cd:8.1f} {sd / cd:5.2f}"
                  f"{same}")
        del model
    print(f"cpu_check after: {_wall(2) / _wall(1):.2f} (1.0 = 2 free cores)")


if __name__ == "__main__":
    main()
