"""The fault points: off unless named, SIGKILL at the n-th hit of the named point (and file, and rank)."""
import os
import signal

import pytest

from advcl_dist.config_schema import ConfigError
from advcl_dist.faults import ENV, RANK_ENV, check_environment, fault_point


def status_of(hits: list[tuple[str, str | None]], **environment: str) -> int:
    """Exit status of a forked child that reaches `hits` in order with `environment` set: -9 if killed, else
    the number of points it passed."""
    pid = os.fork()
    if pid == 0:
        os.environ.update(environment)
        for name, file_name in hits:
            fault_point(name, file_name)
        os._exit(len(hits))
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_unset_nothing_happens(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert status_of([("train.mid_step", None)] * 3) == 3


def test_the_nth_hit_of_the_named_point_kills():
    steps = [("train.mid_step", None)] * 3
    assert status_of(steps, **{ENV: "train.mid_step@3"}) == -signal.SIGKILL
    assert status_of(steps[:2], **{ENV: "train.mid_step@3"}) == 2
    assert status_of(steps, **{ENV: "train.before_checkpoint"}) == 3


def test_a_file_and_a_rank_restrict_the_point():
    writes = [("write.before_rename", "run.json"), ("write.before_rename", "checkpoint.pt")]
    assert status_of(writes, **{ENV: "write.before_rename:checkpoint.pt"}) == -signal.SIGKILL
    assert status_of(writes[:1], **{ENV: "write.before_rename:checkpoint.pt"}) == 1
    assert status_of(writes, **{ENV: "write.before_rename", RANK_ENV: "1", "RANK": "0"}) == 2
    assert status_of(writes, **{ENV: "write.before_rename", RANK_ENV: "1", "RANK": "1"}) == -signal.SIGKILL


@pytest.mark.parametrize("spec", ["train.midstep", "train.mid_step@0", "train.mid_step@x"])
def test_a_bad_spec_is_refused_before_the_stage_starts(monkeypatch, spec):
    monkeypatch.setenv(ENV, spec)
    with pytest.raises(ConfigError, match=rf"{ENV}='{spec}' is not <point>\[:<file>\]\[@<n ≥ 1>\]"):
        check_environment()
