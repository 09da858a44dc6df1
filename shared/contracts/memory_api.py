"""The memory service's request/response contract (``memory_requests`` → ``memory_responses``).

Same envelope and error shape as the ltm requests: ``{"request_id", "type", "user_id", "data", "reply_to",
"deadline"}`` in, ``{"request_id", "user_id", "success", "data", "error"}`` out. One model per request
type, a discriminated union on ``type``. Every type except ``ping`` names a ``user_id`` and only ever
sees that user's sessions: another user's session is ``not_found``. The behaviour is written down in
docs/contract-memory.md; the shapes returned in ``data`` are the ``*Info`` models below.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, TypeAdapter, field_validator

from shared.contracts.errors import ErrorInfo
from shared.contracts.messages import (
    EmptyData,
    Id,
    Message,
    PingRequest,
    RequestEnvelope,
    Timestamp,
    _check_size,
    derive_id,
)

Role = Literal["human", "ai", "system"]
ImportRole = Literal["user", "assistant", "human", "ai", "system"]
IMPORT_ROLES: dict[str, Role] = {"user": "human", "assistant": "ai", "human": "human", "ai": "ai", "system": "system"}
"""An imported message's role as the conversation store names it (user<->human, assistant<->ai)."""
ContextType = Literal["conversation", "preference", "project", "user_info"]
Label = Annotated[str, Field(min_length=1, max_length=256)]


# ------------------------------------------------------------------ request data
class CreateSessionData(Message):
    session_id: Id | None = None  # made by the service when absent
    name: str | None = Field(default=None, max_length=1024)
    type: Label = "chat"
    metadata: dict[str, Any] = Field(default_factory=dict)


class SessionRef(Message):
    session_id: Id


class StoreMessageData(Message):
    session_id: Id
    content: str = Field(min_length=1)
    role: Role = "human"
    message_type: Label = "text"
    message_id: Id | None = None  # made by the service when absent; storing the same id twice is a no-op
    parent_message_id: Id | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    timestamp: Timestamp | None = None
    is_context_message: bool = False

    _size = field_validator("content")(_check_size)


class GetMessagesData(Message):
    session_id: Id
    limit: int = Field(default=50, ge=1, le=10_000)
    offset: int = Field(default=0, ge=0)
    newest_first: bool = False


class SearchMessagesData(Message):
    query: str = Field(min_length=1)
    session_id: Id | None = None  # None: every session of the user
    limit: int = Field(default=10, ge=1, le=100)
    threshold: float | None = Field(default=None, ge=-1.0, le=1.0)

    _size = field_validator("query")(_check_size)


class StoreContextData(Message):
    session_id: Id
    context_type: ContextType = "conversation"
    key: Label
    value: Any
    relevance_score: float = Field(default=1.0, ge=0.0, le=1.0)
    metadata: dict[str, Any] = Field(default_factory=dict)
    ttl_seconds: float | None = Field(default=None, gt=0)
    merge: bool = True  # two JSON objects are merged (new keys win); anything else is replaced


class GetContextData(Message):
    session_id: Id
    context_type: ContextType | None = None


class UpdateActivityData(Message):
    session_id: Id
    status: Label | None = None
    name: str | None = Field(default=None, max_length=1024)
    metadata: dict[str, Any] | None = None  # merged into the session's metadata
    relevance_score: float | None = Field(default=None, ge=0.0, le=1.0)


class UserSessionsData(Message):
    limit: int = Field(default=20, ge=1, le=1000)
    status: Label | None = None


class LinkSessionsData(Message):
    source_session_id: Id
    target_session_id: Id
    relation_type: Label = "related"
    strength: float = Field(default=1.0, ge=0.0, le=1.0)


class GetPreferencesData(Message):
    keys: list[Label] | None = None  # None: all of the user's preferences


class SetPreferenceData(Message):
    key: Label
    value: Any
    sensitive: bool = False  # stored encrypted (see docs/contract-memory.md)


