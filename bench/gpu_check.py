"""GPU check: every GPU-only measurement of this project in one call on a GPU machine.

    bash bench/gpu_check.sh                    # on the GPU machine (bench/README.md, "GPU check")
    bash bench/gpu_check.sh --smoke            # here, on the CPU: every step with tiny budgets
    bash bench/gpu_check.sh --only fast,vit    # again, some steps only (setup and device always run)
    bash bench/gpu_check.sh --prepare          # here, once: data pack + missing wheels into .devdata/

Steps, one after the other, each a subprocess with its own time budget (BUDGETS below); a failing or
timed-out step is recorded and the next one runs. After every step $OUT/gpu_check.json is rewritten,
and $OUT/gpu_check.log gets a few lines, so whatever finished is there even if the call is cut off.

  setup       a Python with torch (GPU_CHECK_PYTHON, ./.venv, python3; a fresh venv from
              requirements.txt last), the carried wheels of what it lacks (.devdata/whl), the data
              (.devdata/cifar10 pack -> .npz) and the PNG folder the tests' conftest reads
  device      torch.cuda.get_device_name, driver (nvidia-smi), CUDA / cuDNN / torch / onnxruntime
  cuda_tests  the tests with CUDA branches and the engine tests that run on "auto" = the GPU
  onnx        onnxruntime on CUDAExecutionProvider, shipped checkpoints, batch 1 and 256
  pipeline    bench/bench_pipeline.py: our device-resident pipeline vs a torchvision DataLoader
  fast        the `fast` preset to 94%: test accuracy and wall time
  muon        a preset whose name contains "muon", when this checkout has one (else: not available)
  resnet18    the ResNet-18 preset ("report baseline") for a time limit: images/s
  vit         the ViT-tiny preset for a time limit: images/s

This file needs only the standard library itself; the steps run under the Python chosen in setup.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

# ------------------------------------------------------------------------------------------------
# Budgets: seconds per step (a hard timeout), then the whole call's deadline. "full" is the GPU run
# (fits the 10 minutes with room to spare), "smoke" the CPU plumbing check.
# ------------------------------------------------------------------------------------------------
BUDGETS = {  # step: (full, smoke)
    "setup": (90, 300),
    "device": (45, 120),
    "cuda_tests": (120, 240),
    "onnx": (45, 150),
    "pipeline": (60, 180),
    "fast": (150, 180),
    "muon": (150, 180),
    "resnet18": (115, 150),  # = the time limit below + the overhead, so the limit is not cut
    "vit": (115, 150),
}
DEADLINE_S = {"full": 480, "smoke": 1500}  # the whole script (GPU_CHECK_DEADLINE_S overrides); steps
                                           # are cut to what is left
RESERVE_S = 10          # kept back at the deadline to write the JSON and the log
MIN_STEP_S = 20         # a step that would get less than this is skipped ("deadline")
TIME_LIMIT_MIN = {"full": 1.25, "smoke": 0.1}  # resnet18 / vit: training minutes (less if the deadline is near)
TRAIN_OVERHEAD_S = {"full": 40, "smoke": 90}  # process start, data, final test pass of a limited run

STEP_ORDER = ["setup", "device", "cuda_tests", "onnx", "pipeline", "fast", "muon", "resnet18", "vit"]
PRESETS = {"fast": "fast", "resnet18": "report baseline", "vit": "ViT-tiny"}  # muon: found at run time
TARGET_ACC = 0.94

# What each step runs, per mode.
TEST_FILES = ["tests/test_augment.py", "tests/test_estimate.py", "tests/test_fast_tricks.py",
              "tests/test_models.py", "tests/test_train.py", "tests/test_transformers.py"]
SMOKE_TEST_FILES = ["tests/test_augment.py", "tests/test_estimate.py"]
SMOKE_TEST_FILTER = "generator_must_be_cpu or bad_input_is_a_config_error"  # the two CUDA-branch tests
PIPELINE_ARGS = {
    "full": ["--models", "fastnet,resnet18", "--batch-size", "512", "--steps", "20", "--warmup", "3",
             "--workers", "0,8", "--device", "cuda", "--amp", "bf16", "--channels-last"],
    "smoke": ["--models", "fastnet", "--batch-size", "64", "--steps", "2", "--warmup", "1",
              "--workers", "0", "--threads", "1"],
}
ONNX_MODELS = ["checkpoints/fastnet.onnx", "checkpoints/fastnet-int8.onnx", "checkpoints/cct.onnx"]
ONNX_REPEATS = {"full": {1: 300, 256: 30}, "smoke": {1: 5, 256: 1}}  # timed calls per batch size
ONNX_WARMUP = {"full": 5, "smoke": 1}
SMOKE_TRAIN_ARGS = ["--subset", "random", "--subset-size", "300", "--val-size", "0", "--test-size", "200",
                    "--epochs", "1", "--batch-size", "100", "--eval-every", "1", "--log-every", "1",
                    "--precision", "fp32"]  # bf16 on a CPU without AVX-512 BF16 crawls

# Setup: what the steps import, the wheels --prepare fetches for the GPU image (which has no kornia
# and no registry), and the data pack --prepare makes (the smaller pack of ../shared/data/cifar10's
# README: the repository's ~15 MB plus the default 52 MB pack would exceed the 64 MiB transfer).
NEEDED_MODULES = ["torch", "torchvision", "numpy", "PIL", "kornia", "tqdm", "onnx", "onnxruntime", "pytest",
                  "pytest_timeout", "sklearn"]
WHEELS = ["kornia", "kornia_rs"]          # pinned to the versions of the local .venv at --prepare
DEVICE_PYTHON = "3.12"                    # the GPU image's python3 (/work/.library/device/KINDS.md)
PACK_QUALITY = {"train": 85, "test": 95}
TRANSFER_LIMIT = 64 * 2**20

REPO = Path(__file__).resolve().parents[1]
DEVDATA = REPO / ".devdata"
PACK = DEVDATA / "cifar10"
WHEEL_DIR = DEVDATA / "whl"
OFFLINE_DIR = REPO.parent / "shared" / "data" / "cifar10"  # what tests/conftest.py reads
JSON_MARK = "GPU_CHECK_JSON "


# ------------------------------------------------------------------------------------------------
# Main: parse, set up, run the steps in order, write the report after each
# ------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", default=os.environ.get("GPU_CHECK_SMOKE") == "1",
                    help="tiny budgets on whatever device is there (also GPU_CHECK_SMOKE=1)")
    ap.add_argument("--only", default="", help="comma-separated steps to run (setup and device always run)")
    ap.add_argument("--data", default=os.environ.get("GPU_CHECK_DATA"), help="CIFAR-10 .npz or folder")
    ap.add_argument("--prepare", action="store_true", help="here: pack the data and fetch wheels into .devdata")
    ap.add_argument("--worker", choices=("device", "onnx"), help=argparse.SUPPRESS)
    ap.add_argument("--worker-args", default="{}", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return {"device": worker_device, "onnx": worker_onnx}[args.worker](json.loads(args.worker_args))
    if args.prepare:
        return prepare()
    check = Check(mode="smoke" if args.smoke else "full", only=[s for s in args.only.split(",") if s],
                  data=args.data)
    return check.run()


class Check:
    def __init__(self, mode: str, only: list[str], data: str | None):
        unknown = [s for s in only if s not in STEP_ORDER]
        if unknown:
            raise SystemExit(f"unknown step(s) {', '.join(unknown)}; steps: {', '.join(STEP_ORDER)}")
        self.mode, self.only, self.data_arg = mode, only, data
        self.t0 = time.time()
        self.deadline_s = float(os.environ.get("GPU_CHECK_DEADLINE_S") or DEADLINE_S[mode])
        self.deadline = self.t0 + self.deadline_s
        self.out = Path(os.environ.get("OUT") or "/tmp/gpu_check_out")
        self.work = Path(os.environ.get("GPU_CHECK_WORK") or "/tmp/gpu_check")
        self.out.mkdir(parents=True, exist_ok=True)
        if (self.work / "runs").exists():
            shutil.rmtree(self.work / "runs")
        (self.work / "outputs").mkdir(parents=True, exist_ok=True)
        self.log_path, self.json_path = self.out / "gpu_check.log", self.out / "gpu_check.json"
        self.log_path.write_text("")
        self.py: str | None = None
        self.env = dict(os.environ)
        self.npz: str | None = None
        self.report = {
            "schema": 1, "mode": mode, "started": _iso(self.t0), "finished": None, "wall_s": None,
            "deadline_s": self.deadline_s, "budgets_s": {k: v[0 if mode == "full" else 1] for k, v in BUDGETS.items()},
            "only": only or None, "out": str(self.out), "work": str(self.work),
            "host": {"hostname": os.uname().nodename, "cpus": os.cpu_count(), "orchestrator_python": sys.version.split()[0]},
            "device": None, "data": None, "steps": {}, "summary": {},
        }

    # ---- the run, top-down ---------------------------------------------------------------------
    def run(self) -> int:
        signal.signal(signal.SIGTERM, _raise_interrupt)
        self.say(f"GPU check ({self.mode}), deadline {self.deadline_s:.0f} s, out {self.out}")
        try:
            for name in STEP_ORDER:
                if self.only and name not in self.only and name not in ("setup", "device"):
                    self.record(name, {"status": "not_run", "reason": "not in --only"}, quiet=True)
                    continue
                if name != "setup" and self.py is None:
                    self.record(name, {"status": "skipped", "reason": "setup found no Python with torch"})
                    continue
                self.step(name)
        except KeyboardInterrupt:
            self.say("interrupted (SIGTERM or Ctrl-C): writing what finished")
            self.report["interrupted"] = True
        self.finish()
        bad = [n for n, s in self.report["steps"].items() if s["status"] in ("failed", "timeout")]
        return 1 if bad else 0

    def step(self, name: str) -> None:
        budget = self.report["budgets_s"][name]
        left = self.deadline - time.time() - RESERVE_S
        timeout = min(budget, left)
        if timeout < MIN_STEP_S:
            self.record(name, {"status": "skipped", "reason": f"deadline: {max(0, left):.0f} s left", "budget_s": budget})
            return
        self.say(f"{name}: start (budget {budget} s, timeout {timeout:.0f} s)")
        started = time.time()
        try:
            result = getattr(self, f"step_{name}")(timeout)
        except Exception as exc:  # a bug in this script's parsing must not stop the other steps
            result = {"status": "failed", "reason": f"gpu_check error: {type(exc).__name__}: {exc}"}
        result.setdefault("wall_s", round(time.time() - started, 1))
        result["budget_s"] = budget
        self.record(name, result)

    # ---- steps ---------------------------------------------------------------------------------
    def step_setup(self, timeout: float) -> dict:
        end = time.time() + timeout
        py, tried = self.find_python(end)
        if py is None:
            return {"status": "failed", "reason": "no Python with torch: " + "; ".join(tried), "tried": tried}
        self.py = py
        out = {"python": py, "tried": tried}
        site = self.work / "site"
        self.env.update(PYTHONPATH=os.pathsep.join([str(site), str(REPO)] +
                                                   ([self.env["PYTHONPATH"]] if self.env.get("PYTHONPATH") else [])),
                        PYTHONUNBUFFERED="1", CIFAR10_DATA_DIR=str(self.work / "cache"), CIFAR_LAB_TENSORBOARD="0")
        if self.mode == "smoke":
            self.env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        out["wheels"] = self.install_wheels(site, end)
        out["missing_modules"] = self.missing_modules(end)
        data = self.find_data(end)
        self.report["data"] = data
        out["data_source"] = data.get("npz") or data.get("error")
        ok = self.npz is not None and not out["missing_modules"]
        out["status"] = "ok" if ok else "failed"
        if not ok:
            out["reason"] = data.get("error") or f"missing modules: {', '.join(out['missing_modules'])}"
        return out

    def step_device(self, timeout: float) -> dict:
        res = self.worker("device", {}, timeout)
        if res.get("info"):
            self.report["device"] = res["info"]
            if not res["info"].get("cuda_available"):
                res["note"] = "no CUDA device: the GPU figures below are CPU plumbing only"
        return res

    def step_cuda_tests(self, timeout: float) -> dict:
        found = cuda_mentions()
        files = SMOKE_TEST_FILES if self.mode == "smoke" else TEST_FILES
        cmd = [self.py, "-m", "pytest", "-v", "-p", "no:cacheprovider", "--timeout", "60", "-o", "addopts=",
               *files] + (["-k", SMOKE_TEST_FILTER] if self.mode == "smoke" else [])
        rc, timed_out, wall, text = self.call("cuda_tests", cmd, timeout)
        counts = {k: 0 for k in ("passed", "failed", "error", "skipped")}
        failed = []
        for m in re.finditer(r"^(tests/\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)", text, re.M):
            key = m.group(2).lower()
            counts[key] = counts.get(key, 0) + 1
            if key in ("failed", "error"):
                failed.append(m.group(1))
        closing = [ln for ln in text.splitlines() if re.search(r"\d+ (passed|failed|error)", ln) and " in " in ln]
        out = {"command": shlex.join(cmd[1:]), "files": files, "filter": SMOKE_TEST_FILTER if self.mode == "smoke" else None,
               "cuda_branches_found": found, "cuda_branches_exercised": bool((self.report["device"] or {}).get("cuda_available")),
               "counts": counts, "failed_tests": failed[:20], "closing_line": closing[-1].strip("= ") if closing else None,
               "wall_s": wall, "returncode": rc}
        out.update(_status(rc, timed_out, ok=rc == 0 and counts["passed"] > 0,
                           why=f"{counts['failed'] + counts['error']} failed" if failed else "pytest exit code"))
        return out

    def step_onnx(self, timeout: float) -> dict:
        models = [m for m in ONNX_MODELS if (REPO / m).is_file()]
        threads = 1 if self.mode == "smoke" else 0  # 0: onnxruntime's default (all cores)
        return self.worker("onnx", {"models": models, "repeats": ONNX_REPEATS[self.mode], "threads": threads,
                                    "warmup": ONNX_WARMUP[self.mode]}, timeout)

    def step_pipeline(self, timeout: float) -> dict:
        extra = list(PIPELINE_ARGS[self.mode])
        if self.mode == "smoke" or not (self.report["device"] or {}).get("cuda_available"):
            extra = [a for a in extra if a not in ("--amp", "bf16")]
            if "--device" in extra:
                extra[extra.index("--device") + 1] = "auto"
        cmd = [self.py, "bench/bench_pipeline.py", "--data", self.npz, *extra]
        rc, timed_out, wall, text = self.call("pipeline", cmd, timeout)
        rows = []
        for m in re.finditer(r"^\| ([^|]+) \| ([^|]+) \| ([^|]+) \| ([\d,.]+) \| ([\d.]+) \| ([^|]+) \| ([\d.]+)× \|$",
                             text, re.M):
            rows.append({"model": m.group(1).strip(), "pipeline": m.group(2).strip(), "workers": m.group(3).strip(),
                         "images_per_s": float(m.group(4).replace(",", "")), "ms_per_step": float(m.group(5)),
                         "data_share": m.group(6).strip(), "x_ours": float(m.group(7))})
        ratios = {}
        for model in dict.fromkeys(r["model"] for r in rows):
            ours = [r["images_per_s"] for r in rows if r["model"] == model and r["pipeline"].startswith("ours")]
            ref = [r["images_per_s"] for r in rows if r["model"] == model and not r["pipeline"].startswith("ours")]
            if ours and ref:
                ratios[model] = round(ours[0] / max(ref), 2)
        out = {"command": shlex.join(cmd[1:]), "rows": rows, "ours_over_best_reference": ratios,
               "wall_s": wall, "returncode": rc}
        out.update(_status(rc, timed_out, ok=rc == 0 and bool(ratios), why="no table parsed"))
        return out

    def step_fast(self, timeout: float) -> dict:
        return self.train("fast", PRESETS["fast"], timeout, target=TARGET_ACC)

    def step_muon(self, timeout: float) -> dict:
        started = time.time()
        names, how = self.muon_presets(timeout)
        if not names:
            return {"status": "unavailable", "reason": "not available in this checkout: no preset whose name "
                                                       "contains 'muon' (" + how + ")"}
        out = self.train("muon", names[0], timeout - (time.time() - started), target=TARGET_ACC)
        out["muon_presets_found"] = names
        return out

    def step_resnet18(self, timeout: float) -> dict:
        return self.train("resnet18", PRESETS["resnet18"], timeout, limited=True)

    def step_vit(self, timeout: float) -> dict:
        return self.train("vit", PRESETS["vit"], timeout, limited=True)

    # ---- training runs through the CLI, figures from the run record ------------------------------
    def train(self, name: str, preset: str, timeout: float, target: float | None = None,
              limited: bool = False) -> dict:
        runs, run_id = self.work / "runs", f"gpu-{name}"
        cmd = [self.py, "-m", "cifar_core", "--runs-root", str(runs), "train", "--preset", preset,
               "--data", self.npz, "--run-id", run_id, "--no-progress"]
        if self.mode == "smoke":
            cmd += SMOKE_TRAIN_ARGS
        limit = None
        if limited:
            limit = min(TIME_LIMIT_MIN[self.mode], (timeout - TRAIN_OVERHEAD_S[self.mode]) / 60)
            if limit < 0.05:
                return {"status": "skipped", "reason": f"deadline: {timeout:.0f} s is too short for a timed run"}
            cmd += ["--time-limit-min", f"{limit:.2f}"]
        rc, timed_out, wall, text = self.call(name, cmd, timeout)
        out = {"preset": preset, "command": shlex.join(cmd[1:]), "wall_s": wall, "returncode": rc,
               "time_limit_min": round(limit, 2) if limit else None}
        out.update(run_figures(runs / run_id))
        if target is not None and out.get("test_acc") is not None:
            out["target_acc"] = target
            out["target_met"] = out["test_acc"] >= target
        state = out.get("state")
        out.update(_status(rc, timed_out, ok=rc == 0 and state == "completed",
                           why=f"run {state}: {out.get('error') or _last_line(text)}"))
        return out

    def muon_presets(self, timeout: float) -> tuple[list[str], str]:
        """Names containing "muon" that `train --preset NAME --print-config` accepts."""
        probe = [self.py, "-m", "cifar_core", "train", "--preset", "__gpu_check_list__", "--print-config"]
        _, _, _, text = self.call("muon-list", probe, min(60, timeout))
        m = re.search(r"choose from: (.*)\)\s*$", text, re.M)
        names = [n for n in (m.group(1).split(", ") if m else ["muon"]) if "muon" in n.lower()]
        how = f"the CLI lists {len(m.group(1).split(', '))} presets" if m else "the CLI did not list its presets"
        accepted = []
        for n in names:
            rc, _, _, _ = self.call("muon-config", [self.py, "-m", "cifar_core", "train", "--preset", n,
                                                    "--print-config"], min(60, timeout))
            if rc == 0:
                accepted.append(n)
        return accepted, how

    # ---- setup helpers -------------------------------------------------------------------------
    def find_python(self, end: float) -> tuple[str | None, list[str]]:
        tried = []
        for cand in [os.environ.get("GPU_CHECK_PYTHON"), str(REPO / ".venv/bin/python"), "python3", "python"]:
            if not cand or (os.sep in cand and not os.path.exists(cand)) or (os.sep not in cand and not shutil.which(cand)):
                continue
            path = cand if os.sep in cand else shutil.which(cand)
            rc, _, _, text = self.call("python-probe", [path, "-c", "import torch, numpy, PIL; print(torch.__version__)"],
                                       min(90, end - time.time()))
            tried.append(f"{path}: " + (f"torch {text.strip().splitlines()[-1]}" if rc == 0 else "no torch"))
            if rc == 0:
                return path, tried
        # Last resort: a fresh venv from requirements.txt (works only where a package registry answers;
        # the GPU machines have none, their python3 already holds torch).
        venv = self.work / "venv"
        rc, timed_out, _, text = self.call("venv", ["bash", "-c",
                                                    f"python3 -m venv {shlex.quote(str(venv))} && "
                                                    f"{shlex.quote(str(venv))}/bin/pip install -q -r requirements.txt"],
                                           max(1, end - time.time() - 30))
        tried.append("new venv + pip install -r requirements.txt: " + ("ok" if rc == 0 else
                                                                        "timed out" if timed_out else _last_line(text)))
        return (str(venv / "bin/python"), tried) if rc == 0 else (None, tried)

    def install_wheels(self, site: Path, end: float) -> dict:
        """Install the carried wheels (.devdata/whl) of distributions this Python lacks, into `site`."""
        wheels = sorted(WHEEL_DIR.glob("*.whl")) if WHEEL_DIR.is_dir() else []
        if not wheels:
            return {"carried": [], "installed": []}
        have = [w for w in wheels if self.has_dist(w.name.split("-")[0], end)]
        todo = [w for w in wheels if w not in have]
        out = {"carried": [w.name for w in wheels], "already_there": [w.name for w in have], "installed": []}
        if todo:
            cmd = [self.py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                   "--disable-pip-version-check", "--target", str(site), *map(str, todo)]
            rc, _, _, text = self.call("wheels", cmd, max(1, end - time.time() - 30))
            out["installed" if rc == 0 else "failed"] = [w.name for w in todo]
            if rc != 0:
                out["error"] = _last_line(text)
        return out

    def has_dist(self, dist: str, end: float) -> bool:
        code = f"import importlib.metadata as m; m.version({dist!r})"
        return self.call("dist-probe", [self.py, "-c", code], max(1, min(30, end - time.time())))[0] == 0

    def missing_modules(self, end: float) -> list[str]:
        code = ("import importlib.util, json; print(json.dumps([m for m in %r if importlib.util.find_spec(m) is None]))"
                % NEEDED_MODULES)
        rc, _, _, text = self.call("modules", [self.py, "-c", code], max(1, min(60, end - time.time())))
        return json.loads(text.strip().splitlines()[-1]) if rc == 0 else ["(probe failed)"]

    def find_data(self, end: float) -> dict:
        """The .npz every step reads: --data, the carried pack, $CIFAR10_NPZ, /tmp/cifar10.npz, the offline
        folder; then the PNG folder tests/conftest.py expects, made from it where it is missing."""
        info: dict = {}
        npz = self.work / "cifar10.npz"
        if self.data_arg:
            info = {"source": self.data_arg, "kind": "given"}
            self.npz = self.data_arg
        elif (PACK / "labels.json").is_file():
            info = {"source": str(PACK), "kind": "pack", "pack": pack_description()}
            rc, _, _, text = self.call("unpack", [self.py, str(PACK / "cifar10_offline.py"), "unpack", str(PACK), str(npz)],
                                       max(1, end - time.time() - 20))
            if rc != 0:
                return {**info, "error": f"unpacking failed: {_last_line(text)}"}
            self.npz = str(npz)
        else:
            for cand in [os.environ.get("CIFAR10_NPZ"), "/tmp/cifar10.npz", str(OFFLINE_DIR)]:
                if cand and Path(cand).exists():
                    info, self.npz = {"source": cand, "kind": "npz" if cand.endswith(".npz") else "offline folder"}, cand
                    break
            else:
                return {"error": "no CIFAR-10: carry .devdata (bash bench/gpu_check.sh --prepare) or pass --data"}
        info["npz"] = self.npz
        if not (OFFLINE_DIR / "labels.json").is_file():  # on the GPU machine ../shared does not travel
            code = _MAKE_OFFLINE_DIR % (self.npz, str(OFFLINE_DIR), str(PACK / "labels.json"))
            rc, _, _, text = self.call("offline-dir", [self.py, "-c", code], max(1, end - time.time() - 5))
            info["tests_offline_dir"] = f"made from {self.npz}" if rc == 0 else f"failed: {_last_line(text)}"
        else:
            info["tests_offline_dir"] = "present"
        return info

    # ---- subprocesses --------------------------------------------------------------------------
    def worker(self, kind: str, wargs: dict, timeout: float) -> dict:
        cmd = [self.py, str(Path(__file__).resolve()), "--worker", kind, "--worker-args", json.dumps(wargs)]
        rc, timed_out, wall, text = self.call(kind, cmd, timeout)
        lines = [ln[len(JSON_MARK):] for ln in text.splitlines() if ln.startswith(JSON_MARK)]
        out = json.loads(lines[-1]) if lines else {}
        out.setdefault("wall_s", wall)
        if "status" not in out or timed_out:
            out.update(_status(rc, timed_out, ok=False, why=_last_line(text)))
        return out

    def call(self, label: str, cmd: list[str], timeout: float) -> tuple[int | None, bool, float, str]:
        """Run cmd in its own process group with a hard timeout; (returncode, timed out, seconds, output)."""
        path = self.work / "outputs" / f"{label}.txt"
        started = time.time()
        with open(path, "w") as fh:
            proc = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=fh, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
            try:
                rc, timed_out = proc.wait(timeout=max(1, timeout)), False
            except (subprocess.TimeoutExpired, KeyboardInterrupt) as exc:
                _stop_group(proc)
                if isinstance(exc, KeyboardInterrupt):
                    raise
                rc, timed_out = None, True
        return rc, timed_out, round(time.time() - started, 1), path.read_text(errors="replace")

    # ---- report --------------------------------------------------------------------------------
    def record(self, name: str, result: dict, quiet: bool = False) -> None:
        self.report["steps"][name] = result
        if not quiet:
            figures = _headline(name, result)
            self.say(f"{name}: {result['status']}" + (f" in {result['wall_s']} s" if "wall_s" in result else "")
                     + (f" ({result['reason']})" if result.get("reason") else "") + (f": {figures}" if figures else ""))
            if result["status"] in ("failed", "timeout"):
                self.tail(name)
        self.write_json()

    def tail(self, name: str, lines: int = 25) -> None:
        files = sorted((self.work / "outputs").glob("*.txt"), key=lambda p: p.stat().st_mtime)
        if files:
            text = files[-1].read_text(errors="replace").splitlines()[-lines:]
            with open(self.log_path, "a") as fh:
                fh.write(f"    --- last lines of {files[-1].name} ---\n" + "".join(f"    | {ln}\n" for ln in text))

    def finish(self) -> None:
        end = time.time()
        steps = self.report["steps"]
        self.report.update(finished=_iso(end), wall_s=round(end - self.t0, 1))
        self.report["summary"] = {
            "statuses": {n: s["status"] for n, s in steps.items()},
            "device_name": (self.report["device"] or {}).get("name"),
            **{n: _headline(n, s) for n, s in steps.items() if _headline(n, s)},
        }
        self.write_json()
        self.say(f"done in {end - self.t0:.0f} s: " + ", ".join(f"{n} {s['status']}" for n, s in steps.items()))

    def write_json(self) -> None:
        tmp = self.json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.report, indent=2, default=str) + "\n")
        tmp.replace(self.json_path)

    def say(self, msg: str) -> None:
        line = f"[{time.time() - self.t0:6.1f} s] {msg}"
        print(line, flush=True)
        with open(self.log_path, "a") as fh:
            fh.write(line + "\n")


# ------------------------------------------------------------------------------------------------
# Workers: run under the chosen Python (torch, onnxruntime), print one JSON line
# ------------------------------------------------------------------------------------------------

def worker_device(_: dict) -> int:
    import platform
    import torch
    info = {"cuda_available": torch.cuda.is_available(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "python": platform.python_version(), "cpus": os.cpu_count()}
    if info["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        info.update(name=torch.cuda.get_device_name(0), capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                    memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count)
        x = torch.ones(1024, 1024, device="cuda")
        info["cuda_works"] = float((x @ x)[0, 0]) == 1024.0
    else:
        info["name"] = f"no CUDA device (CPU: {platform.processor() or platform.machine()})"
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
        info["driver"] = smi.stdout.split(",")[1].strip() if smi.returncode == 0 and "," in smi.stdout else None
        top = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout
        m = re.search(r"CUDA Version:\s*([\d.]+)", top)
        info["driver_cuda"] = m.group(1) if m else None
    except (OSError, subprocess.TimeoutExpired) as exc:
        info.update(nvidia_smi=f"not run: {exc}", driver=None, driver_cuda=None)
    try:
        import onnxruntime as ort
        info.update(onnxruntime=ort.__version__, onnxruntime_providers=ort.get_available_providers())
    except Exception as exc:
        info["onnxruntime"] = f"not importable: {exc}"
    ok = info["cuda_available"] and info.get("cuda_works")
    status = {"status": "ok" if ok else "unavailable"}
    if not ok:
        status["reason"] = "torch sees no CUDA device" if not info["cuda_available"] else "CUDA matmul gave a wrong result"
    print(JSON_MARK + json.dumps({**status, "info": info}))
    return 0


def worker_onnx(wargs: dict) -> int:
    """p50/p95 latency and images/s of each shipped .onnx on CUDAExecutionProvider at batch 1 and 256
    (session.run on numpy input: the host-device copies are included, as the app serves), plus top-1 on
    the 200 bundled sample images as a correctness check. Without a usable CUDA provider: "unavailable",
    with CPU figures under cpu_reference."""
    import numpy as np
    import onnxruntime as ort
    from cifar_core.data import load_sample
    from cifar_core.serve.inference import tiles_to_input
    repeats = {int(k): v for k, v in wargs["repeats"].items()}
    out = {"onnxruntime": ort.__version__, "available_providers": ort.get_available_providers()}
    if "CUDAExecutionProvider" in out["available_providers"] and hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()  # CUDA / cuDNN from the nvidia pip packages, as torch uses them
        except Exception as exc:
            out["preload_dlls"] = str(exc)[:200]
    x_sample, y_sample, _ = load_sample()

    def bench(path: str, provider: str) -> dict:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = wargs.get("threads", 0)
        session = ort.InferenceSession(str(REPO / path), options, providers=[provider, "CPUExecutionProvider"])
        used = session.get_providers()[0]
        if used != provider:
            raise RuntimeError(f"the {provider} did not load (the session fell back to {used})")
        name = session.get_inputs()[0].name
        row = {"model": path, "provider": used,
               "sample_top1": float((session.run(None, {name: tiles_to_input(x_sample)})[0].argmax(1) == y_sample).mean())}
        for batch, n in sorted(repeats.items()):
            x = tiles_to_input(np.resize(x_sample, (batch, *x_sample.shape[1:])))
            for _ in range(wargs.get("warmup", 3)):
                session.run(None, {name: x})
            ms = []
            for _ in range(n):
                t = time.perf_counter()
                session.run(None, {name: x})
                ms.append((time.perf_counter() - t) * 1000)
            ms.sort()
            p50 = statistics.median(ms)
            row[f"batch_{batch}"] = {"p50_ms": round(p50, 3), "p95_ms": round(ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))], 3),
                                     "images_per_s": round(batch * 1000 / p50, 1), "calls": n}
        return row

    rows, errors = [], []
    cuda_ok = "CUDAExecutionProvider" in out["available_providers"]
    for path in wargs["models"]:
        if not cuda_ok:
            break
        try:
            rows.append(bench(path, "CUDAExecutionProvider"))
        except Exception as exc:
            errors.append(f"{path}: {str(exc)[:300]}")
    out["rows"] = rows
    if cuda_ok and rows and not errors:
        out["status"] = "ok"
    elif rows:
        out.update(status="failed", reason="; ".join(errors))
    else:
        why = errors[0] if errors else (f"onnxruntime {ort.__version__} has no CUDAExecutionProvider "
                                        f"(providers: {', '.join(out['available_providers'])}); the GPU package "
                                        "onnxruntime-gpu would be needed")
        out.update(status="unavailable", reason=why)
        out["cpu_reference"] = [bench(p, "CPUExecutionProvider") for p in wargs["models"]]
    print(JSON_MARK + json.dumps(out))
    return 0


# ------------------------------------------------------------------------------------------------
# --prepare (here, before the device call): data pack and wheels into .devdata/, size check
# ------------------------------------------------------------------------------------------------

def prepare() -> int:
    py = str(REPO / ".venv/bin/python") if (REPO / ".venv/bin/python").exists() else sys.executable
    src = REPO.parent / "shared" / "data" / "cifar10"
    wanted = {"train_quality": PACK_QUALITY["train"], "test_quality": PACK_QUALITY["test"]}
    info_path = PACK / "PACK_INFO.json"
    current = json.loads(info_path.read_text()) if info_path.is_file() else {}
    if {k: current.get(k) for k in wanted} != wanted:
        print(f"packing {src} into {PACK} (train JPEG q{wanted['train_quality']}, test JPEG q{wanted['test_quality']}) ...",
              flush=True)
        subprocess.run([py, str(src / "cifar10_offline.py"), "pack", str(PACK), "--dir", str(src),
                        "--train-quality", str(wanted["train_quality"]), "--test-quality", str(wanted["test_quality"])],
                       check=True)
        info_path.write_text(json.dumps({**wanted, "made": _iso(time.time()), "from": "../shared/data/cifar10"}) + "\n")
    else:
        print(f"{PACK}: already packed ({current})")
    code = "import importlib.metadata as m, sys; print(' '.join(f'{d}=={m.version(d)}' for d in sys.argv[1:]))"
    pins = subprocess.run([py, "-c", code, *WHEELS], check=True, capture_output=True, text=True).stdout.split()
    WHEEL_DIR.mkdir(parents=True, exist_ok=True)
    platforms = [a for n in ("manylinux_2_28", "manylinux_2_27", "manylinux_2_17", "manylinux2014", "manylinux1")
                 for a in ("--platform", f"{n}_x86_64")]
    subprocess.run([py, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps", "--only-binary=:all:",
                    "--python-version", DEVICE_PYTHON, "--implementation", "cp", *platforms, "-d", str(WHEEL_DIR), *pins],
                   check=True)
    print(f"wheels for Python {DEVICE_PYTHON} in {WHEEL_DIR}: {', '.join(p.name for p in sorted(WHEEL_DIR.glob('*.whl')))}")
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.split(b"\0")
    tree = sum((REPO / p.decode()).stat().st_size for p in listed if p and (REPO / p.decode()).is_file())
    carried = sum(f.stat().st_size for f in DEVDATA.rglob("*") if f.is_file())
    total = tree + carried
    print(f"what travels: working tree {tree / 2**20:.1f} MiB + .devdata {carried / 2**20:.1f} MiB = "
          f"{total / 2**20:.1f} MiB of {TRANSFER_LIMIT / 2**20:.0f} MiB" + ("" if total <= TRANSFER_LIMIT else "  TOO LARGE"))
    return 0 if total <= TRANSFER_LIMIT else 1


# ------------------------------------------------------------------------------------------------
# Small helpers
# ------------------------------------------------------------------------------------------------

# Writes the offline PNG folder (stacked PNGs + labels.json) that tests/conftest.py reads, from an
# .npz; the pack's labels.json is copied when there is one (it holds the class names).
_MAKE_OFFLINE_DIR = """
import json, shutil, numpy as np
from pathlib import Path
from PIL import Image
npz, dst, labels = %r, Path(%r), Path(%r)
d = np.load(npz) if npz.endswith('.npz') else None
dst.mkdir(parents=True, exist_ok=True)
for split in ('train', 'test'):
    x = d['x_' + split]
    for b in range(0, len(x), 1000):
        Image.fromarray(x[b:b + 1000].reshape(-1, 32, 3)).save(dst / f'{split}_{b // 1000:02d}.png', compress_level=0)
