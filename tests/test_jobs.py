"""Background jobs: real OS processes started by the supervisor on tiny real trainings."""
import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from cifar_core import jobs
from cifar_core.config import RunConfig
from cifar_core.runs import RunStore


def long_cfg(**changes):
    # Small but long enough to stay running until the test cancels it.
    base = dict(model="lenet", subset="per_class", per_class=20, epochs=2000, batch_size=50,
                log_every=1, val_size=0, eval_every=1000)
    base.update(changes)
    return RunConfig(**base).validated()


def wait_for(predicate, timeout=90, every=0.2):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        time.sleep(every)
    return False


@pytest.fixture
def store(tmp_path, cifar_npz, monkeypatch):
    monkeypatch.setenv("CIFAR10_NPZ", str(cifar_npz))
    monkeypatch.setenv("CIFAR_LAB_SLOTS_CPU", "1")
    monkeypatch.setenv("CIFAR_LAB_CANCEL_GRACE", "5")
    monkeypatch.setenv("CIFAR_LAB_WORKER_IDLE", "5")
    s = RunStore(tmp_path / "runs")
    yield s
    # leave nothing behind: cancel everything, stop the supervisor
    for record in s.records():
        pid = record.status().get("pid")
        if pid and jobs.process_alive(pid):
            jobs.signal_run(pid, signal.SIGKILL)
    stop_worker(s)


def worker_pids(store):
    out = subprocess.run(["pgrep", "-f", "--", f"--runs-root {store.root} worker"], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def stop_worker(store):
    for pid in worker_pids(store):
        os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not worker_pids(store), timeout=20)


def state(store, run_id):
    return store.record(run_id).state()


def test_queue_order_concurrency_cancel_and_reattach(store):
    a = jobs.submit(long_cfg(name="a"), store).run_id
    b = jobs.submit(long_cfg(name="b"), store).run_id
    c = jobs.submit(long_cfg(name="c"), store).run_id
    assert wait_for(lambda: state(store, a) == "running"), store.record(a).status()
    assert wait_for(lambda: store.record(a).metrics_path.exists())
    time.sleep(1.5)  # give the supervisor several ticks to (wrongly) start more
    assert state(store, b) == "queued" and state(store, c) == "queued"   # 1 CPU slot

    # cancel the running one: SIGTERM, it stops at a safe point with a checkpoint, no process left
    pid_a = store.record(a).status()["pid"]
    assert jobs.cancel(a, store) == "cancelling"
    assert wait_for(lambda: state(store, a) == "cancelled")
    assert wait_for(lambda: not jobs.process_alive(pid_a), timeout=20)
    assert store.record(a).checkpoint_path("last").exists()

    # the queue moves on in submission order
    assert wait_for(lambda: state(store, b) == "running")
    assert state(store, c) == "queued"

    # cancelling a queued job is immediate
    assert jobs.cancel(c, store) == "cancelled"

    # restart the supervisor: the running job keeps running and is still tracked
    stop_worker(store)
    pid_b = store.record(b).status()["pid"]
    assert jobs.process_alive(pid_b)
    lines_before = len(store.record(b).read_metrics())
    jobs.ensure_worker(store)
    assert wait_for(lambda: len(worker_pids(store)) == 1)
    time.sleep(1.0)
    assert state(store, b) == "running"
    assert wait_for(lambda: len(store.record(b).read_metrics()) > lines_before)  # still streaming
    jobs.cancel(b, store)
    assert wait_for(lambda: state(store, b) == "cancelled")
    assert wait_for(lambda: not jobs.process_alive(pid_b), timeout=20)


def test_lost_process_is_marked_failed_with_log_tail(store):
    run_id = jobs.submit(long_cfg(), store).run_id
    assert wait_for(lambda: store.record(run_id).metrics_path.exists())
    stop_worker(store)
    pid = store.record(run_id).status()["pid"]
    os.killpg(os.getpgid(pid), signal.SIGKILL)
    assert wait_for(lambda: not jobs.process_alive(pid), timeout=10)
    assert jobs.reconcile(store) == [run_id]
    status = store.record(run_id).status()
    assert status["state"] == "failed" and status["error"].startswith("process lost")


