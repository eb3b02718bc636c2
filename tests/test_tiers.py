"""The rule of the fast tier: a test that starts a process is marked slow (tests/conftest.py
refuses a process in any other test)."""

import subprocess
import sys

import pytest


def test_a_fast_test_cannot_start_a_process():
    with pytest.raises(AssertionError, match="mark it @pytest.mark.slow"):
        subprocess.run([sys.executable, "-c", "pass"], check=True)


@pytest.mark.slow
def test_a_slow_test_can():  # twin: the guard stands aside for slow tests
    assert subprocess.run([sys.executable, "-c", "pass"]).returncode == 0
