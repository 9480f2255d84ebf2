"""cpuattn.torch's custom operators: torch.compile(fullgraph=True) forward and
backward against eager and a float64 reference, torch.library.opcheck, dtypes,
GQA, the lse output, the paged op, bad input, zero-copy crossing."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
pytest.importorskip("ml_dtypes")

import cpuattn  # noqa: E402
import cpuattn.torch as ct  # noqa: E402
from torch._dynamo.testing import CompileCounterWithBackend  # noqa: E402
from conftest import make_pages, ref_paged, thread_cap, tol  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# gradients of fp16/bf16 inputs are rounded to their dtype: compare loosely
GRAD_TOL = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 6e-2}


def reference(q, k, v, sinks=None, causal=False, softcap=0.0, window=(-1, -1), scale=None):
    """Attention in float64 torch ops (autograd gives the reference gradients):
    token-major (B, S, H, D), GQA, bottom-right causal mask, window, softcap, sinks."""
    q, k, v = (t.double() for t in (q, k, v))
    g = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    sq, sk = q.shape[1], k.shape[1]
    seen = torch.from_numpy(cpuattn.reference.visible_mask(sq, sk, causal, window))
    s = s.masked_fill(~seen, float("-inf"))
    if sinks is not None:
        col = sinks.double().reshape(1, -1, 1, 1).expand(s.shape[0], -1, sq, 1)
        p = torch.softmax(torch.cat([s, col], -1), -1)[..., :-1]
    else:
        p = torch.softmax(s, -1)
    p = torch.nan_to_num(p, nan=0.0)      # a row that sees no key gives 0
    return torch.einsum("bhqk,bkhd->bqhd", p, v)


def inputs(dtype, b=2, sq=5, sk=9, h=4, hkv=2, d=16, seed=0):
    """q, k, v token-major views of (B, H, S, D) storage (as a model holds
    them), requiring grad, and sinks (float32)."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, n, s, d, generator=gen).to(dtype).transpose(1, 2)
               for n, s in ((h, sq), (hkv, sk), (hkv, sk)))
    sinks = torch.randn(h, generator=gen)
    return [t.detach().requires_grad_() for t in (q, k, v, sinks)]


def loss_fn(q, k, v, sinks):
    out, lse = ct.attention(q, k, v, causal=True, softcap=5.0, sinks=sinks, return_lse=True)
    return out, lse, (out.float() * torch.linspace(-1, 1, out.shape[-1])).sum()


def grads_of(fn, args):
    args = [a.detach().clone().requires_grad_() for a in args]
    out, lse, loss = fn(*args)
    loss.backward()
    return None if out is None else out.detach(), lse, [a.grad for a in args]


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_compiled_matches_eager_and_reference(dtype):
    """fullgraph compile (aot_eager: the traced graph with the ops, no codegen)
    gives eager's bytes, forward and gradients; both match float64."""
    torch._dynamo.reset()
    args = inputs(DTYPES[dtype])
    eager = grads_of(loss_fn, args)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = grads_of(torch.compile(loss_fn, fullgraph=True, backend=counter), args)
    assert counter.frame_count == 1     # one graph, the op inside it
    torch.testing.assert_close(compiled[0], eager[0], rtol=0, atol=0)
    torch.testing.assert_close(compiled[1], eager[1], rtol=0, atol=0)
    for gc, ge in zip(compiled[2], eager[2]):
        torch.testing.assert_close(gc, ge, rtol=0, atol=0)
    # against float64
    ref_args = [a.detach().double().requires_grad_() for a in args]
    ref = reference(*ref_args[:3], sinks=ref_args[3], causal=True, softcap=5.0)
    (ref.float() * torch.linspace(-1, 1, ref.shape[-1])).sum().backward()
    np.testing.assert_allclose(eager[0].double().numpy(), ref.detach().numpy(), **tol(dtype))
    for g, r in zip(eager[2], ref_args):
        err = (g.double() - r.grad).abs().max() / r.grad.abs().max()
        assert err < GRAD_TOL[dtype], (dtype, float(err))
    assert [g.dtype for g in eager[2]] == [a.dtype for a in args]


