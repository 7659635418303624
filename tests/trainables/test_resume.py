"""Resuming from a checkpoint: saved masks, another device's generator state, and
``python -m trainables --resume`` on bad, foreign, changed or finished checkpoints."""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from trainables import checkpoint
from trainables.__main__ import main
from trainables.config import TrialConfig
from trainables.train import build_run, restore, train

pytestmark = pytest.mark.slow

CONFIG: dict[str, Any] = {
    "seed": 4, "device": "cpu", "dataset": {"name": "mnist-5k"},
    "privacy": {"epsilon": 8.0, "delta": 1e-5, "accountant": "rdp", "noise_multiplier": 1.0},
    "optim": {"learning_rate": 1.0, "batch_size": 1000, "max_epochs": 2},
    "pruning": {"rate": 0.5, "criterion": "random"},
    "dropping": {"rate": 0.5, "criterion": "random"},
}


class Crash(Exception):
    pass


def crash(_metrics: dict[str, Any], _dir: str | None) -> None:
    raise Crash


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """``partial`` (after epoch 1 of 2) and ``finished`` checkpoints of one trial."""
    root = tmp_path_factory.mktemp("ckpt")
    partial, finished = root / "partial", root / "finished"
    with pytest.raises(Crash):
        train({**CONFIG, "checkpoint_dir": str(partial)}, report=crash)
    shutil.copytree(partial, finished)
    train({**CONFIG, "checkpoint_dir": str(finished)}, resume_from=str(finished))
    return {"partial": partial, "finished": finished, "root": root}


def copy_of(src: Path, dst: Path, edit: Any = None) -> Path:
    shutil.copytree(src, dst)
    if edit is not None:
        path = dst / checkpoint.FILENAME
        state = torch.load(path, weights_only=False)
        edit(state)
        torch.save(state, path)
    return dst


def cli(tmp_path: Path, directory: Path, capsys, **changes: Any) -> tuple[int, str]:
    config = copy.deepcopy(CONFIG)
    for key, value in changes.items():
        section, field = key.split("__")
        config.setdefault(section, {})[field] = value
    path = tmp_path / "trial.yaml"
    path.write_text(yaml.safe_dump(config))
    code = main([str(path), "--checkpoint-dir", str(directory), "--resume"])
    return code, capsys.readouterr().err


def test_restore_loads_the_saved_masks(checkpoints, tmp_path) -> None:
    def edit(state: dict[str, Any]) -> None:  # as if pruning on another node rounded otherwise
        name = next(iter(state["masks"]))
        mask = state["masks"][name]
        kept = mask.flatten().nonzero().flatten()[:10]
        mask.view(-1)[kept] = False
        state["model"][name].view(-1)[kept] = 0.0

    ckpt = copy_of(checkpoints["partial"], tmp_path / "edited", edit)
    saved = checkpoint.load(str(ckpt))["masks"]
    run = build_run(TrialConfig.from_dict({**CONFIG, "checkpoint_dir": str(ckpt)}))
    name = next(iter(saved))
    assert not torch.equal(run.pruned.masks[name], saved[name])  # re-pruning differs
    restore(run, str(ckpt))
    names = [n.removeprefix("_module.") for n, _ in run.model.named_parameters()]
    for n, trainable in zip(names, run.optimizer.trainable, strict=True):
        if n in saved:
            assert torch.equal(run.pruned.masks[n], saved[n])
            assert torch.equal(trainable, saved[n])
    assert run.optimizer.trainable_count == run.pruned.params_after
    weights = dict(run.model._module.named_parameters())
    assert torch.all(weights[name][~saved[name]] == 0)


def test_resume_from_a_gpu_written_checkpoint_on_the_cpu(checkpoints, tmp_path) -> None:
    """Noise and selector states written by CUDA generators (16 bytes each) resume here."""
    def edit(state: dict[str, Any]) -> None:
        for name in ("noise", "selector"):
            state["rng"]["generators"][name].update(
                device="cuda", state=torch.zeros(16, dtype=torch.uint8))

    ckpt = copy_of(checkpoints["partial"], tmp_path / "gpu", edit)
    with pytest.warns(UserWarning, match="another device type"):
        final = train({**CONFIG, "checkpoint_dir": str(ckpt)}, resume_from=str(ckpt))
    reference = checkpoint.load(str(checkpoints["finished"]))
    assert final["steps"] == reference["progress"]["step"] == final["steps_planned"]
    assert final["epsilon_spent"] == reference["progress"]["history"][-1]["epsilon_spent"]
    resumed = checkpoint.load(str(ckpt))["rng"]["generators"]
    assert resumed["noise"]["device"] == "cpu"
    assert resumed["noise"]["seed"] == reference["rng"]["generators"]["noise"]["seed"]


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_cli_resume_from_an_unreadable_checkpoint(checkpoints, tmp_path, capsys,
                                                  damage) -> None:
    ckpt = copy_of(checkpoints["partial"], tmp_path / damage)
    path = ckpt / checkpoint.FILENAME
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else os.urandom(4000))
    code, err = cli(tmp_path, ckpt, capsys)
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert str(path) in err and "not a readable dpstudy checkpoint" in err


