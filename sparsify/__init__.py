"""Sparsification methods on ONNX graphs: what ``sparsecc sparsify`` runs.

* ``methods.py``: the one table of methods (name, kind, module, how it is written) and
  the options every method receives; the CLI's help is made from it.
* one module per method: ``magnitude``, ``wanda``, ``seap``, ``functional`` (weights);
  ``teal``, ``cats``, ``relu``, ``dynk`` (activations).
* ``masks.py`` (``--mask``: masks other tools wrote) and ``like.py`` (``--like``: another
  export's sparsification copied).
* what the methods share: ``graph.py`` (linear layers and MLPs), ``stats.py`` (statistics
  from onnxruntime runs), ``gates.py`` (inserting gates), ``calibration.py`` (the
  calibration inputs, which ``sparsecc compile --activation-sparsity`` reads too).
* ``run.py``: the verb, ``sparsify(SparsifyOptions(...))``.

A new method is one module with a ``prune`` or ``gate`` function plus one row in
``methods.METHODS``. This package imports nothing at import time, so that the CLI can read
the table cheaply.
"""