@settings(max_examples=40)
@given(b=st.integers(1, 2), sq=st.integers(1, 7), sk=st.integers(1, 9), hkv=st.integers(1, 2),
       group=st.integers(1, 3), d=st.sampled_from([1, 3, 8, 17]),
       causal=st.booleans(), window=st.sampled_from([(-1, -1), (2, 0), (0, 3), (1, 1)]),
       softcap=st.sampled_from([0.0, 2.5]), scale=st.sampled_from([None, 0.3]),
       use_sinks=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_fuzz_forward_backward_against_float64(b, sq, sk, hkv, group, d, causal, window, softcap,
                                               scale, use_sinks, seed):
    """The op's forward and gradients (float32, through autograd) against the
    float64 reference for awkward shapes and every option combination."""
    gen = torch.Generator().manual_seed(seed)
    h = hkv * group
    q, k, v = (torch.randn(b, s, n, d, generator=gen, requires_grad=True)
               for s, n in ((sq, h), (sk, hkv), (sk, hkv)))
    sinks = torch.randn(h, generator=gen, requires_grad=True) if use_sinks else None
    opts = dict(causal=causal, window=window, softcap=softcap, scale=scale)
    out = ct.attention(q, k, v, sinks=sinks, **opts)
    dout = torch.randn(out.shape, generator=gen)
    leaves = [q, k, v] + ([sinks] if use_sinks else [])
    got = torch.autograd.grad(out, leaves, dout)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = reference(*ref_leaves[:3], sinks=ref_leaves[3] if use_sinks else None, **opts)
    want = torch.autograd.grad(ref, ref_leaves, dout.double())
    np.testing.assert_allclose(out.detach().numpy(), ref.detach().numpy(), atol=2e-5, rtol=2e-5)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.numpy(), w.numpy(), atol=1e-4, rtol=1e-4)


def test_thread_count_does_not_change_the_bytes():
    args = inputs(torch.float32, b=2, sq=33, sk=70, h=8, hkv=2, d=32)
    runs = []
    old = thread_cap()
    for n in (1, 2):
        cpuattn.set_num_threads(n)
        try:
            runs.append(grads_of(loss_fn, args))
        finally:
            cpuattn.set_num_threads(old)
    for a, b in zip((runs[0][0], runs[0][1], *runs[0][2]), (runs[1][0], runs[1][1], *runs[1][2])):
        assert torch.equal(a, b)


def test_inductor_fullgraph_forward_backward():
    """The default backend (inductor) with torch ops around the custom op: one
    small graph, as a model layer would call it."""
    torch._dynamo.reset()

    def layer(x, wq, sinks):
        q = (x @ wq).view(1, 6, 4, 8)            # (B, S, H, D) projection
        out = ct.attention(q, q[:, :, :2], q[:, :, 2:], causal=True, sinks=sinks)
        return out.relu().sum()

    gen = torch.Generator().manual_seed(1)
    args = [torch.randn(1, 6, 16, generator=gen), torch.randn(16, 32, generator=gen),
            torch.randn(4, generator=gen)]
    want = grads_of(lambda *a: (None, None, layer(*a)), args)
    got = grads_of(lambda *a: (None, None, torch.compile(layer, fullgraph=True)(*a)), args)
    for g, w in zip(got[2], want[2]):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_opcheck_dense_ops():
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(1, 3, 4, 8, generator=gen, requires_grad=True)
    k = torch.randn(1, 5, 2, 8, generator=gen, requires_grad=True)
    v = torch.randn(1, 5, 2, 8, generator=gen, requires_grad=True)
    sinks = torch.randn(4, generator=gen, requires_grad=True)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])
    for extra in ((None, None, False, None, -1, -1, 0.0),
                  (sinks, slopes, True, 0.3, 2, 0, 4.0)):
        torch.library.opcheck(torch.ops.cpuattn.attention.default, (q, k, v) + extra)
    with torch.no_grad():
        out, lse = torch.ops.cpuattn.attention(q, k, v, sinks, None, True, None, -1, -1, 0.0)
    torch.library.opcheck(torch.ops.cpuattn.attention_backward.default,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse,
                           sinks.detach(), None, True, None, -1, -1, 0.0))


def test_options_reach_the_kernel():
    """Every option is honoured inside the op: eager and compiled equal the
    numpy API called with the same options, bit for bit."""
    torch._dynamo.reset()
    q, k, v, sinks = (t.detach() for t in inputs(torch.float32, sq=7, sk=7))
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])
    opts = dict(causal=True, scale=0.3, window=(3, 0), softcap=2.0)

    def fn(q, k, v, sinks, slopes):
        return ct.attention(q, k, v, sinks=sinks, alibi_slopes=slopes, return_lse=True, **opts)

    want = cpuattn.attention(q.numpy(), k.numpy(), v.numpy(), sinks=sinks.numpy(),
                             alibi_slopes=slopes.numpy(), return_lse=True, **opts)
    for f in (fn, torch.compile(fn, fullgraph=True, backend="aot_eager")):
        out, lse = f(q, k, v, sinks, slopes)
        np.testing.assert_array_equal(out.numpy(), want[0])
        np.testing.assert_array_equal(lse.numpy(), want[1])


