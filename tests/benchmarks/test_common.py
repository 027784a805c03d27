"""The shared scenario runner (``benchmarks.common.main``): its parser."""

import pytest


def test_a_wrong_flag_is_one_line_and_exit_2(capsys):
    """An unknown flag ends with argparse's usage line and exit 2, before any model is built."""
    from benchmarks import ar_rollout

    with pytest.raises(SystemExit) as stop:
        ar_rollout.main(["--tiny", "--no-such-flag"])
    assert stop.value.code == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err
