"""The one exception type for mistakes a user can make.

Everything that a user can get wrong (a missing file, a corrupt artifact, a wrong input
shape, an op we cannot compile) raises :class:`SparseccError` with one clear sentence.
The CLI prints that sentence and exits non-zero; anything else is a bug and keeps its
traceback. It lives in ``runtime`` because the runtime must not import the compiler.
"""


class SparseccError(Exception):
    """A user-facing error: its message is one sentence that says what to fix."""


# The errors of a write that the system refused, as opposed to a bug.
WRITE_ERRNOS = frozenset(
    getattr(__import__("errno"), name) for name in
    ("ENOSPC", "EDQUOT", "EROFS", "EACCES", "EPERM", "ENOTDIR", "EEXIST", "EISDIR", "ENAMETOOLONG", "EFBIG")
)


def cannot_write(path, error: OSError) -> SparseccError:
    """The one sentence for an output that the system refused to write (a full disk, a
    read-only folder, no permission, a file where a folder should be)."""
    import errno

    reasons = {
        errno.ENOSPC: "the disk is full",
        errno.EDQUOT: "the disk quota is used up",
        errno.EROFS: "the file system is read-only",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.ENOTDIR: "a part of the path is a file, not a folder",
        errno.EEXIST: "a part of the path exists and is not a folder",
        errno.EISDIR: "it is a folder",
        errno.ENAMETOOLONG: "the name is too long",
    }
    reason = reasons.get(error.errno, error.strerror or type(error).__name__)
    return SparseccError(f"cannot write {path}: {reason} (nothing was written).")
