"""sparsetrace: per-head sparse attention traces of long-context language models."""

from .config import StreamConfig
from .errors import (
    ConfigError,
    InputError,
    MemoryRequestError,
    SparsetraceError,
    TraceFileError,
    UnsupportedModelError,
)

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "InputError",
    "MemoryRequestError",
    "SparsetraceError",
    "StreamConfig",
    "TraceFileError",
    "UnsupportedModelError",
    "__version__",
]
