"""Precision int8: the model's transformer exported to ONNX, its dense layers quantised to int8, run
by onnxruntime on the CPU (the `onnx` extra: `pip install -e ".[onnx]"`).

Each process exports the installed weights once (no download) into
`$XDG_CACHE_HOME/nightly-recs/onnx/<model fingerprint>/` (written under a temporary name and renamed,
so processes that export at once do not clash), then loads it. Pooling and normalisation follow the
model's own modules; models other than mean pooling are refused.

What is quantised (onnxruntime dynamic quantisation, weights per channel): every dense layer but the
feed-forward down-projections (`layer.N/output/dense`), whose int8 rounding cost the most cosine to
fp32 (docs/performance.md, "Precision", has the figures). The run still checks the cosine on a sample of
its own texts and falls back to fp32 below 0.99.

Example:
    encoder = load_quantized(resolve_model_path("all-MiniLM-L6-v2"), threads=2)
    encoder.encode(["a red running shoe"], batch_size=64).shape   # (1, 384), unit length
"""

from __future__ import annotations

import importlib.util
import os
import uuid
from pathlib import Path

import numpy as np

from embedder.artifacts import atomic_path
from embedder.model import load_model, model_fingerprint

_ENCODERS: dict[tuple[str, int], "QuantizedEncoder"] = {}
KEEP_FLOAT = "/output/dense/"  # feed-forward down-projections (not attention/output/dense) stay float32


def available() -> bool:
    """True when onnx and onnxruntime are installed."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnx", "onnxruntime"))


def export_dir(fingerprint: str) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "nightly-recs" / "onnx" / fingerprint[:32]


class QuantizedEncoder:
    """An `embedder.encoder.Encoder` over an int8 ONNX session."""

    def __init__(self, session, tokenizer, max_length: int, dim: int):
        self.session, self.tokenizer, self.max_length, self.dim = session, tokenizer, max_length, dim
        self.inputs = {i.name for i in session.get_inputs()}

    def encode(self, texts, batch_size: int = 64) -> np.ndarray:
        texts = list(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        order = np.argsort([-len(t) for t in texts], kind="stable")  # similar lengths share a batch's padding
        for start in range(0, len(texts), batch_size):
            rows = order[start:start + batch_size]
            enc = self.tokenizer([texts[r] for r in rows], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="np")
            feed = {k: np.asarray(v, dtype=np.int64) for k, v in enc.items() if k in self.inputs}
            hidden = self.session.run(None, feed)[0]
            mask = enc["attention_mask"][..., None].astype(np.float32)
            out[rows] = (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def _max_length(model) -> int:
    """The model's max sequence length; raises for pooling other than mean (the only one exported)."""
    names = [type(module).__name__ for module in model]
    pooling = next((m for m in model if type(m).__name__ == "Pooling"), None)
    mode = getattr(pooling, "pooling_mode", None)  # sentence-transformers 6 (5 had get_pooling_mode_str())
    if mode is None and pooling is not None and hasattr(pooling, "get_pooling_mode_str"):
        mode = pooling.get_pooling_mode_str()
    if mode != "mean":
        raise ValueError(f"precision int8 supports mean-pooling models; this model's modules are {names} "
                         f"(pooling {mode!r}): use bf16 or fp32")
    return int(model.max_seq_length)


def export_quantized(model_path: Path | str) -> Path:
    """The int8 ONNX file for the model at `model_path`, exported and quantised on first use."""
    target = export_dir(model_fingerprint(Path(model_path))) / "model-int8.onnx"
    if target.exists():
        return target
    import onnx
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = load_model(model_path, "cpu")
    _max_length(model)
    transformer, tokenizer = model[0].auto_model, model[0].tokenizer
    sample = tokenizer(["an example text", "a second, somewhat longer example text"], padding=True, return_tensors="pt")
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in sample]

    class LastHidden(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *inputs):
            return self.inner(**dict(zip(names, inputs))).last_hidden_state

    plain = target.with_name(f".fp32-{uuid.uuid4().hex[:8]}.onnx")
    try:
        with torch.no_grad(), atomic_path(target) as quantised:
            torch.onnx.export(LastHidden(transformer).eval(), tuple(sample[n] for n in names), str(plain),
                              input_names=names, output_names=["last_hidden_state"], opset_version=17, dynamo=False,
                              dynamic_axes={n: {0: "batch", 1: "tokens"} for n in [*names, "last_hidden_state"]})
            graph = onnx.load(str(plain)).graph
            weights = {w.name for w in graph.initializer}
            dense = [n.name for n in graph.node if n.op_type == "MatMul" and any(i in weights for i in n.input)
                     and not (KEEP_FLOAT in n.name and "attention" not in n.name)]
            quantize_dynamic(str(plain), quantised, weight_type=QuantType.QInt8, per_channel=True, nodes_to_quantize=dense)
    finally:
        plain.unlink(missing_ok=True)
    return target


def load_quantized(model_path: Path | str, threads: int | None = None) -> QuantizedEncoder:
    """The int8 encoder for the model at `model_path`, loaded once per process and thread count."""
    key = (str(model_path), int(threads or 0))
    if key not in _ENCODERS:
        import onnxruntime as ort

        path = export_quantized(model_path)
        model = load_model(model_path, "cpu")  # its tokenizer and pooling
        max_length = _max_length(model)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        dim = int((getattr(model, 'get_embedding_dimension', None) or model.get_sentence_embedding_dimension)())
        _ENCODERS[key] = QuantizedEncoder(session, model[0].tokenizer, max_length, dim)
    return _ENCODERS[key]
