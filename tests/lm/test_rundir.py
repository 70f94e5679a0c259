"""Run-directory helpers: library logs go to a file in the run directory, not the console."""
from __future__ import annotations

import logging

from lm.train.rundir import library_logs


def test_library_logs_go_to_the_run_directory(tmp_path, capsys):
    with library_logs(tmp_path):
        logging.getLogger("absl").error("Failed to json parse Metadata file: %s", "x/_CHECKPOINT_METADATA")
        logging.getLogger("absl").info("routine detail")
    captured = capsys.readouterr()
    assert "Failed to json parse" not in captured.err + captured.out
    text = (tmp_path / "logs" / "libraries.log").read_text()
    assert "absl ERROR Failed to json parse Metadata file: x/_CHECKPOINT_METADATA" in text
    assert "routine detail" not in text
    # Afterwards the libraries log as before, and a block that logged nothing leaves no logs/ directory.
    assert logging.getLogger("absl").propagate
    (tmp_path / "quiet").mkdir()
    with library_logs(tmp_path / "quiet"):
        pass
    assert not (tmp_path / "quiet" / "logs").exists()
