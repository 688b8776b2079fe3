"""The artifact: a folder ``NAME.sccx/`` with a manifest, a compiled library and weights.

The manifest is a few dataclasses with ``to_dict`` / ``from_dict``; this module is the only
place that reads or writes them. Reading checks everything a damaged or foreign artifact
could get wrong (format, version, the sha256 of every file) before anything is loaded.

Every file the manifest names (its libraries, weights file, tokenizer and the entries of
``files``) must be a plain name of a regular file inside the folder, listed in ``files``
with its sha256: a manifest cannot make the runtime load a library, or map weights, from
anywhere else. A symbolic link is followed only when it stays inside the folder.

The manifest holds the sha256 of its own content (``content_sha256``: every other field
as canonical JSON), so an edit of a weight's offset, shape or dtype, or of an input's
valid range, is refused like a changed file. Like the files' sha256s, this catches
accidents, not attacks: whoever can edit an artifact can recompute it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from runtime.errors import SparseccError
from runtime.manifest_schema import check_manifest

FORMAT = "sparsecc-artifact"
# 2: the manifest holds the sha256 of its own content (CONTENT_SHA256), and input_ranges.
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
CONTENT_SHA256 = "manifest_sha256"


@dataclass(frozen=True)
class TensorSpec:
    """A named tensor of fixed shape and dtype (an input, output or weight)."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, data: dict) -> "TensorSpec":
        return cls(str(data["name"]), tuple(int(d) for d in data["shape"]), str(data["dtype"]))


@dataclass(frozen=True)
class WeightSpec:
    """A weight stored at ``offset`` in the weights file, passed to the library in order."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    offset: int
    nbytes: int
    source: str = ""  # the ONNX initializer it came from, for people reading the manifest

    def to_dict(self) -> dict:
        return {**asdict(self), "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, data: dict) -> "WeightSpec":
        return cls(
            str(data["name"]), tuple(int(d) for d in data["shape"]), str(data["dtype"]),
            int(data["offset"]), int(data["nbytes"]), str(data.get("source", "")),
        )


@dataclass(frozen=True)
class Manifest:
    """Everything needed to check and run an artifact."""

    sparsecc_version: str
    target: dict
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    weights: list[WeightSpec]
    files: dict[str, str]  # file name -> sha256
    library: str = "model.so"
    weights_file: str = "weights.bin"
    summary: dict = field(default_factory=dict)
    # Integer input name -> [low, high): values outside would index a table out of bounds
    # (passes.guard_gather_indices); the runtime refuses them.
    input_ranges: dict = field(default_factory=dict)
    # More graphs over the same weights file: name -> {"library", "inputs", "outputs",
    # "weights"} (a decoder's prefill step); and how a decoder drives them.
    graphs: dict = field(default_factory=dict)
    decoding: dict = field(default_factory=dict)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict:
        return {
            "format": self.format,
            "format_version": self.format_version,
            "sparsecc_version": self.sparsecc_version,
            "target": self.target,
            "library": self.library,
            "weights_file": self.weights_file,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "weights": [w.to_dict() for w in self.weights],
            "files": self.files,
            "summary": self.summary,
            "input_ranges": self.input_ranges,
            **({"graphs": self.graphs} if self.graphs else {}),
            **({"decoding": self.decoding} if self.decoding else {}),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Manifest":
        return cls(
            sparsecc_version=str(data["sparsecc_version"]),
            target=dict(data["target"]),
            inputs=[TensorSpec.from_dict(t) for t in data["inputs"]],
            outputs=[TensorSpec.from_dict(t) for t in data["outputs"]],
            weights=[WeightSpec.from_dict(w) for w in data["weights"]],
            files={str(k): str(v) for k, v in data["files"].items()},
            library=str(data.get("library", "model.so")),
            weights_file=str(data.get("weights_file", "weights.bin")),
            summary=dict(data.get("summary", {})),
            input_ranges={str(name): [int(low), int(high)] for name, (low, high) in data.get("input_ranges", {}).items()},
            graphs=dict(data.get("graphs", {})),
            decoding=dict(data.get("decoding", {})),
            format=str(data["format"]),
            format_version=int(data["format_version"]),
        )


def content_sha256(data: dict) -> str:
    """The sha256 of a manifest's content: every field but ``CONTENT_SHA256`` as canonical
    JSON (sorted keys, no spaces, ASCII), so that only the layout of the file may change."""
    body = json.loads(json.dumps({key: value for key, value in data.items() if key != CONTENT_SHA256}))
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def write_manifest(folder: str | os.PathLike, data: dict) -> None:
    """Writes ``data`` as ``folder/manifest.json`` with the sha256 of its content."""
    text = json.dumps({**data, CONTENT_SHA256: content_sha256(data)}, indent=2)
    (Path(folder) / MANIFEST).write_text(text + "\n")


def sha256_file(path: str | os.PathLike) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def read_manifest(path: str | os.PathLike, verify: bool = True) -> Manifest:
    """Reads and checks an artifact's manifest (and, with ``verify``, every file's sha256).

    Raises:
        SparseccError: when the folder is missing, not an artifact, of a newer format, or
            any file is missing or differs from its recorded hash.
    """
    path = Path(path)
    if not path.exists():
        raise SparseccError(f"{path}: no such artifact.")
    if not path.is_dir():
        raise SparseccError(f"{path} is not a sparsecc artifact (expected a folder NAME.sccx/ with {MANIFEST}).")
    manifest_path = path / MANIFEST
    if not manifest_path.exists():
        raise SparseccError(f"{path} is not a sparsecc artifact (it has no {MANIFEST}).")
    try:
        data = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise SparseccError(f"{manifest_path} is corrupt ({exc.__class__.__name__}: {exc}).") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise SparseccError(f"{path} is not a sparsecc artifact (its manifest has format {data.get('format') if isinstance(data, dict) else None!r}).")
    version = data.get("format_version")
    if not isinstance(version, int):
        raise SparseccError(f"{manifest_path} is corrupt (format_version is {version!r}).")
    if version > FORMAT_VERSION:
        raise SparseccError(
            f"{path} uses artifact format {version}, newer than the {FORMAT_VERSION} this sparsecc reads; upgrade sparsecc."
        )
    if version < FORMAT_VERSION:
        raise SparseccError(
            f"{path} uses artifact format {version}, older than the {FORMAT_VERSION} this sparsecc reads; compile it again."
        )
    check_manifest(data, path)
    if data.get(CONTENT_SHA256) != content_sha256(data):
        raise SparseccError(f"{path} is corrupt: its {MANIFEST} was changed after it was written (its content does "
                            "not match its sha256); compile it again.")
    try:
        manifest = Manifest.from_dict(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise SparseccError(f"{manifest_path} is corrupt (bad or missing field {exc}).") from None
    check_named_files(path, manifest)
    if verify:
        for name, expected in manifest.files.items():
            if sha256_file(path / name) != expected:
                raise SparseccError(f"{path} is corrupt: {name} does not match its sha256 in the manifest.")
    check_weight_regions(path, manifest)
    return manifest


def named_files(manifest: Manifest) -> list[tuple[str, object]]:
    """(what it is, name) of every file the manifest names, the listed ones last."""
    named = [("its library", manifest.library), ("its weights file", manifest.weights_file)]
    named += [(f"its {graph} library", spec.get("library") if isinstance(spec, dict) else spec)
              for graph, spec in manifest.graphs.items()]
    if "event_library" in manifest.target:
        named.append(("its event library", manifest.target["event_library"]))
    if manifest.decoding.get("tokenizer") is not None:
        named.append(("its tokenizer", manifest.decoding["tokenizer"]))
    return named + [("a listed file", name) for name in manifest.files]


def is_plain_name(name: object) -> bool:
    """A file name without any folder part: not absolute, no separator, not ``.`` or ``..``."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and "\0" not in name)


