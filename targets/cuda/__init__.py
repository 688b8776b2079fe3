"""The ``cuda`` target: TVM Relax with our TIR kernels, built to CUDA source and PTX."""
