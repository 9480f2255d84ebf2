"""cpuattn.integrations.hf.PagedCache: a transformers Cache over one PagePool.

Random tiny models built with from_config (no downloads). The references
are transformers' DynamicCache with "sdpa" (or "eager" where sdpa lacks a
feature), on the same weights; for low-bit pages, a DynamicCache whose K/V
went through quantize_kv / dequantize_kv first, so the only difference
left is the kernels' arithmetic.
"""
import copy
import math
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import cpuattn  # noqa: E402
from cpuattn import CpuAttnError, DTypeError, PoolFullError, ShapeError  # noqa: E402
from cpuattn.integrations import hf  # noqa: E402
from cpuattn.integrations.hf_paged import PagedKV  # noqa: E402
from test_hf import VOCAB, left_padded as padded, twin_models  # noqa: E402  (prompts, mask, models)

LOW_BIT = ["int8", "int4", "float8_e4m3fn", "float8_e5m2"]
ML_DTYPES = {"bfloat16", "float8_e4m3fn", "float8_e5m2"}
# max |logit difference| against float32 pages on the tiny models (logits of
# about +-0.6), teacher-forced over 11 positions: about 4x the largest seen
# on tiny Llama / Qwen3 (fp16 1e-4, bf16 7e-4, int8 2e-3, e4m3 9e-3, e5m2
# 2.3e-2, int4 3.6e-2)
VS_FLOAT32 = {"float16": 5e-4, "bfloat16": 3e-3, "int8": 8e-3, "float8_e4m3fn": 4e-2,
              "float8_e5m2": 0.1, "int4": 0.15}

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # past_key_values= renamed


def need_dtype(name):
    if name in ML_DTYPES:
        pytest.importorskip("ml_dtypes")


def twins(cfg, reference="sdpa"):
    """The same random model twice: `reference` attention and "cpuattn"."""
    return twin_models(cfg, ref=reference)


def llama_config(num_kv_heads=2, **kw):
    return transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=num_kv_heads, vocab_size=VOCAB, max_position_embeddings=256,
        pad_token_id=0, **kw)


@pytest.fixture(scope="module")
def llama():
    return twins(llama_config())


def generate(model, ids, mask, cache=None, **kw):
    opts = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)
    opts.update(kw)
    if cache is not None:
        opts["past_key_values"] = cache
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, **opts)


def paged(model, kv_dtype="float32", max_tokens=512, **kw):
    return hf.PagedCache(model.config, max_tokens=max_tokens, kv_dtype=kv_dtype, **kw)


def assert_same_tokens(ref, ours, ids, mask, kv_dtype="float32", **kw):
    want = generate(ref, ids, mask, transformers.DynamicCache(config=ref.config), **kw)
    cache = paged(ours, kv_dtype)
    got = generate(ours, ids, mask, cache, **kw)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    return cache


def teacher_forced(model, cache, ids, mask, cont):
    """Last-position logits of a prefill and then one step per token of cont."""
    out = []
    with torch.no_grad():
        out.append(model(ids, attention_mask=mask, past_key_values=cache).logits[:, -1])
        for t in range(cont.shape[1]):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            out.append(model(cont[:, t:t + 1], attention_mask=mask,
                             past_key_values=cache).logits[:, -1])
    return torch.stack(out)


def round_trip(x, dtype):
    """K or V (batch, heads, seq, dim) as the pages store it, back in float32."""
    if dtype in ("float32", "float16", "bfloat16"):
        return x.to(getattr(torch, dtype)).to(x.dtype)
    t = x.detach().transpose(1, 2).float().numpy()          # (..., kv_heads, dim)
    codes, scale = cpuattn.quantize_kv(t, dtype)
    out = torch.from_numpy(cpuattn.dequantize_kv(codes, scale, dtype)).transpose(1, 2)
    return out.to(x.dtype)


