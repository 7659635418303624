"""Experiment trackers (MLflow, TensorBoard), the persisted Optuna study and the report's
Optuna figures, on one tiny real study; the HTML report checked in headless Chromium."""

from __future__ import annotations

import glob
import json
import pickle
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml
from inprocess import dpstudy

from study.execution.callbacks import CONFIRM_KEY
from study.spec.model import SpecError, StudySpec, check_against_data

BASE: dict[str, Any] = {
    "name": "tracked", "seed": 0, "dataset": {"name": "mnist-5k"}, "device": "cpu",
    "privacy": {"epsilon": 3.0, "delta": 1e-5, "accountant": "rdp"},
    "search": {"prune_rate": {"low": 0.0, "high": 0.8},
               "learning_rate": {"low": 0.5, "high": 3.0, "log": True},
               "noise_multiplier": {"low": 0.8, "high": 3.0}, "clip_norm": 1.0,
               "batch_size": 500, "max_epochs": 2},
    "trials": 2, "max_concurrent": 2, "scheduler": "none",
    "loggers": ["mlflow", "tensorboard"],
}


def spec_of(tmp_path: Path, **overrides: Any) -> StudySpec:
    return StudySpec.from_dict({**BASE, "storage": str(tmp_path / "runs"),
                                "results": str(tmp_path / "results"), **overrides})


# --- wiring (fast) ---------------------------------------------------------------------

def test_callbacks_follow_the_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mlflow")
    from ray.tune.logger import TBXLoggerCallback

    from study.execution.trackers import StudyMLflowCallback, tracker_callbacks, tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    spec = spec_of(tmp_path)
    mlflow_cb, tb_cb = tracker_callbacks(spec, str(tmp_path / "runs" / "tracked"))
    assert isinstance(mlflow_cb, StudyMLflowCallback) and isinstance(tb_cb, TBXLoggerCallback)
    assert mlflow_cb.tracking_uri == f"sqlite:///{tmp_path}/runs/tracked/mlflow.db"
    assert mlflow_cb.experiment_name == "tracked"
    assert tracker_callbacks(spec_of(tmp_path, loggers=[]), "x") == []
    back = pickle.loads(pickle.dumps(mlflow_cb))  # Tune pickles its callbacks
    assert back.tracking_uri == mlflow_cb.tracking_uri and back.spec == spec
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert tracking_uri("anywhere") == "http://mlflow.example:5000"


class FakeTrial:
    """What MLflowLoggerCallback reads of a Tune trial."""

    def __init__(self, trial_id: str, config: dict[str, Any]) -> None:
        self.trial_id, self.config = trial_id, config

    def __str__(self) -> str:
        return f"dpstudy_trial_{self.trial_id}"


