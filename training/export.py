"""Encoder + head → one ONNX graph, with a parity check against torch on real tiles.

The graph takes what image decoders produce — uint8 RGB ``[N, S, S, 3]`` — and does the cast,
scaling and normalisation itself, so the service cannot get preprocessing wrong. Outputs are
the (temperature-scaled) class probabilities and the embedding, for out-of-distribution flags.
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


def parity_check(reference: np.ndarray, path: Path, images: np.ndarray, variant: str = "fp32") -> ParityResult:
    """Max |Δ probability| and top-1 agreement between torch and ONNX Runtime on the same tiles."""
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
