"""The issue-16 examples run small and fast, and check themselves against
the float64 reference (examples/parallel_sampling.py,
examples/speculative_verify.py)."""
import importlib.util
from pathlib import Path

import numpy as np

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_parallel_sampling():
    mod = load("parallel_sampling")
    tokens, worst = mod.run(samples=5, prompt=700, steps=6, num_kv_heads=8, verbose=False)
    assert tokens.shape == (5, 6)
    assert worst < 1e-4
    # the samples differ (their own temperatures and draws), the prompt was shared
    assert len({tuple(t) for t in tokens}) > 1


def test_speculative_verify_equals_greedy():
    mod = load("speculative_verify")
    moved = 0
    for seed, (width, depth) in enumerate([(2, 4), (3, 2), (4, 3)]):
        spec, plain, calls, m, worst = mod.run(context=200 + 37 * seed, tokens=24, width=width,
                                               depth=depth, seed=seed, verbose=False)
        assert spec == plain
        assert worst < 1e-4
        assert calls < 24   # drafts were accepted
        moved += m
    assert moved > 0   # some accepted path was not a depth-first prefix of its tree


def test_draft_tree_mask_is_ancestor_closed():
    mod = load("speculative_verify")
    model = mod.Target(64, 4, 2, 16)
    toks, parents, mask = mod.draft_tree(model, 5, 3, 3)
    assert len(toks) == 1 + 3 * 3 and mask.shape == (10, 10)
    assert np.all(np.diag(mask)) and not np.any(np.triu(mask, 1))
    for i, p in enumerate(parents):
        if p >= 0:
            assert np.all(mask[i, :i] == mask[p, :i])   # a node sees what its parent sees
