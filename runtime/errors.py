"""The one exception type for mistakes a user can make.

Everything that a user can get wrong (a missing file, a corrupt artifact, a wrong input
shape, an op we cannot compile) raises :class:`SparseccError` with one clear sentence.
The CLI prints that sentence and exits non-zero; anything else is a bug and keeps its
traceback. It lives in ``runtime`` because the runtime must not import the compiler.
"""


class SparseccError(Exception):
    """A user-facing error: its message is one sentence that says what to fix."""
