"""Guidance settings: one number or one per scale, parsed the same way by every CLI."""
import argparse

import pytest

from stagevar.guidance import GuidanceError, format_guidance, guidance_argument, guidance_per_scale, parse_guidance


@pytest.mark.parametrize("value, expected", [
    (3, 3.0), ("5", 5.0), (" 1.5 ", 1.5), ("1,1,5", (1.0, 1.0, 5.0)), ("1 1 5", (1.0, 1.0, 5.0)),
    ([1, 2], (1.0, 2.0)), ((4.0,), 4.0),
])
def test_parse_guidance(value, expected):
    assert parse_guidance(value) == expected


@pytest.mark.parametrize("value", ["", "a", "1,x", [], "nan", "1,inf", None, True])
def test_bad_guidance_names_the_value(value):
    with pytest.raises(GuidanceError, match="guidance"):
        parse_guidance(value)


def test_per_scale_expansion_and_length_check():
    assert guidance_per_scale(2.0, 3) == (2.0, 2.0, 2.0)
    assert guidance_per_scale("1,2,3", 3) == (1.0, 2.0, 3.0)
    with pytest.raises(GuidanceError, match="lists 2 values \\(1, 2\\) but the model has 3 scales"):
        guidance_per_scale([1, 2], 3)


def test_format_and_argparse_type():
    assert format_guidance(5.0) == "5" and format_guidance([1, 1, 5]) == "1,1,5"
    assert guidance_argument("1,3") == (1.0, 3.0)
    with pytest.raises(argparse.ArgumentTypeError, match="comma-separated"):
        guidance_argument("x")