class RoundTripCache(transformers.DynamicCache):
    """DynamicCache holding K/V rounded through the page storage; the first
    forward pass (a prompt's prefill) attends over its exact K/V, as
    PagedCache's does."""

    def __init__(self, config, k_dtype, v_dtype):
        super().__init__(config=config)
        self.k_dtype, self.v_dtype = k_dtype, v_dtype

    def update(self, k, v, layer_idx, *args, **kwargs):
        fresh = self.get_seq_length(layer_idx) == 0
        kk, vv = super().update(round_trip(k, self.k_dtype), round_trip(v, self.v_dtype),
                                layer_idx, *args, **kwargs)
        return (k, v) if fresh else (kk, vv)


# ---- float32 pages: DynamicCache's tokens ---------------------------------------------


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_single_sequence_tokens_equal_dynamic_cache(num_kv_heads):
    ref, ours = twins(llama_config(num_kv_heads))
    ids, mask = padded([9], 9, seed=1)
    cache = assert_same_tokens(ref, ours, ids, mask, max_new_tokens=16, min_new_tokens=16)
    assert cache.get_seq_length() == 9 + 16 - 1         # the last token is never fed back
    assert cache.pool.seq_len(cache._seqs[0]) == 24


def test_left_padded_batch_tokens_equal_dynamic_cache(llama):
    ids, mask = padded([11, 4, 8, 1], 11, seed=2)
    cache = assert_same_tokens(*llama, ids, mask)
    # padding is never stored: each row's pool sequence holds its real tokens
    assert [cache.pool.seq_len(s) for s in cache._seqs] == [n + 9 for n in (11, 4, 8, 1)]


def test_no_mask_and_forward_calls_match_dynamic_cache(llama):
    ref, ours = llama
    ids, mask = padded([7, 5], 7, seed=3)
    more = torch.randint(1, VOCAB, (2, 3), generator=torch.Generator().manual_seed(4))
    dyn, cache = transformers.DynamicCache(config=ref.config), paged(ours)
    with torch.no_grad():
        for x, m in [(ids, mask), (more, torch.cat([mask, torch.ones_like(more)], 1))]:
            want = ref(x, attention_mask=m, past_key_values=dyn).logits
            got = ours(x, attention_mask=m, past_key_values=cache).logits
            real = m[:, -x.shape[1]:].bool()
            torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)
        one = ids[:1, 2:]                               # a mask-free single sequence
        a = ref(one, past_key_values=transformers.DynamicCache(config=ref.config)).logits
        b = ours(one, past_key_values=paged(ours)).logits
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_sampling_beam_search_chunked_prefill(llama):
    ref, ours = llama
    ids, mask = padded([8, 5], 8, seed=5)
    torch.manual_seed(1)
    want = generate(ref, ids, mask, do_sample=True)
    torch.manual_seed(1)
    torch.testing.assert_close(generate(ours, ids, mask, paged(ours), do_sample=True), want,
                               rtol=0, atol=0)
    # beam search: reorder_cache forks pool sequences
    cache = assert_same_tokens(ref, ours, ids, mask, num_beams=3, max_new_tokens=6,
                               min_new_tokens=6)
    assert cache.batch_size == 6
    assert_same_tokens(ref, ours, ids, mask, prefill_chunk_size=3, max_new_tokens=5,
                       min_new_tokens=5)


def test_cache_reused_across_generate_calls(llama):
    ref, ours = llama
    ids, mask = padded([6, 4], 6, seed=6)
    dyn, cache = transformers.DynamicCache(config=ref.config), paged(ours)
    a = generate(ref, ids, mask, dyn, max_new_tokens=5, min_new_tokens=5)
    b = generate(ours, ids, mask, cache, max_new_tokens=5, min_new_tokens=5)
    torch.testing.assert_close(b, a, rtol=0, atol=0)
    more = torch.randint(1, VOCAB, (2, 3), generator=torch.Generator().manual_seed(7))
    ids2 = torch.cat([a, more], 1)
    mask2 = torch.cat([mask, torch.ones(2, ids2.shape[1] - mask.shape[1], dtype=mask.dtype)], 1)
    a2 = generate(ref, ids2, mask2, dyn, max_new_tokens=5, min_new_tokens=5)
    b2 = generate(ours, ids2, mask2, cache, max_new_tokens=5, min_new_tokens=5)
    torch.testing.assert_close(b2, a2, rtol=0, atol=0)
    assert cache.get_seq_length() == dyn.get_seq_length() == ids2.shape[1] + 4


