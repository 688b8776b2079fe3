import subprocess
import sys
import textwrap

import numpy as np
import onnx.parser
import pytest
from onnx import numpy_helper

import runtime
from conftest import onnxruntime_reference
from passes.guard_gather_indices import guard_gather_indices, index_ranges
from runtime.errors import SparseccError

# A table looked up by an input that is not called input_ids, through a Cast and a Reshape.
CAST_LOOKUP = """
<ir_version: 10, opset_import: ["" : 18]>
lookup (int32[2, 3] tokens) => (float[6, 4] y) <float[10, 4] table, int64[1] flat> {
    ids = Cast<to=7>(tokens)
    flat_ids = Reshape(ids, flat)
    y = Gather<axis=0>(table, flat_ids)
}
"""

# A table looked up at computed indices: no input range can keep them inside it.
SHIFTED_LOOKUP = """
<ir_version: 10, opset_import: ["" : 18]>
lookup (int64[2, 3] ids) => (float[2, 3, 4] y) <float[10, 4] table, int64 shift> {
    shifted = Add(ids, shift)
    y = Gather<axis=0>(table, shifted)
}
"""

SHIFTED_EXPECTED = """
<ir_version: 10, opset_import: ["" : 18]>
lookup (int64[2, 3] ids) => (float[2, 3, 4] y) <float[10, 4] table, int64 shift, int64 shifted_rows_10> {
    shifted = Add(ids, shift)
    shifted_int64 = Cast<to=7>(shifted)
    shifted_within_10 = Mod<fmod=0>(shifted_int64, shifted_rows_10)
    y = Gather<axis=0>(table, shifted_within_10)
}
"""


def _with_weights(text: str, shift: int = 3) -> onnx.ModelProto:
    model = onnx.parser.parse_model(text)
    values = {"table": np.arange(40, dtype=np.float32).reshape(10, 4), "flat": np.array([-1], np.int64),
              "shift": np.array(shift, np.int64), "shifted_rows_10": np.array(10, np.int64)}
    return _initialized(model, values)


def _initialized(model: onnx.ModelProto, values: dict) -> onnx.ModelProto:
    """The model with the tensors its text declares in ``<...>`` given ``values``."""
    names = [value.name for value in model.graph.value_info]
    del model.graph.value_info[:]
    model.graph.initializer.extend(numpy_helper.from_array(values[name], name) for name in names)
    return model


def _structure(model: onnx.ModelProto) -> list:
    return [(node.op_type, list(node.input), list(node.output), [(a.name, onnx.helper.get_attribute_value(a)) for a in node.attribute])
            for node in model.graph.node]


def test_the_range_of_an_input_reaching_a_table_through_cast_and_reshape():
    assert index_ranges(_with_weights(CAST_LOOKUP)) == {"tokens": [0, 10]}


def test_several_tables_read_by_one_input_keep_the_smallest():
    text = CAST_LOOKUP.replace("<float[10, 4] table, int64[1] flat>", "<float[10, 4] table, int64[1] flat, float[7, 2] small>")
    text = text.replace("=> (float[6, 4] y)", "=> (float[6, 4] y, float[2, 3, 2] z)").replace(
        "y = Gather<axis=0>(table, flat_ids)", "y = Gather<axis=0>(table, flat_ids)\n    z = Gather<axis=0>(small, ids)")
    model = _initialized(onnx.parser.parse_model(text), {
        "table": np.zeros((10, 4), np.float32), "flat": np.array([-1], np.int64), "small": np.zeros((7, 2), np.float32)})
    assert index_ranges(model) == {"tokens": [0, 7]}


def test_a_cast_that_could_change_an_index_is_not_followed():
    """int8 holds 0..127: ids of a 300-row table would wrap, so the input gets no range
    and the gather is guarded instead."""
    text = CAST_LOOKUP.replace("Cast<to=7>(tokens)", "Cast<to=3>(tokens)").replace("float[10, 4] table", "float[300, 4] table")
    model = _initialized(onnx.parser.parse_model(text), {
        "table": np.zeros((300, 4), np.float32), "flat": np.array([-1], np.int64)})
    assert index_ranges(model) == {}
    assert guard_gather_indices(model).modified


