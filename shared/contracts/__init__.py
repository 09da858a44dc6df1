"""The wire contract of the memory mesh: message models, names, the codec. Depends only on pydantic."""

from shared.contracts.codec import (
    AI_RESPONSE,
    LTM_REQUEST,
    LTM_RESPONSE,
    LTM_WARM,
    MEMORY_UPDATE,
    STREAM_FIELD,
    USER_INPUT,
    decode,
    encode,
    payload_limit,
)
from shared.contracts.errors import DeadLetterReason, DecodeError, ErrorCode, ErrorInfo
from shared.contracts.memory_api import MEMORY_REQUEST, MEMORY_RESPONSE, MemoryRequest, MemoryResponse
from shared.contracts.messages import (
    AddRequest,
    AIResponse,
    AIResponseMeta,
    DeleteRequest,
    DeleteUserRequest,
    DocAddRequest,
    DocDeleteRequest,
    DocSearchRequest,
    LTMRequest,
    LTMResponse,
    LtmWarm,
    Memory,
    MemorySource,
    MemoryUpdate,
    OptimizeRequest,
    PingRequest,
    ProfileGetRequest,
    ProfileUpdateRequest,
    SearchEntitiesRequest,
    SearchRequest,
    StatsRequest,
    UserInput,
    derive_id,
    new_id,
)
from shared.contracts.names import Names

__all__ = [
    "AI_RESPONSE", "LTM_REQUEST", "LTM_RESPONSE", "MEMORY_UPDATE", "STREAM_FIELD", "USER_INPUT",
    "AIResponse", "AIResponseMeta", "AddRequest", "DeadLetterReason", "DecodeError", "DeleteRequest",
    "DeleteUserRequest", "DocAddRequest", "DocDeleteRequest", "DocSearchRequest", "ErrorCode", "ErrorInfo",
    "LTMRequest", "LTMResponse", "Memory", "MemorySource",
    "MemoryUpdate", "Names", "OptimizeRequest", "PingRequest", "ProfileGetRequest", "ProfileUpdateRequest",
    "SearchEntitiesRequest", "SearchRequest", "StatsRequest", "UserInput", "decode", "derive_id", "encode",
    "new_id", "payload_limit",
]
# memory_requests: shared/contracts/memory_api.py holds the per-type models
__all__ += ["LTM_WARM", "LtmWarm"]
__all__ += ["MEMORY_REQUEST", "MEMORY_RESPONSE", "MemoryRequest", "MemoryResponse"]
