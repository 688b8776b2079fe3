"""An artifact may name only its own files, and nothing outside it is loaded or run.

Each case crafts an artifact as a careless or hostile hand would (paths out of the folder,
files the manifest does not hash, symbolic links leading out) and expects one
``SparseccError`` before any library is loaded: a planted library's constructor writes
a marker file, which must not appear.
"""

import hashlib
import json
import shutil
import subprocess
import types

import numpy as np
import pytest

import runtime
from runtime.artifact import MANIFEST, write_manifest
from runtime.errors import SparseccError

PLANTED_SOURCE = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void planted(void) {
    const char *marker = getenv("SPARSECC_TEST_MARKER");
    if (marker) { FILE *f = fopen(marker, "w"); if (f) { fputs("ran", f); fclose(f); } }
}
"""


def _sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _manifest(path) -> dict:
    return json.loads((path / MANIFEST).read_text())


def _craft(path, data: dict) -> None:
    """Writes ``data`` as the artifact's manifest, as a crafted artifact would hold it
    (with the sha256 of its content recomputed)."""
    write_manifest(path, data)


@pytest.fixture
def planted(tmp_path, monkeypatch):
    """A shared library outside any artifact whose constructor writes ``marker``."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build the planted library")
    source = tmp_path / "planted.c"
    source.write_text(PLANTED_SOURCE)
    library = tmp_path / "planted.so"
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    marker = tmp_path / "constructor-ran"
    monkeypatch.setenv("SPARSECC_TEST_MARKER", str(marker))
    return library, marker


@pytest.fixture
def artifact_copy(compiled, tmp_path):
    path = tmp_path / "copy.sccx"
    shutil.copytree(compiled("tiny-llama", 0.0), path)
    return path


@pytest.fixture
def decoder_copy(decoder, tmp_path):
    path = tmp_path / "decoder.sccx"
    shutil.copytree(decoder[1], path)
    return path


def _library_elsewhere(data, artifact, library):
    data["library"] = str(library)


def _library_up_the_tree(data, artifact, library):
    data["library"] = f"../{library.name}"


def _library_elsewhere_listed(data, artifact, library):
    data["library"] = str(library)
    data["files"][str(library)] = _sha256(library)


def _event_library_elsewhere(data, artifact, library):
    data["target"]["event_library"] = str(library)


@pytest.mark.parametrize("edit", [_library_elsewhere, _library_up_the_tree, _library_elsewhere_listed,
                                  _event_library_elsewhere])
def test_a_library_outside_the_artifact_is_never_loaded(artifact_copy, planted, edit):
    library, marker = planted
    data = _manifest(artifact_copy)
    edit(data, artifact_copy, library)
    _craft(artifact_copy, data)
    with pytest.raises(SparseccError, match="is refused"):
        runtime.load(artifact_copy)
    assert not marker.exists(), "the planted library's constructor ran"


def test_a_prefill_library_outside_the_artifact_is_never_loaded(decoder_copy, planted):
    library, marker = planted
    data = _manifest(decoder_copy)
    data["graphs"]["prefill"]["library"] = f"../{library.name}"
    _craft(decoder_copy, data)
    with pytest.raises(SparseccError, match="is refused"):
        runtime.load(decoder_copy)
    assert not marker.exists(), "the planted library's constructor ran"


def test_a_tokenizer_outside_the_artifact_is_refused(decoder_copy):
    data = _manifest(decoder_copy)
    data["decoding"]["tokenizer"] = "/etc/passwd"
    _craft(decoder_copy, data)
    with pytest.raises(SparseccError, match=r"names '/etc/passwd' as its tokenizer, which is not a plain file name"):
        runtime.load(decoder_copy)


def test_another_artifacts_weights_are_refused(artifact_copy, compiled):
    other = artifact_copy.parent / "other.sccx"
    shutil.copytree(compiled("tiny-llama", 0.5), other)
    data = _manifest(artifact_copy)
    data["weights_file"] = "../other.sccx/weights.bin"
    data["files"]["../other.sccx/weights.bin"] = _sha256(other / "weights.bin")
    _craft(artifact_copy, data)
    with pytest.raises(SparseccError, match=r"names '../other.sccx/weights.bin' as its weights file, which is not a plain"):
        runtime.load(artifact_copy)


