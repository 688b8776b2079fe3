"""Graph passes: ONNX ModelProto in, ModelProto out, one pass per file."""

from passes.base import PassResult

__all__ = ["PassResult"]
