"""Every error the API answers: ``{"error": {"code", "message", "fields"}}`` with a 4xx status.

``fields`` maps each offending field (``data.steps``, ``id``, ``limit``...) to what is wrong
with it; it is empty when no field is to blame (an unknown route, a wrong method).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
          405: "method_not_allowed", 406: "not_acceptable", 409: "conflict",
          413: "too_large", 415: "unsupported_media_type", 416: "range_not_satisfiable",
          422: "invalid"}
# The parts of a FastAPI error location that say where, not what: the field's own name
# is what a client wrote.
_WHERE = ("body", "query", "path", "header", "cookie")
# pydantic's wording for the two most common mistakes, as the daemon words them for job files.
_PLAIN = {"extra_forbidden": "unknown key", "missing": "required"}


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str,
                 fields: dict[str, str] | None = None, headers: dict[str, str] | None = None
                 ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.fields = fields or {}
        self.headers = headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.code, self.message, self.fields, self.headers)

    @classmethod
    def invalid(cls, fields: dict[str, str], code: str = "invalid") -> ApiError:
        message = "; ".join(f"{field}: {problem}" for field, problem in fields.items())
        return cls(422, code, message, fields)


def error_response(status: int, code: str, message: str, fields: dict[str, str] | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"code": code, "message": message, "fields": fields or {}}}
    return JSONResponse(body, status_code=status, headers=headers)


def fields_of(exc: ValidationError, prefix: str = "") -> dict[str, str]:
    """One entry per offending field, in the words the daemon uses for a job file."""
    fields: dict[str, str] = {}
    for err in exc.errors(include_url=False):
        where = ".".join(str(part) for part in (prefix, *err["loc"]) if part != "")
        _add(fields, where or "body", _PLAIN.get(err["type"], err["msg"]))
    return fields


def _add(fields: dict[str, str], field: str, problem: str) -> None:
    fields[field] = f"{fields[field]}; {problem}" if field in fields else problem


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return exc.response()


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    fields: dict[str, str] = {}
    broken_json = False
    for err in exc.errors():
        loc: tuple[Any, ...] = tuple(err.get("loc", ()))
        if err.get("type") == "json_invalid":
            broken_json = True
            reason = (err.get("ctx") or {}).get("error", "invalid JSON")
            _add(fields, "body", f"invalid JSON: {reason} at character {loc[-1]}")
            continue
        parts = [str(p) for p in (loc[1:] if loc and loc[0] in _WHERE else loc)]
        field = ".".join(parts) or (loc[0] if loc else "body")
        _add(fields, field, _PLAIN.get(err.get("type", ""), err.get("msg", "invalid")))
    if broken_json:
        return error_response(400, "invalid_json", fields["body"], fields)
    body = exc.body
    if getattr(request.scope.get("route"), "name", None) == "create_task" and isinstance(
            body, dict) and isinstance(body.get("type"), str) and isinstance(
            data := body.get("data", {}), dict):
        # As the daemon does for a job file: the plugin's parameters are checked even
        # when the task's own keys are wrong, so that every bad field is named at once.
        for field, problem in request.app.state.api.jobs.plugin_fields(body["type"],
                                                                       data).items():
            fields.setdefault(field, problem)
    return ApiError.invalid(fields).response()


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code if 400 <= exc.status_code < 500 else 400
    detail = exc.detail if isinstance(exc.detail, str) else _CODES.get(status, "error")
    if status == 413:
        detail = "the request body is larger than max_job_bytes"
    return error_response(status, _CODES.get(status, "error"), detail,
                          headers=getattr(exc, "headers", None))


def install(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
