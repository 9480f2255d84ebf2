"""transformers backend: attn_implementation="cpuattn" against "eager"."""
import copy

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import cpuattn  # noqa: E402
import cpuattn.integrations.hf as cpuattn_hf  # noqa: E402
from cpuattn import CpuAttnError, ShapeError  # noqa: E402
from cpuattn.dense import _attention_ranges  # noqa: E402
from conftest import tol  # noqa: E402

VOCAB = 128


def twin_models(cfg, ref="eager"):
    """The same random model (from cfg) twice: `ref` ("eager" or "sdpa") and cpuattn."""
    cpuattn_hf.register()
    torch.manual_seed(0)
    # each model needs its own config: from_config writes _attn_implementation into it
    eager = transformers.AutoModelForCausalLM.from_config(
        copy.deepcopy(cfg), attn_implementation=ref).eval()
    ours = transformers.AutoModelForCausalLM.from_config(
        copy.deepcopy(cfg), attn_implementation="cpuattn").eval()
    ours.load_state_dict(eager.state_dict())
    return eager, ours


def make_models(num_kv_heads=2, ref="eager"):
    """The same tiny random Llama twice: `ref` and cpuattn."""
    eager, ours = twin_models(transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=num_kv_heads, vocab_size=VOCAB, max_position_embeddings=128,
        pad_token_id=0, torch_dtype=torch.float32), ref)
    assert ours.config._attn_implementation == "cpuattn"
    assert eager.config._attn_implementation == ref
    return eager, ours


@pytest.fixture(scope="module")
def models():
    return make_models()


def left_padded(lengths, width, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (len(lengths), width), generator=g)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        mask[b, width - n:] = 1
    return ids.masked_fill(mask == 0, 0), mask