@pytest.mark.parametrize(("key", "value", "field"), [
    ("privacy__epsilon", 4.0, "privacy.epsilon"),  # another privacy plan
    ("model__width", 2.0, "model.width"),  # another model
    ("optim__learning_rate", 0.5, "optim.learning_rate"),
])
def test_cli_resume_refuses_a_changed_config(checkpoints, tmp_path, capsys, key, value,
                                             field) -> None:
    for which in ("partial", "finished"):
        code, err = cli(tmp_path, checkpoints[which], capsys, **{key: value})
        assert code == 2, err
        assert err.count("\n") == 1 and "Traceback" not in err
        assert field in err and str(checkpoints[which]) in err and "refusing" in err


def test_cli_resume_refuses_a_foreign_model_or_plan(checkpoints, tmp_path, capsys) -> None:
    """Same config, but state of another model / another privacy plan (edited files)."""
    def other_model(state: dict[str, Any]) -> None:
        state["model"][next(iter(state["model"]))] = torch.zeros(3, 3)

    def other_plan(state: dict[str, Any]) -> None:
        state["plan"]["steps"] += 1

    for name, edit, words in (("model", other_model, "does not fit this trial's model"),
                              ("plan", other_plan, "privacy plan differs")):
        ckpt = copy_of(checkpoints["partial"], tmp_path / name, edit)
        code, err = cli(tmp_path, ckpt, capsys)
        assert code == 2, err
        assert err.count("\n") == 1 and "Traceback" not in err
        assert str(ckpt) in err and words in err


def test_cli_resume_of_a_finished_checkpoint_says_so(checkpoints, tmp_path, capsys) -> None:
    before = (checkpoints["finished"] / checkpoint.FILENAME).read_bytes()
    code, err = cli(tmp_path, checkpoints["finished"], capsys)
    assert code == 0
    assert "already finished" in err and str(checkpoints["finished"]) in err
    assert (checkpoints["finished"] / checkpoint.FILENAME).read_bytes() == before