def test_structure_computed_indices_are_wrapped_into_the_table():
    result = guard_gather_indices(_with_weights(SHIFTED_LOOKUP))
    assert result.modified
    expected = _with_weights(SHIFTED_EXPECTED)
    assert _structure(result.model) == _structure(expected)
    rows = {init.name: numpy_helper.to_array(init).tolist() for init in result.model.graph.initializer}
    assert rows["shifted_rows_10"] == 10
    assert "computed by Add" in result.explanations[0]


def test_indices_read_from_an_input_are_left_to_the_runtime_check():
    result = guard_gather_indices(_with_weights(CAST_LOOKUP))
    assert not result.modified
    assert "checked at run time" in result.explanations[0]


def test_wrapped_indices_equal_onnxruntime_for_every_valid_index():
    """Mod with fmod=0 is i for i in [0, S) and i + S for i in [-S, 0): ONNX's own meaning."""
    model = _with_weights(SHIFTED_LOOKUP, shift=-10)
    guarded = guard_gather_indices(model).model
    ids = np.array([[0, 5, 19], [10, 12, 1]], np.int64)  # ids - 10 covers [-10, 9]
    np.testing.assert_array_equal(onnxruntime_reference(guarded, {"ids": ids})[0],
                                  onnxruntime_reference(model, {"ids": ids})[0])


def test_constant_indices_outside_the_table_are_refused():
    text = SHIFTED_LOOKUP.replace("shifted = Add(ids, shift)\n    y = Gather<axis=0>(table, shifted)",
                                  "y = Gather<axis=0>(table, shift)").replace("=> (float[2, 3, 4] y)", "=> (float[4] y)")
    with pytest.raises(SparseccError, match="reads index 12 of table, which has 10 rows"):
        guard_gather_indices(_with_weights(text, shift=12))


@pytest.fixture
def compile_text(tmp_path):
    from compiler.driver import CompileOptions, compile_model

    def make(model: onnx.ModelProto, name: str):
        onnx.save(model, str(tmp_path / f"{name}.onnx"))
        compile_model(CompileOptions(str(tmp_path / f"{name}.onnx"), str(tmp_path / f"{name}.sccx")))
        return tmp_path / f"{name}.sccx"

    return make


def test_an_id_equal_to_the_table_size_is_refused_whatever_the_input_is_called(compile_text):
    model = _with_weights(CAST_LOOKUP)
    compiled = runtime.load(compile_text(model, "cast"))
    tokens = np.array([[0, 3, 9], [1, 2, 8]], np.int32)
    np.testing.assert_array_equal(compiled.run({"tokens": tokens})["y"], onnxruntime_reference(model, {"tokens": tokens})[0])
    with pytest.raises(SparseccError, match=r"input 'tokens' holds 10, outside the valid range \[0, 9\]"):
        compiled.run({"tokens": np.full((2, 3), 10, np.int32)})
    with pytest.raises(SparseccError, match=r"input 'tokens' holds -1, outside the valid range \[0, 9\]"):
        compiled.run({"tokens": np.full((2, 3), -1, np.int32)})


def test_computed_indices_never_read_outside_the_table(compile_text, tmp_path):
    """Far out of range, in a fresh process so that a wild read would show as a crash."""
    model = _with_weights(SHIFTED_LOOKUP)
    artifact = compile_text(model, "shifted")
    ids = np.array([[0, 1, 6], [2, 3, 4]], np.int64)
    np.testing.assert_array_equal(runtime.load(artifact).run({"ids": ids})["y"], onnxruntime_reference(model, {"ids": ids})[0])
    script = textwrap.dedent(f"""
        import numpy as np, runtime
        y = runtime.load({str(artifact)!r}).run({{"ids": np.full((2, 3), 1 << 40, np.int64)}})["y"]
        table = np.arange(40, dtype=np.float32).reshape(10, 4)
        assert all(any((row == t).all() for t in table) for row in y.reshape(-1, 4)), y
        print("INSIDE")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "INSIDE" in result.stdout, (result.returncode, result.stderr[-2000:])


def test_token_ids_through_a_reshape_are_checked(compiled):
    """tiny-gpt2 reshapes input_ids before its embedding lookup."""
    model = runtime.load(compiled("tiny-gpt2", 0.0))
    with pytest.raises(SparseccError, match=r"'input_ids' holds 512, outside the valid range \[0, 511\]"):
        model.run({"input_ids": np.full((1, 16), 512, np.int64)})