def check_named_files(path: Path, manifest: Manifest) -> None:
    """Refuses a manifest naming a file that is not a plain name, not listed in ``files``
    with a sha256, not a regular file, or a symbolic link leading out of ``path``."""
    for role, name in named_files(manifest):
        if not is_plain_name(name):
            raise SparseccError(f"{path} is refused: its manifest names {name!r} as {role}, which is not a plain "
                                "file name inside the artifact folder.")
        if name not in manifest.files:
            raise SparseccError(f"{path} is refused: {role} {name!r} is not listed with a sha256 in its manifest's files.")
    folder = path.resolve()
    for name in manifest.files:
        try:
            mode = os.lstat(path / name).st_mode
            if stat.S_ISLNK(mode):
                target = (path / name).resolve()
                if target.parent != folder:
                    raise SparseccError(f"{path} is refused: {name} is a symbolic link leading out of the artifact folder.")
                mode = os.stat(target).st_mode
        except FileNotFoundError:
            raise SparseccError(f"{path} is incomplete: {name} is missing.") from None
        except (OSError, RuntimeError) as exc:  # a link loop, a name too long, no permission
            raise SparseccError(f"{path} is refused: {name} cannot be read ({exc.__class__.__name__}).") from None
        if not stat.S_ISREG(mode):
            raise SparseccError(f"{path} is refused: {name} is not a regular file.")


def check_weight_regions(path: Path, manifest: Manifest) -> None:
    """Refuses weights (of any graph) that lie past the end of the weights file."""
    size = os.stat(path / manifest.weights_file).st_size
    entries = [(w.name, w.offset, w.nbytes) for w in manifest.weights]
    entries += [(w["name"], w["offset"], w["nbytes"]) for spec in manifest.graphs.values() for w in spec["weights"]]
    for name, offset, nbytes in entries:
        if offset + nbytes > size:
            raise SparseccError(f"{path} is corrupt: weight {name} lies past the end of {manifest.weights_file}.")


