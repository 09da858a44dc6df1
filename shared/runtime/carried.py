"""A message's vector carried on the bus (``MemoryUpdate.embedding``): one embedding per message in the mesh.

memory embeds each message as it stores it (for ``search_messages``); before this, ltm's ingest embedded the same
text again, its costliest step (one forward pass of the float model a turn, docs/operations.md). memory now sends
the vector along, with the turn's salience (services/memory/carry.py), and ltm stores it as it would have stored
its own (services/ltm/native.py). The receiver trusts nothing it cannot check: the vector must be the model of the
vectors it stores (by name, int8 copies apart), of its size, finite and of unit length; otherwise it embeds the
text itself and counts why (:class:`Refused`).
"""

from __future__ import annotations

import base64
import binascii

import numpy as np

from shared.contracts.messages import CarriedEmbedding
from shared.runtime.embedding import SyncEmbedder

NORM_TOLERANCE = 1e-3  # every model's vectors are L2-normalised here (shared/runtime/embedding.py)


class Refused(ValueError):
    """A carried vector the receiver will not store; ``reason`` is a metric's suffix."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def model_id(model: SyncEmbedder) -> str:
    """How a model's vectors are named on the bus: its name, with ``/int8`` for the int8 copy (whose vectors are
    close to the float model's but not the same)."""
    return f"{model.name}/int8" if getattr(model, "quantized", False) else model.name


def carry(vector: np.ndarray, model: str, salience: float | None = None) -> CarriedEmbedding:
    values = np.ascontiguousarray(vector, dtype="<f4")
    return CarriedEmbedding(model=model, dim=int(values.shape[0]), vector=base64.b64encode(values.tobytes()).decode(),
                            salience=None if salience is None else min(1.0, max(0.0, float(salience))))


def vector_of(carried: CarriedEmbedding, model: str, dim: int) -> np.ndarray:
    """The carried vector as float32, if it is ``model``'s and sound; else :class:`Refused`."""
    if carried.model != model:
        raise Refused("model", f"vector of {carried.model!r}, stored vectors are {model!r}")
    if carried.dim != dim:
        raise Refused("dim", f"{carried.dim} values, stored vectors have {dim}")
    try:
        raw = base64.b64decode(carried.vector, validate=True)
    except (binascii.Error, ValueError):
        raise Refused("encoding", "vector is not base64") from None
    if len(raw) != dim * 4:
        raise Refused("encoding", f"vector holds {len(raw)} bytes, {dim} float32 are {dim * 4}")
    values = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    if not np.isfinite(values).all():
        raise Refused("values", "vector holds NaN or infinity")
    norm = float(np.linalg.norm(values))
    if abs(norm - 1.0) > NORM_TOLERANCE:
        raise Refused("norm", f"vector length {norm:.4f}, not 1")
    return values
