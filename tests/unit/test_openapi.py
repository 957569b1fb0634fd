"""The OpenAPI document is generated from the same Structs the gateway validates with."""

import re
from typing import Any, get_args, get_origin

import msgspec

from services.common.settings import from_environ
from services.gateway.app import create_app
from services.gateway.openapi import A1111_OPTIONS, NULL
from services.gateway.routes import ROUTES, UNDOCUMENTED_PATHS, document
from services.gateway.settings import GatewaySettings


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if "$ref" in node else []
        return found + [r for value in node.values() for r in _refs(value)]
    if isinstance(node, list):
        return [r for value in node for r in _refs(value)]
    return []


def test_every_reference_resolves() -> None:
    built = document()
    assert "3.1.0" == built["openapi"]
    schemas = built["components"]["schemas"]
    for ref in _refs(built):
        assert ref.startswith("#/components/schemas/")
        assert ref.rsplit("/", 1)[1] in schemas, ref


def test_request_rules_are_the_validation_rules() -> None:
    txt2img = document()["components"]["schemas"]["Txt2ImgRequest"]
    assert ["stable_diffusion_model"] == txt2img["required"]
    assert 8 == txt2img["properties"]["width"]["multipleOf"]
    assert "number" == txt2img["properties"]["eta"]["anyOf"][0]["type"]
    assert 1 == txt2img["properties"]["steps"]["minimum"]


def test_seed_routes_are_documented() -> None:
    paths = document()["paths"]
    for path in (
        "/txt2img",
        "/img2img",
        "/tasks/{task_id}/result",
        "/tasks/{task_id}/progress",
        "/tasks/{task_id}/cancellation",
        "/login",
        "/sdapi/v1/txt2img",
    ):
        assert path in paths


def _template(path: str) -> str:
    """A path with its parameters unnamed: ``/tasks/{task_id}`` and ``/tasks/{taskId}`` agree."""
    return re.sub(r"\{[^}]*\}", "{}", path)


def test_every_registered_route_is_documented() -> None:
    app = create_app(from_environ(GatewaySettings, {}))
    registered = {
        (route.method.lower(), _template(route.resource.canonical))
        for route in app.router.routes()
        if route.method != "HEAD"
        and route.resource is not None
        and route.resource.canonical not in UNDOCUMENTED_PATHS
    }
    documented = {
        (method, _template(path))
        for path, operations in document()["paths"].items()
        for method in operations
    }
    assert set() == registered - documented, "routes missing from the OpenAPI document"
    assert set() == documented - registered, "documented routes the app does not serve"


def test_request_bodies_are_the_proto_structs() -> None:
    paths = document()["paths"]
    for path, method, struct in (
        ("/models", "post", "RegisterModelRequest"),
        ("/models/{model_name}", "put", "RegisterModelRequest"),
        ("/batch_update_sd_resource", "post", "BatchUpdateSdResourceRequest"),
        ("/del/sd/functions", "post", "DeleteFunctionsRequest"),
        ("/sdapi/v1/extra-batch-images", "post", "ExtraBatchImagesRequest"),
    ):
        content = paths[path][method]["requestBody"]["content"]
        assert f"#/components/schemas/{struct}" == content["application/json"]["schema"]["$ref"]
    upload = paths["/models/{model_name}"]["put"]["requestBody"]["content"]
    assert "binary" == upload["application/octet-stream"]["schema"]["format"]
    model_type = paths["/models"]["get"]["parameters"][0]
    assert ("type", "query") == (model_type["name"], model_type["in"])


NOT_JSON = {
    ("get", "/tasks/{task_id}/events"),  # text/event-stream
    ("get", "/metrics"),  # Prometheus text
    ("get", "/files/{key:.+}"),  # the file itself
}
FREE_FORM = {("get", "/sdapi/v1/options")}
"""A1111's settings: an open mapping of option name to value, on purpose."""


def _struct(kind: Any) -> Any:
    """The Struct a response type is made of (``list[S]`` → ``S``), else None."""
    if get_origin(kind) is list:
        (kind,) = get_args(kind)
    return kind if isinstance(kind, type) and issubclass(kind, msgspec.Struct) else None


def test_every_json_route_answers_a_strict_struct() -> None:
    """A route added with a dict (or no) response type fails here: each JSON route's
    handler encodes a Struct that forbids unknown fields, so the document says exactly
    what is sent (the schemathesis run checks responses against it)."""
    for route in ROUTES:
        where = (route.method, route.path)
        if route.response is None:
            assert where in NOT_JSON, f"{where}: no response type"
        elif route.response is NULL or where in FREE_FORM:
            assert route.response in (NULL, A1111_OPTIONS), where
        else:
            struct = _struct(route.response)
            assert struct is not None, f"{where}: {route.response} is no Struct"
            assert struct.__struct_config__.forbid_unknown_fields, f"{where}: {struct}"


def test_success_bodies_allow_no_other_fields() -> None:
    """Every object a success body can hold, nested ones too, is closed."""
    built = document()
    schemas = built["components"]["schemas"]
    seen: set[str] = set()
    pending = [
        ref
        for operations in built["paths"].values()
        for operation in operations.values()
        for code, response in operation["responses"].items()
        if code.startswith("2") or code == "500"
        for ref in _refs(response)
    ]
    while pending:
        name = pending.pop().rsplit("/", 1)[1]
        if name in seen:
            continue
        seen.add(name)
        schema = schemas[name]
        if "properties" in schema:
            assert schema.get("additionalProperties") is False, name
        pending += _refs(schema)
    assert {"A1111Memory", "WorkerMemory", "FunctionInfo", "ControlNetSlider"} <= seen


def test_64_bit_integers_from_mongodb_are_encoded() -> None:
    """PyMongo returns BSON int64 as ``bson.Int64`` (a 2 GiB file's size): msgspec alone
    refuses it, and a registered big model answered 500."""
    from bson.int64 import Int64

    from services.gateway.openapi import respond

    class Sized(msgspec.Struct):
        sizeBytes: int

    assert b'{"sizeBytes":2147483648}' == respond(Sized(sizeBytes=Int64(2**31))).body


def test_an_unhealthy_answer_and_task_statuses_are_documented() -> None:
    """``/healthz`` answers 503 with its usual body when a dependency is down; task
    statuses and kinds are the enums, not any string."""
    built = document()
    unhealthy = built["paths"]["/healthz"]["get"]["responses"]["503"]
    healthy = built["paths"]["/healthz"]["get"]["responses"]["200"]
    assert healthy["content"] == unhealthy["content"]
    schemas = built["components"]["schemas"]
    for name in ("TaskSummary", "CancelResponse"):
        assert {"$ref": "#/components/schemas/TaskStatus"} == schemas[name]["properties"]["status"]
    assert {"$ref": "#/components/schemas/TaskKind"} == schemas["TaskSummary"]["properties"]["kind"]
