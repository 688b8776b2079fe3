"""The sparsecc runtime: load and run compiled artifacts.

It needs only the TVM runtime and numpy, and never imports ``compiler`` or ``passes``::

    import runtime
    model = runtime.load("model.sccx")
    outputs = model.run({"input_ids": ids})   # {"logits": array}
"""

from runtime.errors import SparseccError
from runtime.executor import CompiledModel, load

__all__ = ["CompiledModel", "SparseccError", "load"]
