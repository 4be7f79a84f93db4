"""Unknown options of evaluate.py and filter_data.py: one line naming the close option, no prefix matching."""

import pytest

from data import UserError, check_options, did_you_mean


@pytest.mark.parametrize("script", ["evaluate", "filter_data"])
def test_unknown_option_is_not_taken_as_a_prefix(script):
    module = __import__(script)
    with pytest.raises(UserError, match=r"^unknown option --num_sample: did you mean --num_samples\?$"):
        module.parse_args(["--num_sample", "2"])


def test_did_you_mean_only_when_close():
    assert did_you_mean("--max_stepz", ["--max_steps", "--seed"]) == ": did you mean --max_steps?"
    assert did_you_mean("--qqqq", ["--max_steps", "--seed"]) == ""


def test_check_options_passes_known_options_through_and_stops_at_double_dash():
    import argparse

    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--name")
    args = ["--name=a", "--config", "r.yaml", "--", "--anything"]
    assert check_options(parser, args) == args
    with pytest.raises(UserError, match="unknown key 'nam' in recipe r.yaml: did you mean name"):
        check_options(parser, [], {"nam": 1}, "r.yaml")
