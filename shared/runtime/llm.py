"""OpenAI-compatible chat models (OpenAI, vLLM, Ollama), used when configured.

With neither ``OPENAI_API_KEY`` nor ``OPENAI_BASE_URL`` set there is no model and
callers take their offline path (the offline responder, rule extraction, the
extractive summariser).
"""

from __future__ import annotations

from typing import Any, Protocol

from shared.runtime.logging import get_logger

log = get_logger(__name__)


class ChatModel(Protocol):
    name: str

    async def complete(self, messages: list[dict[str, str]], *, max_tokens: int = 512,
                       temperature: float = 0.3, json_mode: bool = False) -> str: ...


class OpenAIChatModel:
    def __init__(self, *, api_key: str | None, base_url: str | None, model: str, timeout_s: float = 30.0) -> None:
        from openai import AsyncOpenAI

        # vLLM and Ollama accept any key; the client insists on one.
        self._client = AsyncOpenAI(api_key=api_key or "not-needed", base_url=base_url, timeout=timeout_s,
                                   max_retries=1)
        self.name = model

    async def complete(self, messages: list[dict[str, str]], *, max_tokens: int = 512,
                       temperature: float = 0.3, json_mode: bool = False) -> str:
        kwargs: dict[str, Any] = {"model": self.name, "messages": messages, "max_tokens": max_tokens,
                                  "temperature": temperature}
        if json_mode:
            kwargs["response_format"] = {"type": "json_object"}
        resp = await self._client.chat.completions.create(**kwargs)
        return resp.choices[0].message.content or ""

    async def close(self) -> None:
        await self._client.close()


def chat_model(api_key: str | None, base_url: str | None, model: str, timeout_s: float = 30.0) -> ChatModel | None:
    if not (api_key or base_url):
        return None
    return OpenAIChatModel(api_key=api_key, base_url=base_url, model=model, timeout_s=timeout_s)
