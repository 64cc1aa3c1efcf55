"""Encoder + head → one ONNX graph (+ a TorchScript twin for wsinfer/QuPath), parity-checked on real tiles.

The graph takes what image decoders produce — uint8 RGB ``[N, S, S, 3]`` — and does the cast,
scaling and normalisation itself, so the service cannot get preprocessing wrong. Outputs are
the (temperature-scaled) class probabilities and the embedding, for out-of-distribution flags.

``model.ts.pt`` is the same encoder + head for the field's TorchScript clients: wsinfer (0.6.1,
``wsinfer run --model-path model.ts.pt --config config.json``) and QuPath's WSInfer extension (a
folder with ``torchscript_model.pt`` + ``config.json``). Both feed it what ``config.json``'s transform
makes of a tile — float ``[N, 3, S, S]``, ``ToTensor`` then ``Normalize(mean, std)`` — and both apply
softmax to its output themselves (wsinfer ``run_inference.py``; QuPath ``applySoftmax = true``), so it
returns the temperature-scaled logits: their softmax is exactly ``model.onnx``'s probabilities.

``python -m training.export MODEL_DIR`` writes ``model.ts.pt`` for an existing model directory from
its ``head.safetensors`` and card, checked against its ``model.onnx`` (docs/encoders.md).
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from models.card import (
    EMBEDDINGS_OUTPUT,
    INPUT_NAME,
    OOD_OUTPUT,
    PROBABILITIES_OUTPUT,
    ParityResult,
    Variant,
    sha256_file,
)
from training.embed import Normalize
from training.encoders import FrozenEncoder

log = logging.getLogger("histo_robust.export")

PARITY_TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "int8": 0.95}  # int8: minimum top-1 agreement


HEAD_FILE = "head.safetensors"
TORCHSCRIPT_FILE = "model.ts.pt"


class ExportError(RuntimeError):
    pass


def save_head(head: nn.Module, path: Path) -> None:
    """The torch head beside the graph: lets anyone re-export or re-check parity without retraining."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in head.state_dict().items()}, str(path))
    path.chmod(0o644)


def load_head(path: Path, kind: str, n_classes: int) -> nn.Module:
    from safetensors.torch import load_file

    state = load_file(str(path))
    head = _empty_head(state, kind, n_classes)
    head.load_state_dict(state)
    return head.eval()


def _empty_head(state: dict[str, torch.Tensor], kind: str, n_classes: int) -> nn.Module:
    """The module ``state`` was saved from: one head, a slide ensemble, or one of those per stacked encoder."""
    from training.heads import make_head
    from training.robust import FeatureGroupEnsemble, SlideEnsemble

    if "groups" in state:  # FeatureGroupEnsemble: groups + members.<g>.<its own head>
        groups = state["groups"].tolist()
        members = []
        for g in range(len(groups)):
            prefix = f"members.{g}."
            members.append(
                _empty_head({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}, kind, n_classes)
            )
        return FeatureGroupEnsemble(members, groups)
    if "0.mean" in state:
        dim = state["0.mean"].shape[0]
        return make_head(kind, dim, n_classes, torch.zeros(dim), torch.ones(dim))
    # slide ensemble: members.<i>.<layer>...
    dim = state["members.0.0.mean"].shape[0]
    n_members = len({k.split(".")[1] for k in state})
    return SlideEnsemble([make_head(kind, dim, n_classes, torch.zeros(dim), torch.ones(dim)) for _ in range(n_members)])