if labels.is_file():
    shutil.copy(labels, dst / 'labels.json')
else:
    names = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck']
    (dst / 'labels.json').write_text(json.dumps({'classes': names, 'train': d['y_train'].tolist(),
                                                 'test': d['y_test'].tolist(), 'test_from_jpeg': []}))
"""


def run_figures(path: Path) -> dict:
    """Figures of a finished (or stopped) run from its record: status.json, results.json, metrics.jsonl."""
    def load(name):
        try:
            return json.loads((path / name).read_text())
        except (OSError, ValueError):
            return {}
    status, results = load("status.json"), load("results.json")
    if not status:
        return {"state": None, "record": "none written"}
    rows = []
    try:
        rows = [json.loads(ln) for ln in (path / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    except (OSError, ValueError):
        pass
    rates = [r["images_per_s"] for r in rows if r.get("kind") == "train" and not r.get("partial") and r.get("images_per_s")]
    evals = [r for r in rows if r.get("kind") == "eval"]
    created, finished = status.get("created"), status.get("finished")
    return {
        "state": status.get("state"), "error": status.get("error"), "run_reason": status.get("reason"),
        "device": status.get("device"), "precision": status.get("precision"),
        "steps": status.get("step"), "total_steps": status.get("total_steps"),
        "epochs_done": round(status["step"] / status["steps_per_epoch"], 2) if status.get("steps_per_epoch") else None,
        "train_images": status.get("train_images"), "params": status.get("params"),
        "test_acc": results.get("test_acc"),
        "train_seconds": round(results["train_seconds"], 1) if results.get("train_seconds") is not None else None,
        "record_wall_s": round(finished - created, 1) if created and finished else None,
        # the first window holds the warm-up (cuDNN autotuning, allocator); the rest are steady
        "images_per_s_median": round(statistics.median(rates[1:] or rates), 1) if rates else None,
        "images_per_s_max": round(max(rates), 1) if rates else None, "train_rows": len(rates),
        "last_eval_acc": evals[-1].get("val_acc") if evals else None,
    }


def pack_description() -> dict:
    info_path = PACK / "PACK_INFO.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    files = [p for p in PACK.iterdir() if p.name.startswith(("train_", "test_"))]
    return {**info, "train_format": sorted({p.suffix for p in files if p.name.startswith("train_")}),
            "test_format": sorted({p.suffix for p in files if p.name.startswith("test_")}),
            "mib": round(sum(p.stat().st_size for p in PACK.iterdir()) / 2**20, 1)}


def cuda_mentions() -> list[str]:
    """file:line of every test line that asks for CUDA (what "the CUDA-only tests" are in this repo)."""
    found = []
    for f in sorted((REPO / "tests").glob("test_*.py")):
        for i, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
            if re.search(r"torch\.cuda\.is_available|\.cuda\(\)|device=\"cuda\"|torch\.device\(\"cuda\"\)", line):
                found.append(f"tests/{f.name}:{i}")
    return found


def _headline(name: str, s: dict) -> str:
    """One line of a step's key figures (log and JSON summary)."""
    pct = lambda v: f"{100 * v:.2f}%" if isinstance(v, (int, float)) else "-"
    if name in ("fast", "muon") and s.get("state"):
        return (f"{s.get('preset')}: test {pct(s.get('test_acc'))} (target {'met' if s.get('target_met') else 'not met'}), "
                f"wall {s.get('wall_s')} s (record {s.get('record_wall_s')} s, train {s.get('train_seconds')} s), "
                f"{s.get('images_per_s_median')} img/s")
    if name in ("resnet18", "vit") and s.get("state"):
        return (f"{s.get('preset')}: {s.get('images_per_s_median')} img/s median (max {s.get('images_per_s_max')}), "
                f"{s.get('epochs_done')} epochs, test {pct(s.get('test_acc'))}")
    if name == "cuda_tests" and "counts" in s:
        return ", ".join(f"{v} {k}" for k, v in s["counts"].items() if v)
    if name == "pipeline" and s.get("ours_over_best_reference"):
        return ", ".join(f"{m} ours/reference {r}x" for m, r in s["ours_over_best_reference"].items())
    if name == "onnx" and (s.get("rows") or s.get("cpu_reference")):
        rows = s.get("rows") or s.get("cpu_reference")
        tag = "" if s.get("rows") else "CPU reference: "
        return tag + "; ".join(f"{Path(r['model']).stem} b1 {r.get('batch_1', {}).get('p50_ms')} ms, "
                               f"b256 {r.get('batch_256', {}).get('images_per_s')} img/s" for r in rows)
    if name == "device" and s.get("info"):
        i = s["info"]
        return f"{i.get('name')}, driver {i.get('driver')}, torch {i.get('torch')} (CUDA {i.get('torch_cuda')})"
    return ""


def _status(rc, timed_out: bool, ok: bool, why: str) -> dict:
    if timed_out:
        return {"status": "timeout", "reason": "stopped at its time budget"}
    return {"status": "ok"} if ok else {"status": "failed", "reason": why if rc == 0 else f"exit {rc}: {why}"}


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "(no output)"


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the child's own process group (a training run then stops at a step boundary), SIGKILL after 15 s."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _raise_interrupt(*_):
    raise KeyboardInterrupt


def _iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(timespec="seconds")


if __name__ == "__main__":
    sys.exit(main())
