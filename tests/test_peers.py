"""llama.cpp as a peer (``benchmarks/peers.py``), the frontier plot (``benchmarks/frontier.py``)
and ``sparsecc eval``'s llama.cpp scoring convention.

The parsers are tested on recorded output of the tools (trimmed); the tools themselves run
only where ``make bench-peers`` built them, and the tests that need them skip with the
sentence that says what is missing."""

import json
import math

import numpy as np
import pytest

from benchmarks import frontier, peers
from compiler.evaluate import perplexity, window_nll
from conftest import onnxruntime_reference
from runtime.errors import SparseccError
from sparsify.calibration import calibration_feeds

# Recorded from `llama-bench -m smollm2-135m-Q4_0.gguf -t 2 -p 0 -n 31 -r 3 -o json` here
# (stdout, under load), trimmed to a few fields around those the parser reads.
LLAMA_BENCH_JSON = """[
  {
    "build_commit": "0c1e570",
    "cpu_info": "AMD EPYC",
    "model_type": "llama 256M Q4_0",
    "n_threads": 2,
    "repack": true,
    "n_prompt": 0,
    "n_gen": 31,
    "n_depth": 0,
    "test_time": "2026-12-03T17:46:45Z",
    "avg_ns": 1696688787,
    "stddev_ns": 3988122201,
    "avg_ts": 103.384309,
    "stddev_ts": 83.818946,
    "samples_ns": [ 4681481471, 201816407, 206768483 ],
    "samples_ts": [ 6.62184, 153.605, 149.926 ]
  }
]
"""
BENCH_SAMPLES = [6.62184, 153.605, 149.926]

# Recorded from `llama-perplexity -m smollm2-135m-Q4_1.gguf -f data/pride_and_prejudice.txt
# -c 512 --chunks 8 -t 2` here (stderr's log lines, then stdout), trimmed.
LLAMA_PERPLEXITY_OUTPUT = """0.02.450.634 I perplexity: tokenizing the input ..
0.02.537.571 I perplexity: tokenization took 86.916 ms
0.02.537.761 I perplexity: calculating perplexity over 8 chunks, n_ctx=512, batch_size=2048, n_seq=4
0.21.874.353 I perplexity: 19.34 seconds per pass - ETA 0.48.677.145 I Final estimate: PPL = 18.8506 +/- 1.13651
0.98 minutes
[1]15.5928,[2]18.0898,[3]17.1735,[4]17.4869,[5]18.1325,[6]18.5155,[7]18.2169,[8]18.8506,
"""

# The strided mode (`-c 257 -b 257 --ppl-stride 511 --chunks 8`) prints the running values
# but no final estimate; recorded the same way.
LLAMA_PERPLEXITY_STRIDED_OUTPUT = """0.00.002.683 I Will perform strided perplexity calculation -> adjusting context size from 257 to 512
0.01.450.735 I perplexity_v2: have 30144 tokens. Calculation chunk = 512
0.01.450.832 I perplexity_v2: computing over 8 chunks, n_ctx=512, batch_size=257, n_seq=1
0.08.848.333 I perplexity_v2: 7.40 seconds per pass - ETA 
0.98 minutes
[1]16.2292,[2]19.5670,[3]19.8128,[4]20.7029,[5]20.9459,[6]21.4993,[7]22.0895,[8]22.2431,
"""


def test_llama_bench_json_gives_each_repetition():
    assert peers.parse_llama_bench_json(LLAMA_BENCH_JSON) == BENCH_SAMPLES


def test_llama_bench_json_picks_the_generation_test():
    prompt_and_generation = json.loads(LLAMA_BENCH_JSON) * 2
    prompt_and_generation[0] = {**prompt_and_generation[0], "n_prompt": 512, "n_gen": 0, "samples_ts": [900.0]}
    assert peers.parse_llama_bench_json(json.dumps(prompt_and_generation)) == BENCH_SAMPLES


@pytest.mark.parametrize("text, fragment", [("error: failed to load model", "no JSON list"),
                                            ('[{"n_prompt": 512, "n_gen": 0, "samples_ts": [1.0]}]', "no text-generation")])
def test_llama_bench_json_refusals_are_one_sentence(text, fragment):
    with pytest.raises(SparseccError, match=fragment):
        peers.parse_llama_bench_json(text)


def test_llama_perplexity_output_final_estimate():
    result = peers.parse_llama_perplexity(LLAMA_PERPLEXITY_OUTPUT)
    assert result == {"perplexity": 18.8506, "chunks": 8, "standard_error": 1.13651}