class ServingGraph(nn.Module):
    """uint8 NHWC → (probabilities, embeddings[, ood_score]): exactly what ``model.onnx`` computes."""

    def __init__(
        self, encoder: FrozenEncoder, head: nn.Module, temperature: float = 1.0, ood: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.normalize = Normalize(encoder.spec.mean, encoder.spec.std)
        self.encoder = encoder.features
        self.head = head
        self.ood = ood
        self.register_buffer("inv_temperature", torch.tensor(1.0 / temperature))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        embeddings = self.encoder(self.normalize(images))
        probabilities = torch.softmax(self.head(embeddings) * self.inv_temperature, dim=1)
        if self.ood is None:
            return probabilities, embeddings
        return probabilities, embeddings, self.ood(embeddings)


class WsinferGraph(nn.Module):
    """Normalised float NCHW → temperature-scaled logits ``[N, C]``: what wsinfer and QuPath run."""

    def __init__(self, encoder: FrozenEncoder, head: nn.Module, temperature: float = 1.0) -> None:
        super().__init__()
        self.encoder = encoder.features
        self.head = head
        self.register_buffer("inv_temperature", torch.tensor(1.0 / temperature))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x)) * self.inv_temperature


def export_torchscript(graph: WsinferGraph, path: Path, example: torch.Tensor) -> None:
    """Trace (timm models script unevenly; tracing records the same ops) with a dynamic batch axis."""
    graph = graph.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        # TracerWarnings about Python ints taken from shapes; torch.jit's deprecation notice (TorchScript
        # is the format wsinfer and QuPath load)
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(graph, example, check_trace=False)
        torch.jit.save(traced, str(path))
    path.chmod(0o644)


def wsinfer_input(images: np.ndarray, mean, std) -> torch.Tensor:
    """uint8 NHWC → what config.json's ``ToTensor`` + ``Normalize`` give wsinfer for the same pixels."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).to(torch.float32) / 255.0
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@torch.inference_mode()
def torchscript_predict(path: Path, images: np.ndarray, mean, std, batch_size: int = 32) -> np.ndarray:
    """Probabilities as wsinfer computes them: softmax of the TorchScript output."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
        module = torch.jit.load(str(path), map_location="cpu").eval()
    out = [
        torch.softmax(module(wsinfer_input(images[s : s + batch_size], mean, std)), dim=1).numpy()
        for s in range(0, len(images), batch_size)
    ]
    return np.concatenate(out)