def test_a_resumed_trial_logs_into_its_earlier_run(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from study.execution.trackers import TRIAL_ID_TAG, StudyMLflowCallback
    from trainables.tune_trainable import CONFIG_KEY, reported_config

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file://{tmp_path}/mlruns")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    spec = spec_of(tmp_path)
    config = {"prune_rate": 0.3, "learning_rate": 1.0, "noise_multiplier": 1.2}
    reported = reported_config(spec.trial_config(config))  # what the trial reports
    for driver, epoch in ((1, 1), (2, 2)):  # the second driver resumes the experiment
        callback = pickle.loads(pickle.dumps(StudyMLflowCallback(spec, "unused")))
        callback.setup()
        trial = FakeTrial("abc_00001", config)
        callback.log_trial_start(trial)
        callback.log_trial_result(epoch, trial, {"training_iteration": epoch,
                                                 "epsilon_spent": 1.5 * epoch,
                                                 CONFIG_KEY: reported})
        if driver == 2:
            callback.log_trial_end(trial)
    client = MlflowClient(tracking_uri=f"file://{tmp_path}/mlruns")
    [run] = client.search_runs([client.get_experiment_by_name("tracked").experiment_id])
    assert run.data.tags[TRIAL_ID_TAG] == "abc_00001" and run.info.status == "FINISHED"
    assert run.data.params["pruning/rate"] == "0.3" and run.data.params["prune_rate"] == "0.3"
    history = client.get_metric_history(run.info.run_id, "epsilon_spent")
    assert [(m.step, m.value) for m in history] == [(1, 1.5), (2, 3.0)]


def test_rows_record_the_config_the_trial_reported(tmp_path: Path) -> None:
    """The driver records the trial config a trial resolved and reported (under a study
    budget its noise and epsilon are not the spec's), never one rebuilt from the spec."""
    from study.execution.callbacks import reported_config, trial_row
    from trainables.config import TrialConfig
    from trainables.tune_trainable import CONFIG_KEY
    from trainables.tune_trainable import reported_config as report

    spec = spec_of(tmp_path)
    sampled = {"prune_rate": 0.3, "learning_rate": 1.0, "noise_multiplier": 1.2}
    used = spec.trial_config(sampled, seed=7)
    used["privacy"].update(noise_multiplier=2.5, epsilon=2.9)  # as study_trial_config does
    result = {"finished": True, CONFIG_KEY: report(used)}
    resolved = TrialConfig.from_dict(used).to_dict()
    del resolved["checkpoint_dir"]
    assert reported_config(result) == resolved
    run = {CONFIRM_KEY: {"params": sampled, "seed": 7, "run_id": "c1", "config_id": "t0"}}
    row = trial_row(spec, "x", run, result, status="completed")
    assert (row["trial_id"], row["stage"], row["seed"], row["prune_rate"],
            row["noise_multiplier"], row["clip_norm"]) == ("c1", "confirm", 7, 0.3, 2.5, 1.0)
    early = trial_row(spec, "t1", sampled, None, status="failed", error="no data")
    assert early["seed"] == 0 and json.loads(early["params"]) == sampled
    assert "prune_rate" not in early  # it never reported the config it resolved


def test_loggers_are_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SpecError, match=r"loggers\[1\]: must be one of mlflow, tensorboard "
                                        r"\(got 'wandb'\)"):
        spec_of(tmp_path, loggers=["mlflow", "wandb"])
    assert spec_of(tmp_path, loggers="tensorboard").loggers == ("tensorboard",)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    remote = spec_of(tmp_path, storage="s3://bucket/runs", loggers=["mlflow"])
    with pytest.raises(SpecError, match="loggers: mlflow with a URI storage needs "
                                        "MLFLOW_TRACKING_URI"):
        check_against_data(remote)


# --- one real study --------------------------------------------------------------------

@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    pytest.importorskip("mlflow")
    tmp = tmp_path_factory.mktemp("tracked")
    spec = {**BASE, "storage": str(tmp / "runs"), "results": str(tmp / "results")}
    (tmp / "tracked.yaml").write_text(yaml.safe_dump(spec))
    env = {"MLFLOW_TRACKING_URI": f"file://{tmp}/mlruns",
           "MLFLOW_ALLOW_FILE_STORE": "true"}  # MLflow 3 keeps the file store on request
    done = dpstudy("run", str(tmp / "tracked.yaml"), env=env)  # on the shared embedded Ray
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {"tmp": tmp, "experiment": tmp / "runs" / "tracked", "results": tmp / "results",
            "mlruns": tmp / "mlruns"}


def parquet_ids(study: dict[str, Path]) -> set[str]:
    return {r["trial_id"] for r in pq.read_table(study["results"] / "trials.parquet")
            .to_pylist()}


@pytest.mark.slow
def test_mlflow_has_every_trial_with_params_and_epoch_metrics(
        study: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"file://{study['mlruns']}")
    experiment = client.get_experiment_by_name("tracked")
    runs = client.search_runs([experiment.experiment_id])
    assert {r.data.tags["dpstudy.trial_id"] for r in runs} == parquet_ids(study)
    assert len(runs) == 2
    for run in runs:
        assert run.info.status == "FINISHED"
        params = run.data.params
        assert params["privacy/epsilon"] == "3.0" and params["optim/clip_norm"] == "1.0"
        assert float(params["prune_rate"]) == float(params["pruning/rate"])  # sampled
        for metric in ("epsilon_spent", "val_accuracy", "test_accuracy", "density"):
            history = client.get_metric_history(run.info.run_id, metric)
            assert [m.step for m in history] == [1, 2], metric  # one value per epoch
        spent = [m.value for m in client.get_metric_history(run.info.run_id, "epsilon_spent")]
        assert spent[0] < spent[1] <= 3.0


def tensorboard_tags(path: str) -> set[str]:
    """Scalar tags of a TensorBoard event file (TFRecord framing of Event protos)."""
    from tensorboardX.proto import event_pb2

    data, i, tags = Path(path).read_bytes(), 0, set()
    while i < len(data):
        (length,) = struct.unpack("<Q", data[i:i + 8])
        event = event_pb2.Event.FromString(data[i + 12:i + 12 + length])
        tags.update(v.tag for v in event.summary.value)
        i += 12 + length + 4
    return tags


