"""tools/install_cpu.sh (the README's first command) reports progress without flooding the terminal.

A stand-in ``python3`` plays venv and pip: its pip prints hundreds of lines over a few seconds.
The script must say what it installs and how long that tends to take, print a bounded number of
progress lines naming pip's latest step, keep pip's full output in the log, show the log's end on
a failure, and stay silent once installed.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "tools", "install_cpu.sh")

FAKE_PYTHON = """#!/usr/bin/env bash
if [ "$1 $2" = "-m venv" ]; then mkdir -p "$3/bin"; cp "$0" "$3/bin/python"; exit 0; fi
if [ "$1 $2 $3 $4" = "-m pip install --upgrade" ]; then echo "Requirement already satisfied: pip"; exit 0; fi
if [ "$1 $2" = "-m pip" ]; then
  for i in $(seq 1 150); do
    echo "Collecting package$i"
    echo "  Downloading package$i-1.0-py3-none-any.whl (1.$i MB)"
    echo "unrelated detail $i"
    sleep 0.02
  done
  echo "Installing collected packages: package1, package2"
  sleep 1.5
  if [ -n "${FAKE_PIP_FAIL:-}" ]; then echo "ERROR: No matching distribution found for torch==9.9"; exit 1; fi
  exit 0
fi
[ "$1" = "-c" ] && exit 0
exit 3
"""


def _run(tmp_path, **env):
    python = tmp_path / "python3"
    python.write_text(FAKE_PYTHON)
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    full = dict(os.environ, PYTHON=str(python), VENV=str(tmp_path / "venv"), PROGRESS_SECONDS="1", **env)
    return subprocess.run(["bash", SCRIPT], env=full, capture_output=True, text=True, timeout=120)


def test_install_shows_bounded_progress_then_stays_silent(tmp_path):
    proc = _run(tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert "torch==2.13.0 (CPU build" in lines[1] and "about 1-2 minutes" in proc.stderr, proc.stderr
    progress = [ln for ln in lines if re.search(r"\[\d+s\] ", ln)]
    # pip ran ~4.5 s: a few progress lines, each naming pip's latest step, not its 450 lines
    assert 2 <= len(progress) <= 12, proc.stderr
    assert any(re.search(r"(Collecting|Downloading) package\d+|Installing collected packages", ln)
               for ln in progress), proc.stderr
    assert len(lines) < 25, proc.stderr
    assert "unrelated detail" not in proc.stderr and proc.stdout == ""
    assert re.search(r"done in \d+s", lines[-1]), lines[-1]
    log = (tmp_path / "venv" / "install.log").read_text()
    assert log.count("unrelated detail") == 150  # everything pip said is kept
    assert (tmp_path / "venv" / ".megatron-lasp-installed").is_file()

    again = _run(tmp_path)  # installed: nothing to do, nothing said
    assert again.returncode == 0 and again.stderr == "" and again.stdout == ""


def test_install_failure_shows_the_log_end(tmp_path):
    proc = _run(tmp_path, FAKE_PIP_FAIL="1")
    assert proc.returncode == 1
    assert "failed after" in proc.stderr and "ERROR: No matching distribution found for torch==9.9" in proc.stderr
    assert str(tmp_path / "venv" / "install.log") in proc.stderr
    assert not (tmp_path / "venv" / ".megatron-lasp-installed").exists()