def test_sliding_window_model_tokens_equal():
    """Mistral: every layer windowed (4 tokens), prompts longer than the window."""
    ref, ours = twins(transformers.MistralConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, sliding_window=4, pad_token_id=0))
    assert_same_tokens(ref, ours, *padded([12, 7], 12, seed=8))


def test_gpt_oss_sinks_and_sliding_layers_tokens_equal():
    """gpt-oss: sinks (s_aux) and alternating sliding (6) / full layers, vs eager."""
    ref, ours = twins(transformers.GptOssConfig(
        hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
        vocab_size=VOCAB, sliding_window=6, pad_token_id=0), reference="eager")
    with torch.no_grad():
        for layer in ref.model.layers:
            layer.self_attn.sinks.normal_()             # zero sinks would test nothing
    ours.load_state_dict(ref.state_dict())
    cache = assert_same_tokens(ref, ours, *padded([13, 6], 13, seed=9))
    assert cache.is_sliding == [True, False]


def test_gemma2_softcap_and_sliding_tokens_equal():
    ref, ours = twins(transformers.Gemma2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, sliding_window=5,
        pad_token_id=0), reference="eager")
    assert_same_tokens(ref, ours, *padded([10, 3], 10, seed=10))


def test_middle_padding_is_compacted(llama):
    """A hole in the mask (not a window layer): the hole is not stored and
    the other tokens' logits equal DynamicCache's."""
    ref, ours = llama
    ids, mask = padded([10, 10], 10, seed=11)
    mask[1, 3:6] = 0
    cache = paged(ours)
    with torch.no_grad():
        want = ref(ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask, past_key_values=cache).logits
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=1e-5, atol=1e-5)
    assert [cache.pool.seq_len(s) for s in cache._seqs] == [10, 7]


# ---- low-bit pages ---------------------------------------------------------------------


@pytest.mark.parametrize("k_dtype,v_dtype", [(d, d) for d in LOW_BIT + ["float16", "bfloat16"]]
                         + [("int8", "float16"), ("int4", "int8"), ("float16", "int4")])
def test_low_bit_pages_only_storage_error(llama, k_dtype, v_dtype):
    """Logits equal a DynamicCache whose K/V went through the same storage
    (quantize_kv bytes) to float32 accuracy, and stay within the stated
    bound of float32 pages."""
    need_dtype(k_dtype)
    need_dtype(v_dtype)
    ref, ours = llama
    ids, mask = padded([12, 5], 12, seed=12)
    cont = torch.randint(1, VOCAB, (2, 10), generator=torch.Generator().manual_seed(13))
    cache = hf.PagedCache(ours.config, max_tokens=64, kv_dtype="float32", k_dtype=k_dtype,
                          v_dtype=v_dtype)
    got = teacher_forced(ours, cache, ids, mask, cont)
    assert (cache.pool.k_dtype, cache.pool.v_dtype) == (k_dtype, v_dtype)
    want = teacher_forced(ref, RoundTripCache(ref.config, k_dtype, v_dtype), ids, mask, cont)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    base = teacher_forced(ours, paged(ours), ids, mask, cont)
    bound = max(VS_FLOAT32[k_dtype], VS_FLOAT32[v_dtype])
    assert (got - base).abs().max().item() <= bound