def test_register_installs_mask_function():
    from transformers import AttentionInterface, AttentionMaskInterface
    assert cpuattn_hf.register() == "cpuattn"
    assert AttentionInterface._global_mapping["cpuattn"] is cpuattn_hf.attention_forward
    # without a mask function transformers passes no mask at all (transformers#45811)
    assert "cpuattn" in AttentionMaskInterface._global_mapping


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_single_sequence_logits(num_kv_heads):
    eager, ours = make_models(num_kv_heads)
    ids = torch.randint(0, VOCAB, (1, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, eager(ids).logits, rtol=1e-4, atol=1e-4)


def assert_same_logits(models, ids, mask):
    """Both models agree on the logits of every non-padding position."""
    eager, ours = models
    with torch.no_grad():
        a = eager(ids, attention_mask=mask).logits
        b = ours(ids, attention_mask=mask).logits
    keep = mask.bool()
    torch.testing.assert_close(b[keep], a[keep], rtol=1e-4, atol=1e-4)


def assert_same_generation(eager, ours, ids, mask, new_tokens):
    """The same logits (prefill and every decode step) and the same greedy
    tokens, padded batch."""
    assert_same_logits((eager, ours), ids, mask)
    kw = dict(attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
              do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        want, got = eager.generate(ids, **kw), ours.generate(ids, **kw)
    torch.testing.assert_close(got.sequences, want.sequences, rtol=0, atol=0)
    assert len(got.logits) == len(want.logits) == new_tokens
    for a, b in zip(got.logits, want.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_left_padded_batch_logits(models):
    assert_same_logits(models, *left_padded([11, 4, 8], 11))


def test_right_padded_batch_logits(models):
    ids, mask = left_padded([9, 3], 9, seed=2)
    assert_same_logits(models, ids.flip(1), mask.flip(1))


@pytest.mark.parametrize("ref", ["eager", "sdpa"])
@pytest.mark.parametrize("num_kv_heads", [4, 2], ids=["mha", "gqa"])
def test_greedy_generate_identical(num_kv_heads, ref):
    """Left-padded batched decode: the same logits at every step and the
    same greedy tokens as "eager" and "sdpa"."""
    eager, ours = make_models(num_kv_heads, ref)
    assert_same_generation(eager, ours, *left_padded([7, 3, 5, 1], 7, seed=3), 12)
    with torch.no_grad():                               # no padding: the mask-free path
        one = left_padded([7], 7, seed=3)[0]
        torch.testing.assert_close(ours.generate(one, max_new_tokens=8, do_sample=False),
                                   eager.generate(one, max_new_tokens=8, do_sample=False),
                                   rtol=0, atol=0)


def test_causal(models):
    _, ours = models
    ids = torch.randint(1, VOCAB, (1, 12), generator=torch.Generator().manual_seed(4))
    changed = ids.clone()
    changed[0, 8:] = (changed[0, 8:] + 7) % VOCAB
    with torch.no_grad():
        a, b = ours(ids).logits, ours(changed).logits
    torch.testing.assert_close(a[:, :8], b[:, :8], rtol=0, atol=0)
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_unsupported_masks_raise():
    q = torch.randn(2, 4, 5, 8)
    k = v = torch.randn(2, 2, 5, 8)
    module = torch.nn.Module()
    mask = torch.rand(2, 1, 5, 5) > 0.5                 # arbitrary pattern
    mask[:, :, :, 0] = True
    with pytest.raises(ShapeError, match="not of that form"):
        cpuattn_hf.attention_forward(module, q, k, v, mask)
    with pytest.raises(ShapeError, match="bias"):
        cpuattn_hf.attention_forward(module, q, k, v, torch.randn(2, 1, 5, 5))
    with pytest.raises(CpuAttnError, match="dropout"):
        cpuattn_hf.attention_forward(module, q, k, v, None, dropout=0.1)


def test_masks_match_sdpa_semantics():
    """Direct calls: bool and additive masks, padding and windows vs torch SDPA."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 4, 6, 8, generator=g)
    k, v = torch.randn(2, 2, 9, 8, generator=g), torch.randn(2, 2, 9, 8, generator=g)
    i, j = torch.arange(6)[:, None] + 3, torch.arange(9)
    causal = j <= i
    pad = torch.tensor([[0] * 2 + [1] * 7, [1] * 9]).bool()
    window = j > i - 4
    for m, sw in ((causal & pad[:, None, None], None), (causal & window, 4)):
        m = m.expand(2, 1, 6, 9)
        want = torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=m)
        for mask in (m, torch.zeros(m.shape).masked_fill(~m, torch.finfo(torch.float32).min)):
            got, w = cpuattn_hf.attention_forward(torch.nn.Module(), q, k, v, mask,
                                                  sliding_window=sw)
            assert w is None and got.shape == (2, 6, 4, 8)
            torch.testing.assert_close(got, want.transpose(1, 2), rtol=1e-5, atol=1e-5)


def per_row(q, k, v, mask, sliding_window=None, **opts):
    """The per-row path the one-call path replaced: one public cpuattn call per
    batch row (and per part of it) on slices, from the mask's (s, e, c)."""
    left = None if sliding_window is None else sliding_window - 1
    qn, kn, vn = (x.numpy().transpose(0, 2, 1, 3) for x in (q, k, v))
    b, q_len = qn.shape[:2]
    allowed = cpuattn_hf._bool_mask(mask, b, q_len, kn.shape[1])
    out = np.zeros(qn.shape[:3] + (vn.shape[-1],), qn.dtype)
    win = (-1 if left is None else left, -1)
    for i, (s, e, c) in enumerate(zip(*cpuattn_hf._mask_plan(allowed, left))):
        if e <= s:
            continue
        f0 = min(max(e - c, 0), q_len)
        r0 = min(max(s - c, 0), f0)
        if r0 < f0:
            out[i, r0:f0] = cpuattn.attention(qn[i:i + 1, r0:f0], kn[i:i + 1, s:f0 + c],
                                              vn[i:i + 1, s:f0 + c], causal=True,
                                              window=win, **opts)[0]
        if f0 < q_len:
            if left is not None:
                raise ShapeError("the per-row path refused whole-range rows under a window")
            out[i, f0:] = cpuattn.attention(qn[i:i + 1, f0:], kn[i:i + 1, s:e],
                                            vn[i:i + 1, s:e], causal=False, **opts)[0]
    return torch.from_numpy(out)


def mask_forms():
    """(name, q_len, kv_len, bool mask (B, 1, q_len, kv_len), sliding_window,
    engine calls) for the mask forms transformers builds."""
    def build(q_len, kv_len, starts, ends, causal=True, window=None):
        i = torch.arange(q_len)[:, None] + (kv_len - q_len)
        j = torch.arange(kv_len)
        m = torch.stack([(j >= s) & (j < e) & ((j <= i) if causal else (i >= 0))
                         for s, e in zip(starts, ends)])
        if window is not None:
            m &= j > i - window
        return m[:, None]
    return [
        ("left-padded prefill", 9, 9, build(9, 9, [0, 4, 8, 9], [9] * 4), None, 1),
        ("left-padded decode", 1, 12, build(1, 12, [0, 5, 11, 3], [12] * 4), None, 1),
        ("left-padded chunk over a cache", 4, 12, build(4, 12, [0, 5, 10], [12] * 3), None, 1),
        ("right-padded prefill", 8, 8, build(8, 8, [0, 0, 0], [8, 5, 1]), None, 2),
        ("bidirectional padded", 6, 6, build(6, 6, [0, 2, 0], [6, 6, 3], causal=False), None, 1),
        ("sliding prefill, left-padded", 10, 10, build(10, 10, [0, 3], [10] * 2, window=4),
         4, 1),
        ("sliding decode, left-padded", 1, 15, build(1, 15, [0, 6, 13], [15] * 3, window=4),
         4, 1),
        ("sliding, one right-padded row", 6, 6, build(6, 6, [0, 0], [6, 5], window=3), 3, 2),
        ("a row that sees nothing", 5, 5, build(5, 5, [0, 5], [5, 5]), None, 1),
    ]


@pytest.mark.parametrize("form", mask_forms(), ids=lambda f: f[0])
def test_one_call_matches_per_row_and_sdpa(form, monkeypatch):
    """Every mask form: the engine calls per layer (one, two for rows that see
    a whole padded range), the per-row path (bitwise where both run the same
    sequences), and torch SDPA in float64."""
    _, q_len, kv_len, mask, window, n_calls = form
    b = mask.shape[0]
    g = torch.Generator().manual_seed(21)
    q = torch.randn(b, q_len, 6, 16, generator=g).transpose(1, 2)    # as a projection's view
    k, v = (torch.randn(b, 2, kv_len, 16, generator=g) for _ in range(2))
    calls = []
    real = cpuattn_hf._attention_ranges
    monkeypatch.setattr(cpuattn_hf, "_attention_ranges",
                        lambda *a, **kw: calls.append(kw["causal"]) or real(*a, **kw))
    for m in (mask, torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)):
        calls.clear()
        got, _ = cpuattn_hf.attention_forward(torch.nn.Module(), q, k, v, m,
                                              sliding_window=window)
        assert len(calls) == n_calls
        if window is None or n_calls == 1:
            want = per_row(q, k, v, mask, window)
            if n_calls == 1 and calls[0]:
                torch.testing.assert_close(got, want, rtol=0, atol=0)
            else:   # a joined row runs in a longer sequence (tiled, not decode kernel)
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        else:       # the per-row path refused a whole-range row under a window
            with pytest.raises(ShapeError):
                per_row(q, k, v, mask, window)
        ref = torch.nn.functional.scaled_dot_product_attention(
            q.double(), k.double().repeat_interleave(3, 1), v.double().repeat_interleave(3, 1),
            attn_mask=mask).transpose(1, 2)
        seen = mask.any(-1)[:, 0]                                     # (B, q_len)
        torch.testing.assert_close(got[seen].double(), ref[seen], rtol=1e-5, atol=1e-5)
        assert not got[~seen].any()                                   # rows that see no key: 0


@given(st.data())
def test_masks_of_the_supported_form_fuzz(data):
    """Random rows "query i sees s <= j < e, j <= i + c (, j >= i + c - left)":
    equal to float64 SDPA, or ShapeError only for several whole-range rows
    under a window; at most two engine calls."""
    b, q_len = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 12))
    kv_len = q_len + data.draw(st.integers(0, 10))
    window = data.draw(st.none() | st.integers(1, 8))
    i, j = torch.arange(q_len)[:, None], torch.arange(kv_len)
    rows = []
    for _ in range(b):
        s = data.draw(st.integers(0, kv_len))
        e = data.draw(st.integers(s, kv_len))
        c = data.draw(st.integers(-2, kv_len + 2))
        m = (j >= s) & (j < e) & (j <= i + c)
        if window is not None:
            m &= j > i + c - window
        rows.append(m)
    mask = torch.stack(rows)[:, None]
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    q = torch.randn(b, 4, q_len, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(b, 2, kv_len, 8, generator=g, dtype=torch.float64) for _ in range(2))
    try:
        got, _ = cpuattn_hf.attention_forward(torch.nn.Module(), q, k, v, mask,
                                              sliding_window=window)
    except ShapeError as err:
        assert window is not None and "whole padded range" in str(err)
        return
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=mask).transpose(1, 2)
    seen = mask.any(-1)[:, 0]
    torch.testing.assert_close(got[seen], ref[seen], rtol=1e-12, atol=1e-12)
    assert not got[~seen].any()
    assert len(cpuattn_hf._plan_of(mask, b, q_len, kv_len, None if window is None
                                   else window - 1).calls) <= 2


