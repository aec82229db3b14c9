"""Errors in OpenAI's schema: ``{"error": {"message", "type", "param", "code"}}`` with its HTTP status."""
from __future__ import annotations

from starlette.responses import JSONResponse


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def unknown_model(name: str) -> ApiError:
    return ApiError(404, f"The model `{name}` does not exist", param="model", code="model_not_found")


def bad_key() -> ApiError:
    return ApiError(401, "Incorrect API key provided", code="invalid_api_key")


def overloaded(message: str) -> ApiError:
    return ApiError(503, f"The server is overloaded: {message}", type_="server_error", code="overloaded")