def test_a_files_entry_outside_the_artifact_is_refused(artifact_copy, compiled):
    outside = artifact_copy.parent / "outside.bin"
    outside.write_bytes(b"outside")
    data = _manifest(artifact_copy)
    data["files"][str(outside)] = _sha256(outside)
    _craft(artifact_copy, data)
    with pytest.raises(SparseccError, match="as a listed file, which is not a plain file name"):
        runtime.load(artifact_copy)


@pytest.mark.parametrize("name, role", [("weights.bin", "weights file"), ("model.so", "library")])
def test_a_file_the_manifest_does_not_hash_is_refused(artifact_copy, name, role):
    data = _manifest(artifact_copy)
    del data["files"][name]
    _craft(artifact_copy, data)
    with pytest.raises(SparseccError, match=f"its {role} {name!r} is not listed with a sha256"):
        runtime.load(artifact_copy)


def test_a_symbolic_link_leading_out_is_refused(artifact_copy):
    """Same bytes, so the sha256 matches: the link itself is what is refused."""
    outside = artifact_copy.parent / "weights-outside.bin"
    shutil.move(artifact_copy / "weights.bin", outside)
    (artifact_copy / "weights.bin").symlink_to(outside)
    with pytest.raises(SparseccError, match="weights.bin is a symbolic link leading out of the artifact folder"):
        runtime.load(artifact_copy)


def test_a_symbolic_link_to_a_device_is_refused(artifact_copy):
    (artifact_copy / "weights.bin").unlink()
    (artifact_copy / "weights.bin").symlink_to("/dev/null")
    data = _manifest(artifact_copy)
    data["files"]["weights.bin"] = hashlib.sha256(b"").hexdigest()
    _craft(artifact_copy, data)
    with pytest.raises(SparseccError, match="weights.bin is a symbolic link leading out of the artifact folder"):
        runtime.load(artifact_copy)


def test_a_folder_named_as_the_weights_file_is_refused(artifact_copy):
    (artifact_copy / "weights.bin").unlink()
    (artifact_copy / "weights.bin").mkdir()
    with pytest.raises(SparseccError, match="weights.bin is not a regular file"):
        runtime.load(artifact_copy)


def test_a_symbolic_link_inside_the_folder_is_followed(artifact_copy, token_ids):
    """A link to another file of the same folder stays inside it and is allowed."""
    reference = runtime.load(artifact_copy).run({"input_ids": token_ids})["logits"]
    shutil.move(artifact_copy / "weights.bin", artifact_copy / "weights.real")
    (artifact_copy / "weights.bin").symlink_to("weights.real")
    data = _manifest(artifact_copy)
    data["files"]["weights.real"] = data["files"]["weights.bin"]
    _craft(artifact_copy, data)
    np.testing.assert_array_equal(runtime.load(artifact_copy).run({"input_ids": token_ids})["logits"], reference)


@pytest.fixture
def library_cache(tmp_path, monkeypatch, artifact_copy):
    """The library copy cache moved into ``tmp_path``, and the artifact's library marked as
    one this process already loaded other bytes from (so ``load`` goes through the cache)."""
    import os
    import tempfile

    from runtime import executor

    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    key = str((artifact_copy / "model.so").resolve())
    monkeypatch.setitem(executor._LOADED_LIBRARIES, key, "0" * 64)
    return temporary / f"sparsecc-libraries-{os.getuid()}", _sha256(artifact_copy / "model.so")


def test_the_library_cache_is_created_private(artifact_copy, library_cache, token_ids, compiled):
    import os
    import stat

    folder, digest = library_cache
    outputs = runtime.load(artifact_copy).run({"input_ids": token_ids})["logits"]
    reference = runtime.load(compiled("tiny-llama", 0.0)).run({"input_ids": token_ids})["logits"]
    np.testing.assert_array_equal(outputs, reference)
    info = os.lstat(folder)
    assert stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == os.getuid()
    assert [entry.name for entry in folder.iterdir()] == [f"{digest}.so"], "one copy, no partial file left"