def test_bfloat16_model_over_int8_pages():
    pytest.importorskip("ml_dtypes")
    ref, ours = twins(llama_config(torch_dtype=torch.bfloat16))
    ref, ours = ref.to(torch.bfloat16), ours.to(torch.bfloat16)
    ids, mask = padded([9, 6], 9, seed=14)
    cont = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(15))
    got = teacher_forced(ours, paged(ours, "int8"), ids, mask, cont)
    want = teacher_forced(ref, RoundTripCache(ref.config, "int8", "int8"), ids, mask, cont)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=0.02, atol=0.02)


def test_thread_count_does_not_change_logits(llama):
    _, ours = llama
    ids, mask = padded([12, 9], 12, seed=16)
    cont = torch.randint(1, VOCAB, (2, 4), generator=torch.Generator().manual_seed(17))
    n = cpuattn.get_num_threads()
    try:
        runs = []
        for threads in (1, 2):
            cpuattn.set_num_threads(threads)
            runs.append(teacher_forced(ours, paged(ours, "int8"), ids, mask, cont))
    finally:
        cpuattn.set_num_threads(n)
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)


# ---- memory accounting -----------------------------------------------------------------


def page_bytes(dtype, P, H, D, L):
    """Bytes of one page of one of K/V over all layers, scales included."""
    if dtype == "int4":
        return L * P * H * (D // 2 + 2 * math.ceil(D / 32))
    if dtype in ("int8", "float8_e4m3fn", "float8_e5m2"):
        return L * P * H * (D + 4)
    return L * P * H * D * np.dtype(dtype).itemsize if dtype != "bfloat16" else L * P * H * D * 2


@pytest.mark.parametrize("k_dtype,v_dtype", [("float32", "float32"), ("int8", "int8"),
                                             ("int4", "int4"), ("int8", "bfloat16"),
                                             ("float8_e4m3fn", "float16")])
def test_nbytes_exact(llama, k_dtype, v_dtype):
    need_dtype(k_dtype)
    need_dtype(v_dtype)
    _, ours = llama
    cache = hf.PagedCache(ours.config, max_tokens=200, k_dtype=k_dtype, v_dtype=v_dtype,
                          page_size=8, batch_size=3)
    assert cache.nbytes == 0 and cache.pool.num_pages == 25 + 2
    ids, mask = padded([13, 4, 9], 13, seed=18)
    generate(ours, ids, mask, cache, max_new_tokens=5, min_new_tokens=5)
    lengths = [n + 4 for n in (13, 4, 9)]
    assert [cache.pool.seq_len(s) for s in cache._seqs] == lengths
    per_page = sum(page_bytes(d, 8, 2, 16, 2) for d in (k_dtype, v_dtype))
    assert cache.nbytes == sum(-(-n // 8) for n in lengths) * per_page
    assert cache.pool.nbytes == cache.pool.num_pages * per_page
    cache.reorder_cache(torch.tensor([0, 0, 2]))        # row 1 dropped, row 0 shared
    assert cache.nbytes == (-(-lengths[0] // 8) + -(-lengths[2] // 8)) * per_page


# ---- errors and their rollback ---------------------------------------------------------


def snapshot(cache):
    return (cache.get_seq_length(), cache.nbytes, cache.pool.num_free_pages,
            [cache.pool.seq_len(s) for s in cache._seqs], cache._real.clone())


def test_pool_full_leaves_cache_unchanged(llama):
    ref, ours = llama
    ids, mask = padded([10, 7], 10, seed=19)
    cache = paged(ours, "int8", max_tokens=24, page_size=4)     # 7 pages
    with torch.no_grad():
        ours(ids, attention_mask=mask, past_key_values=cache)  # 3 + 2 pages
        before = snapshot(cache)
        more = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(20))
        m2 = torch.cat([mask, torch.ones_like(more)], 1)
        with pytest.raises(PoolFullError, match="max_tokens"):
            ours(more, attention_mask=m2, past_key_values=cache)
        after = snapshot(cache)
        assert after[:4] == before[:4] and torch.equal(after[4], before[4])
        # the cache still decodes as if the failed call never happened
        ok = ours(more[:, :1], attention_mask=m2[:, :11], past_key_values=cache).logits
        dyn = RoundTripCache(ref.config, "int8", "int8")
        ref(ids, attention_mask=mask, past_key_values=dyn)
        want = ref(more[:, :1], attention_mask=m2[:, :11], past_key_values=dyn).logits
    torch.testing.assert_close(ok, want, rtol=1e-5, atol=1e-5)


def test_forked_tail_page_copies_are_counted(llama):
    """Beams share a partial last page, which each growing beam but the last
    copies: those copies count, so a pool one page short fails up front with
    nothing changed, and one with enough pages decodes."""
    _, ours = llama
    ids, mask = padded([5], 5, seed=21)
    cache = paged(ours, "float32", max_tokens=16, page_size=8)  # 2 pages, 1 used
    nxt = torch.ones((3, 1), dtype=ids.dtype)
    m2 = torch.ones((3, 6), dtype=mask.dtype)
    with torch.no_grad():
        ours(ids, attention_mask=mask, past_key_values=cache)
        cache.batch_repeat_interleave(3)            # three rows share page 0: 2 copies
        before = snapshot(cache)
        with pytest.raises(PoolFullError, match="2 are needed"):
            ours(nxt, attention_mask=m2, past_key_values=cache)
        after = snapshot(cache)
        assert after[:4] == before[:4] and torch.equal(after[4], before[4])
        cache.pool._check_invariants()
        cache.batch_select_indices(torch.tensor([0, 2]))   # two rows: 1 copy fits
        ours(nxt[:2], attention_mask=m2[:2], past_key_values=cache)
    assert cache.pool.num_free_pages == 0 and cache.get_seq_length() == 6


def test_attention_implementations_that_cannot_read_the_pool(llama):
    ref, _ = llama
    ids, mask = padded([6], 6)
    for impl in ("sdpa", "eager"):
        ref.set_attn_implementation(impl)
        cache = paged(ref)
        with pytest.raises(CpuAttnError, match=f"attn_implementation.*{impl}"):
            generate(ref, ids, mask, cache)
        assert cache.get_seq_length() == 0 and cache.nbytes == 0
    ref.set_attn_implementation("sdpa")


def test_kv_touched_outside_cpuattn_raises(llama):
    _, ours = llama
    cache = paged(ours)
    k = torch.zeros(1, 2, 3, 16)
    kk, vv = cache.update(k, k, 0)
    assert isinstance(kk, PagedKV) and repr(kk) == "PagedKV(layer=0)"
    for use in (lambda: kk.shape, lambda: kk.transpose(1, 2),
                lambda: torch.nn.functional.scaled_dot_product_attention(k, kk, vv)):
        with pytest.raises(CpuAttnError, match="only the 'cpuattn' attention function"):
            use()
    with pytest.raises(CpuAttnError, match="out of order"):
        cache.update(k, k, 1)                               # layer 0 never attended
    with pytest.raises(CpuAttnError, match="out of order"):
        paged(ours).update(k, k, 1)
    assert cache.get_seq_length() == 0


def test_models_it_cannot_serve(llama):
    _, ours = llama
    ids, mask = padded([6], 6)
    cfg = copy.deepcopy(ours.config)
    cfg.layer_types = ["full_attention", "linear_attention"]
    cache = hf.PagedCache(cfg, max_tokens=64, kv_dtype="float32")   # built: raises on use
    with pytest.raises(CpuAttnError, match="linear_attention"):
        generate(ours, ids, mask, cache)
    cfg = copy.deepcopy(ours.config)
    cfg.head_dim = 8                                    # K/V will not match the pool
    with pytest.raises(CpuAttnError, match="key_states"):
        generate(ours, ids, mask, hf.PagedCache(cfg, max_tokens=64, kv_dtype="float32"))


def test_mask_it_cannot_express_raises_and_rolls_back(llama):
    _, ours = llama
    ids, mask = padded([6, 6], 6, seed=22)
    cache = paged(ours)
    full = torch.ones(2, 1, 6, 6, dtype=torch.bool)         # bidirectional
    with torch.no_grad():
        with pytest.raises(ShapeError, match="not of that form"):
            ours(ids, attention_mask=full, past_key_values=cache)
        assert cache.get_seq_length() == 0 and cache.nbytes == 0 and cache.batch_size == -1
        ours(ids, attention_mask=mask, past_key_values=cache)
        with pytest.raises(ShapeError, match="padding tokens"):   # no mask over padding
            ids2, mask2 = padded([6, 3], 6, seed=23)
            c2 = paged(ours)
            ours(ids2, attention_mask=mask2, past_key_values=c2)
            ours(ids2[:, :1], past_key_values=c2)
        assert c2.get_seq_length() == 6


def test_backward_raises(llama):
    _, ours = llama
    ids, mask = padded([5], 5)
    out = ours(ids, attention_mask=mask, past_key_values=paged(ours)).logits
    with pytest.raises(CpuAttnError, match="inference-only"):
        out.sum().backward()


def test_constructor_arguments():
    cfg = llama_config()
    for kw, err, name in [(dict(max_tokens=0), ShapeError, "max_tokens"),
                          (dict(max_tokens=8, page_size=0), ShapeError, "page_size"),
                          (dict(max_tokens=8, batch_size=0), ShapeError, "batch_size"),
                          (dict(max_tokens=8, kv_dtype="int3"), DTypeError, "int3"),
                          (dict(max_tokens=8, v_dtype="uint8"), DTypeError, "uint8")]:
        with pytest.raises(err, match=name):
            hf.PagedCache(cfg, **kw)
    odd = copy.deepcopy(cfg)
    odd.head_dim = 9
    with pytest.raises(ShapeError, match="head_dim"):
        hf.PagedCache(odd, max_tokens=8, kv_dtype="int4")
    cache = hf.PagedCache(cfg, max_tokens=8, kv_dtype=torch.float16)
    assert (cache.k_dtype, cache.v_dtype, cache.pool) == ("float16", "float16", None)


def test_batch_size_fixes_the_pool(llama):
    _, ours = llama
    cache = paged(ours, max_tokens=32, batch_size=2)
    assert cache.pool.num_pages == 2 + 1 and cache.batch_size == 2
    with pytest.raises(ShapeError, match="batch_size"):
        generate(ours, *padded([4, 4, 4], 4), cache)
    generate(ours, *padded([4, 4], 4), cache, max_new_tokens=3, min_new_tokens=3)


def test_crop_reset_select(llama):
    ref, ours = llama
    ids, mask = padded([8, 5], 8, seed=24)
    cache = paged(ours)
    with torch.no_grad():
        ours(ids, attention_mask=mask, past_key_values=cache)
        cache.crop(-3)
        assert cache.get_seq_length() == 5
        assert [cache.pool.seq_len(s) for s in cache._seqs] == [5, 2]
        dyn = transformers.DynamicCache(config=ref.config)
        ref(ids[:, :5], attention_mask=mask[:, :5], past_key_values=dyn)
        nxt = torch.tensor([[3], [4]])
        m2 = torch.cat([mask[:, :5], torch.ones_like(nxt)], 1)
        torch.testing.assert_close(ours(nxt, attention_mask=m2, past_key_values=cache).logits,
                                   ref(nxt, attention_mask=m2, past_key_values=dyn).logits,
                                   rtol=1e-5, atol=1e-5)
        with pytest.raises(ShapeError, match="tokens_to_remove"):
            cache.crop(1)
        cache.batch_select_indices(torch.tensor([1]))
        assert cache.batch_size == 1 and cache.pool.seq_len(cache._seqs[0]) == 3
        cache.reset()
        assert cache.get_seq_length() == 0 and cache.nbytes == 0
        assert cache.pool.num_free_pages == cache.pool.num_pages
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            generate(ours, *padded([4], 4), cache, max_new_tokens=2, min_new_tokens=2)
