"""Output error of attention over low-bit KV pages against the same pages in
float32, for Gaussian K/V and for K with a few large outlier channels (as
real models' keys have). Decode, batch 8, context 1024, H32:8, D128.

    python bench/quant_error.py

Prints, per format (K and V in the same format), the RMS of the output error
relative to the RMS of the output, and the largest absolute error."""
import numpy as np

import cpuattn

B, CTX, H, HKV, D, P = 8, 1024, 32, 8, 128, 16


def pages(rng, outliers):
    n = B * CTX // P
    k = rng.standard_normal((n, P, HKV, D)).astype(np.float32)
    v = rng.standard_normal((n, P, HKV, D)).astype(np.float32)
    if outliers:
        # 4 of 128 channels 20x larger in every key, as in real models
        k[..., rng.choice(D, 4, replace=False)] *= 20.0
    return k, v


def main():
    rng = np.random.default_rng(0)
    bt = np.arange(B * CTX // P, dtype=np.int32).reshape(B, CTX // P)
    lens = np.full(B, CTX, np.int32)
    q = rng.standard_normal((B, H, D)).astype(np.float32)
    print(f"{'K/V data':18s} {'format':14s} {'rel RMS err':>12s} {'max |err|':>10s}")
    for outliers in (False, True):
        k, v = pages(rng, outliers)
        exact = cpuattn.paged_attention(q, k, v, bt, lens)
        rms = np.sqrt(np.mean(exact ** 2))
        for fmt in ("float16", "bfloat16", "int8", "float8_e4m3fn", "float8_e5m2", "int4"):
            if fmt in ("float16", "bfloat16"):
                import ml_dtypes
                dt = np.float16 if fmt == "float16" else ml_dtypes.bfloat16
                out = cpuattn.paged_attention(q, k.astype(dt), v.astype(dt), bt, lens)
            else:
                (kc, ks), (vc, vs) = cpuattn.quantize_kv(k, fmt), cpuattn.quantize_kv(v, fmt)
                out = cpuattn.paged_attention(q, kc, vc, bt, lens, k_scale=ks, v_scale=vs)
            err = out - exact
            label = "K outlier channels" if outliers else "Gaussian"
            print(f"{label:18s} {fmt:14s} {np.sqrt(np.mean(err ** 2)) / rms:12.2e} "
                  f"{np.abs(err).max():10.2e}")


if __name__ == "__main__":
    main()