def test_a_library_cache_others_can_write_is_refused(artifact_copy, library_cache):
    folder, _ = library_cache
    folder.mkdir(mode=0o777)
    folder.chmod(0o777)
    with pytest.raises(SparseccError, match="is not private to this user"):
        runtime.load(artifact_copy)


def test_a_library_planted_in_the_cache_is_not_loaded(artifact_copy, library_cache, planted, token_ids, compiled):
    """A file at the copy's name whose bytes are not the library's is replaced, not run."""
    folder, digest = library_cache
    library, marker = planted
    folder.mkdir(mode=0o700)
    shutil.copyfile(library, folder / f"{digest}.so")
    outputs = runtime.load(artifact_copy).run({"input_ids": token_ids})["logits"]
    assert not marker.exists(), "the planted library's constructor ran"
    reference = runtime.load(compiled("tiny-llama", 0.0)).run({"input_ids": token_ids})["logits"]
    np.testing.assert_array_equal(outputs, reference)
    assert _sha256(folder / f"{digest}.so") == digest


def test_a_symbolic_link_planted_in_the_cache_is_not_followed(artifact_copy, library_cache, planted, tmp_path):
    """The link is replaced by a copy; the file it pointed to is left as it was."""
    folder, digest = library_cache
    library, marker = planted
    folder.mkdir(mode=0o700)
    before = _sha256(library)
    (folder / f"{digest}.so").symlink_to(library)
    runtime.load(artifact_copy)
    assert not marker.exists(), "the planted library's constructor ran"
    assert not (folder / f"{digest}.so").is_symlink() and _sha256(folder / f"{digest}.so") == digest
    assert _sha256(library) == before, "the copy was written through the link"


def test_a_library_cache_others_may_only_read_is_closed_to_them(artifact_copy, library_cache):
    """Older sparsecc versions made the folder 0755: nobody else could plant a file there,
    so it is kept and made private."""
    import stat

    folder, _ = library_cache
    folder.mkdir()
    folder.chmod(0o755)
    runtime.load(artifact_copy)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700


def test_output_names_cannot_leave_the_npz(tmp_path):
    """Output names are the model's: an ``.npz`` entry is a plain, unique name whatever they are."""
    import zipfile

    from compiler.driver import save_outputs

    outputs = {"../../evil": np.arange(3.0), "/etc/passwd": np.ones(2), "a/b": np.zeros(1), "a_b": np.full(1, 7.0),
               "file": np.arange(2), "allow_pickle": np.arange(4), "logits.1": np.eye(2)}
    path = tmp_path / "out" / "o.npz"
    names = save_outputs(outputs, str(path))
    entries = zipfile.ZipFile(path).namelist()
    assert all("/" not in entry and "\\" not in entry and not entry.startswith(".") for entry in entries), entries
    assert len(set(entries)) == len(outputs) and sorted(entries) == sorted(f"{name}.npy" for name in names.values())
    assert names["logits.1"] == "logits.1" and names["a_b"] == "a_b"
    loaded = np.load(path, allow_pickle=False)
    for name, array in outputs.items():
        np.testing.assert_array_equal(loaded[names[name]], array)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["o.npz", "out"], "nothing written outside the file"


def _decode_export_naming(decoder, tmp_path, tokenizer, prefill_model=None):
    """A copy of the decoder's export whose metadata names ``tokenizer`` (and ``prefill_model``)."""
    import onnx

    from compiler.decode_export import DECODE_KEY

    folder = tmp_path / "export"
    folder.mkdir()
    for entry in decoder[0].parent.iterdir():
        if entry.is_file():
            shutil.copyfile(entry, folder / entry.name)
    model = onnx.load(str(folder / decoder[0].name), load_external_data=False)
    for prop in model.metadata_props:
        if prop.key == DECODE_KEY:
            spec = json.loads(prop.value)
            spec["tokenizer"] = tokenizer
            if prefill_model is not None:
                spec["prefill_model"] = prefill_model
            prop.value = json.dumps(spec)
    onnx.save(model, str(folder / decoder[0].name))
    return folder / decoder[0].name


