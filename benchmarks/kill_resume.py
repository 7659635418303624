"""Kill a study's driver at several moments, resume it, and count the work done twice.

    python benchmarks/kill_resume.py [--moments first-checkpoint,last-epoch,first-trial,sigint]
                                     [--code DIR] [--json OUT]

For each moment a tiny study (mnist-5k, ``--trials`` trials of ``--epochs`` epochs, two at a
time) is started with ``dpstudy run`` in its own process group; at the moment the driver
gets SIGKILL (or SIGINT for ``sigint``), then ``dpstudy resume`` finishes it. Every trained
epoch is logged by the trial process itself (a ``sitecustomize`` hook on
``trainables.train.save_checkpoint``, installed only for this script), so the figures are
exact:

- ``extra ids``: trials trained under ids beyond the study's ``trials`` (a running trial
  abandoned and restarted from scratch under a new id);
- ``finished re-run``: trials already ``completed`` in Parquet at the kill that trained
  again after it;
- ``finished restored``: such trials that Tune restored from a checkpoint after the kill
  (one restored from its last checkpoint trains no epoch, so ``finished re-run`` misses it);
- ``re-trained``: epochs trained in all minus epochs in the final results;
- ``rows``: trial rows in the final results (must equal ``trials``, with no duplicate);
- ``all_completed``: every row is ``completed`` (none recorded as stopped early by mistake).

``--code DIR`` runs another checkout's code (e.g. ``git archive main``) for a before/after
comparison. Moments: ``first-checkpoint`` (a trial reported epoch 1, none finished),
``unreported`` (a trial wrote its epoch-1 checkpoint; the kill comes before its report),
``last-epoch`` (a trial trained its last epoch, it may not be recorded yet),
``first-trial`` (a trial is in Parquet), ``sigint`` (Ctrl-C at the first checkpoint).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

HOOK = '''
import importlib.abc, importlib.util, os, sys, time
_LOG = os.environ.get("DPSTUDY_EPOCH_LOG")
_PAUSE = os.environ.get("DPSTUDY_PAUSE_AFTER_SAVE")

def _trial():
    try:
        from ray import tune
        return tune.get_context().get_trial_id()
    except Exception:
        return None

class _Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "trainables.train" or not _LOG:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        loader = spec.loader
        original_exec = loader.exec_module

        def exec_module(module):
            original_exec(module)
            save, restore = module.save_checkpoint, module.restore

            def logged(run, progress, ckpt_dir):
                save(run, progress, ckpt_dir)
                with open(_LOG, "a") as f:
                    f.write(f"{_trial()} {progress.epoch} {time.time()}\\n")
                if _PAUSE and not os.path.exists(_PAUSE):  # written, not yet reported
                    with open(_PAUSE + ".tmp", "w") as f:
                        f.write(str(os.getpid()))
                    os.replace(_PAUSE + ".tmp", _PAUSE)
                    time.sleep(3600)
            module.save_checkpoint = logged

            def logged_restore(*args, **kwargs):  # a trial resumed from its checkpoint
                with open(_LOG + ".restores", "a") as f:
                    f.write(f"{_trial()} {time.time()}\\n")
                return restore(*args, **kwargs)
            module.restore = logged_restore
        loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, _Hook())
'''

MOMENTS = ("first-checkpoint", "unreported", "last-epoch", "first-trial", "sigint")


def study_spec(root: Path, name: str, trials: int, epochs: int) -> Path:
    spec = {
        "name": name, "seed": 0, "device": "cpu",
        "dataset": {"name": "mnist-5k"}, "model": {"name": "cnn-mnist"},
        "privacy": {"epsilon": 3.0, "delta": 1e-5, "accountant": "rdp"},
        "search": {"prune_rate": {"low": 0.0, "high": 0.8}, "drop_rate": 0.0,
                   "clip_norm": 1.0, "noise_multiplier": {"low": 1.0, "high": 2.0},
                   "learning_rate": {"low": 0.5, "high": 3.0, "log": True},
                   "batch_size": 500, "max_epochs": epochs},
        "trials": trials, "max_concurrent": 2, "resources_per_trial": {"cpu": 1, "gpu": 0},
        "sampler": "tpe", "scheduler": "none",
        "storage": str(root / "runs"), "results": str(root / "results"),
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def epoch_log(path: Path) -> list[tuple[str, int]]:
    if not path.exists():
        return []
    return [(line.split()[0], int(line.split()[1])) for line in path.read_text().splitlines()
            if line.strip()]


def restored_after(log: Path, since: float) -> set[str]:
    """Trials that restored a checkpoint after ``since`` (the hook's ``.restores`` log)."""
    path = Path(f"{log}.restores")
    lines = path.read_text().splitlines() if path.exists() else []
    return {line.split()[0] for line in lines if line.strip() and float(line.split()[1]) >= since}


def read_rows(results: Path) -> list[dict[str, Any]]:
    from study.storage.read import read_trials

    try:
        return read_trials(str(results)).to_pylist()
    except (FileNotFoundError, OSError, ValueError):
        return []


def reached(moment: str, root: Path, name: str, log: Path, epochs: int) -> bool:
    if moment in ("first-checkpoint", "sigint"):
        return bool(glob.glob(str(root / "runs" / name / "*" / "checkpoint_000000")))
    if moment == "last-epoch":
        return any(epoch == epochs for _, epoch in epoch_log(log))
    if moment == "unreported":
        return (root / "paused").exists()
    return len(read_rows(root / "results")) >= 1


def one_moment(moment: str, code: Path, trials: int, epochs: int) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix=f"dpstudy-kill-{moment}-"))
    hook = root / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOOK)
    log = root / "epochs.log"
    name = "killed"
    spec = study_spec(root, name, trials, epochs)
    env = {**os.environ, "PYTHONPATH": f"{hook}{os.pathsep}{code}",
           "DPSTUDY_EPOCH_LOG": str(log), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    if moment == "unreported":  # the first checkpoint's trial stops before its report
        env["DPSTUDY_PAUSE_AFTER_SAVE"] = str(root / "paused")
    driver = subprocess.Popen([sys.executable, "-m", "study.cli", "run", str(spec)], cwd=root,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              start_new_session=True)
    out: dict[str, Any] = {"moment": moment}
    try:
        deadline = time.monotonic() + 600
        while not reached(moment, root, name, log, epochs):
            if driver.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{moment}: the study ended before the moment came:\n"
                                   + driver.stdout.read().decode()[-3000:])
            time.sleep(0.05)
        before_rows = read_rows(root / "results")
        trained_before = len(epoch_log(log))
        if moment == "sigint":
            os.kill(driver.pid, signal.SIGINT)
            driver.wait(timeout=300)
            text = driver.stdout.read().decode()
            out["sigint_exit"] = driver.returncode
            out["sigint_says_resume"] = "dpstudy resume" in text
            out["fake_stopped_rows"] = sum(r["status"] == "stopped"
                                           for r in read_rows(root / "results"))
            before_rows = read_rows(root / "results")
            trained_before = len(epoch_log(log))
        else:
            os.kill(driver.pid, signal.SIGKILL)
            driver.wait(timeout=60)
            if moment == "unreported":  # and the paused trial's process (Ray's, not ours)
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int((root / "paused").read_text()), signal.SIGKILL)
        killed_at = time.time()
        time.sleep(2)
    finally:
        try:
            os.killpg(driver.pid, signal.SIGKILL)  # the killed driver's own Ray processes
        except (ProcessLookupError, PermissionError):
            pass
    resumed = subprocess.run([sys.executable, "-m", "study.cli", "resume",
                              str(root / "runs" / name)], cwd=root, env=env,
                             capture_output=True, text=True, timeout=900)
    out["resume_exit"] = resumed.returncode
    if resumed.returncode != 0:
        out["resume_output"] = resumed.stdout + resumed.stderr
    trained = epoch_log(log)
    after = trained[trained_before:]
    rows = read_rows(root / "results")
    completed_before = {r["trial_id"] for r in before_rows if r["status"] == "completed"}
    from study.storage.read import read_epochs

    final_epochs = read_epochs(str(root / "results")).num_rows if rows else 0
    out.update({
        "trials": trials, "epochs_needed": trials * epochs,
        "completed_at_kill": len(completed_before),
        "rows": len(rows), "duplicates": len(rows) - len({r["trial_id"] for r in rows}),
        "extra_ids": max(0, len({t for t, _ in trained}) - trials),
        "finished_rerun": len(completed_before & {t for t, _ in after}),
        "finished_restored": len(completed_before & restored_after(log, killed_at)),
        "epochs_trained": len(trained), "final_epochs": final_epochs,
        "retrained": len(trained) - final_epochs,
        "restarted_from_scratch": len({t for t, e in after if e == 1}
                                      & {t for t, _ in trained[:trained_before]}),
        "all_completed": all(r["status"] == "completed" for r in rows),
    })
    return out


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, kill and resume at each moment, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--moments", default=",".join(MOMENTS))
    parser.add_argument("--code", default=str(Path(__file__).resolve().parents[1]),
                        help="checkout whose study/ and trainables/ to run")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    sys.path.insert(0, args.code)
    rows = [one_moment(m, Path(args.code), args.trials, args.epochs)
            for m in args.moments.split(",")]
    header = ("moment", "completed_at_kill", "extra_ids", "finished_rerun",
              "finished_restored", "restarted_from_scratch", "retrained", "epochs_trained",
              "rows", "duplicates", "all_completed", "resume_exit")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(str(r.get(k)) for k in header) + " |")
        if "sigint_exit" in r:
            print(f"  sigint: exit {r['sigint_exit']}, says how to resume: "
                  f"{r['sigint_says_resume']}, fake 'stopped' rows: {r['fake_stopped_rows']}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
