"""The OpenAPI document is generated from the same Structs the gateway validates with."""

from typing import Any

from services.gateway.openapi import build_document


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if "$ref" in node else []
        return found + [r for value in node.values() for r in _refs(value)]
    if isinstance(node, list):
        return [r for value in node for r in _refs(value)]
    return []


def test_every_reference_resolves() -> None:
    document = build_document()
    assert "3.1.0" == document["openapi"]
    schemas = document["components"]["schemas"]
    for ref in _refs(document):
        assert ref.startswith("#/components/schemas/")
        assert ref.rsplit("/", 1)[1] in schemas, ref


def test_request_rules_are_the_validation_rules() -> None:
    txt2img = build_document()["components"]["schemas"]["Txt2ImgRequest"]
    assert ["stable_diffusion_model"] == txt2img["required"]
    assert 8 == txt2img["properties"]["width"]["multipleOf"]
    assert "number" == txt2img["properties"]["eta"]["anyOf"][0]["type"]
    assert 1 == txt2img["properties"]["steps"]["minimum"]


def test_seed_routes_are_documented() -> None:
    paths = build_document()["paths"]
    for path in (
        "/txt2img",
        "/img2img",
        "/tasks/{taskId}/result",
        "/tasks/{taskId}/progress",
        "/tasks/{taskId}/cancellation",
        "/login",
        "/sdapi/v1/txt2img",
    ):
        assert path in paths
