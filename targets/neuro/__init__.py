"""The ``neuro`` target: a sparse model mapped onto a neuromorphic chip model and run by an
event-driven simulator (``neuro:seneca``, ``neuro:loihi2`` or ``neuro:PATH.toml``)."""

from targets.neuro.target import NeuroTarget


def make_target(chip: str, chips: int = 1) -> NeuroTarget:
    return NeuroTarget(chip, chips)


__all__ = ["NeuroTarget", "make_target"]
