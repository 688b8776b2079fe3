"""``--mask FILE``: external pruning masks, the files other pruning tools write.

Two formats, chosen by the file's extension:

* ``.pt``: a ``torch.nn.utils.prune`` state dict; every ``*_mask`` tensor, in the order
  of the state dict.
* ``.safetensors``: a checkpoint in the ``sparse-bitmask`` format of the compressed-tensors
  package. Each compressed weight ``PREFIX`` is stored as ``PREFIX.shape`` (the dense
  [rows, cols]), ``PREFIX.compressed`` (the nonzero values, row-major),
  ``PREFIX.bitmask`` (uint8 [rows, ceil(cols / 8)], bits packed little-endian along a
  row, as ``numpy.packbits(..., bitorder="little")`` writes them) and
  ``PREFIX.row_offsets``. The mask is the unpacked bitmask; weights are read in the
  order of the modules (layer index, attention before MLP, q k v o, gate up down), since a
  safetensors file keeps its keys sorted by name.

Masks come back in torch's Linear layout, [out features, in features]; ``apply_masks``
matches them, in module order, to the linear layers in graph order by shape ([N, K]
transposed) and multiplies the weights by them.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx

from runtime.errors import SparseccError
from sparsify.graph import Linear, get_weight, match_by_shape, set_weight

# The order of a transformer block's linear layers in the graph, for sorting by name.
SUBMODULE_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "c_attn", "out_proj", "gate_proj", "up_proj",
                   "fc1", "c_fc", "down_proj", "fc2", "c_proj")


def read_masks(path: str) -> list[np.ndarray]:
    """The 2-D masks stored in ``path`` (``.pt`` or ``.safetensors``), in module order."""
    if not Path(path).exists():
        raise SparseccError(f"{path}: no such file.")
    if path.endswith(".safetensors"):
        return compressed_tensors_masks(path)
    return torch_prune_masks(path)


def torch_prune_masks(path: str) -> list[np.ndarray]:
    """The ``*_mask`` tensors of a ``torch.nn.utils.prune`` state dict."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise SparseccError(f"{path} is not a torch state dict ({type(exc).__name__}).") from None
    if not isinstance(state, dict):
        raise SparseccError(f"{path} is not a torch state dict.")
    masks = [value.detach().cpu().numpy() for key, value in state.items() if str(key).endswith("_mask")]
    if not masks:
        raise SparseccError(f"{path} has no *_mask tensors (save the state dict of a model pruned with torch.nn.utils.prune).")
    return [mask != 0 for mask in masks if mask.ndim == 2]


def _module_order(prefix: str) -> tuple:
    numbers = tuple(int(n) for n in re.findall(r"\d+", prefix))
    leaf = prefix.rsplit(".", 1)[-1]
    block = 0 if re.search(r"attn|attention", prefix) else 1
    rank = SUBMODULE_ORDER.index(leaf) if leaf in SUBMODULE_ORDER else len(SUBMODULE_ORDER)
    return numbers, block, rank, prefix


def compressed_tensors_masks(path: str) -> list[np.ndarray]:
    """The masks of a compressed-tensors ``sparse-bitmask`` checkpoint."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise SparseccError(f"{path} is not a safetensors file ({exc}).") from None
    prefixes = sorted((key[: -len(".bitmask")] for key in tensors if key.endswith(".bitmask")), key=_module_order)
    if not prefixes:
        raise SparseccError(f"{path} has no '*.bitmask' tensors (it is not in compressed-tensors' sparse-bitmask format).")
    masks = []
    for prefix in prefixes:
        if f"{prefix}.shape" not in tensors:
            raise SparseccError(f"{path}: {prefix}.bitmask has no {prefix}.shape beside it.")
        shape = [int(d) for d in np.asarray(tensors[f"{prefix}.shape"]).reshape(-1)]
        packed = np.asarray(tensors[f"{prefix}.bitmask"])
        if len(shape) != 2 or packed.ndim != 2 or packed.shape != (shape[0], (shape[1] + 7) // 8):
            raise SparseccError(f"{path}: {prefix}.bitmask has shape {list(packed.shape)}, which does not fit the dense shape {shape}.")
        mask = np.unpackbits(packed.view(np.uint8), axis=-1, count=shape[1], bitorder="little").astype(bool)
        values = tensors.get(f"{prefix}.compressed")
        if values is not None and values.size != int(mask.sum()):
            raise SparseccError(f"{path}: {prefix} has {values.size} values but its bitmask marks {int(mask.sum())}.")
        masks.append(mask)
    return masks


def apply_masks(model: onnx.ModelProto, layers: list[Linear], path: str) -> list[str]:
    """Multiplies the weights by the masks in ``path``, matched in order by shape."""
    masks = read_masks(path)
    # torch Linear weights are [N, K]
    matched = match_by_shape(model, layers, [mask.T.shape for mask in masks],
                             lambda i: f"{path}: a mask of shape {list(masks[i].shape)} matches no remaining linear layer "
                                       f"of shape {list(masks[i].T.shape)} (transposed).")
    for mask, layer in zip(masks, matched):
        set_weight(model, layer, get_weight(model, layer) * mask.T)
    return [layer.weight for layer in matched]
