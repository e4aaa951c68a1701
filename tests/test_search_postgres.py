"""One Optuna study on a real PostgreSQL server, worked on by two real `search-worker` processes.

Each worker has its own runs folder (two "machines" sharing only the database), so each trial's run is
trained by that folder's job supervisor. Checked: every trial is recorded once, under a number no other
trial has, with a run in exactly one of the two folders that names the same study and trial; the budget
is met exactly; the best trial is the same from two independent clients (a fresh Optuna storage and the
`search-report` command). When one worker is killed (SIGKILL) in the middle of a trial the other goes
on to the end of the budget, the dead worker's trial ends FAIL (found stale through its heartbeat) and is
retried once with the same parameters, and the dead worker's run is cancelled by its folder's supervisor
instead of training on for nobody.

The kill hits worker 1's first trial of a budget of 4, so that worker 2 still has trials to start after
the dead trial's heartbeat is older than the grace: a worker fails stale trials only when it starts a
trial, and a RUNNING trial (dead or not) counts toward the budget.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.postgres_server import postgres_server

REPO = Path(__file__).resolve().parents[1]
HEARTBEAT_S, GRACE_S = 1, 4
SPACE = {"lr": {"low": 0.05, "high": 0.5, "log": True}, "label_smoothing": {"low": 0.0, "high": 0.2}}
WORKER_TIMEOUT_S = 300  # a trial takes ~10-20 s on 2 idle cores (mostly process start-ups), 3x that when busy


# ---- helpers ----------------------------------------------------------------------------------------

def wait_for(predicate, timeout: float, every: float = 0.25):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    return None


def pids_under(root: Path) -> list[int]:
    """Processes (workers, supervisors, trainers) started with `--runs-root ROOT`."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(root).encode() in args and b"--runs-root" in args:
            out.append(int(entry.name))
    return out


def kill_all_under(root: Path) -> None:
    for pid in pids_under(root):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def trainers_under(root: Path) -> list[int]:
    out = []
    for pid in pids_under(root):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"train" in args:
            out.append(pid)
    return out


class Worker:
    """A `python -m cifar_core search-worker` process with its own runs folder and log file."""

    def __init__(self, name: str, root: Path, study: str, url: str, data: str, env: dict, log_dir: Path):
        self.name, self.root = name, root
        self.log_path = log_dir / f"{name}.log"
        cmd = [sys.executable, "-m", "cifar_core", "--runs-root", str(root), "search-worker",
               "--study", study, "--storage", url, "--data", data]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return "(no output)"

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None


def describe(workers: list[Worker], study=None) -> str:
    """Everything useful when an assertion fails: the workers' output, the trials, the runs, logs."""
    parts = []
    for w in workers:
        parts.append(f"===== {w.name} (pid {w.proc.pid}, exit {w.proc.poll()}) output:\n{w.output()[-6000:]}")
        sup = w.root / ".worker.log"
        if sup.exists():
            parts.append(f"----- {w.name} supervisor log:\n{sup.read_text(errors='replace')[-3000:]}")
        for status_file in sorted(w.root.glob("*/status.json")):
            status = json.loads(status_file.read_text())
            keep = {k: status.get(k) for k in ("state", "search", "trial", "error", "reason", "owner")}
            parts.append(f"----- {w.name} run {status_file.parent.name}: {json.dumps(keep, default=str)[:600]}")
    if study is not None:
        for t in study.get_trials(deepcopy=False):
            parts.append(f"trial {t.number}: {t.state.name} value={t.value} params={t.params} "
                         f"run={t.user_attrs.get('run_id')} system={t.system_attrs}")
    return "\n".join(parts)


def fresh_study(url: str, name: str):
    """The study through a storage of its own (no heartbeat, no shared engine): an independent reader."""
    import optuna
    from optuna.storages import RDBStorage
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=name, storage=RDBStorage(url))


