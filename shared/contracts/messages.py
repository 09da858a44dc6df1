"""One pydantic model per message of the wire contract (docs/contract.md; JSON Schema in docs/schema/).

Unknown fields are ignored, missing required fields are errors, text fields are
limited in UTF-8 bytes (``max_content_bytes`` in the validation context, 32 KiB
by default). Request types are a discriminated union on ``type``.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    field_validator,
    model_validator,
)

from shared.contracts.errors import ErrorInfo

DEFAULT_MAX_CONTENT_BYTES = 32 * 1024
DEFAULT_MAX_DOCUMENT_BYTES = 1024 * 1024  # doc_add's text (LTM_DOC_MAX_BYTES); every other text: max_content_bytes
ID_NAMESPACE = uuid.UUID("6f1c8a52-3d5e-4f0b-9a51-5b8f0d7c2e11")

Id = Annotated[str, StringConstraints(min_length=1, max_length=256, strip_whitespace=True)]
# Epoch seconds from 1970 to before the year 3000: a timestamp in milliseconds (or NaN, or infinity) is refused at
# the edge with a clear error, instead of failing a date conversion deep in a consumer.
EPOCH_MAX = 32_503_680_000.0
Timestamp = Annotated[float, Field(ge=0.0, lt=EPOCH_MAX, description="epoch seconds (1970 to before 3000)")]
MemoryType = Literal["preference", "fact", "commitment", "instruction", "entity", "episodic"]
LtmStatus = Literal["hit", "miss", "timeout", "error", "disabled"]
Source = Literal["user", "ai"]
DocFormat = Literal["text", "markdown", "html"]


OFFLINE_MODEL = "offline"
"""``AIResponse.meta.model`` of the offline responder (no language model configured)."""
OFFLINE_REPLY_PREFIX = "[offline responder:"
"""How every offline reply begins: such replies only repeat memories, so they are never memories themselves."""


def derive_id(*parts: object) -> str:
    """A deterministic UUID from parts, so a replay gets the same id."""
    return str(uuid.uuid5(ID_NAMESPACE, "\x1f".join(str(p) for p in parts)))


def entry_time(info: ValidationInfo) -> float | None:
    """When the stream entry being decoded was added (its id's milliseconds), if one is: the time of a message that
    carries none, the same on every delivery of the entry (the clock at decoding would differ each time)."""
    entry = (info.context or {}).get("entry_id")
    if not isinstance(entry, str):
        return None
    try:
        return int(entry.split("-", 1)[0]) / 1000
    except ValueError:
        return None


def new_id() -> str:
    return str(uuid.uuid4())


def _check_size(value: str, info: ValidationInfo) -> str:
    limit = (info.context or {}).get("max_content_bytes", DEFAULT_MAX_CONTENT_BYTES)
    size = len(value.encode("utf-8"))
    if size > limit:
        raise ValueError(f"text is {size} bytes, over the limit of {limit}")
    return value


def _check_document_size(value: str, info: ValidationInfo) -> str:
    limit = (info.context or {}).get("max_document_bytes", DEFAULT_MAX_DOCUMENT_BYTES)
    size = len(value.encode("utf-8"))
    if size > limit:
        raise ValueError(f"document is {size} bytes, over the limit of {limit}")
    return value


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


# --------------------------------------------------------------------------- chat
class UserInput(Message):
    message_id: Id = Field(default="")
    user_id: Id | None = None
    session_id: Id
    content: str = Field(min_length=1)
    timestamp: Timestamp = Field(default_factory=time.time)
    meta: dict[str, Any] = Field(default_factory=dict)

    _size = field_validator("content")(_check_size)

    @model_validator(mode="after")
    def _default_id(self, info: ValidationInfo) -> UserInput:
        if "timestamp" not in self.model_fields_set and (added := entry_time(info)) is not None:
            self.timestamp = added  # a redelivery is the same turn, at the same time (memory's STM member)
        if not self.message_id:
            entry = (info.context or {}).get("entry_id")
            # A redelivered stream entry keeps its id, so its derived message id is stable.
            self.message_id = derive_id("user_input", entry) if entry else new_id()
        return self


class AIResponseMeta(Message):
    model_config = ConfigDict(extra="allow")

    ltm: LtmStatus = "disabled"
    memories_used: int = 0
    model: str = ""
    latency_ms: float = 0.0
    # ENABLE_RAG: the document search beside the memory search (disabled when off); passages in the prompt
    docs: LtmStatus = "disabled"
    passages_used: int = 0


class AIResponse(Message):
    message_id: Id
    in_reply_to: Id
    user_id: Id | None = None
    session_id: Id
    content: str
    timestamp: Timestamp = Field(default_factory=time.time)
    meta: AIResponseMeta = Field(default_factory=AIResponseMeta)

    _size = field_validator("content")(_check_size)


# ----------------------------------------------------------------- memory updates
class LtmWarm(Message):
    """On ``ltm_index_warm``: users ltm just stored memories for (their next search should find them indexed), and
    users just deleted (``forget``: every ltm process drops them from its search index and clears its text caches).
    At least one of the two lists is not empty."""

    users: list[Id] = Field(default_factory=list, max_length=1000)
    forget: list[Id] = Field(default_factory=list, max_length=1000)

    @model_validator(mode="after")
    def _not_empty(self) -> LtmWarm:
        if not self.users and not self.forget:
            raise ValueError("users or forget must name at least one user")
        return self


class MemoryUpdateMeta(Message):
    model_config = ConfigDict(extra="allow")

    session_id: str | None = None
    message_id: str | None = None


MAX_VECTOR_DIM = 16_000  # EMBEDDING_DIM's bound


class CarriedEmbedding(Message):
    """The sentence vector of a MemoryUpdate's ``content``, computed by its publisher (memory embeds each message
    as it stores it), so that ltm need not embed the same text again; and the turn's salience when the publisher
    scored it. Optional: ltm uses it only when ``model`` is the model of the vectors it stores and the values are
    sound (``dim`` finite float32 of unit length), else it embeds the content itself and counts the refusal."""

    model: str = Field(min_length=1, max_length=200, description=(
        "the model of the vector, as the publisher names it: `all-MiniLM-L6-v2` (the local float model), "
        "`all-MiniLM-L6-v2/int8` (its int8 copy), or a remote model's name"))
    dim: int = Field(ge=1, le=MAX_VECTOR_DIM)
    vector: str = Field(min_length=4, max_length=(MAX_VECTOR_DIM * 4 + 2) // 3 * 4, description=(
        "base64 of `dim` little-endian float32 values"))
    salience: float | None = Field(default=None, ge=0.0, le=1.0, description=(
        "the turn's salience (services/ltm/salience) from the publisher's state of the session; none: not scored"))


class MemoryUpdate(Message):
    """The seed contract, kept field for field, and an optional ``embedding``."""

    user_id: Id
    content: str = Field(min_length=1)
    source: Source = "user"
    timestamp: Timestamp = Field(default_factory=time.time)
    meta: MemoryUpdateMeta = Field(default_factory=MemoryUpdateMeta)
    embedding: CarriedEmbedding | None = None

    _size = field_validator("content")(_check_size)

    @model_validator(mode="after")
    def _derive_message_id(self, info: ValidationInfo) -> MemoryUpdate:
        given = "timestamp" in self.model_fields_set
        if not self.meta.message_id:
            # from what the producer sent: a timestamp filled in here differs between deliveries (and between the
            # stream's and the channel's copy), so it is no part of the id
            self.meta.message_id = derive_id(
                "memory_update", self.user_id, self.source, repr(self.timestamp) if given else "",
                self.meta.session_id or "", self.content,
            )
        if not given and (added := entry_time(info)) is not None:
            self.timestamp = added
        return self

    @property
    def message_id(self) -> str:
        assert self.meta.message_id is not None  # set by the validator
        return self.meta.message_id


# ------------------------------------------------------------------- ltm requests
class SearchData(Message):
    query: str = Field(min_length=1)
    limit: int = Field(default=5, ge=1, le=100)
    threshold: float | None = Field(default=None, ge=-1.0, le=1.0)
    types: list[MemoryType] | None = None
    session_id: str | None = None  # only memories of this session
    exclude_session_id: str | None = None  # none of this session (chat_ai: the STM already holds it)
    now: Timestamp | None = None  # "now" for relative dates and recency (the turn's own timestamp); None = the clock
    max_tokens: int | None = Field(default=None, ge=50, le=32_000)  # results + context budget; None = LTM_RESULT_TOKENS
    turn_tokens: int | None = Field(default=None, ge=10, le=32_000)  # a turn counts at most this (the reader cuts it)
    source_turns: bool = False  # a fact extracted from a turn brings that turn along as context (chat_ai's block)

    _size = field_validator("query")(_check_size)


class AddData(Message):
    content: str = Field(min_length=1)
    type: MemoryType = "fact"
    confidence: float = Field(default=0.9, ge=0.0, le=1.0)
    source_turn: str | None = None
    meta: dict[str, Any] = Field(default_factory=dict)

    _size = field_validator("content")(_check_size)


class EmptyData(Message):
    pass


class ProfileUpdateData(Message):
    profile: dict[str, Any]


class DeleteData(Message):
    memory_id: Id


class SearchEntitiesData(Message):
    query: str = Field(min_length=1)
    limit: int = Field(default=10, ge=1, le=100)
    types: list[str] | None = None

    _size = field_validator("query")(_check_size)


class DocAddData(Message):
    """One document of the user's collection. ``(user, source)`` is its identity: the same text again changes nothing,
    another text under the same source replaces it; the same text under another source is the document already held."""

    source: str = Field(min_length=1, max_length=1024)  # a file path, URL or name
    title: str | None = Field(default=None, max_length=512)  # None: the first heading, else the source's file name
    text: str = Field(min_length=1)
    format: DocFormat | None = None  # None: from ``mime``, else from the source's extension, else text
    mime: str | None = Field(default=None, max_length=128)  # text/plain, text/markdown, text/html

    _size = field_validator("text")(_check_document_size)


class DocSearchData(Message):
    query: str = Field(min_length=1)
    top_k: int = Field(default=5, ge=1, le=50)
    threshold: float | None = Field(default=None, ge=-1.0, le=1.0)  # least cosine of a passage; None = the gate only
    max_tokens: int | None = Field(default=None, ge=20, le=32_000)  # the passages' text within this budget

    _size = field_validator("query")(_check_size)


class DocDeleteData(Message):
    """One document (``doc_id``) or every document of the user (``all``), not both."""

    doc_id: Id | None = None
    all: bool = False

    @model_validator(mode="after")
    def _one(self) -> DocDeleteData:
        if (self.doc_id is None) == (not self.all):
            raise ValueError("give doc_id or all=true (not both)")
        return self


class RequestEnvelope(Message):
    request_id: Id
    reply_to: str | None = None
    deadline: float | None = None
    # when the requester sent it (epoch seconds): a write the user's deletion overtook is refused by this time, not
    # by when a worker took it (a congested list is served newest first; shared/runtime/fence.py)
    sent_at: Timestamp | None = None

    def expired(self, now: float | None = None) -> bool:
        return self.deadline is not None and (time.time() if now is None else now) > self.deadline


class _UserRequest(RequestEnvelope):
    user_id: Id


class SearchRequest(_UserRequest):
    type: Literal["search"]
    data: SearchData


class AddRequest(_UserRequest):
    type: Literal["add"]
    data: AddData


class ProfileGetRequest(_UserRequest):
    type: Literal["profile_get"]
    data: EmptyData = Field(default_factory=EmptyData)


class ProfileUpdateRequest(_UserRequest):
    type: Literal["profile_update"]
    data: ProfileUpdateData


class DeleteRequest(_UserRequest):
    type: Literal["delete"]
    data: DeleteData


class DeleteUserRequest(_UserRequest):
    type: Literal["delete_user"]
    data: EmptyData = Field(default_factory=EmptyData)


class UserDeletion(Message):
    """``data.deletion`` of a ``delete_user`` reply (memory and ltm): what went, by table and stream. Zero
    everywhere when the user had nothing left (a second deletion)."""

    rows: dict[str, int] = Field(default_factory=dict)  # table -> rows deleted
    sessions: int = 0  # sessions the user wrote in (memory)
    keys: int = 0  # Redis keys deleted (STM, cache, dedup)
    stream_entries: dict[str, int] = Field(default_factory=dict)  # stream -> entries XDELed

    @property
    def total(self) -> int:
        return sum(self.rows.values()) + self.keys + sum(self.stream_entries.values())


class ListData(Message):
    """A page of the user's memories, newest first (``mesh memories USER``, the console)."""

    limit: int = Field(default=20, ge=1, le=200)
    offset: int = Field(default=0, ge=0, le=1_000_000)
    types: list[MemoryType] | None = None