def test_one_engine_call_per_layer_in_generate(monkeypatch):
    """A left-padded batch: every layer call of prefill and decode is one engine call."""
    _, ours = make_models()
    layers, calls = [], []
    real_layer, real = cpuattn_hf.attention_forward, cpuattn_hf._attention_ranges
    from transformers import AttentionInterface
    monkeypatch.setitem(AttentionInterface._global_mapping, "cpuattn",
                        lambda *a, **kw: layers.append(1) or real_layer(*a, **kw))
    monkeypatch.setattr(cpuattn_hf, "_attention_ranges",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    ids, mask = left_padded([6, 2, 4], 6, seed=22)
    with torch.no_grad():
        ours.generate(ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5,
                      do_sample=False, pad_token_id=0)
    assert len(layers) == 2 * 5 and len(calls) == len(layers)


def test_plan_and_sinks_caches_follow_changes():
    """The cached mask plan and float64 sinks are rebuilt when their tensor
    changes in place (its version moves)."""
    g = torch.Generator().manual_seed(23)
    q, k, v = torch.randn(2, 4, 3, 8, generator=g), torch.randn(2, 2, 3, 8, generator=g), \
        torch.randn(2, 2, 3, 8, generator=g)
    mask = torch.ones(2, 1, 3, 3, dtype=torch.bool).tril()
    sinks = torch.nn.Parameter(torch.zeros(4), requires_grad=False)
    with torch.no_grad():
        a, _ = cpuattn_hf.attention_forward(torch.nn.Module(), q, k, v, mask, s_aux=sinks)
        mask[1, :, :, 0] = False
        sinks.fill_(3.0)
        b, _ = cpuattn_hf.attention_forward(torch.nn.Module(), q, k, v, mask, s_aux=sinks)
    torch.testing.assert_close(b, per_row(q, k, v, mask, sinks=np.full(4, 3.0)),
                               rtol=0, atol=0)
    assert not torch.equal(a, b)


def test_output_attentions_warns_as_sdpa():
    """output_attentions=True: a warning (once, through transformers' logger,
    as "sdpa" gives) and no weights, never silence; the logits are unchanged."""
    import logging
    sdpa, ours = make_models(ref="sdpa")
    ids = torch.randint(1, VOCAB, (2, 5), generator=torch.Generator().manual_seed(24))
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        cpuattn_hf._logger.warning_once.cache_clear()     # warn_once: forget earlier tests
        with torch.no_grad():
            want = sdpa(ids, output_attentions=True)
            got = ours(ids, output_attentions=True)
            ours(ids, output_attentions=True)
    finally:
        logger.removeHandler(handler)
    ours_msgs = [r.getMessage() for r in records if "`cpuattn`" in r.getMessage()]
    assert len(ours_msgs) == 1 and "output_attentions=True" in ours_msgs[0]
    assert any("`sdpa`" in r.getMessage() for r in records)
    assert got.attentions == want.attentions                      # no weights from either
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-4)


