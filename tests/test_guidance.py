"""Guidance settings: one number or one per scale, parsed the same way by every CLI."""
import argparse

import pytest

from stagevar.guidance import (GuidanceError, format_guidance, guidance_argument, guidance_per_scale, guidance_ramp,
                               parse_guidance, same_guidance)


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


def test_same_guidance_compares_per_scale_values():
    assert same_guidance(5, [5.0] * 4, 4) and same_guidance("1,1,3,3", (1, 1, 3, 3), 4)
    assert not same_guidance(5, "1,5,5,5", 4) and not same_guidance(3, 5, 4)
    with pytest.raises(GuidanceError, match="has 4 scales"):
        same_guidance("1,5", 5, 4)


def test_guidance_ramp_is_upstream_vars_linear_schedule():
    """VAR guides scale k of N with t = cfg * k / (N - 1), logits (1 + t) cond - t uncond: in
    Infinity's convention 1 + t, from 1 on the first scale to the peak on the last."""
    r = guidance_ramp(5.0, 10)
    assert r[0] == 1.0 and r[-1] == 5.0 and len(r) == 10
    assert all(abs(r[k] - (1 + 4.0 * k / 9)) < 1e-3 for k in range(10))
    assert format_guidance(guidance_ramp(3.0, 10)) == "1,1.222,1.444,1.667,1.889,2.111,2.333,2.556,2.778,3"
    assert guidance_ramp(3.0, 1) == (3.0,)
