"""A1111's prompt syntax parses to the same weights A1111 gives."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from services.inference.prompts import parse_attention


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a cat", [("a cat", 1.0)]),
        ("(cat)", [("cat", 1.1)]),
        ("((cat))", [("cat", 1.21)]),
        ("[cat]", [("cat", 1 / 1.1)]),
        ("(cat:1.5) dog", [("cat", 1.5), (" dog", 1.0)]),
        (
            "a (big [red] cat:1.2) x",
            [("a ", 1.0), ("big ", 1.2), ("red", 1.2 / 1.1), (" cat", 1.2), (" x", 1.0)],
        ),
        (r"a \(b\) c", [("a (b) c", 1.0)]),
        ("x BREAK y", [("x ", 1.0), ("BREAK", -1.0), (" y", 1.0)]),
        ("BREAKING news", [("BREAKING news", 1.0)]),
        ("(unclosed cat", [("unclosed cat", 1.1)]),
        ("time 10:30, ratio 1:2", [("time 10:30, ratio 1:2", 1.0)]),
    ],
)
def test_weights(prompt: str, expected: list[tuple[str, float]]) -> None:
    parsed = parse_attention(prompt)
    assert [t for t, _ in expected] == [t for t, _ in parsed]
    assert [w for _, w in expected] == pytest.approx([w for _, w in parsed])