class ListRequest(_UserRequest):
    type: Literal["list"]
    data: ListData = Field(default_factory=ListData)


class StatsRequest(_UserRequest):
    type: Literal["stats"]
    data: EmptyData = Field(default_factory=EmptyData)


class OptimizeRequest(_UserRequest):
    type: Literal["optimize"]
    data: EmptyData = Field(default_factory=EmptyData)


class SearchEntitiesRequest(_UserRequest):
    type: Literal["search_entities"]
    data: SearchEntitiesData


class DocAddRequest(_UserRequest):
    type: Literal["doc_add"]
    data: DocAddData


class DocSearchRequest(_UserRequest):
    type: Literal["doc_search"]
    data: DocSearchData


class DocDeleteRequest(_UserRequest):
    type: Literal["doc_delete"]
    data: DocDeleteData


class PingRequest(RequestEnvelope):
    type: Literal["ping"]
    user_id: str | None = None
    data: EmptyData = Field(default_factory=EmptyData)


LTMRequest = Annotated[
    SearchRequest
    | AddRequest
    | ProfileGetRequest
    | ProfileUpdateRequest
    | DeleteRequest
    | DeleteUserRequest
    | StatsRequest
    | ListRequest
    | OptimizeRequest
    | SearchEntitiesRequest
    | DocAddRequest
    | DocSearchRequest
    | DocDeleteRequest
    | PingRequest,
    Field(discriminator="type"),
]