def test_backward_raises_instead_of_silent_zero_grad():
    q = torch.randn(1, 2, 3, 4, requires_grad=True)
    k = v = torch.randn(1, 2, 3, 4)
    out, _ = cpuattn_hf.attention_forward(torch.nn.Module(), q, k, v, None)
    with pytest.raises(CpuAttnError, match="inference-only"):
        out.sum().backward()


@pytest.mark.parametrize("dtype,tol", [("float16", 2e-3), ("bfloat16", 1e-2), ("float64", 1e-6)])
def test_half_and_double_tensors(dtype, tol):
    if dtype == "bfloat16":
        pytest.importorskip("ml_dtypes")
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(6)
    q = torch.randn(2, 4, 5, 8, generator=g).to(dt)
    k, v = (torch.randn(2, 2, 7, 8, generator=g).to(dt) for _ in range(2))
    m = torch.ones(2, 1, 5, 7, dtype=torch.bool).tril(2)
    m[1, :, :, :2] = False                              # left padding on row 1
    got, _ = cpuattn_hf.attention_forward(torch.nn.Module(), q, k, v, m)
    want = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double().repeat_interleave(2, 1), v.double().repeat_interleave(2, 1),
        attn_mask=m).transpose(1, 2)
    assert got.dtype == dt
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


