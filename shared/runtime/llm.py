"""OpenAI-compatible chat models (OpenAI, vLLM, Ollama), used when configured.

With neither ``OPENAI_API_KEY`` nor ``OPENAI_BASE_URL`` set there is no model and
callers take their offline path (the offline responder, rule extraction, the
extractive summariser).
"""

from __future__ import annotations

import time
from typing import Any, Protocol

from shared.runtime import prom
from shared.runtime.logging import get_logger

log = get_logger(__name__)


class ChatModel(Protocol):
    name: str

    async def complete(self, messages: list[dict[str, str]], *, max_tokens: int = 512,
                       temperature: float = 0.3, json_mode: bool = False) -> str: ...


class OpenAIChatModel:
    def __init__(self, *, api_key: str | None, base_url: str | None, model: str, timeout_s: float = 30.0,
                 service: str = "mesh") -> None:
        from openai import AsyncOpenAI

        # vLLM and Ollama accept any key; the client insists on one.
        self._client = AsyncOpenAI(api_key=api_key or "not-needed", base_url=base_url, timeout=timeout_s,
                                   max_retries=1)
        self.name = model
        self.service = service  # the label of llm_call_duration_seconds and llm_tokens_used_total

    async def complete(self, messages: list[dict[str, str]], *, max_tokens: int = 512,
                       temperature: float = 0.3, json_mode: bool = False) -> str:
        kwargs: dict[str, Any] = {"model": self.name, "messages": messages, "max_tokens": max_tokens,
                                  "temperature": temperature}
        if json_mode:
            kwargs["response_format"] = {"type": "json_object"}
        started = time.perf_counter()
        try:
            resp = await self._client.chat.completions.create(**kwargs)
        except Exception as exc:
            prom.LLM_DURATION.labels(self.service, self.name, type(exc).__name__).observe(time.perf_counter() - started)
            raise
        prom.LLM_DURATION.labels(self.service, self.name, "ok").observe(time.perf_counter() - started)
        if resp.usage is not None:
            prom.LLM_TOKENS.labels(self.service, self.name, "prompt").inc(resp.usage.prompt_tokens or 0)
            prom.LLM_TOKENS.labels(self.service, self.name, "completion").inc(resp.usage.completion_tokens or 0)
        return resp.choices[0].message.content or ""

    async def close(self) -> None:
        await self._client.close()


def chat_model(api_key: str | None, base_url: str | None, model: str, timeout_s: float = 30.0,
               service: str = "mesh") -> ChatModel | None:
    if not (api_key or base_url):
        return None
    return OpenAIChatModel(api_key=api_key, base_url=base_url, model=model, timeout_s=timeout_s, service=service)
