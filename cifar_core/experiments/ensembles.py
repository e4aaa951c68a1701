"""EasyEnsemble / bagging: k runs on k balanced under-samples, evaluated as one model.

`launch_ensemble(cfg, k)` queues k background runs of one config, member i with the balancing entry
`easy_ensemble_member` (members=k, member=i: its own balanced random under-sample of the training
set, Liu et al. 2009) and seed `cfg.seed + i` (its own initialisation and batch order too: members
that differ only in their data agree more, and an ensemble gains only where its members disagree).
Each member's status.json carries {"ensemble": id, "member": i}; the manifest
``<runs>/.ensembles/<id>.json`` lists them. `ensemble_result` averages the members' saved test logits
(`<run>/logits.npz`) and evaluates the average as one model with the report every run gets
(accuracy, balanced accuracy, macro-F1, per-class recall, confusion matrix, calibration), beside
each member's own. While members are unfinished or failed, the finished ones make a partial
ensemble, and the result says so.

Boosting (RUSBoost, Seiffert et al. 2010) is not built, for three reasons:
- each boosting round is a whole CNN training run that needs the previous round's weights, so k
  rounds take k times one run, one after another, where bagging's k members train independently
  (in parallel where there are slots) and a failed member costs only itself;
- AdaBoost weights the next round by the current learner's training errors, but a CNN trained for a
  few epochs fits its training sample almost perfectly: the weighted error is near zero, the
  learner's vote weight ½·log((1-ε)/ε) blows up and the re-weighting has nothing to re-weight (the
  method assumes weak learners; with deep nets it degenerates into one model);
- what it would add over bagging, focusing on hard examples, is done at the cost of one run by the
  loss-based strategies (focal loss, LDAM-DRW), while bagging keeps what it is for here: variance
  reduction over the random under-samples, which throw away most of the majority classes each.
"""
from __future__ import annotations

import secrets
import time
from pathlib import Path

import numpy as np

from ..config import RunConfig
from ..data import CLASSES
from ..imbalance.metrics import imbalance_report
from ..params import ID_RE, ConfigError, Param, validate_id
from ..runs import RunStore, atomic_write_json, read_json

MANIFEST_DIR = ".ensembles"
MEMBER_BALANCE = "easy_ensemble_member"
MEMBERS = Param("members", "int", 5, 2, 100, help="k: how many runs, each on its own balanced under-sample.")
MEMBER_METRICS = ("test_acc", "balanced_acc", "macro_f1", "ece")


# ---- ids and manifests ----------------------------------------------------------------------------

def ensembles_dir(store: RunStore) -> Path:
    return Path(store.root) / MANIFEST_DIR


def new_ensemble_id() -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-ensemble-{secrets.token_hex(3)}"


def manifest_path(store: RunStore, ensemble_id: str) -> Path:
    return ensembles_dir(store) / f"{validate_id(ensemble_id, 'ensemble id')}.json"


def read_manifest(store: RunStore, ensemble_id: str) -> dict:
    manifest = read_json(manifest_path(store, ensemble_id))
    if not isinstance(manifest, dict) or not isinstance(manifest.get("runs"), list):
        raise ConfigError(f"ensemble {ensemble_id} not found (or its manifest is unreadable) in "
                          f"{ensembles_dir(store)}")
    return manifest


def list_ensembles(store: RunStore) -> list[dict]:
    """Manifests of all ensembles, newest first (unreadable ones skipped)."""
    folder = ensembles_dir(store)
    if not folder.is_dir():
        return []
    out = []
    for path in folder.glob("*.json"):
        manifest = read_json(path) if ID_RE.match(path.stem) else None
        if isinstance(manifest, dict) and isinstance(manifest.get("runs"), list):
            manifest.setdefault("ensemble_id", path.stem)
            out.append(manifest)
    return sorted(out, key=lambda m: m.get("created", 0), reverse=True)


# ---- launching ------------------------------------------------------------------------------------

def member_configs(cfg: RunConfig, members: int) -> list[RunConfig]:
    """The k members' configs, all validated: `cfg` with member i's under-sample and seed."""
    k = MEMBERS.validate(members)
    cfg = cfg.validated()
    if cfg.balance not in ("none", MEMBER_BALANCE):
        raise ConfigError(f"an ensemble's members each train on a balanced under-sample (balance "
                          f"{MEMBER_BALANCE}): leave balance at none, not {cfg.balance}")
    label = cfg.name or cfg.model
    return [cfg.replace(balance=MEMBER_BALANCE, balance_params={"members": k, "member": i},
                        seed=(cfg.seed + i) % 2**31, name=f"{label} member {i}")
            for i in range(k)]