def _tokenizer_json(path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    Tokenizer(WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(path))


@pytest.mark.parametrize("name, message", [
    ("/etc/passwd", "names the tokenizer '/etc/passwd', which is not a plain file name beside it"),
    ("../outside.json", "names the tokenizer '../outside.json', which is not a plain file name beside it"),
    ("passwd.json", r"passwd.json is not a tokenizer \(tokenizer.json\)"),
    ("folder.json", "folder.json is not a regular file"),
])
def test_a_decode_export_cannot_make_compile_copy_any_file_as_its_tokenizer(decoder, tmp_path, name, message):
    from compiler.driver import CompileOptions, compile_model

    model = _decode_export_naming(decoder, tmp_path, name)
    (model.parent / "passwd.json").write_text(open("/etc/passwd").read())
    (model.parent / "folder.json").mkdir()
    _tokenizer_json(tmp_path / "outside.json")
    output = tmp_path / "out.sccx"
    with pytest.raises(SparseccError, match=message):
        compile_model(CompileOptions(str(model), str(output)))
    assert not output.exists()


def test_a_decode_export_cannot_name_a_prefill_step_elsewhere(decoder, tmp_path):
    from compiler.driver import CompileOptions, compile_model

    model = _decode_export_naming(decoder, tmp_path, None, prefill_model=str(decoder[0].with_name("tiny.prefill.onnx")))
    with pytest.raises(SparseccError, match="names the prefill step .*, which is not a plain file name beside it"):
        compile_model(CompileOptions(str(model), str(tmp_path / "out.sccx")))


def test_the_tokenizer_beside_a_decode_export_is_the_one_copied(decoder, tmp_path):
    from compiler.decode_build import tokenizer_source

    model = _decode_export_naming(decoder, tmp_path, "tiny.tokenizer.json")
    _tokenizer_json(model.parent / "tiny.tokenizer.json")
    assert tokenizer_source(model, {"tokenizer": "tiny.tokenizer.json"}) == model.parent / "tiny.tokenizer.json"
    assert tokenizer_source(model, {"tokenizer": None}) is None


def test_a_moved_weight_offset_is_caught(artifact_copy):
    """The manifest's own content is hashed: one byte's shift of one weight would give wrong logits."""
    data = _manifest(artifact_copy)
    data["weights"][0]["offset"] += 1
    (artifact_copy / MANIFEST).write_text(json.dumps(data, indent=2))
    with pytest.raises(SparseccError, match="manifest.json was changed after it was written"):
        runtime.load(artifact_copy)


def test_removed_input_ranges_are_caught(artifact_copy):
    data = _manifest(artifact_copy)
    data.pop("input_ranges", None)
    data["summary"].pop("input_ranges", None)
    (artifact_copy / MANIFEST).write_text(json.dumps(data, indent=2))
    with pytest.raises(SparseccError, match="manifest.json was changed after it was written"):
        runtime.load(artifact_copy)


def test_the_manifests_layout_is_not_part_of_its_content(artifact_copy, token_ids, compiled):
    """Only the content is hashed: the same manifest laid out differently still loads."""
    data = _manifest(artifact_copy)
    (artifact_copy / MANIFEST).write_text(json.dumps(data, sort_keys=True))
    reference = runtime.load(compiled("tiny-llama", 0.0)).run({"input_ids": token_ids})["logits"]
    np.testing.assert_array_equal(runtime.load(artifact_copy).run({"input_ids": token_ids})["logits"], reference)


def test_an_artifact_of_the_older_format_is_refused_with_what_to_do(artifact_copy):
    from runtime.artifact import FORMAT_VERSION

    data = _manifest(artifact_copy)
    data["format_version"] = FORMAT_VERSION - 1
    data.pop("manifest_sha256", None)
    (artifact_copy / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(SparseccError, match=f"uses artifact format {FORMAT_VERSION - 1}, older than the "
                                            f"{FORMAT_VERSION} this sparsecc reads; compile it again"):
        runtime.load(artifact_copy)


# --- nothing lost: compiling over an existing artifact ----------------------------------------


def test_compile_refuses_a_folder_holding_other_files(exported, compiled, tmp_path):
    from compiler.driver import CompileOptions, compile_model

    artifact = tmp_path / "mine.sccx"
    shutil.copytree(compiled("tiny-llama", 0.0), artifact)
    (artifact / "NOTES.txt").write_text("my notes")
    before = (artifact / MANIFEST).read_text()
    with pytest.raises(SparseccError, match=r"holds files that are not part of its artifact \(NOTES.txt\)"):
        compile_model(CompileOptions(str(exported("tiny-llama", 0.5)), str(artifact)))
    assert (artifact / "NOTES.txt").read_text() == "my notes" and (artifact / MANIFEST).read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.sccx"], "no staging folder left"


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "rename-aside"])
def test_a_kill_while_the_old_artifact_is_removed_leaves_the_new_one(exported, compiled, tmp_path, monkeypatch,
                                                                    token_ids, exchange):
    """The old artifact is removed only after the new one is in place: a run killed right
    after removing it (simulated) leaves a complete artifact."""
    from compiler.driver import CompileOptions, compile_model
    from runtime import artifact as artifact_module

    if not exchange:  # a system without renameat2's exchange
        monkeypatch.setattr(artifact_module, "_exchange", lambda first, second: False)
    artifact = tmp_path / "swap.sccx"
    shutil.copytree(compiled("tiny-llama", 0.0), artifact)
    remove = shutil.rmtree

    def killed_after_removing(path, *args, **kwargs):
        remove(path, *args, **kwargs)
        raise KeyboardInterrupt

    # Only the artifact writer's removals are killed (TVM's build removes folders of its own).
    monkeypatch.setattr(artifact_module, "shutil", types.SimpleNamespace(rmtree=killed_after_removing))
    with pytest.raises(KeyboardInterrupt):
        compile_model(CompileOptions(str(exported("tiny-llama", 0.5)), str(artifact)))
    monkeypatch.undo()
    outputs = runtime.load(artifact).run({"input_ids": token_ids})["logits"]
    reference = runtime.load(compiled("tiny-llama", 0.5)).run({"input_ids": token_ids})["logits"]
    np.testing.assert_allclose(outputs, reference, atol=1e-5, rtol=0)


