"""Bounded spinning for cpuattn's own OpenMP runtime (issue 12).

GNU libgomp workers spin at barriers and between parallel regions for up to
``GOMP_SPINCOUNT`` (default 300000) pause iterations before sleeping. On a
shared machine (a busy core, a CPU quota, a time-sliced VM) that spinning
takes the core the thread with the work needs. libgomp reads its settings
once, when it is loaded, and has no call to change them later; so, before
the first extension loads libgomp, cpuattn puts ``GOMP_SPINCOUNT=10000``
into the environment and takes it out again right after. Nothing is left in
``os.environ``: child processes and libraries loaded later (torch ships its
own libgomp copy) see the user's environment unchanged.

It is applied only when all hold: the user set neither ``OMP_WAIT_POLICY``
nor ``GOMP_SPINCOUNT`` (theirs win), ``CPUATTN_SPINCOUNT`` is not ``off``
(or gives another count), and the system ``libgomp.so.1`` is not already
loaded (then it is initialised and shared with whoever loaded it).
Caveat: a library loaded later that links the same ``libgomp.so.1`` (not a
vendored copy) shares the runtime and so this spin count.
``cpuattn.info()["omp_spin"]`` reports what happened.
"""
import os

DEFAULT_SPINCOUNT = 10000
_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
state = {"applied": False, "spincount": None, "reason": "not yet imported"}


def _libgomp_loaded():
    try:
        with open("/proc/self/maps") as f:
            return any("/libgomp.so.1" in line for line in f)
    except OSError:
        return None          # cannot tell (not Linux): assume not loaded


def before_load():
    """Call before the first cpuattn extension is imported; returns the
    undo function to call right after."""
    user = [v for v in _VARS if v in os.environ]
    knob = os.environ.get("CPUATTN_SPINCOUNT", "").strip().lower()
    if user:
        state.update(reason=f"user set {', '.join(user)}: left as is")
        return lambda: None
    if knob in ("off", "0", "no", "false"):
        state.update(reason="CPUATTN_SPINCOUNT=off: libgomp defaults")
        return lambda: None
    if _libgomp_loaded():
        state.update(reason="libgomp.so.1 was already loaded: its settings stand")
        return lambda: None
    count = DEFAULT_SPINCOUNT
    if knob:
        try:
            count = max(1, int(knob))
        except ValueError:
            pass
    os.environ["GOMP_SPINCOUNT"] = str(count)

    def undo():
        os.environ.pop("GOMP_SPINCOUNT", None)
        state.update(applied=True, spincount=count,
                     reason="set for cpuattn's libgomp at import (not left in os.environ)")
    return undo
