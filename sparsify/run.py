"""``sparsecc sparsify``: prune weights and gate activations of an ONNX model.

Everything works on the ONNX graph (``sparsify.graph``); the calibrated methods measure
the model in onnxruntime (``sparsify.stats``). The methods are in one table
(``sparsify.methods.METHODS``), one module each:

* weights (``--weights METHOD:LEVEL``), on every linear layer with a constant 2-D weight
  except the output projection (``--prune-output-projection`` adds it to ``magnitude``
  and ``wanda``): ``magnitude``, ``wanda`` (and ``wanda:N:M``), ``seap``, ``functional``;
* activations (``--activations METHOD:LEVEL``), written as ``ai.sparsecc``
  ``ActivationGate`` nodes that onnxruntime runs and ``sparsecc compile`` fuses: ``teal``,
  ``cats``, ``relu``, ``dynk``.

Two more sources of sparsity take no method: ``--mask FILE``, the masks another pruning
tool wrote (``sparsify.masks``), and ``--like SPARSIFIED``, the sparsification of another
export of the same model copied (``sparsify.like``), e.g. from the seq-512 graph onto a
``--decode`` export.
"""

from __future__ import annotations

import importlib
import time

import onnx

from compiler.onnx_io import load_model, save_model
from compiler.output_file import check_output_file
from compiler.progress import SILENT, Progress
from runtime.errors import SparseccError
from sparsify.graph import linear_layers, output_projection, weight_sparsity
from sparsify.like import sparsify_like
from sparsify.masks import apply_masks
from sparsify.methods import METHODS, Method, SparsifyOptions, parse_method
from sparsify.stats import calibration, measure_gate_sparsity

__all__ = ["SparsifyOptions", "sparsify"]


def prune_weights(model: onnx.ModelProto, method: Method, options: SparsifyOptions, progress: Progress) -> dict:
    """Runs the weight method on the prunable layers; returns the weight sparsity reached."""
    layers = linear_layers(model)
    if not layers:
        raise SparseccError(f"{options.model} has no linear layers with constant weights to prune.")
    if options.prune_output_projection:
        layers.append(output_projection(model))
    touched = importlib.import_module(METHODS[method.name].module).prune(model, layers, method, options, progress)
    return weight_sparsity(model, touched)


def gate_activations(model: onnx.ModelProto, method: Method, options: SparsifyOptions, progress: Progress) -> dict:
    """Runs the activation method; returns its gates and their calibrated sparsity."""
    return importlib.import_module(METHODS[method.name].module).gate(model, method, options, progress)


def quantize(model: onnx.ModelProto, options: SparsifyOptions) -> dict:
    """Quantizes the (pruned) weights in place, after pruning so pruned zeros stay exact
    zeros (``int8``, ``int4sym``); returns the explanation lines."""
    from compiler.decode_export import decoding_metadata
    from passes.quantize_weights import quantize_weights

    if decoding_metadata(model) is not None:
        raise SparseccError("--quantize writes one graph, and a --decode export has two: compile it with "
                            "--weight-dtype instead, which quantizes both alike.")
    result = quantize_weights(model, options.quantize)
    if not result.modified:
        raise SparseccError(f"{options.model} has no float32 linear weights to quantize.")
    model.CopyFrom(result.model)
    return {"dtype": options.quantize, "explanations": result.explanations}


def sparsify(options: SparsifyOptions, progress: Progress = SILENT) -> dict:
    """Applies the weight and activation methods; writes ``options.output``; returns a summary."""
    weight_method = METHODS.get(options.weights.partition(":")[0]) if options.weights else None
    if options.prune_output_projection and (options.like or weight_method is None or not weight_method.output_projection):
        choices = " or ".join(f"{name}:L" for name, info in METHODS.items() if info.output_projection)
        raise SparseccError(f"--prune-output-projection prunes with --weights {choices}; give one of them "
                            "(the other weight methods remove MLP neurons, which the output projection does not have).")
    check_output_file(options.output)  # before the work, not after it
    if options.like:
        return sparsify_like(options, progress)
    weights = parse_method(options.weights, "weights") if options.weights else None
    activations = parse_method(options.activations, "activations") if options.activations else None
    if weights is None and activations is None and not options.mask and not options.quantize:
        raise SparseccError("nothing to do: give --weights METHOD:LEVEL, --activations METHOD:LEVEL, --mask FILE "
                            "or --quantize DTYPE.")
    if weights is not None and options.mask:
        raise SparseccError("give either --weights or --mask, not both.")
    if options.calib_tokens < 1:
        raise SparseccError(f"--calib-tokens must be positive, not {options.calib_tokens}.")
    start = time.perf_counter()
    with progress.step(f"loading {options.model}"):
        model = load_model(options.model)
    summary: dict = {"output": str(options.output), "weights": options.weights, "activations": options.activations}
    if options.mask:
        with progress.step(f"applying the masks of {options.mask}"):
            layers = linear_layers(model)
            masked = set(apply_masks(model, layers, options.mask))
            summary["weight_sparsity"] = weight_sparsity(model, [layer for layer in layers if layer.weight in masked])
    if weights is not None:
        with progress.step(f"pruning weights: {options.weights}"):
            summary["weight_sparsity"] = prune_weights(model, weights, options, progress)
    if activations is not None:
        with progress.step(f"gating activations: {options.activations}"):
            summary["activation_sparsity"] = gate_activations(model, activations, options, progress)
        if options.calib:
            with progress.step("measuring the gates' sparsity on the calibration data"):
                summary["activation_sparsity"]["measured"] = measure_gate_sparsity(model, calibration(model, options, progress))
    if options.quantize:
        summary["quantized"] = quantize(model, options)
    with progress.step(f"writing {options.output}"):
        save_model(model, options.output)
    summary["seconds"] = time.perf_counter() - start
    return summary
