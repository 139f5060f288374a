"""The one map from error conditions to protocol error codes, error types and close codes.

Every `error` event and every server-initiated close goes through `ErrorCode`: its
value is the wire `code`, `ERROR_TYPES` the OpenAI-style `type`, `CLOSE_CODES` the
WebSocket close code when the condition ends the session (absent = the session lives on),
`HTTP_STATUS` the status of a handshake refusal or an HTTP error response.
`ProtocolError` carries one up from parsing to the session loop. This module knows
nothing about sockets or sessions.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    INVALID_JSON = "invalid_json"  # a text frame that is not a JSON object
    UNKNOWN_EVENT = "unknown_event"  # a `type` this server does not know
    INVALID_EVENT = "invalid_event"  # missing fields or wrong field types
    INVALID_AUDIO = "invalid_audio"  # base64 that does not decode, or odd-length PCM16
    UNSUPPORTED_SAMPLE_RATE = "unsupported_sample_rate"  # input audio not 16 or 24 kHz
    INVALID_FRAME = "invalid_frame"  # binary frame too short or of an unknown kind
    INVALID_IMAGE = "invalid_image"  # an image that does not decode, or over max_image_pixels
    # an HTTP request body that is not JSON of the expected shape, or a client secret whose session
    # config this server refuses at connect (the session is closed)
    INVALID_REQUEST = "invalid_request"
    MODEL_NOT_FOUND = "model_not_found"  # GET /v1/models/{id} of a model this server does not serve
    TEXT_TOO_LONG = "text_too_long"  # text over max_text_chars / max_task_input_chars, or the queue full
    INPUT_RATE_EXCEEDED = "input_rate_exceeded"  # audio arriving faster than real time beyond the bound
    UNSUPPORTED = "unsupported"  # a known event whose feature is not available here
    UNKNOWN_TASK = "unknown_task"  # task.cancel of a task this session does not have running
    UNKNOWN_CALL = "unknown_call"  # a function_call_output for no client tool call waiting
    ITEM_NOT_FOUND = "item_not_found"  # truncate / delete / previous_item_id of no such item
    # conversation.item.retrieve of no such item: OpenAI's code, which clients (pipecat) expect and survive
    ITEM_RETRIEVE_INVALID_ITEM_ID = "item_retrieve_invalid_item_id"
    # response.create while one is active is queued, not refused; this is for asks that cannot be met
    # (a second queued response.create)
    RESPONSE_ALREADY_ACTIVE = "conversation_already_has_active_response"
    SERVER_BUSY = "server_busy"  # every engine slot is taken
    SERVER_DRAINING = "server_draining"  # the server is shutting down
    SLOW_CONSUMER = "slow_consumer"  # the client does not read its output
    IDLE_TIMEOUT = "idle_timeout"  # no client message for idle_timeout_s
    SESSION_EXPIRED = "session_expired"  # max_session_s reached
    UNAUTHORIZED = "unauthorized"  # no, wrong, expired or replayed credential
    FORBIDDEN_ORIGIN = "forbidden_origin"  # browser Origin not on the allowlist
    ENGINE_ERROR = "engine_error"  # the engine failed this session's row
    # the engine process died or hung: live sessions are closed 1012 (reconnect) while it restarts, and
    # new ones are refused until it is back
    ENGINE_RESTARTING = "engine_restarting"
    INTERNAL_ERROR = "internal_error"  # a bug; the session is closed
    # a WebRTC call whose ICE did not connect in time, or whose ICE or DTLS failed later: the session is
    # closed and released (no event can reach a peer whose data channel never opened; this is counted)
    WEBRTC_FAILED = "webrtc_failed"
    # resumption handles (server/resumption.py), refused before any model work and the socket closed:
    RESUME_INVALID = "resume_handle_invalid"  # forged, garbled, over its size bound, or from another version
    RESUME_EXPIRED = "resume_handle_expired"  # past resume_ttl_s
    RESUME_REPLAYED = "resume_handle_replayed"  # this handle, or a newer one of its session, was used here
    RESUME_FORBIDDEN = "resume_handle_forbidden"  # the session was opened with other credentials
    # the session moved on: another connection resumed it (this one is closed)
    SESSION_RESUMED_ELSEWHERE = "session_resumed_elsewhere"


ERROR_TYPES: dict[ErrorCode, str] = {
    ErrorCode.SERVER_BUSY: "server_error",
    ErrorCode.SERVER_DRAINING: "server_error",
    ErrorCode.ENGINE_ERROR: "server_error",
    ErrorCode.ENGINE_RESTARTING: "server_error",
    ErrorCode.INTERNAL_ERROR: "server_error",
    ErrorCode.SLOW_CONSUMER: "server_error",
    ErrorCode.WEBRTC_FAILED: "server_error",
    ErrorCode.UNAUTHORIZED: "authentication_error",
    ErrorCode.FORBIDDEN_ORIGIN: "authentication_error",
    ErrorCode.INPUT_RATE_EXCEEDED: "rate_limit_error",
    ErrorCode.RESUME_FORBIDDEN: "authentication_error",
}
DEFAULT_ERROR_TYPE = "invalid_request_error"

# 1008 policy violation, 1011 internal error, 1012 service restart, 1013 try again later, 1001 going away,
# 1000 normal.
CLOSE_CODES: dict[ErrorCode, int] = {
    ErrorCode.SERVER_BUSY: 1013,
    ErrorCode.SERVER_DRAINING: 1001,
    ErrorCode.ENGINE_RESTARTING: 1012,
    ErrorCode.SLOW_CONSUMER: 1008,
    ErrorCode.INVALID_REQUEST: 1008,
    ErrorCode.IDLE_TIMEOUT: 1000,
    ErrorCode.SESSION_EXPIRED: 1000,
    ErrorCode.INTERNAL_ERROR: 1011,
    ErrorCode.WEBRTC_FAILED: 1011,
    ErrorCode.RESUME_INVALID: 1008,
    ErrorCode.RESUME_EXPIRED: 1008,
    ErrorCode.RESUME_REPLAYED: 1008,
    ErrorCode.RESUME_FORBIDDEN: 1008,
    ErrorCode.SESSION_RESUMED_ELSEWHERE: 1000,
}

HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.INVALID_REQUEST: 400,
    ErrorCode.MODEL_NOT_FOUND: 404,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.FORBIDDEN_ORIGIN: 403,
    ErrorCode.SERVER_DRAINING: 503,
    ErrorCode.ENGINE_RESTARTING: 503,
}


class ProtocolError(Exception):
    """A client mistake answered by an `error` event naming the offending event."""

    def __init__(self, code: ErrorCode, message: str, event_id: str | None = None, param: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.event_id = event_id
        self.param = param


def error_payload(
    code: ErrorCode, message: str, event_id: str | None = None, param: str | None = None
) -> dict:
    """The `error` object of an OpenAI-style error event."""
    return {
        "type": ERROR_TYPES.get(code, DEFAULT_ERROR_TYPE),
        "code": code.value,
        "message": message,
        "param": param,
        "event_id": event_id,
    }


def close_code(code: ErrorCode) -> int | None:
    """The WebSocket close code for a fatal condition, or None when the session lives on."""
    return CLOSE_CODES.get(code)
