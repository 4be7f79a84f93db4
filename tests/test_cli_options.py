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


def test_write_line_puts_a_message_above_an_open_progress_bar(capsys):
    """Stage and refresh messages (schedules.py, batch_repair.py) are not printed into the training bar."""
    import sys

    from tqdm.auto import tqdm

    from data import write_line

    with tqdm(total=10, file=sys.stdout, desc="training", mininterval=0) as bar:
        bar.update(3)
        write_line("Stage 2/2 from step 3")
        bar.update(1)
    out = capsys.readouterr().out
    start = out.index("Stage 2/2 from step 3")
    assert out[start - 1] in "\r\n" and out[start:].startswith("Stage 2/2 from step 3\n")  # the bar was cleared first