def test_forced_kill_after_grace_period(store):
    # a process that ignores SIGTERM stands in for a stuck trainer
    proc = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, "
                             "signal.SIG_IGN); print('ready', flush=True); time.sleep(120)"],
                            start_new_session=True, stdout=subprocess.PIPE)
    proc.stdout.readline()
    record = store.create(long_cfg(), state="running")
    record.update_status(pid=proc.pid, pid_start=jobs.process_start_time(proc.pid), device_kind="cpu")
    assert jobs.cancel(record.run_id, store) == "cancelling"
    time.sleep(0.5)
    assert proc.poll() is None                      # SIGTERM ignored
    sup = jobs.Supervisor(store)
    assert wait_for(lambda: (sup.tick(), proc.poll() is not None)[1], timeout=20)
    assert record.state() == "cancelled" and "grace period" in record.status()["error"]


def test_second_supervisor_exits_immediately(store):
    jobs.ensure_worker(store)
    assert wait_for(lambda: jobs.worker_alive(store), timeout=20)
    out = subprocess.run([sys.executable, "-m", "cifar_core", "--runs-root", str(store.root), "worker"],
                         capture_output=True, text=True, timeout=60)
    assert "already" in out.stdout
    assert len(worker_pids(store)) == 1


def test_deleted_run_folder_while_viewed(store):
    record = store.create(long_cfg(), state="completed")
    reader = record.metrics_reader()
    record.append_metrics({"kind": "train", "step": 1})
    assert len(reader.read_new()) == 1
    jobs.delete(record.run_id, store)
    assert reader.read_new() == [] and record.status() == {} and not record.exists()
    assert jobs.reconcile(store) == []
    with pytest.raises(Exception, match="not found"):
        jobs.cancel(record.run_id, store)


def test_crash_at_start_is_reported(store, tmp_path):
    record = jobs.submit(long_cfg(), store, data_source=str(tmp_path / "no-such.npz"))
    assert wait_for(lambda: record.state() == "failed", timeout=90), record.status()
    assert "no-such.npz" in record.status()["error"]


def test_cancel_of_a_directly_started_run_spares_its_caller(store, tmp_path):
    """A run started with `python -m cifar_core train` from a plain script shares the script's process
    group: cancelling it must stop the run only, not the script or the script's other children."""
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps(long_cfg().to_dict()))
    script = tmp_path / "caller.sh"
    script.write_text(f"sleep 120 &\necho $! > {tmp_path}/sibling\n"
                      f"{sys.executable} -m cifar_core --runs-root {store.root} train --config {cfg} "
                      f"--run-id direct-run --no-progress > {tmp_path}/train.log 2>&1\n"
                      f"echo after-train > {tmp_path}/caller-done\nwait\n")
    caller = subprocess.Popen(["bash", str(script)], start_new_session=True)  # its own group, like a terminal
    try:
        assert wait_for(lambda: state(store, "direct-run") == "running" and store.record("direct-run").status().get("pid"))
        sibling = int((tmp_path / "sibling").read_text())
        assert jobs.cancel("direct-run", store) == "cancelling"
        assert wait_for(lambda: state(store, "direct-run") == "cancelled", timeout=60)
        assert wait_for(lambda: (tmp_path / "caller-done").exists(), timeout=30)  # the script went on
        assert caller.poll() is None and jobs.process_alive(sibling)  # neither the script nor its sleep died
    finally:
        os.killpg(caller.pid, signal.SIGKILL)


def test_readers_restart_a_dead_supervisor_and_mark_vanished_runs(store, capsys):
    """The supervisor died with work queued, and a directly started run was SIGKILLed: whoever reads
    the records next (here `runs`) restarts the queue and marks the vanished run failed."""
    from cifar_core.cli import main
    queued = jobs.submit(long_cfg(epochs=1), store, start_worker=False)  # as if the supervisor had died
    ghost = subprocess.Popen([sys.executable, "-c", "pass"])
    ghost.wait()
    direct = store.create(long_cfg(), run_id="killed-direct", state="running")
    direct.update_status(pid=ghost.pid, started=time.time() - 60)
    assert not worker_pids(store)
    assert main(["--runs-root", str(store.root), "runs"]) == 0
    assert store.record("killed-direct").state() == "failed"
    assert "process lost" in store.record("killed-direct").status()["error"]
    assert wait_for(lambda: state(store, queued.run_id) == "completed", timeout=120)