class ImportMessage(Message):
    """One past turn of an ``import_messages`` batch (see docs/contract-memory.md)."""

    message_id: Id | None = None  # absent: derived by import_message_id(), so a re-import dedups
    session_id: Id
    role: ImportRole
    content: str = Field(min_length=1)
    timestamp: Timestamp
    meta: dict[str, Any] = Field(default_factory=dict)

    _size = field_validator("content")(_check_size)

    @property
    def store_role(self) -> Role:
        return IMPORT_ROLES[self.role]


def import_message_id(user_id: str, m: ImportMessage) -> str:
    """The message id of an imported turn: its own, else one derived from what it is (user, session, time, role,
    content), so importing the same history twice names the same messages."""
    return m.message_id or derive_id("import", user_id, m.session_id, repr(float(m.timestamp)), m.store_role,
                                     m.content)


class ImportMessagesData(Message):
    messages: list[ImportMessage] = Field(min_length=1)  # at most MEMORY_IMPORT_MAX_BATCH (checked by the service)


# ------------------------------------------------------------------ requests
class _MemoryRequest(RequestEnvelope):
    user_id: Id


class CreateSessionRequest(_MemoryRequest):
    type: Literal["create_session"]
    data: CreateSessionData = Field(default_factory=CreateSessionData)


class GetSessionRequest(_MemoryRequest):
    type: Literal["get_session"]
    data: SessionRef


class StoreMessageRequest(_MemoryRequest):
    type: Literal["store_message"]
    data: StoreMessageData


class GetMessagesRequest(_MemoryRequest):
    type: Literal["get_messages"]
    data: GetMessagesData


class SearchMessagesRequest(_MemoryRequest):
    type: Literal["search_messages"]
    data: SearchMessagesData


class StoreContextRequest(_MemoryRequest):
    type: Literal["store_context"]
    data: StoreContextData


class GetContextRequest(_MemoryRequest):
    type: Literal["get_context"]
    data: GetContextData


class UpdateSessionActivityRequest(_MemoryRequest):
    type: Literal["update_session_activity"]
    data: UpdateActivityData


class GetUserSessionsRequest(_MemoryRequest):
    type: Literal["get_user_sessions"]
    data: UserSessionsData = Field(default_factory=UserSessionsData)


class DeleteSessionRequest(_MemoryRequest):
    type: Literal["delete_session"]
    data: SessionRef


class GetSessionSummaryRequest(_MemoryRequest):
    type: Literal["get_session_summary"]
    data: SessionRef


class CleanupExpiredRequest(_MemoryRequest):
    type: Literal["cleanup_expired_data"]
    data: EmptyData = Field(default_factory=EmptyData)


class LinkSessionsRequest(_MemoryRequest):
    type: Literal["link_sessions"]
    data: LinkSessionsData


class GetPreferencesRequest(_MemoryRequest):
    type: Literal["get_preferences"]
    data: GetPreferencesData = Field(default_factory=GetPreferencesData)


class SetPreferenceRequest(_MemoryRequest):
    type: Literal["set_preference"]
    data: SetPreferenceData


class GetStmRequest(_MemoryRequest):
    """The session's short-term memory, rebuilt from PostgreSQL first if Redis lost it."""

    type: Literal["get_stm"]
    data: SessionRef


class MemoryDeleteUserRequest(_MemoryRequest):
    """Everything of the user in the conversation store and Redis (services/memory/erase.py); ``data.deletion`` is
    a :class:`UserDeletion`. ltm's ``delete_user`` does the same for long-term memory."""

    type: Literal["delete_user"]
    data: EmptyData = Field(default_factory=EmptyData)


class ImportMessagesRequest(_MemoryRequest):
    """A batch of one user's past turns: stored with their own timestamps, STM rebuilt, MemoryUpdates emitted."""

    type: Literal["import_messages"]
    data: ImportMessagesData


MemoryPingRequest = PingRequest  # the same message on both request lists


