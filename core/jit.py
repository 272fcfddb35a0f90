"""One numba kernel, two builds: parallel for many parameter sets, serial for one.

A ``parallel=True`` kernel wakes numba's thread pool on every call. Over a
grid of a thousand parameter sets that is nothing; for the one parameter set
of a live decision it is most of the call, and on a busy machine, or in a Ray
worker holding a fraction of a CPU, waiting for the pool's threads to be
scheduled can take milliseconds where the loop itself takes microseconds
(py-spy put the rule members at a quarter of the ingress replica's samples
on the loaded 2-core development machine before this change).

``serial_twin(kernel)`` compiles the same Python source without ``parallel``
(a ``prange`` is then a ``range``), cached under its own name so the two builds
never overwrite each other in numba's cache. ``pick(kernel, twin, n)`` is the
one rule for choosing.
"""

from __future__ import annotations

import types
from typing import Any

from numba import njit

# Up to this many parameter sets, the serial build.
SERIAL_MAX = 1


def serial_twin(kernel: Any) -> Any:
    fn = kernel.py_func
    twin = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial", fn.__defaults__, fn.__closure__)
    twin.__qualname__ = fn.__qualname__ + "_serial"  # numba's cache files are named by it
    twin.__doc__ = fn.__doc__
    return njit(cache=True)(twin)


def pick(kernel: Any, twin: Any, n: int) -> Any:
    return twin if n <= SERIAL_MAX else kernel