def test_same_device_resume_continues_without_re_deriving(checkpoints, recwarn) -> None:
    """The partial checkpoint resumes exactly on the device type that wrote it."""
    state = checkpoint.load(str(checkpoints["partial"]))
    run = build_run(TrialConfig.from_dict({**CONFIG}))
    progress = restore(run, str(checkpoints["partial"]), state)
    assert progress.epoch == 1
    assert not [w for w in recwarn if "another device type" in str(w.message)]
    assert run.seeds["noise"] == state["rng"]["generators"]["noise"]["seed"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_cuda_trial_resumes_on_the_cpu_and_back(tmp_path) -> None:
    gpu = {**CONFIG, "device": "cuda", "checkpoint_dir": str(tmp_path / "gpu")}
    with pytest.raises(Crash):
        train(gpu, report=crash)
    state = checkpoint.load(str(tmp_path / "gpu"))
    assert state["rng"]["generators"]["noise"]["device"] == "cuda"
    assert state["progress"]["history"][-1]["device"].startswith("cuda")
    cpu_dir = tmp_path / "cpu"
    shutil.copytree(tmp_path / "gpu", cpu_dir)
    with pytest.warns(UserWarning, match="another device type"):
        final = train({**CONFIG, "device": "cpu", "checkpoint_dir": str(cpu_dir)},
                      resume_from=str(cpu_dir))
    assert final["steps"] == final["steps_planned"] and final["device"] == "cpu"
    resumed = checkpoint.load(str(cpu_dir))
    assert resumed["plan"] == state["plan"]
    assert resumed["rng"]["generators"]["noise"]["seed"] == \
        state["rng"]["generators"]["noise"]["seed"]


# --- a driver killed before it recorded a trial's newest checkpoint --------------------

def stored_trial_dir(checkpoints, tmp_path: Path, layout: dict[str, str]) -> Path:
    """A trial folder as Tune stores it: ``checkpoint_NNNNNN`` folders (``partial``,
    ``finished`` or ``truncated``) beside other files."""
    trial = tmp_path / "trial"
    trial.mkdir()
    (trial / "result.json").write_text("{}")
    for name, kind in layout.items():
        if kind == "truncated":
            (trial / name).mkdir()
            data = (checkpoints["finished"] / checkpoint.FILENAME).read_bytes()
            (trial / name / checkpoint.FILENAME).write_bytes(data[: len(data) // 3])
        else:
            shutil.copytree(checkpoints[kind], trial / name)
    return trial


def test_a_trial_continues_from_its_newest_stored_checkpoint(checkpoints, tmp_path) -> None:
    import pyarrow.fs as pafs
    from ray import tune

    from trainables.tune_trainable import newest_checkpoint, stored_checkpoints

    trial = stored_trial_dir(checkpoints, tmp_path, {"checkpoint_000000": "partial",
                                                     "checkpoint_000001": "finished",
                                                     "checkpoint_000002": "truncated"})
    fs = pafs.LocalFileSystem()
    paths = stored_checkpoints(fs, str(trial))
    assert [Path(p).name for p in paths] == [f"checkpoint_00000{i}" for i in range(3)]
    # Tune recorded only the epoch-1 checkpoint (the driver died before the next record)
    handed_back = tune.Checkpoint(str(trial / "checkpoint_000000"), filesystem=fs)
    candidates = [handed_back] + [tune.Checkpoint(p, filesystem=fs) for p in paths[1:]]
    local = newest_checkpoint(candidates, str(tmp_path / "work"), required=True)
    finished_step = checkpoint.load(str(checkpoints["finished"]))["progress"]["step"]
    assert checkpoint.load(local)["progress"]["step"] == finished_step


def test_an_unreadable_recorded_checkpoint_is_an_error_not_a_fresh_start(checkpoints,
                                                                         tmp_path) -> None:
    import pyarrow.fs as pafs
    from ray import tune

    from trainables.tune_trainable import newest_checkpoint

    trial = stored_trial_dir(checkpoints, tmp_path, {"checkpoint_000000": "truncated"})
    fs = pafs.LocalFileSystem()
    handed_back = tune.Checkpoint(str(trial / "checkpoint_000000"), filesystem=fs)
    with pytest.raises(checkpoint.CheckpointError, match="truncated or corrupt"):
        newest_checkpoint([handed_back], str(tmp_path / "work"), required=True)
    # nothing recorded by Tune and nothing readable stored: a genuinely fresh trial
    assert newest_checkpoint([handed_back], str(tmp_path / "work2")) is None
    assert newest_checkpoint([], str(tmp_path / "work3")) is None


@pytest.mark.parametrize("kind, reported_epochs", [("partial", [2]), ("finished", [2])])
def test_a_resumed_trial_reports_its_last_epoch_once(checkpoints, monkeypatch, kind,
                                                     reported_epochs) -> None:
    """A trial resumed from a checkpoint that already holds its whole plan (the driver
    stopped before it saw the last report) reports that finished epoch again, else Tune's
    last result is an earlier epoch and the trial is recorded as stopped early."""
    import json
    from types import SimpleNamespace

    import ray
    from ray import tune

    from trainables.randomness import SECRET
    from trainables.tune_trainable import CONFIG_KEY, run_trial

    reports: list[tuple[dict[str, Any], Any]] = []
    handed_back = tune.Checkpoint.from_directory(str(checkpoints[kind]))
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [])
    monkeypatch.setattr(ray, "get_runtime_context",
                        lambda: SimpleNamespace(get_assigned_resources=lambda: {}))
    monkeypatch.setattr(tune, "get_checkpoint", lambda: handed_back)
    monkeypatch.setattr(tune, "report", lambda metrics, checkpoint=None:
                        reports.append((metrics, checkpoint)))
    final = run_trial(copy.deepcopy(CONFIG))
    assert [m["epoch"] for m, _ in reports] == reported_epochs
    last, ckpt = reports[-1]
    assert last["finished"] and final["finished"] and ckpt is not None
    assert [e["epoch"] for e in json.loads(last["epoch_history"])] == [1, 2]
    # the resumed trial reports the config it resolved again, and no secret seed
    resolved = {k: v for k, v in TrialConfig.from_dict(CONFIG).to_dict().items()
                if k != "checkpoint_dir"}
    assert all(json.loads(m[CONFIG_KEY]) == resolved for m, _ in reports)
    generators = checkpoint.load(str(checkpoints[kind]))["rng"]["generators"]
    secrets = {str(generators[name]["seed"]) for name in SECRET}
    assert not any(seed in json.dumps(m) for m, _ in reports for seed in secrets)
