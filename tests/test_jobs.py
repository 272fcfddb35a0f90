"""Following a job from the command line (raytrade.jobs), against a stand-in scheduler."""

from __future__ import annotations

import pytest

from raytrade import jobs


class _Ref:
    def __init__(self, value):
        self.value = value


class _Method:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *a):
        return _Ref(self.fn(*a))


class _Scheduler:
    """Two polls of output, then the job ends in ``final``; ``interrupt_at`` raises Ctrl-C on that poll."""

    def __init__(self, final="succeeded", interrupt_at=None):
        self.polls, self.final, self.interrupt_at, self.cancelled = 0, final, interrupt_at, []
        self.follow = _Method(self._follow)
        self.cancel = _Method(self._cancel)

    def _follow(self, job_id, since):
        self.polls += 1
        if self.polls == self.interrupt_at:
            raise KeyboardInterrupt
        lines = {0: [("err", "progress 50%"), ("out", "row 1")], 2: [("out", "row 2")]}.get(since, [])
        state = self.final if self.polls >= 2 else "running"
        return {"job": {"id": job_id, "state": state, "error": "ValueError: bad fold" if state == "failed" else None},
                "lines": lines, "next": since + len(lines), "skipped": 0}

    def _cancel(self, job_id):
        self.cancelled.append(job_id)
        return {"id": job_id, "state": "stopping"}


@pytest.fixture(autouse=True)
def _no_ray(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "get", lambda ref, timeout=None: ref.value)
    monkeypatch.setattr(jobs, "FLUSH_S", 0.0)


def test_output_goes_to_its_streams_and_the_exit_code_follows_the_job(capsys):
    assert jobs.follow(_Scheduler(), "j1") == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == ["row 1", "row 2"] and "progress 50%" in err
    assert jobs.follow(_Scheduler(final="failed"), "j2") == 1
    assert "job j2 failed: ValueError: bad fold" in capsys.readouterr().err


def test_ctrl_c_leaves_the_job_running_unless_asked_to_cancel(capsys, monkeypatch):
    s = _Scheduler(interrupt_at=2)
    assert jobs.follow(s, "j3", interactive=False) == 130
    assert s.cancelled == [] and "raytrade workflows wait j3" in capsys.readouterr().err
    s = _Scheduler(interrupt_at=2)
    monkeypatch.setattr("builtins.input", lambda prompt: "c")
    assert jobs.follow(s, "j4", interactive=True) == 130
    assert s.cancelled == ["j4"] and "job j4 stopping" in capsys.readouterr().err


def test_the_job_carries_no_secret(make_settings):
    s = make_settings(store={"access_key": "AKIA-SHOULD-NOT-TRAVEL", "secret_key": "s3-secret-value"},
                      api_keys=[{"name": "ops", "key": "rt-key-that-stays-home-000", "role": "admin"}])
    public = jobs.public_settings(s)
    text = repr(public)
    assert "AKIA-SHOULD-NOT-TRAVEL" not in text and "s3-secret-value" not in text
    assert "rt-key-that-stays-home" not in text and "*****" not in text
    assert "api_keys" not in public and public["store"]["uri"] == s.store.uri