def test_dynamic_shapes_and_errors_under_compile():
    """dynamic=True (symbolic lengths and options) traces and runs for
    several shapes; a bad shape still raises cpuattn's error from inside the graph."""
    torch._dynamo.reset()
    f = torch.compile(lambda q, k, softcap: ct.attention(q, k, k, causal=True, softcap=softcap),
                      fullgraph=True, backend="aot_eager", dynamic=True)
    gen = torch.Generator().manual_seed(6)
    for s, cap in ((5, 2.0), (9, 3.0), (12, 0.0)):
        q, k = torch.randn(1, s, 4, 8, generator=gen), torch.randn(1, s + 2, 2, 8, generator=gen)
        torch.testing.assert_close(f(q, k, cap), ct.attention(q, k, k, causal=True, softcap=cap),
                                   rtol=0, atol=0)
    with pytest.raises(cpuattn.ShapeError, match="num_kv_heads"):
        f(torch.randn(1, 5, 3, 8), torch.randn(1, 5, 2, 8), 1.0)


def test_eager_shortcut_keeps_the_op_visible():
    """Eager calls without gradients run the implementation directly; a
    dispatch mode (a tracer, FlopCounterMode) or an input that requires grad
    still goes through the op, with the same bytes."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    q, k, v, _ = (t.detach() for t in inputs(torch.float32))
    seen = []
    plain = ct.attention(q, k, v, causal=True)
    with Log():
        logged = ct.attention(q, k, v, causal=True)
    assert "cpuattn.attention.default" in seen
    graded = ct.attention(q.requires_grad_(), k, v, causal=True)
    assert graded.grad_fn is not None
    for t in (logged, graded):
        np.testing.assert_array_equal(t.detach().numpy(), plain.numpy())


def test_lse_output_is_not_differentiable():
    q, k, v, _ = inputs(torch.float32)
    out, lse = ct.attention(q, k, v, causal=True, return_lse=True)
    assert lse.shape == (2, 4, 5) and lse.dtype == torch.float32
    assert out.requires_grad and not lse.requires_grad
    _, ref_lse = cpuattn.reference_attention(*(t.detach().double().numpy() for t in (q, k, v)),
                                             causal=True, return_lse=True)
    np.testing.assert_allclose(lse.numpy(), ref_lse, rtol=1e-6, atol=1e-6)
    q64 = q.detach().double()
    assert ct.attention(q64, q64, q64, return_lse=True)[1].dtype == torch.float64


def test_alibi_slopes_gradient_refused():
    q, k, v, _ = inputs(torch.float32)
    slopes = torch.ones(4, requires_grad=True)
    out = ct.attention(q, k, v, alibi_slopes=slopes)
    with pytest.raises(cpuattn.CpuAttnError, match="alibi_slopes"):
        out.sum().backward()


def test_crossing_is_zero_copy(monkeypatch):
    """The op hands the kernels numpy views of the tensors' own memory, and
    returns tensors over the kernels' output arrays."""
    from cpuattn import dense
    seen = {}
    real = dense.attention

    def spy(q, k, v, **kw):
        seen["q"], seen["k"] = q, k
        seen["res"] = real(q, k, v, **kw)
        return seen["res"]
    monkeypatch.setattr(dense, "attention", spy)
    q, k, v, _ = (t.detach() for t in inputs(torch.bfloat16))
    out = ct.attention(q, k, v)
    assert seen["q"].ctypes.data == q.data_ptr() and seen["k"].ctypes.data == k.data_ptr()
    assert out.data_ptr() == seen["res"][0].ctypes.data


@pytest.mark.parametrize("call, error, match", [
    (lambda q, k, v: ct.attention(q.numpy(), k, v), cpuattn.DTypeError, "q: expected a torch"),
    (lambda q, k, v: ct.attention(q.int(), k, v), cpuattn.DTypeError, "q: expected dtype"),
    (lambda q, k, v: ct.attention(q.double(), k, v), cpuattn.DTypeError, "dtype"),
    (lambda q, k, v: ct.attention(q[..., :3, :], k, v), cpuattn.ShapeError, "num_heads"),
    (lambda q, k, v: ct.attention(q[0], k, v), cpuattn.ShapeError, "q"),
    (lambda q, k, v: ct.attention(q, k, v, window=(1,)), cpuattn.ShapeError, "window"),
    (lambda q, k, v: ct.attention(q, k, v, causal="yes"), cpuattn.ShapeError, "causal"),
    (lambda q, k, v: ct.attention(q, k, v, softcap=-1.0), cpuattn.ShapeError, "softcap"),
    (lambda q, k, v: ct.attention(q, k, v, sinks=torch.zeros(3)), cpuattn.ShapeError, "sinks"),
    (lambda q, k, v: ct.attention(q, k, v, sinks=torch.zeros(4, dtype=torch.int32)),
     cpuattn.DTypeError, "sinks"),
])
def test_bad_input(call, error, match):
    q, k, v, _ = (t.detach() for t in inputs(torch.float32))
    with pytest.raises(error, match=match):
        call(q, k, v)


