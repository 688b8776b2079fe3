"""A torch module to an ONNX file with the dynamo exporter: what ``export`` and ``decode_export`` share.

``compiler.export`` exports a causal LM's ``input_ids -> logits``; ``compiler.decode_export``
its KV-cache decode and prefill steps. Both wrap the model in a module whose attribute is
``inner`` and export it here, quietly, with the wrapper's ``inner.`` prefix taken off the
initializer names, so the two graphs and the plain export name the weights alike.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import warnings


def _strip_prefix(model, prefix: str) -> None:
    """Renames initializers ``prefix + name`` to ``name`` (the wrapper's attribute name)."""
    renames = {init.name: init.name[len(prefix):] for init in model.graph.initializer if init.name.startswith(prefix)}
    taken = {init.name for init in model.graph.initializer} | {out for node in model.graph.node for out in node.output}
    renames = {old: new for old, new in renames.items() if new not in taken}
    for init in model.graph.initializer:
        init.name = renames.get(init.name, init.name)
    for node in model.graph.node:
        for index, name in enumerate(node.input):
            if name in renames:
                node.input[index] = renames[name]


@contextlib.contextmanager
def _quiet_exporter():
    """Silences the exporter's warnings and its per-step log lines; errors still raise."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def export_torch(model, output: str | os.PathLike, example_inputs: tuple, input_names: list[str],
                 output_names: list[str], dynamic_shapes=None, metadata: dict[str, str] | None = None) -> None:
    """Exports a torch module with the dynamo exporter and saves it atomically."""
    import torch

    from compiler.onnx_io import save_model

    with tempfile.TemporaryDirectory() as tmp, torch.no_grad(), _quiet_exporter():
        program = torch.onnx.export(
            model, example_inputs, dynamo=True, input_names=input_names,
            output_names=output_names, dynamic_shapes=dynamic_shapes,
            external_data=True, verbose=False,
        )
        program.save(os.path.join(tmp, "model.onnx"), external_data=True)
        from compiler.onnx_io import load_model

        exported = load_model(os.path.join(tmp, "model.onnx"))
        _strip_prefix(exported, "inner.")
        for key, value in (metadata or {}).items():
            exported.metadata_props.add(key=key, value=value)
        save_model(exported, output)