def report_cli(url: str, name: str, env: dict, root: Path) -> dict:
    out = subprocess.run([sys.executable, "-m", "cifar_core", "--runs-root", str(root), "search-report",
                          "--study", name, "--storage", url], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, f"search-report failed ({out.returncode}):\n{out.stdout}\n{out.stderr}"
    return json.loads(out.stdout)


def worker_summary(worker: Worker) -> dict:
    """The JSON summary a worker prints after "search worker done: ..."."""
    out = worker.output()
    assert "search worker done:" in out, out
    return json.loads(out.split("search worker done:", 1)[1].split("\n", 1)[1])


def run_records(root: Path) -> dict[str, dict]:
    """{run id: status.json} of a runs folder."""
    return {p.parent.name: json.loads(p.read_text()) for p in root.glob("*/status.json")}


# ---- fixtures ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pg_url():
    with postgres_server(database="searches") as url:
        yield url


@pytest.fixture
def data_path(request) -> str:
    env = os.environ.get("CIFAR10_NPZ")
    if env and Path(env).is_file():
        return env
    return str(request.getfixturevalue("cifar_npz"))


@pytest.fixture
def lab(tmp_path, data_path, pg_url):
    """Two runs folders, the workers' environment, and a sure clean-up of every process under them."""
    roots = (tmp_path / "machine1", tmp_path / "machine2")
    env = {**os.environ, "CIFAR10_NPZ": data_path, "PYTHONUNBUFFERED": "1",
           "CIFAR_LAB_SEARCH_HEARTBEAT": str(HEARTBEAT_S), "CIFAR_LAB_SEARCH_GRACE": str(GRACE_S),
           "CIFAR_LAB_WORKER_IDLE": "3", "CIFAR_LAB_CANCEL_GRACE": "3", "CIFAR_LAB_SLOTS_CPU": "1",
           "OMP_NUM_THREADS": "1"}  # two trainings at once on 2 cores
    workers: list[Worker] = []
    state = {"roots": roots, "env": env, "workers": workers, "url": pg_url, "data": data_path, "logs": tmp_path}
    yield state
    for w in workers:
        if w.proc.poll() is None:
            w.proc.kill()
            w.proc.wait(timeout=10)
    for root in roots:  # supervisors and trainers are in sessions of their own: by their command line
        kill_all_under(root)
    for root in roots:
        wait_for(lambda r=root: not pids_under(r), timeout=10)


def create_study(url: str, name: str, trials: int) -> None:
    from cifar_core.experiments.presets import preset
    from cifar_core.experiments.search import SearchSpec, create_search
    from cifar_core.config import RunConfig
    base = {**preset("tiny (smoke test)"), "epochs": 2, "eval_every": 1}
    base = RunConfig.from_dict(base).validated().to_dict()
    create_search(name, SearchSpec(base=base, space=SPACE, trials=trials, pruner="none"), url)


def start_workers(lab, study: str) -> list[Worker]:
    for i, root in enumerate(lab["roots"], 1):
        lab["workers"].append(Worker(f"worker{i}", root, study, lab["url"], lab["data"], lab["env"], lab["logs"]))
    return lab["workers"]


def check_trials_and_runs(study, roots, workers, name: str) -> dict[str, tuple[int, dict]]:
    """Trial numbers unique and contiguous; each trial with a run names a run in exactly one runs folder,
    tagged with this study and trial; no run in either folder belongs to no trial. Returns
    {run id: (folder index, status)}."""
    from optuna.trial import TrialState
    info = describe(workers, study)
    trials = study.get_trials(deepcopy=False)
    numbers = [t.number for t in trials]
    assert sorted(numbers) == list(range(len(trials))), f"trial numbers collide or skip: {numbers}\n{info}"
    assert len({t._trial_id for t in trials}) == len(trials), info
    records = [run_records(root) for root in roots]
    runs: dict[str, tuple[int, dict]] = {}
    for t in trials:
        if t.state == TrialState.WAITING:
            continue
        run_id = t.user_attrs.get("run_id")
        assert run_id, f"trial {t.number} ({t.state.name}) has no run\n{info}"
        where = [i for i, rec in enumerate(records) if run_id in rec]
        assert len(where) == 1, f"trial {t.number}'s run {run_id} is in runs folders {where}\n{info}"
        assert run_id not in runs, f"run {run_id} claimed by two trials\n{info}"
        status = records[where[0]][run_id]
        assert (status.get("search"), status.get("trial")) == (name, t.number), \
            f"run {run_id} is tagged {status.get('search')}/{status.get('trial')}, trial is {t.number}\n{info}"
        owner = status.get("owner") or {}
        assert owner.get("pid") == workers[where[0]].proc.pid, \
            f"run {run_id} in {roots[where[0]].name} is owned by {owner}, not that folder's worker\n{info}"
        runs[run_id] = (where[0], status)
    stray = {rid for rec in records for rid in rec} - set(runs)
    assert not stray, f"runs that belong to no trial: {stray}\n{info}"
    return runs


def check_best_agrees(study, report: dict, info: str) -> None:
    from optuna.trial import TrialState
    best = study.best_trial
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    assert best.value == max(t.value for t in complete), info
    assert report["best"] is not None, f"search-report has no best trial: {report}\n{info}"
    assert (report["best"]["trial"], report["best"]["value"]) == (best.number, best.value), \
        f"best trial differs: search-report {report['best']} vs Optuna trial {best.number} = {best.value}\n{info}"
    assert report["best"]["params"] == best.params and report["best"]["run_id"] == best.user_attrs["run_id"], info


# ---- tests ------------------------------------------------------------------------------------------

def test_two_workers_share_one_study_on_postgres(lab):
    from optuna.trial import TrialState
    name, budget = "pg-both", 4
    create_study(lab["url"], name, budget)
    workers = start_workers(lab, name)
    for w in workers:
        code = w.wait(WORKER_TIMEOUT_S)
        assert code == 0, f"{w.name} exited {code} (None: still running after {WORKER_TIMEOUT_S} s)\n" \
                          f"{describe(workers, fresh_study(lab['url'], name))}"
    study = fresh_study(lab["url"], name)
    info = describe(workers, study)
    for w in workers:
        assert f"{budget} trials reached" in w.output(), info
    trials = study.get_trials(deepcopy=False)
    states = [t.state for t in trials]
    assert states.count(TrialState.COMPLETE) == budget and len(trials) == budget, \
        f"expected {budget} completed trials and nothing else, got {[s.name for s in states]}\n{info}"
    runs = check_trials_and_runs(study, lab["roots"], workers, name)
    assert {i for i, _ in runs.values()} == {0, 1}, f"one worker did all the trials\n{info}"
    assert all(status["state"] == "completed" for _, status in runs.values()), info
    for t in trials:  # the value is the run's own last validation accuracy
        assert t.value is not None and 0.0 <= t.value <= 1.0, info
        assert set(t.params) == set(SPACE), info

    report = report_cli(lab["url"], name, lab["env"], lab["roots"][0])
    assert report["trials"] == {"complete": budget}, f"{report}\n{info}"
    check_best_agrees(study, report, info)
    other = fresh_study(lab["url"], name)  # a second, independent Optuna client
    assert (other.best_trial.number, other.best_trial.value) == (study.best_trial.number, study.best_trial.value)


def test_killing_a_worker_mid_trial_fails_its_trial_and_the_other_goes_on(lab):
    from optuna.trial import TrialState
    name, budget = "pg-kill", 4
    create_study(lab["url"], name, budget)
    workers = start_workers(lab, name)
    w1, w2 = workers
    root1 = lab["roots"][0]
    reader = fresh_study(lab["url"], name)

    def w1_training():
        """Worker 1's RUNNING trial whose run's trainer has started (state "running": loading, training)."""
        if w1.proc.poll() is not None or w2.proc.poll() is not None:
            return ("exited", None)
        for t in reader.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):  # worker 2's are elsewhere
            run_id = t.user_attrs.get("run_id")
            record = root1 / str(run_id)
            if run_id and (record / "status.json").is_file() and \
                    json.loads((record / "status.json").read_text()).get("state") == "running":
                return (t.number, run_id)
        return None

    found = wait_for(w1_training, timeout=180)
    assert found and found[0] != "exited", f"worker 1 never had a training trial\n{describe(workers, reader)}"
    killed_number, killed_run = found
    # worker 1's first trial: so that worker 2 has budget left to find it stale (see the module's note)
    assert list(run_records(root1)) == [killed_run], f"worker 1 got past its first trial\n{describe(workers, reader)}"
    killed_params = next(t.params for t in reader.get_trials(deepcopy=False) if t.number == killed_number)
    killed_at, killed_wall = time.monotonic(), time.time()
    os.kill(w1.proc.pid, signal.SIGKILL)  # the worker only: its run and supervisor live in other sessions
    assert w1.wait(10) == -signal.SIGKILL

    # its run is cancelled by folder 1's supervisor (the owner is gone), not left training
    def killed_run_final():
        state = json.loads((root1 / killed_run / "status.json").read_text()).get("state")
        return state if state in ("completed", "failed", "cancelled") else None
    final = wait_for(killed_run_final, timeout=60)
    assert final == "cancelled", f"the dead worker's run {killed_run} ended {final!r} " \
                                 f"{time.monotonic() - killed_at:.0f} s after the kill\n{describe(workers, reader)}"
    assert w2.proc.poll() is None, f"worker 2 stopped with worker 1\n{describe(workers, reader)}"

    code = w2.wait(WORKER_TIMEOUT_S)
    study = fresh_study(lab["url"], name)
    info = describe(workers, study)
    assert code == 0, f"worker 2 exited {code} (None: still running after {WORKER_TIMEOUT_S} s)\n{info}"
    assert f"{budget} trials reached" in w2.output(), info

    trials = study.get_trials(deepcopy=False)
    killed = next(t for t in trials if t.number == killed_number)
    assert killed.state == TrialState.FAIL, f"killed trial {killed_number} is {killed.state.name}\n{info}"
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed_number]
    assert len(retries) == 1, f"expected one retry of trial {killed_number}, got {[t.number for t in retries]}\n{info}"
    retry = retries[0]
    assert retry.state == TrialState.COMPLETE and retry.params == killed_params, info
    assert [t.state for t in trials].count(TrialState.COMPLETE) == budget, info
    assert {t.state for t in trials} == {TrialState.COMPLETE, TrialState.FAIL}, info
    assert sum(t.state == TrialState.FAIL for t in trials) == 1, info

    runs = check_trials_and_runs(study, lab["roots"], workers, name)
    assert runs[killed_run][0] == 0 and runs[killed_run][1]["state"] == "cancelled", info
    # cancelled through the normal path (cancel_requested set by the orphan check, after the kill)
    assert runs[killed_run][1].get("cancel_requested", 0) >= killed_wall, info
    assert runs[retry.user_attrs["run_id"]][0] == 1, f"the retry did not run on worker 2\n{info}"
    assert all(status["state"] == "completed" for rid, (_, status) in runs.items() if rid != killed_run), info
    assert wait_for(lambda: not trainers_under(root1) and not trainers_under(lab["roots"][1]), timeout=20), \
        f"training processes left after the search ended\n{info}"

    report = worker_summary(w2)  # what worker 2 read at its end, through its own storage
    assert report["trials"] == {"complete": budget, "fail": 1}, f"{report}\n{info}"
    check_best_agrees(study, report, info)