# ---- paged ----

def paged_case(rng, dtype=np.float32, seq_lens=(5, 0, 23), h=4, hkv=2, d=16, page_size=8):
    seq_lens = np.array(seq_lens, np.int32)
    k_pages, v_pages, table, _ = make_pages(rng, seq_lens, page_size, hkv, d, dtype)
    cu = np.array([0, 2, 2, 5], np.int32)
    q = rng.standard_normal((int(cu[-1]), h, d)).astype(np.float32)
    return q, k_pages, v_pages, table, seq_lens, cu


def test_paged_compiled_equals_numpy_and_reference():
    torch._dynamo.reset()
    rng = np.random.default_rng(3)
    q, kp, vp, table, lens, cu = paged_case(rng)
    sinks = rng.standard_normal(4).astype(np.float32)

    def fn(q, kp, vp, table, lens, cu, sinks):
        return ct.paged_attention(q, kp, vp, table, lens, cu_seqlens_q=cu, sinks=sinks,
                                  window=(6, 0), return_lse=True)

    want = cpuattn.paged_attention(q, kp, vp, table, lens, cu_seqlens_q=cu, sinks=sinks,
                                   window=(6, 0), return_lse=True)
    t = [torch.from_numpy(a) for a in (q, kp, vp, table, lens, cu, sinks)]
    for f in (fn, torch.compile(fn, fullgraph=True, backend="aot_eager")):
        out, lse = f(*t)
        np.testing.assert_array_equal(out.numpy(), want[0])
        np.testing.assert_array_equal(lse.numpy(), want[1])
    ref, _ = ref_paged(q.astype(np.float64), kp, vp, table, lens, cu, sinks=sinks, window=(6, 0))
    np.testing.assert_allclose(want[0], ref, **tol("float32"))


def test_paged_low_bit_pages_and_opcheck():
    """int8 pages with their scale array and fp8 pages with one float scale
    cross as views; opcheck on the paged op (decode form)."""
    rng = np.random.default_rng(4)
    q, kp, vp, table, lens, cu = paged_case(rng)
    q = q[:3]
    for kind, tdt in (("int8", torch.int8), ("float8_e4m3fn", torch.float8_e4m3fn)):
        kc, ks = cpuattn.quantize_kv(kp, kind)
        vc, vs = cpuattn.quantize_kv(vp, kind)
        if kind == "int8":
            kt, vt = torch.from_numpy(kc), torch.from_numpy(vc)
            scales = dict(k_scale=ks, v_scale=vs)
            tscales = dict(k_scale=torch.from_numpy(ks), v_scale=torch.from_numpy(vs))
        else:
            kt, vt = (torch.from_numpy(c.view(np.uint8)).view(tdt) for c in (kc, vc))
            scales = tscales = dict(k_scale=0.5, v_scale=2.0)
        want = cpuattn.paged_attention(q, kc, vc, table, lens, **scales)
        got = ct.paged_attention(torch.from_numpy(q), kt, vt, torch.from_numpy(table),
                                 torch.from_numpy(lens), **tscales)
        np.testing.assert_array_equal(got.numpy(), want)
    # the float scale (a 0-d tensor inside the op) traces too
    torch._dynamo.reset()
    f = torch.compile(lambda q, k, v, t, n: ct.paged_attention(q, k, v, t, n, **tscales),
                      fullgraph=True, backend="aot_eager")
    got = f(torch.from_numpy(q), kt, vt, torch.from_numpy(table), torch.from_numpy(lens))
    np.testing.assert_array_equal(got.numpy(), want)
    args = [torch.from_numpy(a) for a in (q, kp, vp, table, lens)]
    torch.library.opcheck(torch.ops.cpuattn.paged_attention.default,
                          (*args, None, None, None, None, None, None, True, None, -1, -1, 0.0))


def test_paged_bad_input():
    rng = np.random.default_rng(5)
    q, kp, vp, table, lens, cu = paged_case(rng)
    t = [torch.from_numpy(a) for a in (q[:3], kp, vp, table, lens)]
    bad = t[3].clone()
    bad[2, 0] = 99
    with pytest.raises(cpuattn.PageError, match="block_table"):
        ct.paged_attention(*t[:3], bad, t[4])
    with pytest.raises(cpuattn.ShapeError, match="k_scale"):
        ct.paged_attention(*t, k_scale=torch.ones(kp.shape[:3]))
    with pytest.raises(cpuattn.DTypeError, match="k_scale"):
        ct.paged_attention(*t, k_scale="1")
    with pytest.raises(cpuattn.DTypeError, match="block_table"):
        ct.paged_attention(*t[:3], t[3].to(torch.bfloat16), t[4])