# ------------------------------------------------------------------ ltm responses
class MemorySource(Message):
    message_id: str | None = None
    session_id: str | None = None
    timestamp: float | None = None
    speaker: str | None = None


TOKENS_FIELD = ("all-MiniLM-L6-v2 WordPiece tokens of content, special tokens not counted (the mesh's unit of text "
                "size), when the sender counted them: a reader budgeting a prompt need not tokenize the text again")


class ContextTurn(Message):
    message_id: str | None = None
    content: str
    timestamp: float | None = None
    speaker: str | None = None
    tokens: int | None = Field(default=None, ge=0, description=TOKENS_FIELD)


class Memory(Message):
    memory_id: str
    type: MemoryType
    content: str
    score: float = 0.0
    similarity: float = 0.0
    confidence: float = 1.0
    created_at: float
    last_accessed: float | None = None
    access_count: int = 0
    entities: list[str] = Field(default_factory=list)
    source: MemorySource = Field(default_factory=MemorySource)
    valid_to: float | None = None
    superseded_by: str | None = None
    context: list[ContextTurn] = Field(default_factory=list)
    tokens: int | None = Field(default=None, ge=0, description=TOKENS_FIELD)


class DocAdded(Message):
    """``data`` of a doc_add reply."""

    doc_id: str
    source: str
    title: str
    format: DocFormat
    chunks: int
    status: Literal["created", "updated", "unchanged"]  # updated: new text under a source held already