@pytest.mark.slow
def test_tensorboard_event_files_per_trial(study: dict[str, Path]) -> None:
    files = glob.glob(str(study["experiment"] / "*" / "events.out.tfevents.*"))
    assert len(files) == 2
    for path in files:
        tags = tensorboard_tags(path)
        for metric in ("epsilon_spent", "val_accuracy", "test_accuracy", "density"):
            assert f"ray/tune/{metric}" in tags, sorted(tags)


@pytest.mark.slow
def test_optuna_journal_holds_each_trial_once(study: dict[str, Path]) -> None:
    from optuna.importance import get_param_importances
    from optuna.trial import TrialState

    from study.search.persisted import load_study
    from study.search.space import TUNE_TRIAL_ID

    optuna_study = load_study(str(study["experiment"]), "tracked")
    done = [t for t in optuna_study.trials if t.state == TrialState.COMPLETE]
    assert sorted(t.user_attrs[TUNE_TRIAL_ID] for t in done) == sorted(parquet_ids(study))
    assert len(optuna_study.trials) == 2
    assert set(get_param_importances(optuna_study)) <= {"prune_rate", "learning_rate",
                                                        "noise_multiplier"}


# --- the report in a real browser ------------------------------------------------------

CHECK_SCRIPT = """<script>
window.dpstudyErrors = [];
window.addEventListener("error", e => window.dpstudyErrors.push(
  (e.target && e.target.src) || e.message || "error"), true);
window.addEventListener("load", () => {
  const images = Array.from(document.images).map(i => ({src: i.getAttribute("src"),
    complete: i.complete, width: i.naturalWidth, height: i.naturalHeight}));
  const out = document.createElement("pre");
  out.id = "dpstudy-check";
  out.textContent = JSON.stringify({errors: window.dpstudyErrors, images: images});
  document.body.appendChild(out);
});
</script>"""


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which(
        "google-chrome")


def browser_check(page: Path) -> dict[str, Any]:
    """Load ``page`` in headless Chromium (a copy beside it with a small script that records
    load errors and each image's natural size once the page has loaded)."""
    probe = page.with_name("browser-check.html")
    probe.write_text(page.read_text().replace("<head>", "<head>" + CHECK_SCRIPT, 1))
    dom = subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
        capture_output=True, text=True, timeout=180).stdout
    probe.unlink()
    start = dom.index('<pre id="dpstudy-check">') + len('<pre id="dpstudy-check">')
    return json.loads(dom[start:dom.index("</pre>", start)].replace("&quot;", '"')
                      .replace("&amp;", "&"))


@pytest.mark.slow
@pytest.mark.skipif(chromium() is None, reason="chromium is not installed (.ci/run installs it)")
def test_report_loads_in_chromium_and_shows_every_image(study: dict[str, Path]) -> None:
    from study.report.html import build_report

    out = study["tmp"] / "report"
    files = build_report(str(study["results"]), str(out))
    assert {"privacy_utility", "optuna_parallel_coordinate", "optuna_contour"} <= set(
        files.figures), files.skipped
    checked = browser_check(Path(files.page))
    assert checked["errors"] == []
    shown = {i["src"]: i for i in checked["images"]}
    assert set(shown) == {f"{stem}.png" for stem in files.figures}
    for image in shown.values():
        assert image["complete"] and image["width"] >= 300 and image["height"] >= 200, image
    shot = out / "screenshot.png"
    subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu",
                    "--window-size=1280,6000", f"--screenshot={shot}",
                    Path(files.page).as_uri()], capture_output=True, timeout=180)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_browser_check_sees_a_missing_image(tmp_path: Path) -> None:
    if chromium() is None:
        pytest.skip("chromium is not installed (.ci/run installs it)")
    from study.report.plots import new_figure, save_png

    fig, (ax,) = new_figure()
    ax.plot([0, 1], [1, 0])
    save_png(fig, str(tmp_path / "ok.png"))
    page = tmp_path / "report.html"
    page.write_text('<!DOCTYPE html><html><head><meta charset="utf-8"></head><body>'
                    '<img src="ok.png"><img src="missing.png"></body></html>')
    checked = browser_check(page)
    assert [e.rsplit("/", 1)[-1] for e in checked["errors"]] == ["missing.png"]
    sizes = {i["src"]: i["width"] for i in checked["images"]}
    assert sizes == {"ok.png": 600, "missing.png": 0}
