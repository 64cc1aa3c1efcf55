"""The artifact contract between training and serving.

A *model directory* holds ``model.onnx`` (plus any external-data file), ``card.json`` and,
for tools such as wsinfer, ``config.json``. Training writes it through :func:`save_model_dir`;
the service and the WSI job read it through :func:`load_model_dir`. This module imports
neither torch nor onnxruntime, so both sides can depend on it.

The ONNX graph contract (fixed for schema version 1):

* input ``images``: uint8 ``[N, input_size, input_size, 3]`` RGB, dynamic ``N``; casting,
  scaling and normalisation happen inside the graph;
* output ``probabilities``: float32 ``[N, len(classes)]`` (calibrated when the card says so);
* output ``embeddings``: float32 ``[N, embedding_dim]``;
* optional output ``ood_score``: float32 ``[N]``, present when the card has an ``ood`` section.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

SCHEMA_VERSION = 1
CARD_FILE = "card.json"
ONNX_FILE = "model.onnx"
WSINFER_CONFIG_FILE = "config.json"
INPUT_NAME = "images"
PROBABILITIES_OUTPUT = "probabilities"
EMBEDDINGS_OUTPUT = "embeddings"
OOD_OUTPUT = "ood_score"


class ModelLoadError(RuntimeError):
    """A model directory that cannot be served; the message names the file and the problem."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class Normalization(_Strict):
    """Per-channel mean/std on the 0..1 scale, applied inside the graph after ``/255``."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]


class EncoderInfo(_Strict):
    id: str = Field(description="Registry name of the frozen encoder, e.g. 'efficientnet_lite0_ms'.")
    weights_sha256: str | None = Field(None, description="sha256 of the weights file the encoder was loaded from.")
    embedding_dim: int
    pretraining: str | None = Field(None, description="How the encoder was pre-trained (ImageNet, SimCLR on ...).")


class HeadInfo(_Strict):
    kind: str = Field(description="'linear' or 'mlp'.")
    method: str = Field(description="Noise-robust training method, e.g. 'knn_clean+gce'.")
    members: int = Field(
        1, description="Heads averaged in the graph: one per group of training slides (slide ensemble), or 1."
    )
    hyperparameters: dict[str, Any] = Field(default_factory=dict)


class CorrectionsFile(_Strict):
    """A reviewer's corrections.csv applied to the training labels (``train.py --corrections``)."""

    file: str
    sha256: str
    rows: int


class DataSummary(_Strict):
    source: str
    n_train: int
    n_val: int
    class_counts: dict[str, int]
    injected_noise: str | None = None
    data_sha256: str | None = Field(None, description="sha256 over the sorted (path, label, file sha256) list.")
    licence: str | None = None
    corrections: list[CorrectionsFile] = Field(default_factory=list)


class ParityResult(_Strict):
    """ONNX Runtime vs the torch model on the same real tiles.

    fp32/fp16 pass on ``max_abs_diff <= tolerance``; int8 rounding moves probabilities of
    borderline tiles by more, so it passes on ``top1_agreement >= tolerance`` instead.
    """

    max_abs_diff: float
    top1_agreement: float | None = None
    criterion: Literal["max_abs_diff", "top1_agreement"] = "max_abs_diff"
    tolerance: float
    n_images: int
    passed: bool


class Variant(_Strict):
    """A reduced-precision copy of the graph (fp16 for GPU, int8 for CPU)."""

    file: str
    sha256: str
    parity: ParityResult
    val_accuracy: float | None = None


class Calibration(_Strict):
    """Temperature applied to logits inside the graph, fitted on noisy labels (see training)."""

    temperature: float
    method: str
    ece_before: float | None = None
    ece_after: float | None = None
    ece_split: str | None = Field(None, description="Labels the ECE figures were measured against.")


