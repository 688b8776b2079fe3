"""sparsecc's compiler: CLI, driver, export and the pass pipeline."""

__version__ = "0.1.0"
