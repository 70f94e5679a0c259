"""A short run of experiments/faults/run_faults.py: two kills (one in a save) with resumes, and a second writer,
compared with an uninterrupted run. The mount cases (full disk, read-only mount) stay in the full script."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_short_fault_run(tmp_path):
    report = tmp_path / "faults.md"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    out = subprocess.run([sys.executable, "-m", "experiments.faults.run_faults", "--kills", "2", "--steps", "24",
                          "--no-mounts", "--write", str(report)], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=400)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip()
            for line in report.read_text().splitlines() if line.startswith("| ") and not line.startswith("| case")}
    assert rows["reference"] == rows["kills"] == rows["two_writers"] == "pass", report.read_text()
    assert rows["full_disk"] == "skipped"
    assert rows["read_only"] in ("pass", "skipped")  # as root it needs a mount; otherwise chmod a-w runs it
    kills = next(line for line in report.read_text().splitlines() if line.startswith("| kills"))
    assert "2 kills (" in kills and "(0 during a save)" not in kills