def test_llama_perplexity_strided_output_takes_the_last_running_value():
    assert peers.parse_llama_perplexity(LLAMA_PERPLEXITY_STRIDED_OUTPUT) == {"perplexity": 22.2431, "chunks": 8}


def test_llama_perplexity_without_values_is_one_sentence():
    with pytest.raises(SparseccError, match="no per-chunk perplexity"):
        peers.parse_llama_perplexity("main: error: unable to load model\n")


@pytest.mark.parametrize("window", [512, 256, 257])
def test_strided_command_scores_every_token_of_a_window(window):
    """llama-perplexity's strided mode runs windows of C + S//2 tokens and scores their last
    S targets: for sparsecc's convention that must be a window of ``window`` scoring all
    its window - 1 targets."""
    command = peers.perplexity_command("m.gguf", "t.txt", window, 8, 2, "all", "llama-build")
    context, stride = int(command[command.index("-c") + 1]), int(command[command.index("--ppl-stride") + 1])
    assert context + stride // 2 == window and stride == window - 1
    assert int(command[command.index("-b") + 1]) == context


def test_default_command_is_llama_cpp_convention():
    command = peers.perplexity_command("m.gguf", "t.txt", 512, 8, 2, "second-half", "llama-build")
    assert command[command.index("-c") + 1] == "512" and "--ppl-stride" not in command
    with pytest.raises(SparseccError, match="unknown scoring"):
        peers.perplexity_command("m.gguf", "t.txt", 512, 8, 2, "first-half", "llama-build")


def test_absent_peers_are_one_sentence_naming_the_make_target(monkeypatch, tmp_path):
    monkeypatch.setattr(peers, "PEERS_DIR", tmp_path)
    reason = peers.llama_cpp_available()
    assert isinstance(reason, str) and "make bench-peers" in reason
    runs, note = peers.decode_peer_runs(31, 2)
    assert runs == {} and note == reason
    assert peers.describe_peers({"peers": [], "peers_note": note}) == [note]


def test_cpu_amx_flag(tmp_path):
    with_amx, without = tmp_path / "amx", tmp_path / "plain"
    with_amx.write_text("processor : 0\nflags : fpu avx512f amx_bf16 amx_tile amx_int8\n")
    without.write_text("processor : 0\nflags : fpu avx512f avx512_vnni\n")
    assert peers.cpu_has_amx(str(with_amx)) and not peers.cpu_has_amx(str(without))
    assert not peers.cpu_has_amx(str(tmp_path / "missing"))


def test_decode_peer_runs_time_at_llama_bench_rate(monkeypatch, tmp_path):
    """Each run reports the seconds ``steps`` tokens take at llama-bench's rate, which
    ``time_decoding`` turns back into that rate."""
    from benchmarks.bench_decode import time_decoding
    from compiler.progress import SILENT

    monkeypatch.setattr(peers, "llama_cpp_available", lambda: peers.LlamaCpp(
        {"native": "llama-build"}, {"Q8_0": tmp_path / "q8.gguf", "Q4_0": tmp_path / "q4.gguf"}))
    rates = {"q8.gguf": 100.0, "q4.gguf": 160.0}
    monkeypatch.setattr(peers, "llama_bench", lambda gguf, threads, tokens, repetitions, no_amx=False: rates[gguf.name])
    monkeypatch.setattr("benchmarks.bench_decode.SETTLE_SECONDS", 0.0)
    monkeypatch.setattr("benchmarks.bench_decode.LOCK_FILE", str(tmp_path / "lock"))
    runs, note = peers.decode_peer_runs(31, 2)
    assert note is None and set(runs) == {"llama.cpp Q8_0", "llama.cpp Q4_0"}
    _, medians = time_decoding(runs, 3, 32, SILENT)
    assert medians == pytest.approx({"llama.cpp Q8_0": 100.0, "llama.cpp Q4_0": 160.0}, rel=1e-12)


def test_peer_rows_give_every_rows_ratio_to_each_peer():
    rows = peers.peer_rows({"llama.cpp Q4_1": 150.0, "llama.cpp F16": 50.0}, {"ours dense": 75.0, "onnxruntime dense": 30.0})
    assert rows[0]["others_over_this_peer"] == {"ours dense": 0.5, "onnxruntime dense": 0.2}
    assert rows[1]["others_over_this_peer"] == {"ours dense": 1.5, "onnxruntime dense": 0.6}
    lines = peers.describe_peers({"peers": rows})
    assert any(line.startswith("ours dense") and "0.50x" in line and "1.50x" in line for line in lines)