def test_sliding_window_model():
    """Mistral-style sliding window (mask and window kwarg), left-padded."""
    eager, ours = twin_models(transformers.MistralConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, sliding_window=4, pad_token_id=0))
    assert_same_generation(eager, ours, *left_padded([12, 7], 12, seed=7), 8)


def test_gpt_oss_sinks_honoured():
    """gpt-oss passes its attention sinks as ``s_aux`` (and has sliding and
    full layers): the logits and greedy tokens equal eager's."""
    cfg = transformers.GptOssConfig(
        hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
        vocab_size=VOCAB, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
        pad_token_id=0)
    eager, ours = twin_models(cfg)
    with torch.no_grad():
        for layer in list(eager.model.layers) + list(ours.model.layers):
            layer.self_attn.sinks.normal_(0, 2, generator=torch.Generator().manual_seed(3))
    assert_same_generation(eager, ours, *left_padded([12, 7], 12, seed=8), 6)


def test_sinks_keyword_equals_the_kernel():
    g = torch.Generator().manual_seed(9)
    q, k, v = torch.randn(1, 4, 3, 8, generator=g), torch.randn(1, 2, 3, 8, generator=g), \
        torch.randn(1, 2, 3, 8, generator=g)
    s = torch.randn(4, generator=g)
    got, _ = cpuattn_hf.attention_forward(torch.nn.Module(), q, k, v, None, s_aux=s)
    want = cpuattn.attention(q.transpose(1, 2).numpy(), k.transpose(1, 2).numpy(),
                             v.transpose(1, 2).numpy(), causal=True, sinks=s.numpy())
    np.testing.assert_array_equal(got.numpy(), want)


@pytest.mark.parametrize("name", ["position_bias", "indices", "cache", "block_indices",
                                  "some_future_keyword"])
def test_unhonoured_keywords_raise(name):
    q = torch.randn(1, 2, 3, 4)
    k = v = torch.randn(1, 2, 3, 4)
    with pytest.raises(CpuAttnError, match=name):
        cpuattn_hf.attention_forward(torch.nn.Module(), q, k, v, None, **{name: torch.zeros(2)})


