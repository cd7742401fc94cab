"""Errors a user can fix: each message says what went wrong and how to fix it.

Every error sparsetrace raises on bad input is a `SparsetraceError`; the CLI prints its message
as one line and exits with status 2. Anything else is a bug (exit status 1). `docs/errors.md`
lists them all with their fixes.
"""


class SparsetraceError(Exception):
    """Bad input or a request that cannot be met; the message names the fix."""


class ConfigError(SparsetraceError, ValueError):
    """A `StreamConfig` value is out of range (k, block sizes, sinks, ...)."""


class InputError(SparsetraceError, ValueError):
    """The text or token ids cannot be traced (empty, too long, padded batch, ...)."""


class UnsupportedModelError(SparsetraceError):
    """The model's architecture or one of its attention features is not supported."""


class TraceFileError(SparsetraceError):
    """A file is not a sparsetrace trace, or is truncated, corrupted or of another version."""


class MemoryRequestError(SparsetraceError, MemoryError):
    """The request needs more memory than the machine has available."""


class SparsetraceWarning(UserWarning):
    """A note about a request that went ahead differently from how it was asked (a k clamped to the
    blocks that exist, an input cut by max_tokens, an unverified old file, an empty result). The CLI
    prints each as one line, `sparsetrace: note: ...`, on stderr."""