MemoryRequest = Annotated[
    CreateSessionRequest
    | GetSessionRequest
    | StoreMessageRequest
    | GetMessagesRequest
    | SearchMessagesRequest
    | StoreContextRequest
    | GetContextRequest
    | UpdateSessionActivityRequest
    | GetUserSessionsRequest
    | DeleteSessionRequest
    | GetSessionSummaryRequest
    | CleanupExpiredRequest
    | LinkSessionsRequest
    | GetPreferencesRequest
    | SetPreferenceRequest
    | GetStmRequest
    | ImportMessagesRequest
    | MemoryDeleteUserRequest
    | MemoryPingRequest,
    Field(discriminator="type"),
]


# ------------------------------------------------------------------ results (inside ``data``)
class SessionInfo(Message):
    session_id: str
    user_id: str
    name: str | None = None
    type: str = "chat"
    status: str = "active"
    metadata: dict[str, Any] = Field(default_factory=dict)
    context_summary: str | None = None
    relevance_score: float = 1.0
    message_count: int = 0
    created_at: float
    last_activity: float


class MessageInfo(Message):
    message_id: str
    session_id: str
    role: Role
    content: str
    message_type: str = "text"
    message_index: int
    parent_message_id: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    relevance_score: float = 1.0
    is_context_message: bool = False
    token_count: int = 0
    timestamp: float
    similarity: float | None = None  # search_messages only


class ContextItem(Message):
    session_id: str
    context_type: ContextType
    key: str
    value: Any
    relevance_score: float = 1.0
    metadata: dict[str, Any] = Field(default_factory=dict)
    updated_at: float
    expires_at: float | None = None


class SessionLink(Message):
    source_session_id: str
    target_session_id: str
    relation_type: str
    strength: float


class SummaryInfo(Message):
    session_id: str
    message_count: int
    human_count: int
    ai_count: int
    system_count: int
    total_tokens: int
    first_activity: float | None = None
    last_activity: float | None = None
    context_summary: str | None = None
    summary_kind: str | None = None  # "extractive" or "llm:<model>"
    summary_turns: int = 0  # how many older turns the summary covers


class StmTurnInfo(Message):
    message_id: str
    role: str
    content: str
    timestamp: float


class StmInfo(Message):
    session_id: str
    turns: list[StmTurnInfo] = Field(default_factory=list)
    summary: str = ""
    summary_kind: str = ""
    summary_tokens: int = 0
    rehydrated: bool = False  # True when this call rebuilt it from PostgreSQL


class ImportResult(Message):
    """``data`` of an import_messages reply."""

    imported: int = 0  # messages stored now
    duplicates: int = 0  # messages already stored (or repeated in the batch): not stored, not published again
    sessions: int = 0  # distinct sessions the batch names
    updates_published: int = 0  # MemoryUpdates emitted (0 with ENABLE_LTM_PUBLISH=false)


class MemoryResponse(Message):
    """Reply to every memory request; ``data`` holds the result of the type (see docs/contract-memory.md)."""

    request_id: str
    user_id: str | None = None
    success: bool = True
    data: dict[str, Any] | None = None
    error: ErrorInfo | None = None

    @classmethod
    def failure(cls, request_id: str, error: ErrorInfo, user_id: str | None = None) -> MemoryResponse:
        return cls(request_id=request_id, user_id=user_id, success=False, error=error)


class MemoryForget(Message):
    """On ``memory_forget``: users just deleted. Every memory process drops what it holds in process of their
    sessions (the salience and carried-vector states derived from their turns); the copy that served the deletion
    dropped its own already."""

    forget: list[Id] = Field(min_length=1, max_length=1000)


MEMORY_REQUEST: TypeAdapter[MemoryRequest] = TypeAdapter(MemoryRequest)
MEMORY_RESPONSE: TypeAdapter[MemoryResponse] = TypeAdapter(MemoryResponse)
MEMORY_FORGET: TypeAdapter[MemoryForget] = TypeAdapter(MemoryForget)