def write_artifact(path: str | os.PathLike, manifest: Manifest, staged: Path) -> None:
    """Finishes an artifact staged in ``staged``: hashes its files, writes the manifest and
    puts the folder at ``path``. An older artifact there is swapped out in one step
    (``renameat2`` exchanging the two folders, where the system has it; else renamed aside,
    the new one renamed in, and the old one's folder restored by the next run if killed
    between) and only then removed, so ``path`` always holds a complete artifact."""
    path = Path(path)
    files = {
        entry.name: sha256_file(entry) for entry in sorted(staged.iterdir()) if entry.is_file() and entry.name != MANIFEST
    }
    final = Manifest(**{**manifest.__dict__, "files": files})
    write_manifest(staged, final.to_dict())
    # mkdtemp made the staging folder 0700; the artifact follows the umask like any output.
    os.chmod(staged, 0o777 & ~_umask())
    check_replaceable(path)
    if not path.exists():
        os.replace(staged, path)
    elif _exchange(staged, path):
        shutil.rmtree(staged)  # the old artifact, now at the staging name
    else:
        aside = staged.with_name(staged.name + PREVIOUS)
        os.replace(path, aside)
        os.replace(staged, path)
        shutil.rmtree(aside)


def _umask() -> int:
    """This process's umask (read from /proc where it can be, as setting it to read it
    back would change it for other threads for a moment)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_replaceable(path: Path) -> None:
    """Refuses to let a compile replace ``path`` unless it is absent, an empty folder, or an
    artifact folder holding only its manifest and the files it lists.

    Raises:
        SparseccError: for a symbolic link, a file, a folder that is not an artifact, or an
            artifact folder holding other files (a user's notes must not vanish).
    """
    if path.is_symlink():
        raise SparseccError(f"{path} is a symbolic link; give the artifact folder itself as -o.")
    if not path.exists():
        return
    if not path.is_dir():
        raise SparseccError(f"{path} exists and is not a folder; refusing to replace it.")
    entries = {entry.name for entry in path.iterdir()}
    if not entries:
        return
    if MANIFEST not in entries:
        raise SparseccError(f"{path} exists and is not a sparsecc artifact; refusing to replace it.")
    try:
        listed = set(json.loads((path / MANIFEST).read_text()).get("files", {}))
    except (OSError, UnicodeDecodeError, ValueError, AttributeError, TypeError, RecursionError):
        raise SparseccError(f"{path} has a manifest that cannot be read, so its files cannot be told from others; "
                            "remove it or choose another -o.") from None
    others = sorted(entries - listed - {MANIFEST})
    if others:
        raise SparseccError(f"{path} holds files that are not part of its artifact ({', '.join(others[:5])}); move them "
                            "away or choose another -o (nothing was replaced).")


def _exchange(first: Path, second: Path) -> bool:
    """Swaps two paths in one step (Linux ``renameat2`` with ``RENAME_EXCHANGE``); False,
    with nothing changed, where the system or file system cannot."""
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) == 0


# An old artifact renamed aside while the new one is renamed in (where no exchange exists).
PREVIOUS = ".previous"
# A staging folder without a process id (from sparsecc before it named them so) is taken
# as abandoned after this long.
UNNAMED_STAGING_SECONDS = 24 * 3600


def staging_dir(path: str | os.PathLike) -> Path:
    """A fresh folder ``.NAME.PID.XXXXXXXX`` beside ``path`` to build an artifact in before
    it is swapped in. First refuses a ``path`` that may not be replaced
    (``check_replaceable``) and clears what killed runs left (``clear_stale_staging``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    check_replaceable(path)
    clear_stale_staging(path)
    return Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", dir=path.parent))


def clear_stale_staging(path: Path) -> None:
    """Removes staging folders ``.NAME.PID.*`` beside ``path`` whose process has ended
    (others may be compiling to the same path right now); puts back an old artifact a
    killed run had renamed aside when ``path`` has none."""
    import time

    prefix = f".{path.name}."
    for entry in path.parent.iterdir():
        if not entry.name.startswith(prefix) or entry.is_symlink() or not entry.is_dir():
            continue
        pid = entry.name[len(prefix):].split(".", 1)[0]
        if pid.isdigit():
            if _running(int(pid)):
                continue
        elif time.time() - entry.stat().st_mtime < UNNAMED_STAGING_SECONDS:
            continue
        if entry.name.endswith(PREVIOUS) and not path.exists():
            os.replace(entry, path)
        else:
            shutil.rmtree(entry, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