def export_onnx(graph: ServingGraph, path: Path, input_size: int, opset: int = 18) -> None:
    """Export with a dynamic batch axis; the whole graph in one file."""
    graph = graph.eval()
    example = torch.zeros(2, input_size, input_size, 3, dtype=torch.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch = torch.export.Dim("batch", min=1, max=4096)
        program = torch.onnx.export(
            graph,
            (example,),
            input_names=[INPUT_NAME],
            output_names=[PROBABILITIES_OUTPUT, EMBEDDINGS_OUTPUT] + ([OOD_OUTPUT] if graph.ood is not None else []),
            dynamic_shapes={"images": {0: batch}},
            opset_version=opset,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    program.save(str(path), external_data=False)


def onnx_predict(path: Path, images: np.ndarray, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    probs, embs = [], []
    for start in range(0, len(images), batch_size):
        p, e = session.run([PROBABILITIES_OUTPUT, EMBEDDINGS_OUTPUT], {INPUT_NAME: images[start : start + batch_size]})
        probs.append(p)
        embs.append(e)
    return np.concatenate(probs), np.concatenate(embs)


@torch.inference_mode()
def torch_predict(graph: ServingGraph, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    return np.concatenate(
        [graph(torch.from_numpy(images[s : s + batch_size]))[0].numpy() for s in range(0, len(images), batch_size)]
    )


def parity_check(
    reference: np.ndarray, path: Path, images: np.ndarray, variant: str = "fp32", probs: np.ndarray | None = None
) -> ParityResult:
    """Max |Δ probability| and top-1 agreement between torch and ONNX Runtime (or given ``probs``)."""
    if probs is None:
        probs, _ = onnx_predict(path, images)
    diff = float(np.abs(probs - reference).max())
    agreement = float((probs.argmax(1) == reference.argmax(1)).mean())
    tolerance = PARITY_TOLERANCE[variant]
    if variant == "int8":
        return ParityResult(
            max_abs_diff=diff,
            top1_agreement=agreement,
            criterion="top1_agreement",
            tolerance=tolerance,
            n_images=len(images),
            passed=agreement >= tolerance,
        )
    return ParityResult(
        max_abs_diff=diff, top1_agreement=agreement, tolerance=tolerance, n_images=len(images), passed=diff <= tolerance
    )


def fp16_variant(src: Path, dst: Path) -> None:
    """Weights and activations in float16 (for GPUs); uint8 input and float32 outputs kept."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True, disable_shape_infer=False)
    onnx.save(model, str(dst))


def int8_variant(src: Path, dst: Path, calibration: np.ndarray) -> None:
    """Static QDQ int8 quantisation (for CPUs), calibrated on real tiles."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{INPUT_NAME: calibration[i : i + 16]} for i in range(0, len(calibration), 16)])

        def get_next(self):
            return next(self.batches, None)

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.WARNING)  # the quantiser logs one INFO line per rescaled weight
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize_static(
            str(pre),
            str(dst),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=_head_nodes(pre),
        )
    root.setLevel(level)


def _head_nodes(path: Path) -> list[str]:
    """Keep the softmax/head tail in float: it is tiny and quantising it costs calibration."""
    import onnx

    graph = onnx.load(str(path)).graph
    return [n.name for n in graph.node if n.op_type in ("Softmax", "Gemm", "MatMul") or "head" in n.name]


def export_model(
    encoder: FrozenEncoder,
    head: nn.Module,
    out_dir: Path,
    parity_images: np.ndarray,
    *,
    temperature: float = 1.0,
    ood: nn.Module | None = None,
    variants: tuple[str, ...] = (),
    val_images: np.ndarray | None = None,
    val_labels: np.ndarray | None = None,
) -> tuple[ParityResult, dict[str, Variant]]:
    """Write ``out_dir/model.onnx`` (+ variants); raise :class:`ExportError` if fp32 parity fails."""
    graph = ServingGraph(encoder, head, temperature, ood).eval()
    path = out_dir / "model.onnx"
    save_head(head, out_dir / HEAD_FILE)
    export_onnx(graph, path, encoder.spec.input_size)
    reference = torch_predict(graph, parity_images)
    parity = parity_check(reference, path, parity_images)
    log.info("ONNX parity fp32: max |Δp| = %.2e on %d tiles", parity.max_abs_diff, parity.n_images)
    if not parity.passed:
        raise ExportError(
            f"{path}: ONNX Runtime differs from torch by {parity.max_abs_diff:.3e} (> {parity.tolerance:g}) "
            f"on {parity.n_images} tiles; refusing to ship this graph"
        )
    ts_parity = write_torchscript(encoder, head, out_dir, parity_images, reference, temperature)
    log.info("TorchScript parity: max |Δp| = %.2e on %d tiles", ts_parity.max_abs_diff, ts_parity.n_images)
    made: dict[str, Variant] = {}
    for name in variants:
        vpath = out_dir / f"model.{name}.onnx"
        if name == "fp16":
            fp16_variant(path, vpath)
        elif name == "int8":
            int8_variant(path, vpath, parity_images)
        else:
            raise ExportError(f"unknown variant {name!r}; choose fp16 or int8")
        vparity = parity_check(reference, vpath, parity_images, name)
        accuracy = None
        if val_images is not None and val_labels is not None and len(val_images):
            accuracy = float((onnx_predict(vpath, val_images)[0].argmax(1) == val_labels).mean())
        log.info("variant %s: max |Δp| = %.2e, val accuracy %s", name, vparity.max_abs_diff, accuracy)
        if not vparity.passed:
            log.warning("variant %s fails parity (%s): not shipped", name, vparity)
            vpath.unlink(missing_ok=True)
            continue
        made[name] = Variant(file=vpath.name, sha256=sha256_file(vpath), parity=vparity, val_accuracy=accuracy)
    return parity, made


def write_torchscript(
    encoder: FrozenEncoder,
    head: nn.Module,
    out_dir: Path,
    images: np.ndarray,
    reference: np.ndarray,
    temperature: float = 1.0,
) -> ParityResult:
    """``out_dir/model.ts.pt``, its softmax checked against ``reference`` probabilities on ``images``."""
    mean, std = encoder.spec.mean, encoder.spec.std
    path = out_dir / TORCHSCRIPT_FILE
    export_torchscript(WsinferGraph(encoder, head, temperature), path, wsinfer_input(images[:2], mean, std))
    probs = torchscript_predict(path, images, mean, std)
    parity = parity_check(reference, path, images, probs=probs)
    if not parity.passed:
        path.unlink(missing_ok=True)
        raise ExportError(
            f"{path}: TorchScript differs from the reference by {parity.max_abs_diff:.3e} (> {parity.tolerance:g}) "
            f"on {parity.n_images} tiles; not written"
        )
    return parity


def torchscript_for_model_dir(model_dir: Path, images: np.ndarray, weights: Path | None = None) -> ParityResult:
    """``model.ts.pt`` for an existing model directory: encoder from the card, head from ``head.safetensors``.

    The reference is the directory's own ``model.onnx`` on ``images`` (uint8 NHWC at the card's input
    size): the TorchScript must give the probabilities the service gives.
    """
    from models.card import load_model_dir
    from training.encoders import build_encoder

    model = load_model_dir(model_dir)
    card = model.card
    encoder = build_encoder(card.encoder.id, weights)
    if card.encoder.weights_sha256 and encoder.weights_sha256 != card.encoder.weights_sha256:
        raise ExportError(
            f"{model_dir}: encoder weights sha256 {encoder.weights_sha256} differ from the card's "
            f"{card.encoder.weights_sha256}; pass the weights file the model was trained with (--weights)"
        )
    head = load_head(model.path / HEAD_FILE, card.head.kind, len(card.classes))
    temperature = card.calibration.temperature if card.calibration else 1.0
    reference, _ = onnx_predict(model.onnx_path, images)
    return write_torchscript(encoder, head, model.path, images, reference, temperature)


def main(argv: list[str] | None = None) -> None:
    import argparse

    from models.card import ModelLoadError, load_card
    from training.embed import load_rgb_resized
    from training.encoders import EncoderError

    parser = argparse.ArgumentParser(
        prog="python -m training.export",
        description="Write model.ts.pt (TorchScript for wsinfer / QuPath) into an existing model directory, "
        "checked against its model.onnx on real tiles.",
    )
    parser.add_argument("model_dir", type=Path, help="model directory (model.onnx, card.json, head.safetensors)")
    parser.add_argument("--tiles", type=Path, required=True, help="folder of image tiles for the parity check")
    parser.add_argument("--n-tiles", type=int, default=64, help="tiles used for the parity check")
    parser.add_argument("--weights", type=Path, help="encoder weights file, for encoders without built-in weights")
    args = parser.parse_args(argv)
    try:
        size = load_card(args.model_dir / "card.json").input_size
    except ModelLoadError as exc:
        raise SystemExit(f"error: {exc}") from exc
    files = sorted(p for p in args.tiles.rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".tif", ".webp"})
    if not files:
        raise SystemExit(f"error: {args.tiles}: no image tiles (png, jpg, tif, webp)")
    files = files[:: max(1, len(files) // args.n_tiles)][: args.n_tiles]
    images = np.stack([load_rgb_resized(f, size) for f in files])  # as training and the service resize
    try:
        parity = torchscript_for_model_dir(args.model_dir, images, args.weights)
    except (ExportError, ModelLoadError, EncoderError) as exc:
        raise SystemExit(f"error: {exc}") from exc
    print(
        f"{args.model_dir / TORCHSCRIPT_FILE}: softmax matches model.onnx on {parity.n_images} tiles "
        f"(max |Δp| {parity.max_abs_diff:.2e}, top-1 agreement {parity.top1_agreement:.3f})"
    )


if __name__ == "__main__":
    main()
