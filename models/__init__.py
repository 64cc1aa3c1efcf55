"""The model artifact contract (card + ONNX), importable without torch or onnxruntime."""

from models.card import (
    CARD_FILE,
    ONNX_FILE,
    SCHEMA_VERSION,
    ModelCard,
    ModelDir,
    ModelLoadError,
    load_model_dir,
    save_model_dir,
    sha256_file,
    write_atomic,
)

__all__ = [
    "CARD_FILE",
    "ONNX_FILE",
    "SCHEMA_VERSION",
    "ModelCard",
    "ModelDir",
    "ModelLoadError",
    "load_model_dir",
    "save_model_dir",
    "sha256_file",
    "write_atomic",
]