def test_no_effect_keywords_accepted():
    q = torch.randn(1, 2, 3, 4)
    k = v = torch.randn(1, 2, 3, 4)
    want, _ = cpuattn_hf.attention_forward(torch.nn.Module(), q, k, v, None)
    got, _ = cpuattn_hf.attention_forward(
        torch.nn.Module(), q, k, v, None, output_attentions=True, use_cache=True,
        position_ids=torch.arange(3)[None], cache_position=torch.arange(3), s_aux=None,
        cu_seq_lens_q=None)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    mask = torch.ones(1, 1, 3, 3, dtype=torch.bool).tril()
    cu = torch.tensor([0, 3])
    got, _ = cpuattn_hf.attention_forward(torch.nn.Module(), q, k, v, mask, cu_seq_lens_q=cu,
                                          cu_seq_lens_k=cu, max_length_q=3, max_length_k=3)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(CpuAttnError, match="cu_seq_lens_q"):     # no mask records the packing
        cpuattn_hf.attention_forward(torch.nn.Module(), q, k, v, None, cu_seq_lens_q=cu)


# --- the one-call engine entry (cpuattn.dense._attention_ranges) -----------------



def hf_layout(rng, b, s, h, d, dtype):
    """(B, S, H, D) numpy view of a (B, H, S, D) array, as transformers hands
    K/V over: the token axis is not the outer one."""
    return rng.standard_normal((b, h, s, d)).astype(dtype).transpose(0, 2, 1, 3)


def random_ranges(rng, b, sq, sk):
    """(4, b) int64 rows q_start, k_start, q_len, k_len inside each row,
    empty ranges included."""
    qs = rng.integers(0, sq + 1, b)
    ql = rng.integers(0, sq - qs + 1)
    ks = rng.integers(0, sk + 1, b)
    kl = rng.integers(0, sk - ks + 1)
    return np.stack([qs, ks, ql, kl]).astype(np.int64)


def ranges_reference(q, k, v, seqs, fill, **opts):
    """Each batch row's ranges through the float64 reference; other rows `fill`."""
    out = np.full(q.shape[:3] + (v.shape[-1],), fill, np.float64)
    for b, (qs, ks, ql, kl) in enumerate(seqs.T):
        if ql:
            out[b, qs:qs + ql] = cpuattn.reference_attention(
                q[b:b + 1, qs:qs + ql], k[b:b + 1, ks:ks + kl], v[b:b + 1, ks:ks + kl],
                **opts)[0]
    return out


def run_ranges(q, k, v, seqs, **opts):
    out = np.full(q.shape[:3] + (v.shape[-1],), np.nan, q.dtype)
    assert _attention_ranges(q, k, v, seqs, out, **opts) is out
    return out


RANGE_OPTS = [dict(causal=True), dict(causal=False), dict(causal=True, window=(3, -1)),
              dict(causal=True, softcap=5.0, sinks=np.array([0.5, -1.0, 2.0, 0.0])),
              dict(causal=False, window=(2, 1), scale=0.3)]


@pytest.mark.parametrize("opts", RANGE_OPTS, ids=range(len(RANGE_OPTS)))
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
def test_ranges_match_reference(opts, dtype):
    rng = np.random.default_rng(11)
    b, sq, sk = 6, 9, 23
    q = hf_layout(rng, b, sq, 4, 16, dtype)
    k, v = hf_layout(rng, b, sk, 2, 16, dtype), hf_layout(rng, b, sk, 2, 16, dtype)
    seqs = random_ranges(rng, b, sq, sk)
    got = run_ranges(q, k, v, seqs, **opts)
    # rows outside the ranges are untouched (NaN as filled)
    np.testing.assert_allclose(got.astype(np.float64),
                               ranges_reference(q, k, v, seqs, np.nan, **opts), **tol(dtype))


