"""The thread count chosen at start-up and the wait policy set before torch loads (pure logic)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from qanalyze.errors import ConfigError
from qanalyze.threads import (
    WAIT_ENV,
    ThreadPlan,
    busy_elsewhere,
    choose_threads,
    count_runnable,
    parse_threads,
    prepare_threads,
    runnable_now,
    usable_cpus,
    wait_env,
)


@pytest.mark.parametrize(("requested", "usable", "busy", "expected"), [
    (None, 2, 0, 2),      # idle 2-core machine: both cores
    (None, 2, 1, 1),      # one busy loop beside: the free core only
    (None, 2, 5, 1),      # more busy than cores: still one thread
    (None, 16, 3, 13),
    (None, 8, None, 8),   # run queue not readable: every usable core
    (3, 2, 1, 3),         # the user's count wins
])
def test_choose_threads(requested, usable, busy, expected):
    assert choose_threads(requested, usable, busy) == expected


def test_parse_threads():
    assert parse_threads(None) is None
    assert parse_threads("auto") is None
    assert parse_threads(" Auto ") is None
    assert parse_threads("4") == 4
    assert parse_threads(2) == 2
    for bad in ("0", "-1", "two", "1.5"):
        with pytest.raises(ConfigError):
            parse_threads(bad)


def test_count_runnable_takes_the_median_less_the_reader():
    reads = iter([3, 2, 9, 2, 2])  # a short-lived process in one read
    slept: list[float] = []
    assert count_runnable(lambda: next(reads), samples=5, interval_s=0.01, sleep=slept.append) == 1
    assert slept == [0.01] * 4
    assert count_runnable(lambda: 1, samples=3, sleep=lambda s: None) == 0   # only the reader
    assert count_runnable(lambda: 0, samples=1, sleep=lambda s: None) == 0
    assert count_runnable(lambda: None, sleep=lambda s: None) is None


def test_wait_env_keeps_what_the_user_set():
    assert wait_env({}) == dict(WAIT_ENV)
    assert wait_env({"OMP_WAIT_POLICY": "ACTIVE"}) == {k: v for k, v in WAIT_ENV.items() if k != "OMP_WAIT_POLICY"}
    assert wait_env(dict(WAIT_ENV)) == {}


def test_prepare_threads_sets_only_unset_variables():
    environ = {"OMP_WAIT_POLICY": "ACTIVE"}
    plan = prepare_threads("3", environ)
    assert environ["OMP_WAIT_POLICY"] == "ACTIVE"
    assert environ["KMP_BLOCKTIME"] == "0"
    assert plan.env_set == ("KMP_BLOCKTIME",)
    assert plan.threads == 3 and plan.requested == 3 and plan.busy_elsewhere is None
    assert "3 torch threads (requested" in plan.describe()


def test_prepare_threads_auto_is_at_least_one():
    plan = prepare_threads("auto", {})
    assert 1 <= plan.threads <= plan.usable_cpus
    assert plan.requested is None


def test_machine_readers_on_fake_files(tmp_path):
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/stat").write_text("cpu  1 2 3\nprocs_running 4\nprocs_blocked 0\n")
    assert runnable_now(tmp_path) == 4
    assert runnable_now(tmp_path / "missing") is None
    (tmp_path / "sys/fs/cgroup").mkdir(parents=True)
    (tmp_path / "sys/fs/cgroup/cpu.max").write_text("150000 100000\n")
    assert usable_cpus(tmp_path) == min(2, usable_cpus(tmp_path / "missing"))
    (tmp_path / "sys/fs/cgroup/cpu.max").write_text("max 100000\n")
    assert usable_cpus(tmp_path) == usable_cpus(tmp_path / "missing")


def test_busy_elsewhere_not_read_in_a_slice_of_the_machine(tmp_path, monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 64)
    assert busy_elsewhere(2, tmp_path) is None


def test_plan_is_frozen():
    plan = ThreadPlan(threads=1, requested=None, usable_cpus=2, busy_elsewhere=1, env_set=(), late=False)
    with pytest.raises(AttributeError):
        plan.threads = 2  # type: ignore[misc]
    assert "auto: 2 usable cores, 1 busy elsewhere" in plan.describe()


def test_the_command_line_sets_the_wait_policy_before_torch_loads():
    # building the command line imports torch (the targets and exporters), so the entry sets the policy first
    probe = ("import os, sys\n"
             "seen = []\n"
             "class Spy:\n"
             "    def find_spec(self, name, path=None, target=None):\n"
             "        if name == 'torch' and not seen:\n"
             "            seen.append(os.environ.get('OMP_WAIT_POLICY'))\n"
             "sys.meta_path.insert(0, Spy())\n"
             "from qanalyze.entry import main\n"
             "code = main(['--version'])\n"
             "print(seen, code)\n")
    env = {key: value for key, value in os.environ.items() if key not in WAIT_ENV}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
    assert done.stdout.strip().splitlines()[-1] == "['PASSIVE'] 0"