class Abstention(_Strict):
    """Predictions whose top probability is under ``threshold`` are marked ``abstained``."""

    threshold: float
    target_selective_accuracy: float
    selective_accuracy: float | None = None
    coverage: float | None = None
    measured_on: str | None = None


class OodScorer(_Strict):
    """How the graph's ``ood_score`` output was built and where a tile counts as out of distribution."""

    method: str
    threshold: float
    quantile: float = Field(description="Share of in-distribution validation tiles under the threshold.")
    output: str = OOD_OUTPUT


class Reproduce(_Strict):
    command: str
    seed: int


class ModelCard(_Strict):
    schema_version: int = SCHEMA_VERSION
    name: str
    version: str = "1"
    description: str = ""
    classes: list[str] = Field(min_length=2, description="Class names in output order.")
    input_size: int = Field(gt=0, description="Side in pixels of the square RGB input of the graph.")
    patch_size_pixels: int = Field(gt=0, description="Side in pixels of a training patch at `mpp`.")
    mpp: float = Field(gt=0, description="Micrometres per pixel of the training patches.")
    normalization: Normalization
    encoder: EncoderInfo
    head: HeadInfo
    data: DataSummary
    metrics: dict[str, Any] = Field(default_factory=dict)
    parity: ParityResult | None = None
    variants: dict[str, Variant] = Field(default_factory=dict)
    calibration: Calibration | None = None
    abstention: Abstention | None = None
    ood: OodScorer | None = None
    recommended_batch_size: int = 32
    created: datetime = Field(default_factory=lambda: datetime.now(UTC))
    onnx_file: str = ONNX_FILE
    onnx_sha256: str = ""
    reproduce: Reproduce | None = None
    credits: list[str] = Field(default_factory=list)

    @field_validator("classes")
    @classmethod
    def _unique_classes(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"class names must be unique, got {value}")
        return value

    @property
    def patch_size_um(self) -> float:
        return self.patch_size_pixels * self.mpp