class DocPassage(Message):
    """One chunk of a document, as doc_search returns it (best first)."""

    doc_id: str
    chunk_id: str
    chunk: int  # its position in the document, from 0
    source: str
    title: str
    heading: list[str] = Field(default_factory=list)  # the headings above it, outermost first
    text: str
    score: float = 0.0  # fused relevance (z units); comparable within one reply only
    similarity: float = 0.0  # cosine to the query

    @property
    def label(self) -> str:
        return doc_label(self.title, self.heading)


LABEL_SEP = " \u203a "  # " > " as a single right-pointing angle quotation mark


def doc_label(title: str, heading: list[str]) -> str:
    """``title > heading > subheading`` (joined by LABEL_SEP): where a passage sits; a first heading that is the
    title is not repeated."""
    if heading and heading[0].strip().casefold() == title.strip().casefold():
        heading = heading[1:]
    return LABEL_SEP.join(p for p in (title, *heading) if p)


class DocSearchResult(Message):
    """``data`` of a doc_search reply."""

    passages: list[DocPassage] = Field(default_factory=list)


class DocDeleted(Message):
    """``data`` of a doc_delete reply; doc_delete of a doc_id the user does not hold is ``not_found``."""

    documents: int = 0
    chunks: int = 0
    doc_ids: list[str] = Field(default_factory=list)


class LTMResponse(Message):
    """The seed contract; ``data`` carries results of the extra request types."""

    request_id: str
    user_id: str | None = None
    success: bool = True
    memories: list[Memory] = Field(default_factory=list)
    user_profile: dict[str, Any] | None = None
    error: ErrorInfo | None = None
    data: dict[str, Any] | None = None

    @classmethod
    def failure(cls, request_id: str, error: ErrorInfo, user_id: str | None = None) -> LTMResponse:
        return cls(request_id=request_id, user_id=user_id, success=False, error=error)
