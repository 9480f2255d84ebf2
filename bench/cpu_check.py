"""Whether this machine gives 2 real cores right now: the time of 2
processes of a pure Python loop over the time of 1 (1.0 = 2 real cores, 2.0
= one core's worth). Run it around any 2-thread measurement.

    python bench/cpu_check.py
"""
import multiprocessing as mp
import time


def _loop(n):
    s = 0
    for i in range(n):
        s += i


def _wall(procs, n=8_000_000):
    ps = [mp.Process(target=_loop, args=(n,)) for _ in range(procs)]
    t0 = time.perf_counter()
    for p in ps:
        p.start()
    for p in ps:
        p.join()
    return time.perf_counter() - t0


if __name__ == "__main__":
    one, two = _wall(1), _wall(2)
    print(f"1 process {one:.2f} s, 2 processes {two:.2f} s: ratio {two / one:.2f} "
          "(1.0 = 2 real cores)")