def test_staging_folders_of_killed_runs_are_removed_on_the_next_run(exported, tmp_path):
    """A folder staged by a process that no longer runs goes; one of a running process stays."""
    import os

    from compiler.driver import CompileOptions, compile_model

    finished = subprocess.Popen(["true"])
    finished.wait()
    running = subprocess.Popen(["sleep", "600"])
    try:
        stale = tmp_path / f".out.sccx.{finished.pid}.a1b2c3d4"
        busy = tmp_path / f".out.sccx.{running.pid}.e5f6a7b8"
        for folder in (stale, busy):
            folder.mkdir()
            (folder / "weights.bin").write_bytes(b"partial")
        compile_model(CompileOptions(str(exported("tiny-llama", 0.0)), str(tmp_path / "out.sccx")))
        assert not stale.exists() and busy.exists()
        assert os.path.isdir(tmp_path / "out.sccx")
    finally:
        running.kill()
        running.wait()


def test_an_old_artifact_a_killed_run_renamed_aside_is_put_back(compiled, tmp_path):
    """Killed between renaming the old artifact aside and the new one in: the next run
    restores the old one."""
    from runtime.artifact import PREVIOUS, clear_stale_staging

    finished = subprocess.Popen(["true"])
    finished.wait()
    path = tmp_path / "back.sccx"
    shutil.copytree(compiled("tiny-llama", 0.0), tmp_path / f".back.sccx.{finished.pid}.a1b2c3d4{PREVIOUS}")
    clear_stale_staging(path)
    runtime.load(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["back.sccx"]


def test_an_artifact_folder_follows_the_umask(compiled):
    """Like any other tool's output: not 0700 because it was staged in a private folder."""
    import os
    import stat

    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(compiled("tiny-llama", 0.0).stat().st_mode) == 0o777 & ~umask
