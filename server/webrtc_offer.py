"""The body of `POST /v1/realtime/calls`, in either of the two forms OpenAI's endpoint takes.

- `application/sdp`: the SDP offer itself.
- `multipart/form-data` with an `sdp` field and an optional `session` field (a JSON session
  config, as `session.update` takes it), which browser code written for OpenAI's GA API sends.

Every part is bounded before it is decoded: the body's bytes as they stream in, and the form's
field count and part sizes in the multipart parser. A `session` is validated here, so a bad
one is a 400 before any peer connection or session exists. `read_offer` returns the SDP and the
session config (or None), or raises `OfferError` with the message for the client. This module
knows nothing about peer connections or sessions.
"""

from __future__ import annotations

import json

from fastapi import Request
from pydantic import ValidationError

from . import protocol as p

SDP_TYPE = "application/sdp"
FORM_TYPE = "multipart/form-data"
MAX_SDP_BYTES = 64 * 1024
MAX_SESSION_BYTES = 64 * 1024  # the form's `session` JSON
MAX_FORM_FIELDS = 2  # sdp, session


class OfferError(ValueError):
    """The body is no offer this endpoint takes; the message says why."""


async def read_offer(request: Request) -> tuple[str, dict | None]:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == SDP_TYPE:
        sdp, session = await _read_bounded(request), None
    elif kind == FORM_TYPE:
        sdp, session = await _read_form(request)
    else:
        raise OfferError(f"the body must be an SDP offer ({SDP_TYPE}) or a {FORM_TYPE} form with an "
                         "`sdp` field")
    if not sdp or not sdp.strip():
        raise OfferError(f"the body must be an SDP offer of at most {MAX_SDP_BYTES} bytes of UTF-8")
    return sdp, session


async def _read_bounded(request: Request) -> str | None:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_SDP_BYTES:
            return None
        chunks.append(chunk)
    try:
        return b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError:
        return None


async def _read_form(request: Request) -> tuple[str | None, dict | None]:
    try:
        form = await request.form(max_files=0, max_fields=MAX_FORM_FIELDS,
                                  max_part_size=max(MAX_SDP_BYTES, MAX_SESSION_BYTES))
    except Exception as exc:  # the parser raises its own errors for forms over the bounds or malformed
        raise OfferError(f"the form is not valid: {exc}") from None
    sdp, session = form.get("sdp"), form.get("session")
    if not isinstance(sdp, str) or len(sdp.encode()) > MAX_SDP_BYTES:
        return None, None
    if session is None:
        return sdp, None
    if not isinstance(session, str) or len(session.encode()) > MAX_SESSION_BYTES:
        raise OfferError(f"the form's `session` must be JSON of at most {MAX_SESSION_BYTES} bytes")
    try:
        config = json.loads(session)
        p.SessionConfig.model_validate(config)
    except (ValueError, ValidationError) as exc:
        raise OfferError(f"the form's `session` is not a valid session config: {exc}") from None
    return sdp, config
