"""The sparsification methods, in one table, and how ``--weights`` / ``--activations`` are read.

A method is a module of this package with one function:

* a weight method (``--weights NAME:LEVEL``) has ``prune(model, layers, method, options,
  progress) -> list[Linear]``: it zeros weights of ``layers`` (the prunable linear layers,
  ``sparsify.graph.linear_layers``, plus the output projection with
  ``--prune-output-projection``) in place and returns the layers it changed;
* an activation method (``--activations NAME:LEVEL``) has ``gate(model, method, options,
  progress) -> dict``: it inserts its gates (or routers) in place and returns
  ``{"gates": {tensor: what was set}, "sparsity": the calibrated fraction or None}``.

``METHODS`` names each module and says how the method is written; ``sparsecc sparsify
--help`` and the error for an unknown name are made from it. A new method is its file plus
one row here. This module imports no method: the verb (``sparsify.run``) imports the one
asked for, so the CLI's help costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from runtime.errors import SparseccError


@dataclass(frozen=True)
class MethodInfo:
    """One row of the table.

    Attributes:
        kind: ``weights`` or ``activations`` (which option takes it).
        module: the module with its ``prune`` (weights) or ``gate`` (activations).
        usage: how it is written, e.g. ``wanda:L or wanda:N:M``.
        summary: what it does, for a person reading ``--help``.
        level: whether it takes ``:LEVEL`` (a fraction in [0, 1)).
        n_m: whether ``NAME:N:M`` (keep N of every M) is accepted too.
        options: words accepted after the level (``dynk:L:global``) and what each does.
        output_projection: whether ``--prune-output-projection`` may add the output
            projection to its layers (a weight method that does not remove MLP neurons).
    """

    kind: str
    module: str
    usage: str
    summary: str
    level: bool = True
    n_m: bool = False
    options: dict[str, str] = field(default_factory=dict)
    output_projection: bool = False


METHODS = {
    "magnitude": MethodInfo("weights", "sparsify.magnitude", "magnitude:L",
                            "in every layer, the fraction L of weights of smallest magnitude is zeroed",
                            output_projection=True),
    "wanda": MethodInfo("weights", "sparsify.wanda", "wanda:L or wanda:N:M",
                        "weights are scored by |W| times their input's norm on the calibration data (Wanda); "
                        "each output keeps its best 1 - L, or the N best of every M inputs", n_m=True,
                        output_projection=True),
    "seap": MethodInfo("weights", "sparsify.seap", "seap:L",
                       "the fraction L of each MLP's neurons with the smallest mean |activation| is removed whole"),
    "functional": MethodInfo("weights", "sparsify.functional", "functional:L",
                             "as seap, with neurons scored by FastICA (neurons in no functional network go first)"),
    "teal": MethodInfo("activations", "sparsify.teal", "teal:L",
                       "a magnitude threshold on every linear input, levels set per tensor so that the fraction L "
                       "of multiply-adds is skipped (TEAL)"),
    "cats": MethodInfo("activations", "sparsify.cats", "cats:L",
                       "a threshold on every MLP's SiLU output that zeros the fraction L of its values (CATS)"),
    "relu": MethodInfo("activations", "sparsify.relu", "relu",
                       "SiLU becomes ReLU, whose natural zeros are the sparsity", level=False),
    "dynk": MethodInfo("activations", "sparsify.dynk", "dynk:L",
                       "each MLP becomes a mixture of experts (neurons clustered by co-activation) with a router "
                       "fitted on the calibration data, and per token only the experts whose predicted output norm "
                       "is at least tau times the largest run, tau set per MLP so that the fraction L of experts is "
                       "skipped on average",
                       options={"global": "one tau for all MLPs", "topk": "a fixed number of experts per token"}),
}


def method_names(kind: str) -> list[str]:
    """The methods ``--weights`` (kind ``weights``) or ``--activations`` take, in table order."""
    return [name for name, info in METHODS.items() if info.kind == kind]


def method_help(kind: str) -> str:
    """The CLI's help for ``--weights`` or ``--activations``: every method of that kind."""
    parts = []
    for name in method_names(kind):
        info = METHODS[name]
        options = "".join(f"; {name}:L:{option}: {meaning}" for option, meaning in info.options.items())
        parts.append(f"{info.usage}: {info.summary}{options}.")
    return " ".join(parts)


@dataclass(frozen=True)
class Method:
    """A parsed ``METHOD:LEVEL`` (or ``wanda:N:M``) specification."""

    name: str
    level: float = 0.0
    n: int | None = None
    m: int | None = None
    option: str | None = None


def parse_method(text: str, kind: str) -> Method:
    """Parses ``--weights`` (kind "weights") or ``--activations`` (kind "activations")."""
    known = method_names(kind)
    name, _, rest = text.partition(":")
    option = None
    if name not in known:
        raise SparseccError(f"--{kind} {text!r}: unknown method {name!r} (choose from {', '.join(known)}).")
    info = METHODS[name]
    if not info.level:
        if rest:
            raise SparseccError(f"--{kind} {name} takes no level ({info.summary}), not {text!r}.")
        return Method(name)
    if info.n_m and rest.count(":") == 1:
        n_text, m_text = rest.split(":")
        if not (n_text.isdigit() and m_text.isdigit()):
            raise SparseccError(f"--{kind} {text!r}: N:M must be two whole numbers, e.g. {name}:2:4.")
        n, m = int(n_text), int(m_text)
        if not 0 < n < m:
            raise SparseccError(f"--{kind} {text!r}: N:M needs 0 < N < M (keep N of every M), e.g. {name}:2:4.")
        return Method(name, (m - n) / m, n, m)
    if info.options and ":" in rest:
        rest, _, option = rest.partition(":")
        if option not in info.options:
            choices = [f"{name}:L"] + [f"{name}:L:{word} ({meaning})" for word, meaning in info.options.items()]
            raise SparseccError(f"--{kind} {text!r}: unknown option {option!r}; write {', '.join(choices[:-1])} "
                                f"or {choices[-1]}.")
    try:
        level = float(rest)
    except ValueError:
        raise SparseccError(f"--{kind} {text!r} needs a level: {name}:LEVEL with LEVEL between 0 and 1, e.g. {name}:0.5.") from None
    if not 0.0 <= level < 1.0:
        raise SparseccError(f"--{kind} {text!r}: the level must be in [0, 1), not {level:g}.")
    return Method(name, level, option=option)


@dataclass(frozen=True)
class SparsifyOptions:
    """What ``sparsecc sparsify`` does (the methods are in ``METHODS``); every method gets it."""

    model: str
    output: str
    weights: str | None = None
    activations: str | None = None
    calib: str | None = None
    calib_tokens: int = 2048
    seed: int = 0
    mask: str | None = None
    like: str | None = None
    prune_output_projection: bool = False
    #: quantize the weights last (``formats.quant.WEIGHT_DTYPES``, round to nearest), as
    #: standard DequantizeLinear; None keeps them float32.
    quantize: str | None = None