class ModelDir(BaseModel):
    """A verified model directory: its card and the absolute path of its ONNX file."""

    model_config = ConfigDict(protected_namespaces=())

    path: Path
    card: ModelCard
    onnx_path: Path

    def variant_path(self, variant: str | None) -> Path:
        """Path of ``fp32`` (None) or a named variant's ONNX file."""
        if variant in (None, "", "fp32"):
            return self.onnx_path
        if variant not in self.card.variants:
            known = ", ".join(["fp32", *self.card.variants]) or "fp32"
            raise ModelLoadError(f"{self.path}: no variant {variant!r} in {CARD_FILE} (has: {known})")
        return self.path / self.card.variants[variant].file


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], mode: str = "wb", **open_kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on success fsync and rename it over ``path``.

    Readers never see half a file, and a crash leaves the previous version in place.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; outputs are meant to be shared
        with os.fdopen(fd, mode, **open_kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: str | os.PathLike[str], data: bytes | str) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_file`)."""
    with atomic_file(path, "wb") as handle:
        handle.write(data.encode() if isinstance(data, str) else data)


def wsinfer_config(card: ModelCard) -> dict[str, Any]:
    """A wsinfer model config (schema 1.0) describing the same model."""
    return {
        "spec_version": "1.0",
        "architecture": card.encoder.id,
        "num_classes": len(card.classes),
        "class_names": list(card.classes),
        "patch_size_pixels": card.patch_size_pixels,
        "spacing_um_px": card.mpp,
        "transform": [
            {"name": "Resize", "arguments": {"size": card.input_size}},
            {"name": "ToTensor"},
            {
                "name": "Normalize",
                "arguments": {"mean": list(card.normalization.mean), "std": list(card.normalization.std)},
            },
        ],
    }


def save_model_dir(directory: str | os.PathLike[str], card: ModelCard) -> ModelCard:
    """Write ``card.json`` (with the ONNX sha256 filled in) and the wsinfer ``config.json``.

    The ONNX file must already be in ``directory``; the card is rewritten with its hash so the
    pair cannot drift apart.
    """
    directory = Path(directory)
    onnx_path = directory / card.onnx_file
    if not onnx_path.is_file():
        raise ModelLoadError(f"{onnx_path}: missing; export the graph before saving the card")
    card = card.model_copy(update={"onnx_sha256": sha256_file(onnx_path)})
    write_atomic(directory / CARD_FILE, card.model_dump_json(indent=2) + "\n")
    write_atomic(directory / WSINFER_CONFIG_FILE, json.dumps(wsinfer_config(card), indent=2) + "\n")
    return card


def load_card(path: str | os.PathLike[str]) -> ModelCard:
    """Parse and validate ``card.json``; errors name the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: missing model card")
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}: not valid JSON ({exc})") from exc
    version = raw.get("schema_version") if isinstance(raw, dict) else None
    if version != SCHEMA_VERSION:
        raise ModelLoadError(f"{path}: unknown schema_version {version!r}; this build reads version {SCHEMA_VERSION}")
    try:
        return ModelCard.model_validate(raw)
    except ValidationError as exc:
        raise ModelLoadError(f"{path}: invalid model card: {exc}") from exc


def load_model_dir(directory: str | os.PathLike[str], verify_hash: bool = True) -> ModelDir:
    """Load and verify a model directory: card schema, files present, ONNX sha256."""
    directory = Path(directory).resolve()
    if not directory.is_dir():
        raise ModelLoadError(f"{directory}: model directory does not exist")
    card = load_card(directory / CARD_FILE)
    onnx_path = directory / card.onnx_file
    if not onnx_path.is_file():
        raise ModelLoadError(f"{onnx_path}: missing ONNX file named in {CARD_FILE}")
    if verify_hash:
        actual = sha256_file(onnx_path)
        if actual != card.onnx_sha256:
            raise ModelLoadError(
                f"{onnx_path}: sha256 {actual} does not match {CARD_FILE} ({card.onnx_sha256}); "
                "the file was changed or corrupted after export"
            )
        for name, variant in card.variants.items():
            vpath = directory / variant.file
            if vpath.is_file() and sha256_file(vpath) != variant.sha256:
                raise ModelLoadError(f"{vpath}: sha256 does not match variant {name!r} in {CARD_FILE}")
    return ModelDir(path=directory, card=card, onnx_path=onnx_path)


def check_graph_signature(
    card: ModelCard, inputs: dict[str, list[Any]], outputs: dict[str, list[Any]], where: str
) -> None:
    """Check a graph's input/output names and shapes against the card.

    ``inputs``/``outputs`` map names to shapes (ints or symbolic strings), as onnxruntime's
    ``get_inputs()``/``get_outputs()`` report them. Raises :class:`ModelLoadError`.
    """
    if INPUT_NAME not in inputs:
        raise ModelLoadError(f"{where}: graph has no input {INPUT_NAME!r} (inputs: {sorted(inputs)})")
    shape = inputs[INPUT_NAME]
    if len(shape) != 4 or shape[1:] != [card.input_size, card.input_size, 3]:
        raise ModelLoadError(
            f"{where}: input {INPUT_NAME!r} has shape {shape}, "
            f"card expects [N, {card.input_size}, {card.input_size}, 3]"
        )
    if PROBABILITIES_OUTPUT not in outputs:
        raise ModelLoadError(f"{where}: graph has no output {PROBABILITIES_OUTPUT!r} (outputs: {sorted(outputs)})")
    if card.ood is not None and card.ood.output not in outputs:
        raise ModelLoadError(f"{where}: card has an ood section but the graph has no output {card.ood.output!r}")
    n_out = outputs[PROBABILITIES_OUTPUT][-1]
    if n_out != len(card.classes):
        raise ModelLoadError(
            f"{where}: output {PROBABILITIES_OUTPUT!r} has {n_out} classes but the card lists "
            f"{len(card.classes)}: {card.classes}"
        )
