"""Shared test helpers: the float64 oracle applied to packed and paged calls,
tolerances per dtype, and a fixture that runs a test on every SIMD path."""
import os
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    # CI: the same examples every run (reproducible), no per-example deadline
    # (2 shared cores), no database written into the checkout
    "ci", derandomize=True, deadline=None, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile(
    # local bug hunting: HYPOTHESIS_PROFILE=explore python -m pytest tests/test_fuzz.py
    "explore", deadline=None, max_examples=2000, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

import cpuattn
from cpuattn import _threads

try:
    import ml_dtypes
    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - ml_dtypes is in the test extra
    BF16 = None

# (atol, rtol) of a result against the float64 reference, by storage dtype
TOL = {"float64": (1e-12, 1e-12), "float32": (2e-5, 2e-5), "float16": (3e-3, 3e-3),
       "bfloat16": (2.5e-2, 2.5e-2)}


def tol(dtype):
    atol, rtol = TOL[np.dtype(dtype).name]
    return dict(atol=atol, rtol=rtol)


def assert_lse(lse, ref_lse, dtype=np.float32):
    """lse against the reference everywhere: -inf exactly where the reference
    has -inf (rows that see no key), within the dtype's tolerance elsewhere."""
    lse, ref_lse = np.asarray(lse), np.asarray(ref_lse)
    assert lse.shape == ref_lse.shape, (lse.shape, ref_lse.shape)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    seen = ~np.isneginf(ref_lse)
    np.testing.assert_allclose(lse[seen], ref_lse[seen], **tol(dtype))


def require_tools(*names, packages="qemu-user gcc-aarch64-linux-gnu"):
    """Skip a cross check whose tools (qemu-user, a cross compiler, wine) are
    not installed; under CPUATTN_REQUIRE_CROSS=1 (CI installs them) fail
    instead. packages: the Debian packages that bring them, for the message."""
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        msg = f"{', '.join(missing)} not installed (apt-get install {packages})"
        if os.environ.get("CPUATTN_REQUIRE_CROSS") == "1":
            pytest.fail(msg + ", and CPUATTN_REQUIRE_CROSS=1 requires the cross checks")
        pytest.skip(msg)


def thread_cap():
    """The process-wide cap of set_num_threads: get_num_threads() is
    min(cap, omp_get_max_threads()), so read it with OpenMP's limit raised."""
    import threadpoolctl
    with threadpoolctl.threadpool_limits(limits=1 << 30, user_api="openmp"):
        return cpuattn.get_num_threads()


def randn(rng, shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


def ref_varlen(q, k, v, cu_q, cu_k, **opts):
    """Reference for a packed batch: per-sequence reference_attention."""
    outs, lses = [], []
    h = q.shape[1]
    for b in range(len(cu_q) - 1):
        qs, ks = q[cu_q[b]:cu_q[b + 1]], k[cu_k[b]:cu_k[b + 1]]
        vs = v[cu_k[b]:cu_k[b + 1]]
        if qs.shape[0] == 0:
            outs.append(np.zeros((0, h, v.shape[-1])))
            lses.append(np.zeros((h, 0)))
            continue
        o, l = cpuattn.reference_attention(qs[None], ks[None], vs[None], return_lse=True, **opts)
        outs.append(o[0])
        lses.append(l[0])
    if not outs:  # batch 0
        return np.zeros((0, h, v.shape[-1])), np.zeros((h, 0))
    return np.concatenate(outs), np.concatenate(lses, axis=1)


def ref_paged(q, k_pages, v_pages, block_table, seq_lens, cu_q=None, causal=True, **opts):
    """Reference for paged attention: gather each chain, then the oracle."""
    batch = len(seq_lens)
    cu_q = np.arange(batch + 1) if cu_q is None else np.asarray(cu_q)
    k = cpuattn.gather_pages(k_pages, block_table, seq_lens)
    v = cpuattn.gather_pages(v_pages, block_table, seq_lens)
    ks = np.concatenate([k[b, :seq_lens[b]] for b in range(batch)]) if batch else k.reshape((-1,) + k.shape[2:])[:0]
    vs = np.concatenate([v[b, :seq_lens[b]] for b in range(batch)]) if batch else v.reshape((-1,) + v.shape[2:])[:0]
    cu_k = np.concatenate([[0], np.cumsum(seq_lens)])
    return ref_varlen(q, ks.astype(np.float64), vs.astype(np.float64), cu_q, cu_k, causal=causal,
                      **opts)


def make_pages(rng, seq_lens, page_size, num_kv_heads, head_dim, dtype=np.float32, spare=3,
               shuffle=True):
    """Random pages and a shuffled block table (unused slots = -1, spare pages
    filled with NaN so that a stray read would show)."""
    need = [(int(n) + page_size - 1) // page_size for n in seq_lens]
    num_pages = sum(need) + spare
    k_pages = randn(rng, (num_pages, page_size, num_kv_heads, head_dim), dtype)
    v_pages = randn(rng, (num_pages, page_size, num_kv_heads, head_dim), dtype)
    order = rng.permutation(num_pages) if shuffle else np.arange(num_pages)
    width = max(1, max(need, default=1))
    table = np.full((len(seq_lens), width), -1, dtype=np.int32)
    at = 0
    for b, n in enumerate(need):
        table[b, :n] = order[at:at + n]
        at += n
    for p in order[at:]:
        k_pages[p] = np.nan
        v_pages[p] = np.nan
    # stale slots past each sequence's length in its last page
    for b, n in enumerate(seq_lens):
        if n % page_size:
            last = table[b, need[b] - 1]
            k_pages[last, n % page_size:] = np.nan
            v_pages[last, n % page_size:] = np.inf
    return k_pages, v_pages, table, np.asarray(seq_lens, dtype=np.int32)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(params=_threads.supported_isas())
def each_isa(request):
    """Run the test on every SIMD path this machine supports."""
    old = _threads.get_isa()
    _threads.set_isa(request.param)
    yield request.param
    _threads.set_isa(old)


@pytest.fixture
def threads():
    """Set the thread cap within a test and restore the previous cap afterwards."""
    old = thread_cap()
    yield cpuattn.set_num_threads
    cpuattn.set_num_threads(old)