def test_llama_cpp_tools_run_when_built():
    """Where llama.cpp is built: a short llama-bench gives a positive rate, and the F16
    GGUF (requantized from the shipped Q4_1 weights, which fp16 holds to about 3 digits)
    has Q4_1's perplexity within 0.5 % in both conventions on two windows of 256 tokens."""
    found = peers.llama_cpp_available()
    if isinstance(found, str):
        pytest.skip(found)
    rate = peers.llama_bench(found.ggufs["Q4_0"], 2, 4, 1)
    assert math.isfinite(rate) and rate > 0
    from pathlib import Path
    text = str(Path(__file__).resolve().parents[1] / "data" / "pride_and_prejudice.txt")
    for scored in ("second-half", "all"):
        f16, q4_1 = (peers.llama_perplexity(found.ggufs[t], text, 256, 2, 2, scored)["perplexity"] for t in ("F16", "Q4_1"))
        assert abs(f16 / q4_1 - 1) < 0.005, (scored, f16, q4_1)


def test_eval_second_half_scores_as_llama_cpp(exported):
    """``scored="second-half"`` is the mean negative log-likelihood of the targets at
    positions seq_len/2+1 .. seq_len-1 of each window, computed here position by position."""
    path = exported("tiny-llama")
    report = perplexity(str(path), "pydoc", 512, scored="second-half")
    from compiler.onnx_io import load_model

    model = load_model(path)
    total, count = 0.0, 0
    for feed in calibration_feeds(model, "pydoc", {"input_ids": [1, 16]}, 512):
        logits = onnxruntime_reference(model, feed)[0][0].astype(np.float64)
        ids = feed["input_ids"][0]
        for position in range(8, 15):
            row = logits[position]
            total += math.log(np.exp(row - row.max()).sum()) + row.max() - row[ids[position + 1]]
            count += 1
    assert report["tokens"] == count == 32 * 7 and report["scored"] == "second-half"
    assert report["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-6)


def test_window_nll_from_a_position():
    logits = np.log(np.array([[[0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3], [0.2, 0.2, 0.6]]]))
    nll, count = window_nll(logits, np.array([[0, 1, 2]]), first=1)
    assert count == 1 and nll == pytest.approx(np.log(3))


def test_eval_unknown_scoring_is_one_sentence(exported):
    with pytest.raises(SparseccError, match="unknown scoring 'middle'"):
        perplexity(str(exported("tiny-llama")), "pydoc", 512, scored="middle")


def test_frontier_writes_a_png_from_points_merged_across_files(tmp_path):
    speeds = {"results": [{"variant": "ours dense"}], "peers": [{"variant": "llama.cpp Q4_1", "tokens_per_s": 150.0}]}
    quality = {"points": [{"name": "llama.cpp Q4_1", "kind": "peer", "perplexity": 22.5},
                          {"name": "sparsecc int4", "kind": "sparsecc", "tokens_per_s": 190.0, "perplexity": 23.0},
                          {"name": "llama.cpp Q8_0", "kind": "peer", "perplexity": 22.4}]}
    accuracy = {"rows": [{"row": "dense", "perplexity": 22.37, "ours_tokens_per_s": 53.0,
                             "onnxruntime_dense_tokens_per_s": 39.0},
                            {"row": "teal 25 %", "perplexity": 22.9, "ours_tokens_per_s": None}]}
    paths = []
    for name, report in (("speeds", speeds), ("quality", quality), ("accuracy", accuracy)):
        paths.append(str(tmp_path / f"{name}.json"))
        (tmp_path / f"{name}.json").write_text(json.dumps(report))
    points, incomplete = frontier.merge_points([speeds, quality, accuracy])
    assert {p["name"] for p in points} == {"llama.cpp Q4_1", "sparsecc int4", "sparsecc dense", "onnxruntime dense fp32"}
    assert incomplete == ["llama.cpp Q8_0"]
    assert next(p for p in points if p["name"] == "llama.cpp Q4_1") == {
        "name": "llama.cpp Q4_1", "kind": "peer", "tokens_per_s": 150.0, "perplexity": 22.5}
    output = tmp_path / "frontier.png"
    assert frontier.main([*paths, "-o", str(output)]) == 0
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_frontier_bad_input_is_one_sentence(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"rows": []}))
    assert frontier.main([str(bad), "-o", str(tmp_path / "x.png")]) == 1
    assert capsys.readouterr().err.count("\n") == 1
