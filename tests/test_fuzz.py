"""A bounded, seeded fuzz run (``tests/fuzz.py``): about 45 seconds of mutated ONNX models
and mutated artifacts, each ending in one clean ``SparseccError`` or a correct result.

A longer run: ``python -m tests.fuzz --minutes 10`` (the README gives its last counts).
"""

import pytest

from fuzz import BAD, fuzz


@pytest.mark.slow
def test_fuzzed_inputs_end_cleanly_or_correctly():
    result = fuzz(45, seed=0, log=print)
    counts = result["counts"]
    print(counts)
    assert counts["tried"] >= 50, counts  # the run did work, not only set itself up
    assert counts["refused cleanly"] and counts["ran correctly"], counts  # both kinds of outcome were reached
    assert not any(counts[bad] for bad in BAD), result["bad"][:5]
