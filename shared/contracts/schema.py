"""JSON Schema of every message on the bus, generated from the pydantic models.

``python -m mesh schema --write`` writes one file per message into ``docs/schema/``; a unit test fails
when a committed file differs from what the models generate, so the published schema cannot drift from
the code. What a sender may send is described in pydantic's *validation* mode (defaults optional, unknown
fields ignored); what the mesh emits in *serialization* mode (every field it writes).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import TypeAdapter

from shared.contracts.codec import AI_RESPONSE, LTM_REQUEST, LTM_RESPONSE, LTM_WARM, MEMORY_UPDATE, USER_INPUT
from shared.contracts.memory_api import MEMORY_FORGET, MEMORY_REQUEST, MEMORY_RESPONSE
from shared.contracts.messages import DocAdded, DocDeleted, DocSearchResult
from shared.contracts.ping import PingInfo

Mode = Literal["validation", "serialization"]

# file stem -> (model, mode, where it travels)
MESSAGES: dict[str, tuple[TypeAdapter[Any], Mode, str]] = {
    "user_input": (USER_INPUT, "validation", "stream user_input_queue (USER_INPUT_STREAM), field data"),
    "ai_response": (AI_RESPONSE, "serialization", "stream ai_responses (AI_RESPONSES_STREAM), field data"),
    "memory_update": (MEMORY_UPDATE, "validation",
                      "stream and pub/sub channel memory_updates (MEMORY_UPDATES_STREAM / _CHANNEL)"),
    "ltm_request": (LTM_REQUEST, "validation", "list ltm_requests (LTM_REQUESTS_QUEUE), RPUSH; union on type"),
    "ltm_response": (LTM_RESPONSE, "serialization", "pub/sub channel reply_to, else ltm_responses"),
    "ltm_warm": (LTM_WARM, "validation", "pub/sub channel ltm_index_warm (LTM_WARM_CHANNEL), ltm to ltm"),
    "memory_request": (MEMORY_REQUEST, "validation",
                       "list memory_requests (MEMORY_REQUESTS_QUEUE), RPUSH; union on type"),
    "memory_response": (MEMORY_RESPONSE, "serialization", "pub/sub channel reply_to, else memory_responses"),
    "memory_forget": (MEMORY_FORGET, "validation",
                      "pub/sub channel memory_forget (MEMORY_FORGET_CHANNEL), memory to memory"),
    "ping_info": (TypeAdapter(PingInfo), "serialization", "data of every service's reply to a ping"),
    "doc_added": (TypeAdapter(DocAdded), "serialization", "data of ltm's reply to doc_add"),
    "doc_search_result": (TypeAdapter(DocSearchResult), "serialization", "data of ltm's reply to doc_search"),
    "doc_deleted": (TypeAdapter(DocDeleted), "serialization", "data of ltm's reply to doc_delete"),
}
DIR = Path(__file__).resolve().parent.parent.parent / "docs" / "schema"
DRAFT = "https://json-schema.org/draft/2020-12/schema"


def schema(stem: str) -> dict[str, Any]:
    adapter, mode, where = MESSAGES[stem]
    body = adapter.json_schema(mode=mode)
    return {"$schema": DRAFT, "$id": f"memory-mesh/v1/{stem}.json", "x-travels-on": where,
            "x-mode": mode, **body}


def rendered() -> dict[str, str]:
    """File name -> its text, exactly as ``write`` stores it."""
    return {f"{stem}.json": json.dumps(schema(stem), indent=2, sort_keys=True) + "\n" for stem in MESSAGES}


def write(directory: Path = DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    texts = rendered()
    for stale in directory.glob("*.json"):
        if stale.name not in texts:
            stale.unlink()
    paths = []
    for name, text in texts.items():
        path = directory / name
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    return paths


def stale(directory: Path = DIR) -> list[str]:
    """Names of files that are missing, differ from the models, or belong to no message."""
    texts = rendered()
    out = [name for name, text in texts.items()
           if not (directory / name).is_file() or (directory / name).read_text(encoding="utf-8") != text]
    out += sorted(p.name for p in directory.glob("*.json") if p.name not in texts)
    return out
