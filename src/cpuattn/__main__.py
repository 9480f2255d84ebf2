"""Command line: ``python -m cpuattn info`` and ``python -m cpuattn bench``.

``info`` prints how this build runs here (version, compiler, OpenMP and its
runtime, the worker pool, SIMD path, threads); ``bench`` runs the benchmark suite
(:mod:`cpuattn._bench`; ``python -m cpuattn bench --help``).
"""
import argparse
import json
import sys


def format_info(info, runtimes):
    """The ``info`` report as text."""
    if runtimes:
        rt = ", ".join(f"{r['prefix']} {r['version'] or ''} ({r['filepath']})".replace("  ", " ")
                       for r in runtimes)
    else:
        rt = "none visible to threadpoolctl" if runtimes is not None else "threadpoolctl missing"
    rows = [
        ("version", info["version"]),
        ("compiler", info["compiler"]),
        ("OpenMP", (f"on, {info['openmp_version']} (thread limit only)" if info["openmp"]
                    else "off (thread limit from OMP_NUM_THREADS only)")),
        ("OpenMP library", info["openmp_library"] or "-"),
        ("OpenMP runtimes", rt),
        ("thread pool", "{kind}: {workers} workers, spin {spin_us} us".format(**info["thread_pool"])),
        ("SIMD path", info["simd"]),
        ("supported paths", ", ".join(info["simd_supported"])),
        ("threads", f"{info['num_threads']} (usable CPUs: {info['usable_cpus']})"),
    ]
    return "cpuattn\n" + "\n".join(f"  {k + ':':17s}{v}" for k, v in rows)


def cmd_info(args):
    import cpuattn
    from cpuattn._bench import openmp_runtimes

    info = cpuattn.info()
    runtimes = openmp_runtimes()
    if args.json:
        print(json.dumps({**info, "openmp_runtimes": runtimes}, indent=1))
    else:
        print(format_info(info, runtimes))
    return 0


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m cpuattn", description="cpuattn: CPU attention kernels.")
    sub = parser.add_subparsers(dest="command", metavar="{info,bench}")
    sub.required = True
    p_info = sub.add_parser("info", help="build and runtime facts (SIMD path, OpenMP, threads)",
                            description="Print version, compiler, OpenMP runtime, SIMD path "
                                        "in use, supported paths and thread count.")
    p_info.add_argument("--json", action="store_true", help="print as JSON")
    p_info.set_defaults(func=cmd_info)

    from cpuattn import _bench
    p_bench = sub.add_parser(
        "bench", help="run the benchmark suite",
        description="Benchmark cpuattn against PyTorch SDPA (when installed) and the numpy "
                    "reference on built-in shapes, with rooflines (read bandwidth, fp32 GEMM) "
                    "measured in the same run. Progress goes to stderr, the table to stdout.")
    _bench.add_arguments(p_bench)
    p_bench.set_defaults(func=lambda a: _bench.main(a, p_bench))
    return parser


def main(argv=None):
    """Entry point of ``python -m cpuattn`` and the ``cpuattn`` script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