def launch_ensemble(cfg: RunConfig, members: int, store: RunStore | None = None,
                    data_source: str | None = None) -> str:
    """Queue the k member runs as background jobs and write the manifest; returns the ensemble id.
    Every config is built and validated before anything is queued; the manifest lists what was
    queued even if queuing stops half way."""
    from .. import jobs

    store = store or RunStore()
    configs = member_configs(cfg, members)
    ensemble_id = new_ensemble_id()
    manifest = {"ensemble_id": ensemble_id, "members": len(configs), "config": cfg.validated().to_dict(),
                "created": time.time(), "data_source": data_source, "runs": []}
    try:
        for i, member_cfg in enumerate(configs):
            record = jobs.submit(member_cfg, store, data_source=data_source, start_worker=False,
                                 meta={"ensemble": ensemble_id, "member": i})
            manifest["runs"].append({"run_id": record.run_id, "member": i})
    finally:
        if manifest["runs"]:
            atomic_write_json(manifest_path(store, ensemble_id), manifest)
    jobs.ensure_worker(store)
    return ensemble_id


# ---- results --------------------------------------------------------------------------------------

def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    from scipy.special import log_softmax
    return float(-log_softmax(np.asarray(logits, dtype=np.float64), axis=1)[np.arange(labels.size), labels].mean())


def evaluate_logits(logits: np.ndarray, labels: np.ndarray, train_counts: np.ndarray) -> dict:
    """The report every run's test logits get (metrics.imbalance_report) and the test loss."""
    report = imbalance_report(logits, labels, train_counts, list(CLASSES))
    report["test_loss"] = cross_entropy(logits, labels)
    return report


def average_logits(members: list[dict]) -> np.ndarray:
    """The mean of the members' test logits (float64); ConfigError unless they score the same images."""
    first = members[0]
    for member in members[1:]:
        if not np.array_equal(member["logits"]["test_labels"], first["logits"]["test_labels"]):
            raise ConfigError(f"runs {first['run_id']} and {member['run_id']} were tested on different images "
                              "(their test labels differ): their logits cannot be averaged")
    return np.mean([m["logits"]["test_logits"].astype(np.float64) for m in members], axis=0)


def _member_entry(store: RunStore, entry: dict) -> dict:
    """One member's state, error and (when finished with saved logits) logits and metrics."""
    run_id = entry.get("run_id")
    out = {"member": entry.get("member"), "run_id": run_id, "state": "deleted"}
    try:
        record = store.record(run_id)
    except ConfigError:
        return out
    if not record.exists():
        return out
    status = record.status()
    out["state"] = status.get("state", "unknown")
    if out["state"] in ("failed", "cancelled", "unreadable"):
        out["error"] = status.get("error")
    if out["state"] != "completed":
        return out
    try:
        logits = record.read_logits()
    except ConfigError as exc:
        out.update(state="unusable", error=str(exc))
        return out
    if logits is None:
        out.update(state="unusable", error=f"run {run_id} finished without saved test logits ({record.logits_path.name})")
        return out
    report = evaluate_logits(logits["test_logits"], logits["test_labels"], logits["train_counts"])
    out.update(logits=logits, metrics={k: report[k] for k in MEMBER_METRICS},
               per_class_recall=report["per_class_recall"])
    return out


PENDING_STATES = ("queued", "starting", "running")


def _summary(k: int, used: list[dict], others: list[dict]) -> str:
    counts: dict[str, int] = {}
    for member in others:
        counts[member["state"]] = counts.get(member["state"], 0) + 1
    states = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
    pending = any(m["state"] in PENDING_STATES for m in others)
    if len(used) == k:
        return f"all {k} members finished: the ensemble averages their test logits"
    if not used:
        return (f"no member has finished yet ({states})" if pending else f"no member finished ({states})") \
            + ": no ensemble result"
    text = (f"partial ensemble: {len(used)} of {k} members finished ({states}); the result averages the "
            f"{len(used)} finished member(s) only")
    if pending:
        return text + " and changes as the others finish"
    return text + "; the others will not finish as they are (see each member's error; resume them to complete it)"


def ensemble_result(store: RunStore, ensemble_id: str) -> dict:
    """The ensemble's state and result: `ensemble` (the averaged logits' report, None until a member
    has finished), `members` (each one's run id, state, error and own metrics), `used` (the members
    averaged), `complete` and a `message` saying what the numbers cover."""
    manifest = read_manifest(store, ensemble_id)
    k = int(manifest.get("members") or len(manifest["runs"]))
    entries = [_member_entry(store, e) for e in manifest["runs"]]
    used = [e for e in entries if "logits" in e]
    others = [e for e in entries if "logits" not in e]
    report = None
    if used:
        averaged = average_logits(used)
        report = evaluate_logits(averaged, used[0]["logits"]["test_labels"], used[0]["logits"]["train_counts"])
    mean_member = {key: float(np.mean([e["metrics"][key] for e in used])) for key in MEMBER_METRICS} if used else None
    for entry in entries:
        entry.pop("logits", None)
    return {"ensemble_id": ensemble_id, "members": k, "used": [e["run_id"] for e in used],
            "complete": len(used) == k, "message": _summary(k, used, others), "ensemble": report,
            "mean_member": mean_member, "member_results": entries, "config": manifest.get("config")}