def test_supervisor_started_here_is_reaped_when_it_exits(store, monkeypatch):
    """A long-lived caller (the app's server) that started a supervisor must not keep it as a
    <defunct> zombie after it exits on its own (idle), even if it never submits again."""
    monkeypatch.setenv("CIFAR_LAB_WORKER_IDLE", "2")
    assert jobs.ensure_worker(store)
    assert wait_for(lambda: worker_pids(store), timeout=60)
    pid = worker_pids(store)[0]
    assert os.getppid() != pid and pid != os.getpid()
    # it exits after 2 idle seconds; then its process entry must go (no zombie waits for a reaper)
    assert wait_for(lambda: not os.path.exists(f"/proc/{pid}"), timeout=60), \
        open(f"/proc/{pid}/stat").read() if os.path.exists(f"/proc/{pid}") else ""


def test_launch_keeps_the_state_of_a_manual_resume_that_won_the_race(store, monkeypatch):
    """Between the supervisor reading the queue and starting the trainer, `train --resume ID` started
    by hand took the run's train lock and wrote state running with its own pid: the supervisor must
    not overwrite that with starting and its own (refused) process's pid."""
    from types import SimpleNamespace

    record = jobs.submit(long_cfg(), store, start_worker=False)
    me = os.getpid()  # stands in for the manual trainer (alive)
    started = []

    class Refused:  # the supervisor's trainer, which will find the train lock taken
        pid = 4_000_000

        def poll(self):
            return None

    def popen(cmd, **kwargs):
        started.append(cmd)
        record.update_status(state="running", pid=me, pid_start=jobs.process_start_time(me), started=time.time())
        return Refused()

    monkeypatch.setattr(jobs, "subprocess", SimpleNamespace(Popen=popen, STDOUT=subprocess.STDOUT,
                                                            DEVNULL=subprocess.DEVNULL))
    jobs.Supervisor(store).tick()
    assert started, "the queued run was launched"
    status = record.status()
    assert status["state"] == "running" and status["pid"] == me, status

    # and an ordinary launch still records the new process
    other = jobs.submit(long_cfg(), store, start_worker=False)
    record.update_status(state="completed")  # free the slot
    monkeypatch.setattr(jobs, "subprocess", SimpleNamespace(Popen=lambda cmd, **kw: Refused(),
                                                            STDOUT=subprocess.STDOUT, DEVNULL=subprocess.DEVNULL))
    jobs.Supervisor(store).tick()
    status = other.status()
    assert status["state"] == "starting" and status["pid"] == Refused.pid, status
    for r in (record, other):  # neither pid is a trainer: the teardown must not signal them
        r.update_status(state="cancelled", pid=None)


def test_resume_requeues_cancelled_and_checkpointed_failed_runs(store):
    from cifar_core.params import ConfigError

    record = jobs.submit(long_cfg(), store, start_worker=False)
    assert jobs.cancel(record.run_id, store) == "cancelled"
    assert jobs.resumable(record)
    jobs.resume(record.run_id, store, start_worker=False)
    status = record.status()
    assert status["state"] == "queued" and status["error"] is None and status["finished"] is None
    record.update_status(state="failed", error="RuntimeError: boom")
    assert not jobs.resumable(record)  # failed before any checkpoint: relaunch instead
    with pytest.raises(ConfigError, match="relaunch"):
        jobs.resume(record.run_id, store, start_worker=False)
    record.checkpoint_path("last").write_bytes(b"")
    jobs.resume(record.run_id, store, start_worker=False)
    assert record.state() == "queued"
    record.update_status(state="completed")
    with pytest.raises(ConfigError, match="cannot be resumed: it is completed"):
        jobs.resume(record.run_id, store, start_worker=False)


