"""Exception classes of cpuattn.

Every error the library raises on bad input derives from :class:`CpuAttnError`
and from the builtin class a caller would naturally catch (``ValueError`` for
shapes, ``TypeError`` for dtypes, ...). Messages name the argument, what was
expected and what was received.
"""


class CpuAttnError(Exception):
    """Base class of every error raised by cpuattn on bad input or state."""


class ShapeError(CpuAttnError, ValueError):
    """An array has the wrong number of dimensions, sizes, strides or values."""


class DTypeError(CpuAttnError, TypeError):
    """An array has a dtype (or a dtype combination) the kernels do not support."""


class PageError(CpuAttnError, IndexError):
    """A page id, sequence id or block-table entry is out of range or unknown."""


class PoolFullError(CpuAttnError, MemoryError):
    """The page pool has too few free pages for the requested operation."""


__all__ = ["CpuAttnError", "ShapeError", "DTypeError", "PageError", "PoolFullError"]