@given(st.data())
def test_ranges_fuzz(data):
    b = data.draw(st.integers(1, 5))
    sq, sk = data.draw(st.integers(1, 40)), data.draw(st.integers(0, 70))
    hkv = data.draw(st.sampled_from([1, 2, 3]))
    h = hkv * data.draw(st.sampled_from([1, 2, 4, 9]))
    d = data.draw(st.sampled_from([8, 24, 64]))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    q, k, v = (hf_layout(rng, b, n, hh, d, np.float64) for n, hh in ((sq, h), (sk, hkv), (sk, hkv)))
    seqs = random_ranges(rng, b, sq, sk)
    causal = data.draw(st.booleans())
    left = data.draw(st.integers(-1, 8))
    opts = dict(causal=causal, window=(left, -1))
    np.testing.assert_allclose(run_ranges(q, k, v, seqs, **opts),
                               ranges_reference(q, k, v, seqs, np.nan, **opts), **tol("float64"))


def test_ranges_threads_and_batch_invariance(threads):
    """Bitwise the same for any thread count, and each row equal to the
    same ranges run alone (a batch of one)."""
    rng = np.random.default_rng(12)
    b, sq, sk = 5, 70, 700                  # long enough for split-KV decode items
    q = hf_layout(rng, b, sq, 8, 64, np.float32)
    k, v = hf_layout(rng, b, sk, 2, 64, np.float32), hf_layout(rng, b, sk, 2, 64, np.float32)
    seqs = random_ranges(rng, b, sq, sk)
    seqs[2, 0], seqs[0, 0] = 1, sq - 1      # one decode row
    results = []
    for n in (1, 2, 3):
        threads(n)
        results.append(run_ranges(q, k, v, seqs, causal=True))
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])
    for i in range(b):
        alone = run_ranges(q[i:i + 1], k[i:i + 1], v[i:i + 1],
                           np.ascontiguousarray(seqs[:, i:i + 1]), causal=True)
        np.testing.assert_array_equal(alone[0], results[0][i])


def test_ranges_general_path():
    """Inputs the C checks do not take (a non-contiguous last axis) go
    through the general checks and give the same result; bad ones raise."""
    rng = np.random.default_rng(13)
    q = hf_layout(rng, 2, 3, 2, 8, np.float32)
    k, v = hf_layout(rng, 2, 5, 1, 8, np.float32), hf_layout(rng, 2, 5, 1, 8, np.float32)
    seqs = np.array([[1, 0], [0, 2], [2, 3], [5, 3]], np.int64)
    want = run_ranges(q, k, v, seqs, causal=True)
    k2 = np.asfortranarray(k)               # last axis strided: copied once by the checks
    np.testing.assert_array_equal(run_ranges(q, k2, v, seqs, causal=True), want)
    out = np.zeros((2, 3, 2, 8), np.float32)
    with pytest.raises(cpuattn.DTypeError):
        _attention_ranges(q, k.astype(np.float64), v, seqs, out, causal=True)
    with pytest.raises(ShapeError, match="window"):
        _attention_ranges(q, k, v, seqs, out, causal=True, window=(-2, -1))


@pytest.mark.parametrize("bad,match", [
    (np.array([[0, 0], [0, 0], [4, 1], [1, 1]]), "batch row 0"),       # q past seq_q
    (np.array([[0, 0], [3, 0], [1, 1], [3, 1]]), "batch row 0"),       # k past seq_k
    (np.array([[0, -1], [0, 0], [1, 1], [1, 1]]), "batch row 1"),      # negative start
    (np.zeros((4, 3), np.int64), "int64"),                             # wrong batch
    (np.zeros((4, 2), np.int32), "int64"),                             # wrong dtype
])
def test_ranges_refuse_bad_seqs(bad, match):
    rng = np.random.default_rng(14)
    q = hf_layout(rng, 2, 3, 2, 8, np.float32)
    k = v = hf_layout(rng, 2, 5, 1, 8, np.float32)
    out = np.zeros((2, 3, 2, 8), np.float32)
    with pytest.raises(ShapeError, match=match):
        _attention_ranges(q, k, v, bad, out, causal=True)
    assert not out.any()
