"""The counting task's grader: score and the token index of the first error."""

import json

import pytest

from reward_fns.counting import compute_score, expected_text, first_error

TRUTH = json.dumps({"start": 123, "step": 7, "n_terms": 5})  # 123 130 137 144 151
RIGHT = "123 130 137 144 151"


def grade(response, truth=TRUTH):
    return compute_score("shear_tiny/counting", response, truth)


def test_expected_text_starts_at_start():
    assert expected_text(123, 7, 5) == RIGHT


@pytest.mark.parametrize(
    "response, error",
    [
        (RIGHT, -1),
        ("124 131 138 145 152", 2),  # first term wrong at its last digit
        ("123 130 136 143 150", 10),  # middle term, later terms counted on from it
        ("123 130 137 144 152", 18),  # last term's last digit
        ("hello there", 0),  # junk
        ("", 0),  # empty: the missing first term
        ("123 130 13", 10),  # truncated: errs one past its last character
        ("123 130 137 144 151 158", 19),  # goes on past the last term
        ("123  130 137 144 151", 4),  # a double space
    ],
)
def test_first_error_positions(response, error):
    out = grade(response)
    assert out == {"score": 1.0 if error == -1 else 0.0, "first_error": error}
    if error >= 0:  # independent check: the prefix before the error is right, the char at it is not
        assert RIGHT.startswith(response[:error])
        assert error == len(response) or error == len(RIGHT) or response[error] != RIGHT[error]


def test_ground_truth_as_mapping_and_bad_ground_truth():
    assert grade(RIGHT, {"start": 123, "step": 7, "n_terms": 5})["score"] == 1.0
    with pytest.raises(ValueError, match="start, step and n_terms"):
        grade(RIGHT, json.dumps({"start": 1}))


def test_first_error_is_symmetric_in_what_is_missing():
    assert first_error("abc", "abc") == -1
    assert first_error("ab", "abc") == 2
    assert first_error("abcd", "abc") == 3
