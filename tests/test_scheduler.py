"""The workflow scheduler.

First its rules, on ``WorkflowQueue`` with a simulated clock (no Ray, exact,
fast): contention over few locks, randomised with seeds, checked by an observer
that does not share the scheduler's code; priorities and ageing; retries;
timeouts; cancellation; the journal. Then the Ray actor: real attempts in Ray
tasks, a timeout that kills one, and a scheduler killed mid-run and restarted.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from dataclasses import dataclass, field

import pytest

from cluster.settings import SchedulerSettings
from core.scheduling import (
    CANCELLED, FAILED, QUEUED, RECOVERING, RUNNING, STOPPING, SUCCEEDED, TIMED_OUT, WorkflowError, WorkflowQueue,
)

PRIORITIES = {"critical_trading": 1, "risk_management": 2, "position_reconciliation": 3, "model_intelligence": 4,
              "daily_report": 15, "model_training": 20, "backtest": 22, "data_collection": 25}
TARGET = "tests.support.workflow_targets:work"


def test_default_priorities_are_the_operating_plan():
    wf = SchedulerSettings().workflows
    assert {k: v.priority for k, v in wf.items()} == PRIORITIES


class Clock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def make_queue(clock: Clock, **kw) -> WorkflowQueue:
    cfg = SchedulerSettings(**{"retry_base_delay_s": 2.0, "retry_multiplier": 2.0, "max_running": 3, **kw})
    return WorkflowQueue(cfg, clock=clock, check_target=None)


# -- a simulated operation, with an observer that shares none of the scheduler's code ---------
@dataclass
class Plan:
    workflow: str
    locks: list[str]
    arrive: float
    durations: list[float]  # per attempt
    fails: int = 0  # attempts that fail before one succeeds
    job_id: str = ""


@dataclass
class Observer:
    holders: dict[str, set[str]] = field(default_factory=dict)  # lock -> jobs holding it
    starts: list[tuple[float, str]] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    max_running_seen: int = 0


def simulate(q: WorkflowQueue, clock: Clock, plans: list[Plan], *, dt: float = 0.5, max_steps: int = 200_000,
             obs: Observer | None = None, check_priority: bool = True) -> Observer:
    obs = obs or Observer()
    rate = q.settings.ageing_per_minute
    pending = sorted(plans, key=lambda p: p.arrive)
    by_id: dict[str, Plan] = {}
    ends: dict[str, float] = {}
    for _ in range(max_steps):
        while pending and pending[0].arrive <= clock.t:
            p = pending.pop(0)
            p.job_id = q.submit(p.workflow, job_id=p.job_id or None, target=TARGET, locks=p.locks).id
            by_id[p.job_id] = p
        for jid, end in list(ends.items()):
            if end <= clock.t:
                j = q.jobs[jid]
                p = by_id[jid]
                for lock in j.locks:
                    obs.holders[lock].discard(jid)
                del ends[jid]
                q.attempt_ended(jid, ok=j.attempts > p.fails, error=None if j.attempts > p.fails else "planned")
        for j in q.expired():  # the owner kills it at once in this simulation
            for lock in j.locks:
                obs.holders[lock].discard(j.id)
            ends.pop(j.id, None)
            q.attempt_ended(j.id, ok=False)
        before = {j.id: (j.effective_priority(clock.t, rate), j.seq, list(j.locks))
                  for j in q.jobs.values() if j.state == QUEUED and j.not_before <= clock.t}
        held_before = {lock for lock, who in obs.holders.items() if who}
        started = q.take_next()
        started_keys = {j.id: before[j.id] for j in started}
        for j in started:
            for lock in j.locks:
                if obs.holders.get(lock):
                    obs.violations.append(f"t={clock.t}: {j.id} took {lock} held by {obs.holders[lock]}")
                obs.holders.setdefault(lock, set()).add(j.id)
            obs.starts.append((clock.t, j.id))
            ends[j.id] = clock.t + by_id[j.id].durations[min(j.attempts, len(by_id[j.id].durations)) - 1]
        if check_priority and started:
            _check_passed_over(before, started_keys, held_before, obs, clock.t)
        running = sum(1 for j in q.jobs.values() if j.state in (RUNNING, STOPPING))
        obs.max_running_seen = max(obs.max_running_seen, running)
        if not pending and all(j.state in (SUCCEEDED, FAILED, TIMED_OUT, CANCELLED) for j in q.jobs.values()):
            return obs
        clock.t += dt
    raise AssertionError(f"simulation did not finish in {max_steps} steps")


def _check_passed_over(before, started, held, obs, t):
    """Every more urgent job left waiting had to wait: a lock of it was held, taken by a job
    ahead of it, or reserved by a job ahead of it that was itself waiting."""
    waiting = {k: v for k, v in before.items() if k not in started}
    for jid, (eff_j, seq_j, _) in started.items():
        for kid, (eff_k, seq_k, locks_k) in waiting.items():
            if (eff_k, seq_k) >= (eff_j, seq_j):
                continue
            taken = set(held)
            for sid, (eff_s, seq_s, locks_s) in started.items():
                if (eff_s, seq_s) < (eff_k, seq_k):
                    taken.update(locks_s)
            reserved = set()
            for lid, (eff_l, seq_l, locks_l) in waiting.items():
                if (eff_l, seq_l) < (eff_k, seq_k):
                    reserved.update(locks_l)
            if not (set(locks_k) & (taken | reserved)):
                obs.violations.append(f"t={t}: {jid} (eff {eff_j:.2f}) started before free {kid} (eff {eff_k:.2f})")


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5, 6])
def test_contention_randomised(seed):
    """Many workflows over few locks: one holder per lock, all finish, priorities kept."""
    rng = random.Random(seed)
    clock = Clock()
    q = make_queue(clock, max_running=3, max_attempts=3, ageing_per_minute=2.0)
    locks = ["trading_decision", "market_data", "risk_calculation", "portfolio_data"]
    plans = []
    for i in range(80):
        fails = rng.choice([0, 0, 0, 0, 1, 2, 3])  # 3 failures exhaust max_attempts=3
        plans.append(Plan(
            workflow=rng.choice(list(PRIORITIES)), locks=rng.sample(locks, rng.randint(1, 3)),
            arrive=clock.t + rng.uniform(0, 120), durations=[rng.uniform(1, 20) for _ in range(3)], fails=fails,
        ))
    obs = simulate(q, clock, plans)
    assert obs.violations == []
    assert obs.max_running_seen <= 3
    for p in plans:
        j = q.jobs[p.job_id]
        assert j.state == (FAILED if p.fails >= 3 else SUCCEEDED), (p, j.state)
        assert j.attempts == min(p.fails + 1, 3)
    assert q.held_locks() == {} and not any(obs.holders.values())


def test_the_observer_catches_a_scheduler_that_ignores_locks(monkeypatch):
    """The contention check can fail: a queue that forgets held locks is caught."""
    clock = Clock()
    q = make_queue(clock, max_running=3)
    monkeypatch.setattr(q, "held_locks", lambda: {})
    plans = [Plan("data_collection", ["market_data"], clock.t, [10.0]) for _ in range(3)]
    obs = simulate(q, clock, plans, check_priority=False)
    assert any("held by" in v for v in obs.violations)


def test_the_observer_catches_a_scheduler_that_ignores_priorities(monkeypatch):
    clock = Clock()
    q = make_queue(clock, max_running=1)
    fifo = lambda now=None: sorted((j for j in q.jobs.values() if j.state == QUEUED), key=lambda j: j.seq)  # noqa: E731
    monkeypatch.setattr(q, "queued", fifo)
    plans = [Plan(w, ["market_data"], clock.t, [5.0]) for w in ("daily_report", "data_collection", "critical_trading")]
    obs = simulate(q, clock, plans)
    assert any("started before free" in v for v in obs.violations)


def test_strict_priority_order_with_one_slot():
    clock = Clock()
    q = make_queue(clock, max_running=1, ageing_per_minute=0.0)
    rng = random.Random(11)
    names = [rng.choice(list(PRIORITIES)) for _ in range(30)]
    plans = [Plan(n, [], clock.t, [1.0]) for n in names]
    obs = simulate(q, clock, plans)
    order = [q.jobs[jid].workflow for _, jid in obs.starts]
    # The first starts alone at submission; all others waited together and go by priority, then arrival.
    assert [PRIORITIES[w] for w in order[1:]] == sorted(PRIORITIES[w] for w in order[1:])
    seqs = [q.jobs[jid].seq for _, jid in obs.starts[1:]]
    for a, b in zip(obs.starts[1:], obs.starts[2:]):
        ja, jb = q.jobs[a[1]], q.jobs[b[1]]
        if ja.priority == jb.priority:
            assert ja.seq < jb.seq
    assert len(seqs) == 29


def _flood(ageing: float) -> tuple[float, float]:
    """One data_collection job, then critical trading arriving twice as fast as it is served."""
    clock = Clock()
    q = make_queue(clock, max_running=1, ageing_per_minute=ageing)
    t0 = clock.t
    plans = [Plan("data_collection", ["market_data"], t0 + 1, [60.0])]
    plans += [Plan("critical_trading", ["market_data"], t0 + 30.0 * i, [60.0]) for i in range(120)]
    obs = simulate(q, clock, plans, dt=1.0)
    low = plans[0].job_id
    t_low = next(t for t, jid in obs.starts if jid == low) - t0
    t_last_high = max(t for t, jid in obs.starts if jid != low) - t0
    return t_low, t_last_high


def test_ageing_lets_the_lowest_priority_run_under_a_flood():
    # The first critical job starts at once; the collector waits behind the flood until
    # its age outweighs the 24 points between them: with 1 point a minute, about 48
    # minutes in (the oldest waiting critical job has aged too).
    t_low, t_last = _flood(ageing=1.0)
    assert 40 * 60 <= t_low <= 55 * 60 and t_low < t_last
    # Without ageing it starves until the flood is over: the check above can fail.
    t_low0, t_last0 = _flood(ageing=0.0)
    assert t_low0 > t_last0


def test_a_waiting_job_reserves_its_locks_against_jobs_behind_it():
    """A job needing two locks is not starved by smaller jobs that each take one."""
    clock = Clock()
    q = make_queue(clock, max_running=4, ageing_per_minute=0.0)
    x = q.submit("model_training", target=TARGET, locks=["x"])  # priority 20, holds x
    assert [j.id for j in q.take_next()] == [x.id]
    big = q.submit("risk_management", target=TARGET, locks=["x", "y"])  # priority 2, waits for x
    small = q.submit("data_collection", target=TARGET, locks=["y"])  # priority 25, y is free
    assert q.take_next() == []  # small may not take y: big waits for it
    q.attempt_ended(x.id, ok=True)
    assert [j.id for j in q.take_next()] == [big.id]
    q.attempt_ended(big.id, ok=True)
    assert [j.id for j in q.take_next()] == [small.id]


def test_retries_back_off_exponentially():
    clock = Clock()
    q = make_queue(clock, max_attempts=4, retry_base_delay_s=2.0, retry_multiplier=3.0)
    plans = [Plan("risk_management", ["risk_calculation"], clock.t, [1.0, 1.0, 1.0, 1.0], fails=3)]
    obs = simulate(q, clock, plans, dt=0.25)
    starts = [t for t, _ in obs.starts]
    # attempt n+1 starts (1 s of work) + 2 * 3**(n-1) seconds after attempt n started
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert gaps == pytest.approx([1 + 2, 1 + 6, 1 + 18], abs=0.26)
    j = q.jobs[plans[0].job_id]
    assert j.state == SUCCEEDED and j.attempts == 4
    assert [a["outcome"] for a in j.attempt_log] == [FAILED, FAILED, FAILED, SUCCEEDED]


def test_a_job_backing_off_leaves_its_locks_to_others():
    clock = Clock()
    q = make_queue(clock, retry_base_delay_s=60.0)
    a = q.submit("critical_trading", target=TARGET, locks=["trading_decision"])
    q.take_next()
    q.attempt_ended(a.id, ok=False, error="boom")
    b = q.submit("data_collection", target=TARGET, locks=["trading_decision"])
    assert [j.id for j in q.take_next()] == [b.id]
    assert q.status()["queued"][0]["retry_in_s"] == pytest.approx(60.0)


def test_timeout_keeps_the_lock_until_the_attempt_is_dead_then_retries_or_fails():
    clock = Clock()
    q = make_queue(clock, max_attempts=2, retry_base_delay_s=1.0)
    a = q.submit("daily_report", target=TARGET, locks=["risk_calculation"], timeout_s=10)
    q.take_next()
    b = q.submit("risk_management", target=TARGET, locks=["risk_calculation"])
    clock.t += 10.5
    assert [j.id for j in q.expired()] == [a.id]
    assert q.jobs[a.id].state == STOPPING
    assert q.take_next() == []  # a's attempt is not known dead yet: the lock stays held
    q.attempt_ended(a.id, ok=False)  # Ray confirms the kill
    assert q.jobs[a.id].state == QUEUED and q.jobs[a.id].attempt_log[-1]["outcome"] == TIMED_OUT
    assert [j.id for j in q.take_next()] == [b.id]  # risk (2) before the report's retry (15)
    q.attempt_ended(b.id, ok=True)
    clock.t += 1.0
    assert [j.id for j in q.take_next()] == [a.id]
    clock.t += 10.5
    q.expired()
    q.attempt_ended(a.id, ok=False)
    assert q.jobs[a.id].state == TIMED_OUT and "timed out after 10s" in q.jobs[a.id].error


def test_cancel_queued_and_running():
    clock = Clock()
    q = make_queue(clock)
    run = q.submit("model_training", target=TARGET, locks=["training"])
    q.take_next()
    queued = q.submit("model_training", target=TARGET, locks=["training"])
    assert q.cancel(queued.id).state == CANCELLED
    assert q.cancel(run.id).state == STOPPING
    assert q.held_locks() == {"training": run.id}  # until the kill is confirmed
    q.attempt_ended(run.id, ok=False, error="killed")
    assert q.jobs[run.id].state == CANCELLED and q.jobs[run.id].attempts == 1  # not retried
    assert q.take_next() == []
    assert q.cancel(run.id).state == CANCELLED  # cancelling a finished job changes nothing
    with pytest.raises(WorkflowError, match="no job"):
        q.cancel("nope")


def test_submissions_are_checked_and_idempotent():
    clock = Clock()
    q = make_queue(clock)
    with pytest.raises(WorkflowError, match="unknown workflow 'trade_now'"):
        q.submit("trade_now", target=TARGET)
    with pytest.raises(WorkflowError, match="has no target"):
        q.submit("daily_report")
    with pytest.raises(WorkflowError, match="must be JSON"):
        q.submit("daily_report", [object()], target=TARGET)
    a = q.submit("daily_report", ["x"], target=TARGET, job_id="report-2024-01-02")
    assert q.submit("daily_report", ["x"], target=TARGET, job_id="report-2024-01-02") is a
    assert len(q.jobs) == 1
    checked = WorkflowQueue(SchedulerSettings(), clock=clock)
    with pytest.raises(WorkflowError, match="cannot be imported"):
        checked.submit("daily_report", target="tests.support.workflow_targets:no_such_function")


def test_journal_round_trip_and_recovery_rules():
    clock = Clock()
    q = make_queue(clock)
    done = q.submit("data_collection", target=TARGET, locks=["market_data"], job_id="done")
    q.take_next()
    q.attempt_ended(done.id, ok=True)
    a = q.submit("critical_trading", target=TARGET, locks=["trading_decision"], job_id="a")
    b = q.submit("risk_management", target=TARGET, locks=["risk_calculation"], job_id="b")
    c = q.submit("position_reconciliation", target=TARGET, locks=["portfolio_data"], job_id="c")
    q.take_next()
    q.cancel(c.id)
    waiting = q.submit("critical_trading", target=TARGET, locks=["trading_decision"], job_id="waiting")

    r = WorkflowQueue(q.settings, clock=clock, check_target=None, state=q.to_state())
    assert {j.id: j.state for j in r.jobs.values()} == {
        "done": SUCCEEDED, "a": RECOVERING, "b": RECOVERING, "c": RECOVERING, "waiting": QUEUED}
    # Locks of attempts that may still be alive stay held.
    assert r.held_locks() == {"trading_decision": "a", "risk_calculation": "b", "portfolio_data": "c"}
    assert r.take_next() == []
    r.recovered("a", completed=True)  # left its completion marker: never run again
    r.recovered("b", completed=False)  # interrupted: queued again, the attempt not counted
    r.recovered("c", completed=False)  # was being cancelled
    assert r.jobs["a"].state == SUCCEEDED and r.jobs["a"].attempts == 1
    assert r.jobs["b"].state == QUEUED and r.jobs["b"].attempts == 0
    assert r.jobs["c"].state == CANCELLED
    started = {j.id for j in r.take_next()}
    assert started == {"waiting", "b"}  # "done" and "a" are finished and never start again
    assert r.submit("critical_trading", target=TARGET, job_id="a") is r.jobs["a"]
    assert waiting.id in started and b.id in started and a.id not in started


def test_finished_ids_outlive_the_kept_history():
    clock = Clock()
    q = make_queue(clock, history=2)
    for i in range(5):
        j = q.submit("data_collection", target=TARGET, job_id=f"j{i}")
        q.take_next()
        q.attempt_ended(j.id, ok=True)
        clock.t += 1
    assert sorted(q.jobs) == ["j3", "j4"] and len(q.status()["history"]) == 2
    r = WorkflowQueue(q.settings, clock=clock, check_target=None, state=q.to_state())
    with pytest.raises(WorkflowError, match="already finished"):
        r.submit("data_collection", target=TARGET, job_id="j0")


def test_status_shows_running_with_locks_queued_and_history():
    clock = Clock()
    q = make_queue(clock, max_running=1)
    a = q.submit("critical_trading", target=TARGET, locks=["trading_decision"])
    q.take_next()
    b = q.submit("data_collection", target=TARGET, locks=["trading_decision"])
    st = q.status()
    assert [(r["id"], r["locks_held"]) for r in st["running"]] == [(a.id, ["trading_decision"])]
    assert [(x["id"], x["waiting_for"]) for x in st["queued"]] == [(b.id, ["trading_decision"])]
    q.attempt_ended(a.id, ok=False, error="Traceback...\nValueError: bad bar")
    assert q.jobs[a.id].state == QUEUED  # backing off before its second attempt
    q.cancel(a.id)
    st = q.status()
    assert st["locks"] == {} and st["running"] == []
    assert [(h["id"], h["state"], h["error"]) for h in st["history"]] == [(a.id, CANCELLED, "ValueError: bad bar")]
    assert [x["id"] for x in st["queued"]] == [b.id] and st["queued"][0]["waiting_for"] == []


# -- the actor, on Ray ---------------------------------------------------------------------
@pytest.fixture
def sched_settings(make_settings):
    return make_settings(scheduler={"tick_s": 0.05, "retry_base_delay_s": 0.3, "retry_multiplier": 2.0,
                                    "max_running": 3, "recovery_grace_s": 5.0})


def _start(settings):
    from actors.scheduler import WorkflowScheduler, scheduler_options

    opts = scheduler_options(settings, detached=False)
    opts["name"] = f"scheduler-test-{uuid.uuid4().hex[:8]}"
    return WorkflowScheduler.options(**opts).remote(settings)


def _jobs(sched, ids):
    import ray

    return {jid: ray.get(sched.job.remote(jid), timeout=30) for jid in ids}


def _wait(sched, ids, until, timeout_s=60.0):
    """Poll until ``until(jobs)``; a scheduler that is restarting is polled again."""
    import ray

    deadline = time.time() + timeout_s
    jobs = {}
    while time.time() < deadline:
        try:
            jobs = _jobs(sched, ids)
            if until(jobs):
                return jobs
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"timed out; jobs: { {k: (v or {}).get('state') for k, v in jobs.items()} }")


def _final(jobs):
    return all(j and j["state"] in (SUCCEEDED, FAILED, TIMED_OUT, CANCELLED) for j in jobs.values())


def _no_overlap(spans, locks_of):
    by_lock: dict[str, list] = {}
    for job, pid, t0, t1 in spans:
        for lock in locks_of[job]:
            by_lock.setdefault(lock, []).append((t0, t1, job, pid))
    for lock, xs in by_lock.items():
        xs.sort()
        for a, b in zip(xs, xs[1:]):
            assert a[1] < b[0], f"{lock}: {a[2]} (pid {a[3]}) alive until {a[1]:.3f}, {b[2]} started {b[0]:.3f}"
    return by_lock


def test_actor_runs_contending_workflows_with_retries(ray_session, sched_settings, tmp_path):
    import ray

    from tests.support.workflow_targets import intervals, read_log

    log = str(tmp_path / "events.jsonl")
    sched = _start(sched_settings)
    rng = random.Random(7)
    locks_of, ids = {}, []
    for i in range(9):
        name = f"w{i}"
        locks = rng.sample(["market_data", "portfolio_data"], rng.randint(1, 2))
        j = ray.get(sched.submit.remote(rng.choice(list(PRIORITIES)), [log, name, rng.uniform(0.1, 0.4)],
                                        target=TARGET, locks=locks, job_id=name))
        locks_of[name], ids = locks, ids + [j["id"]]
    flaky = ray.get(sched.submit.remote("risk_management", [log, "flaky", 2], target="tests.support.workflow_targets:flaky",
                                        locks=["risk_calculation"], job_id="flaky"))
    locks_of["flaky"] = ["risk_calculation"]
    jobs = _wait(sched, ids + [flaky["id"]], _final, timeout_s=90)
    assert {j["state"] for j in jobs.values()} == {SUCCEEDED}
    assert jobs["flaky"]["attempts"] == 3
    assert [a["outcome"] for a in jobs["flaky"]["attempt_log"]] == [FAILED, FAILED, SUCCEEDED]
    assert "planned failure 1 of 2" in jobs["flaky"]["attempt_log"][0]["error"]
    events = read_log(log)
    _no_overlap(intervals(events), locks_of)
    starts = [e["t"] for e in events if e["job"] == "flaky" and e["event"] == "start"]
    assert starts[1] - starts[0] >= 0.3 and starts[2] - starts[1] >= 0.6  # backoff 0.3 s, then 0.6 s
    st = ray.get(sched.status.remote())
    assert st["running"] == [] and st["queued"] == [] and st["locks"] == {}
    assert {h["id"] for h in st["history"]} == set(ids) | {"flaky"}
    ray.kill(sched, no_restart=True)


def _pid_alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def test_actor_times_out_and_cancels_by_killing_the_attempt(ray_session, sched_settings, tmp_path):
    import ray

    from tests.support.workflow_targets import intervals, read_log

    log = str(tmp_path / "events.jsonl")
    sched = _start(sched_settings)
    sub = lambda wf, name, secs, locks, **kw: ray.get(sched.submit.remote(  # noqa: E731
        wf, [log, name, secs], target=TARGET, locks=locks, job_id=name, **kw))
    sub("model_training", "slow", 60, ["training"], timeout_s=2.0, max_attempts=1)
    sub("model_training", "after-slow", 0.1, ["training"])
    sub("data_collection", "long", 60, ["market_data"])
    sub("data_collection", "queued", 0.1, ["market_data"])
    _wait(sched, ["long"], lambda js: js["long"]["state"] == RUNNING)
    _wait(sched, ["long"], lambda js: any(e["job"] == "long" for e in read_log(log)), timeout_s=30)
    assert ray.get(sched.cancel.remote("queued"))["state"] == CANCELLED
    assert ray.get(sched.cancel.remote("long"))["state"] == STOPPING
    jobs = _wait(sched, ["slow", "after-slow", "long", "queued"], _final, timeout_s=60)
    assert jobs["slow"]["state"] == TIMED_OUT and jobs["slow"]["attempts"] == 1
    assert jobs["long"]["state"] == CANCELLED and jobs["queued"]["state"] == CANCELLED
    assert jobs["after-slow"]["state"] == SUCCEEDED
    events = read_log(log)
    assert not any(e["job"] == "queued" for e in events)  # cancelled before it ever started
    spans = {job: (pid, t0, t1) for job, pid, t0, t1 in intervals(events)}
    for killed in ("slow", "long"):
        assert not any(e["job"] == killed and e["event"] == "end" for e in events)
        assert not _pid_alive(spans[killed][0]), f"{killed}'s process outlived its timeout/cancel"
    # The job queued behind the timed-out one started only after the killed process's last sign of life.
    assert spans["after-slow"][1] > spans["slow"][2]
    assert 1.5 <= spans["slow"][2] - spans["slow"][1] <= 10
    ray.kill(sched, no_restart=True)


def test_scheduler_killed_mid_run_recovers_and_never_reruns_finished_work(ray_session, sched_settings, tmp_path):
    import ray

    from tests.support.workflow_targets import intervals, read_log

    log = str(tmp_path / "events.jsonl")
    sched = _start(sched_settings)
    sub = lambda wf, name, secs, locks: ray.get(sched.submit.remote(  # noqa: E731
        wf, [log, name, secs], target=TARGET, locks=locks, job_id=name))
    sub("data_collection", "finished", 0.1, ["market_data"])
    _wait(sched, ["finished"], lambda js: js["finished"]["state"] == SUCCEEDED)
    sub("position_reconciliation", "mid-run", 4.0, ["portfolio_data"])
    sub("daily_report", "queued", 0.2, ["portfolio_data"])
    _wait(sched, ["mid-run"], lambda js: js["mid-run"]["state"] == RUNNING)
    _wait(sched, ["mid-run"], lambda js: sum(e["job"] == "mid-run" for e in read_log(log)) > 5, timeout_s=30)

    ray.kill(sched, no_restart=False)  # a crash: Ray restarts it from the same arguments

    jobs = _wait(sched, ["finished", "mid-run", "queued"], _final, timeout_s=90)
    assert {k: j["state"] for k, j in jobs.items()} == {"finished": SUCCEEDED, "mid-run": SUCCEEDED, "queued": SUCCEEDED}
    events = read_log(log)
    starts = lambda job: [e for e in events if e["job"] == job and e["event"] == "start"]  # noqa: E731
    assert len(starts("finished")) == 1  # finished before the crash: never run again
    assert len(starts("mid-run")) == 2  # interrupted by the crash, then run again to the end
    assert [a["outcome"] for a in jobs["mid-run"]["attempt_log"]] == ["interrupted", SUCCEEDED]
    assert jobs["mid-run"]["attempts"] == 1  # the scheduler's crash is not counted against the workflow
    first_pid = starts("mid-run")[0]["pid"]
    assert not any(e["pid"] == first_pid and e["job"] == "mid-run" and e["event"] == "end" for e in events)
    assert not _pid_alive(first_pid)
    # One holder of portfolio_data at a time, across the crash: the rerun and the queued
    # report started only after the interrupted attempt's process was last seen alive.
    by_lock = _no_overlap(intervals(events), {"finished": ["market_data"], "mid-run": ["portfolio_data"],
                                              "queued": ["portfolio_data"]})
    assert [x[2] for x in by_lock["portfolio_data"]] == ["mid-run", "mid-run", "queued"]
    st = ray.get(sched.status.remote())
    assert st["scheduler"]["restored_jobs"] == 3 and st["locks"] == {}
    ray.kill(sched, no_restart=True)


def test_cli_workflows_run_ls_cancel(ray_session, tmp_path, monkeypatch, capsys):
    import ray

    from actors.scheduler import get_scheduler
    from cluster.settings import load_settings
    from raytrade.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAYTRADE_STORE__URI", str(tmp_path / "store"))
    monkeypatch.setenv("RAYTRADE_SCHEDULER__TICK_S", "0.05")
    log = str(tmp_path / "events.jsonl")
    try:
        assert main(["workflows", "ls"]) == 0
        assert "scheduler is not running" in capsys.readouterr().out
        assert main(["workflows", "run", "data_collection", "--target", TARGET, "--args",
                     json.dumps([log, "cli-1", 0.1]), "--id", "cli-1", "--wait", "60"]) == 0
        out = capsys.readouterr().out
        assert "queued cli-1 (data_collection, priority 25, locks market_data)" in out and "cli-1 succeeded" in out
        assert main(["workflows", "run", "model_training", "--target", TARGET, "--args",
                     json.dumps([log, "cli-2", 60]), "--id", "cli-2"]) == 0
        capsys.readouterr()
        assert main(["workflows", "ls", "--json"]) == 0
        st = json.loads(capsys.readouterr().out)
        assert [h["id"] for h in st["history"]] == ["cli-1"] and st["history"][0]["state"] == SUCCEEDED
        assert [j["id"] for j in st["running"] + st["queued"]] == ["cli-2"]
        assert main(["status"]) == 0
        assert "scheduler: " in capsys.readouterr().out
        assert main(["workflows", "cancel", "cli-2"]) == 0
        assert "cli-2 " in capsys.readouterr().out
        # Mistakes are one line and exit 2.
        assert main(["workflows", "run", "buy_everything"]) == 2
        assert "unknown workflow 'buy_everything'" in capsys.readouterr().err
        assert main(["workflows", "run", "daily_report"]) == 2  # no target set for it yet
        assert "has no target" in capsys.readouterr().err
        assert main(["workflows", "cancel", "nope"]) == 2
        assert "no job 'nope'" in capsys.readouterr().err
        sched = get_scheduler(load_settings(use_file=False))
        _wait(sched, ["cli-2"], lambda js: js["cli-2"]["state"] == CANCELLED, timeout_s=30)
    finally:
        try:
            ray.kill(get_scheduler(load_settings(use_file=False)), no_restart=True)
        except LookupError:
            pass


def test_an_unreadable_journal_stops_the_scheduler_instead_of_dropping_the_queue(make_settings):
    from actors.scheduler import load_journal
    from core.store import BarStore

    s = make_settings()
    store = BarStore.from_settings(s.store)
    assert load_journal(store, s.scheduler.journal) is None  # first start
    clock = Clock()
    q = make_queue(clock)
    q.submit("daily_report", target=TARGET, job_id="r1")
    store.put_bytes(s.scheduler.journal, json.dumps(q.to_state()).encode())
    assert [j["id"] for j in load_journal(store, s.scheduler.journal)["jobs"]] == ["r1"]
    store.put_bytes(s.scheduler.journal, b'{"version": 1, "seq": 3, "jobs": [{"id": "half')
    with pytest.raises(RuntimeError, match="unreadable .*move it aside"):
        load_journal(store, s.scheduler.journal)
    store.put_bytes(s.scheduler.journal, b'{"version": 1, "seq": 3, "jobs": [{"id": "x"}]}')
    with pytest.raises(RuntimeError, match="unreadable"):
        load_journal(store, s.scheduler.journal)
