"""Infotexts (A1111's generation parameters) parse back into their fields."""

from __future__ import annotations

from services.gateway.pnginfo import parse_infotext


def test_full_infotext() -> None:
    text = (
        "a cat, masterpiece\nwith a hat\n"
        "Negative prompt: blurry, low quality\n"
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 42,"
        ' Size: 512x768, Model hash: abcdef0123, Lora hashes: "ink: 1234, fog: 5678",'
        " Model: tiny, Version: sdswarm"
    )
    parsed = parse_infotext(text)
    assert "a cat, masterpiece\nwith a hat" == parsed["Prompt"]
    assert "blurry, low quality" == parsed["Negative prompt"]
    assert ("20", "DPM++ 2M", "Karras", "42") == (
        parsed["Steps"],
        parsed["Sampler"],
        parsed["Schedule type"],
        parsed["Seed"],
    )
    assert ("512", "768") == (parsed["Size-1"], parsed["Size-2"])
    assert "ink: 1234, fog: 5678" == parsed["Lora hashes"]
    assert "sdswarm" == parsed["Version"]


def test_prompt_only() -> None:
    assert {"Prompt": "just a prompt", "Negative prompt": ""} == parse_infotext("just a prompt")
