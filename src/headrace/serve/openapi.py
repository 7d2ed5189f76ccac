"""A small route registry that also describes itself as OpenAPI 3.1."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response

Endpoint = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True)
class Param:
    """A path or query parameter."""

    name: str
    where: str = "query"  # "query" or "path"
    type: str = "string"
    description: str = ""
    required: bool = False


@dataclass(frozen=True)
class ApiRoute:
    """One operation of the JSON API."""

    method: str
    path: str
    endpoint: Endpoint
    summary: str
    role: str = "viewer"
    params: tuple[Param, ...] = ()
    body: type[BaseModel] | None = None
    produces: tuple[str, ...] = ("application/json",)
    tags: tuple[str, ...] = field(default_factory=tuple)


def build_openapi(routes: list[ApiRoute], version: str) -> dict[str, Any]:
    """The OpenAPI document of ``routes``."""
    paths: dict[str, dict[str, Any]] = {}
    schemas: dict[str, Any] = {}
    for route in routes:
        operation: dict[str, Any] = {
            "summary": route.summary,
            "description": f"Requires the {route.role} role."
            if route.role != "public"
            else "No authentication.",
            "operationId": f"{route.method.lower()}_{route.endpoint.__name__.strip('_')}",
            "tags": list(route.tags),
            "parameters": [
                {
                    "name": p.name,
                    "in": p.where,
                    "required": p.required or p.where == "path",
                    "description": p.description,
                    "schema": {"type": p.type},
                }
                for p in route.params
            ],
            "responses": {
                "200": {
                    "description": "OK",
                    "content": {media: {} for media in route.produces},
                },
                "400": {"$ref": "#/components/responses/Error"},
                "401": {"$ref": "#/components/responses/Error"},
                "403": {"$ref": "#/components/responses/Error"},
            },
        }
        if route.role != "public":
            operation["security"] = [{"bearer": []}, {"session": []}]
        if route.body is not None:
            schema = route.body.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(schema.pop("$defs", {}))
            schemas[route.body.__name__] = schema
            operation["requestBody"] = {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {"$ref": f"#/components/schemas/{route.body.__name__}"}
                    }
                },
            }
        paths.setdefault(route.path, {})[route.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "headrace", "version": version},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "responses": {
                "Error": {
                    "description": "An error with a reason",
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "properties": {
                                    "error": {"type": "string"},
                                    "fix": {"type": "string"},
                                },
                                "required": ["error"],
                            }
                        }
                    },
                }
            },
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "session": {"type": "apiKey", "in": "cookie", "name": "hr_session"},
            },
        },
    }