def test_a_cancelled_run_resumed_through_the_queue_continues_from_its_checkpoint(store):
    run_id = jobs.submit(long_cfg(), store).run_id
    assert wait_for(lambda: (store.record(run_id).status().get("step") or 0) >= 4), store.record(run_id).status()
    assert jobs.cancel(run_id, store) == "cancelling"
    assert wait_for(lambda: state(store, run_id) == "cancelled")
    at_step = store.record(run_id).status()["step"]
    jobs.resume(run_id, store)
    assert at_step >= 4
    assert wait_for(lambda: state(store, run_id) == "running"
                    and store.record(run_id).status().get("resumed_at_step") == at_step), store.record(run_id).status()
    assert store.record(run_id).status().get("cancel_requested") is None
    jobs.cancel(run_id, store)
    assert wait_for(lambda: state(store, run_id) == "cancelled")


def test_runs_of_a_dead_owner_are_cancelled_queued_and_running(store):
    """A search worker owns its trial's run; when it dies, the run must not train on for nobody."""
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    me = {"pid": owner.pid, "start": jobs.process_start_time(owner.pid), "host": jobs.owner_of_this_process()["host"]}
    running = jobs.submit(long_cfg(), store, owner=me).run_id
    assert wait_for(lambda: store.record(running).metrics_path.exists())
    queued = jobs.submit(long_cfg(), store, owner=me).run_id  # waits behind the single CPU slot
    mine = jobs.submit(long_cfg(epochs=1), store, start_worker=False).run_id  # no owner: untouched
    assert jobs.cancel_orphans(store) == []  # owner alive
    owner.kill()
    owner.wait()
    assert sorted(jobs.cancel_orphans(store)) == sorted([running, queued])
    assert state(store, queued) == "cancelled"
    assert wait_for(lambda: state(store, running) == "cancelled", timeout=60)
    assert "owner" in store.record(running).status()["orphaned"]
    assert state(store, mine) in ("queued", "starting", "running", "completed")


def test_an_owner_on_another_host_is_never_judged_from_here(store):
    record = jobs.submit(long_cfg(), store, start_worker=False,
                         owner={"pid": 999999, "start": 1.0, "host": "some-other-machine"})
    assert not jobs.owner_gone(record.status())
    assert jobs.cancel_orphans(store) == []


def test_a_run_that_starts_from_an_unfinished_run_waits_for_it_without_holding_back_others(tmp_path, monkeypatch):
    """The supervisor's pass with the start of each process replaced by a stand-in: a fine-tune queued
    with 2 free slots must not start while the run it initialises from is still training."""
    monkeypatch.setenv("CIFAR_LAB_SLOTS_CPU", "2")
    store = RunStore(tmp_path)
    launched = []

    def popen(cmd, **kwargs):
        launched.append(store.record(cmd[cmd.index("--resume") + 1]).config_dict()["name"])
        return SimpleNamespace(pid=os.getpid(), poll=lambda: None)

    monkeypatch.setattr(jobs, "subprocess", SimpleNamespace(Popen=popen, STDOUT=subprocess.STDOUT,
                                                            DEVNULL=subprocess.DEVNULL))

    def queued(name: str, **changes):
        record = store.create(RunConfig(model="lenet", name=name, **changes).validated())
        record.update_status(device_kind="cpu")
        return record

    pretext = queued("pretext")
    finetune = queued("finetune", init_run=pretext.run_id)
    queued("other")
    supervisor = jobs.Supervisor(store)
    supervisor.tick()
    assert launched == ["pretext", "other"]  # the fine-tune waits; the later run takes the free slot
    assert jobs.queue_wait(store, finetune.run_id).startswith(f"run {pretext.run_id}, which it starts from, to complete")
    pretext.update_status(state="completed")
    supervisor.tick()
    assert launched == ["pretext", "other", "finetune"]


def test_a_queued_run_waits_for_its_start_and_every_teacher_until_they_finish():
    table = {"completed": ["a"], "running": ["b"], "queued": ["c"]}
    assert jobs.unfinished_source({"teacher_run": "a,b"}, table) == "b"
    assert jobs.unfinished_source({"teacher_run": "a, c"}, table) == "c"
    assert jobs.unfinished_source({"init_run": "b", "teacher_run": "a"}, table) == "b"
    assert jobs.unfinished_source({"init_run": "", "teacher_run": "a"}, table) is None
    assert jobs.unfinished_source({}, table) is None
