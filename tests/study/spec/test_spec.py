"""Tests of the study spec: parsing, validation messages, round trip and trial configs."""

from __future__ import annotations

import copy
import os
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import yaml

from study.spec.model import (
    Param,
    SpecError,
    StudySpec,
    check_against_data,
    load_spec,
)
from trainables.config import ConfigError, TrialConfig

QUICKSTART = Path(__file__).resolve().parents[3] / "examples" / "quickstart.yaml"
#: A spec that searches every kind of parameter (ranges, log, fixed), the base of the tests.
BASE = """
name: quickstart
seed: 0
dataset: {name: mnist-5k}
model: {name: cnn-mnist}
device: auto
privacy: {epsilon: 3.0, delta: 1.0e-5, accountant: prv}
pruning: {criterion: random, scope: global, granularity: unstructured}
dropping: {criterion: random}
optimizer: {name: sgd, momentum: 0.0, weight_decay: 0.0}
search:
  prune_rate: {low: 0.0, high: 0.9}
  drop_rate: {low: 0.0, high: 0.9}
  clip_norm: {low: 0.1, high: 4.0, log: true}
  noise_multiplier: {low: 0.6, high: 3.0}
  learning_rate: {low: 0.05, high: 4.0, log: true}
  batch_size: 256
  max_epochs: 3
trials: 4
max_concurrent: 2
resources_per_trial: {cpu: 1, gpu: 0}
max_failures: 2
objective: {metrics: [val_accuracy], modes: [max]}
sampler: tpe
scheduler: {name: asha, grace_budget: 0.3}
storage: ~/dpstudy-runs
results: results/quickstart
"""


def base() -> dict[str, Any]:
    """A fresh copy of the base spec as a plain dict."""
    return yaml.safe_load(BASE)


def problems_of(data: Any) -> list[str]:
    with pytest.raises(SpecError) as info:
        StudySpec.from_dict(data)
    return info.value.problems


def one_problem(data: Any, field: str, rule: str) -> str:
    """Assert exactly one problem, on ``field``, containing ``rule``; return it."""
    problems = problems_of(data)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{field}: "), problems
    assert rule in problems[0], problems
    return problems[0]


def with_(path: str, value: Any, data: dict | None = None) -> dict[str, Any]:
    """A copy of ``data`` (default: quickstart) with the dotted ``path`` set (or deleted)."""
    data = copy.deepcopy(data) if data is not None else base()
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node.setdefault(key, {})
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return data


_DELETE = object()


def test_quickstart_parses() -> None:
    spec = load_spec(QUICKSTART)
    assert spec.name == "quickstart" and spec.trials == 6 and spec.max_concurrent == 2
    assert spec.dataset.name == "mnist-5k" and spec.model.name == "cnn-mnist"
    assert spec.dataset.carved_validation_fraction == 0.1
    assert spec.privacy.epsilon == 3.0 and spec.privacy.delta == 1e-5
    assert spec.search.max_epochs.value == 8 and spec.search.epochs is None
    assert spec.search.noise_multiplier.distribution_kind() == "float"
    assert spec.search.prune_rate.choices == (0.0, 0.5, 0.8)
    assert spec.search.batch_size.distribution_kind() == "fixed"
    assert spec.scheduler.name == "asha" and spec.scheduler.grace_budget == 0.4
    assert spec.objective.primary == ("val_accuracy", "max") and not spec.objective.multi
    assert spec.objective.selection_split == "validation"
    assert spec.confirm.top == 2 and spec.confirm.seeds == 3 and spec.baseline_trial
    assert spec.results == "results/quickstart"
    assert spec.storage_path == os.path.expanduser("~/dpstudy-runs")


def test_defaults() -> None:
    data = base()
    for key in ("seed", "device", "optimizer", "max_failures", "sampler", "scheduler",
                "results", "pruning", "dropping", "objective", "resources_per_trial"):
        del data[key]
    for key in ("prune_rate", "drop_rate", "max_epochs"):
        del data["search"][key]
    spec = StudySpec.from_dict(data)
    assert (spec.seed, spec.device, spec.max_failures, spec.sampler) == (0, "auto", 2, "tpe")
    assert spec.scheduler.name == "none" and spec.optimizer.name == "sgd"
    assert spec.search.prune_rate.value == 0 and spec.search.max_epochs.value == 10
    assert spec.results == "results/quickstart"


def test_round_trip() -> None:
    spec = load_spec(QUICKSTART)
    assert StudySpec.from_dict(spec.to_dict()) == spec
    rich = base()
    rich["dataset"] = {"name": "mnist-5k", "public": {"size": 500}}
    rich["pruning"] = {"criterion": ["random", "snip"], "scope": ["global", "layerwise"]}
    rich["dropping"] = {"criterion": ["random", "public-grad"]}
    rich["search"] = {"prune_rate": [0.0, 0.5], "clip_norm": 1.0, "epochs": {"low": 1, "high": 5},
                      "learning_rate": {"low": 0.1, "high": 2.0, "step": 0.1},
                      "batch_size": {"low": 64, "high": 512}, "max_epochs": 5}
    rich["objective"] = {"metrics": ["val_accuracy", "trial_cost"]}
    rich["confirm"] = {"top": 2, "seeds": 4}
    rich["scheduler"] = "asha"
    rich["storage"] = "s3://bucket/runs"
    spec = StudySpec.from_dict(rich)
    back = StudySpec.from_dict(yaml.safe_load(yaml.safe_dump(spec.to_dict())))
    assert back == spec
    assert spec.objective.modes == ("max", "min") and spec.objective.multi
    assert spec.pruning.criterion == ("random", "snip") and spec.pruning.granularity == (
        "unstructured",)
    assert spec.search.batch_size.distribution_kind() == "int"
    assert spec.search.prune_rate.distribution_kind() == "categorical"
    assert spec.storage_path == "s3://bucket/runs"


@pytest.mark.parametrize(("path", "value", "field", "rule"), [
    ("trials", "eight", "trials", "must be an integer (got 'eight')"),
    ("search", 5, "search", "must be a mapping (got 5)"),
    ("privacy", [1, 2], "privacy", "must be a mapping (got [1, 2])"),
    ("seed", 1.5, "seed", "must be an integer"),
    ("resources_per_trial.cpu", "two", "resources_per_trial.cpu", "must be a number"),
    ("search.batch_size", "big", "search.batch_size", "must be a number, a list of choices"),
    ("search.batch_size", 12.5, "search.batch_size", "must be an integer (got 12.5)"),
    ("search.clip_norm.log", "yes", "search.clip_norm.log", "must be true or false"),
    ("pruning.criterion", 3, "pruning.criterion", "must be a string or a non-empty list"),
    ("objective.metrics", 7, "objective.metrics", "must be a list of strings"),
    ("scheduler", 5, "scheduler", "must be a mapping (got 5)"),
    ("scheduler.grace_budget", "1", "scheduler.grace_budget", "must be a number"),
    ("storage", 5, "storage", "must be a non-empty path or URI string"),
    ("dataset", [1], "dataset", "must be a mapping"),
    ("model.width", "wide", "model.width", "must be a number"),
])
def test_wrong_types(path: str, value: Any, field: str, rule: str) -> None:
    one_problem(with_(path, value), field, rule)


@pytest.mark.parametrize(("path", "value", "field", "rule"), [
    ("search.prune_rate.high", 1.5, "search.prune_rate.high", "must be < 1 (got 1.5)"),
    ("search.drop_rate", -0.1, "search.drop_rate", "must be >= 0 (got -0.1)"),
    ("search.drop_rate", [0.1, 1.0], "search.drop_rate.choices[1]", "must be < 1 (got 1.0)"),
    ("search.clip_norm.low", 5.0, "search.clip_norm.low", "must be < high = 4.0 (got 5.0)"),
    ("search.noise_multiplier.low", 3.0, "search.noise_multiplier.low", "must be < high"),
    ("search.prune_rate.log", True, "search.prune_rate.low", "must be > 0 with log: true"),
    ("search.learning_rate.low", 0.0, "search.learning_rate.low", "must be > 0 (got 0.0)"),
    ("search.batch_size", 0, "search.batch_size", "must be >= 1 (got 0)"),
    ("search.max_epochs", -1, "search.max_epochs", "must be > 0 (got -1)"),
    ("search.clip_norm.step", 0.1, "search.clip_norm.step", "cannot be combined with log"),
    ("search.clip_norm.high", _DELETE, "search.clip_norm.high", "is required for a range"),
    ("privacy.epsilon", -1.0, "privacy.epsilon", "the accountants support, [0.1, 20] (got -1.0)"),
    ("privacy.epsilon", 1e308, "privacy.epsilon", "[0.1, 20] (got 1e+308)"),
    ("privacy.epsilon", 1e-6, "privacy.epsilon", "[0.1, 20] (got 1e-06)"),
    ("privacy.epsilon", float("inf"), "privacy.epsilon", "must be finite"),
    ("privacy.delta", 1.0, "privacy.delta", "must be < 1.0 (got 1.0)"),
    ("privacy.accountant", "gdp", "privacy.accountant", "must be one of prv, rdp"),
    ("resources_per_trial", {"cpu": 0, "gpu": 0}, "resources_per_trial.cpu", "cpu + gpu"),
    ("max_concurrent", 0, "max_concurrent", "must be >= 1 (got 0)"),
    ("max_failures", -1, "max_failures", "must be >= 0 (got -1)"),
    ("device", "tpu", "device", "must be one of auto, cpu, cuda (got 'tpu')"),
    ("sampler", "cmaes", "sampler", "must be one of tpe, random, nsgaii, gp"),
    ("objective.metrics", ["accuracy"], "objective.metrics[0]", "must be one of val_accuracy"),
    ("objective.metrics", ["test_accuracy"], "objective.metrics",
     "selecting on a test metric biases the reported test accuracy"),
    ("objective.allow_test_selection", "yes", "objective.allow_test_selection",
     "must be true or false"),
    ("dataset.validation_fraction", 0, "objective.metrics",
     "selecting on a validation metric needs a validation split"),
    ("dataset.validation_fraction", 0.9, "dataset.validation_fraction", "must be <= 0.5"),
    ("dataset.validation", {"public": True}, "dataset.validation.public",
     "needs dataset.public"),
    ("dataset.validation", {}, "dataset.validation.dataset",
     "give exactly one of dataset or public: true"),
    ("confirm.seeds", 1, "confirm.seeds", "must be >= 2 (got 1)"),
    ("confirm.top", "two", "confirm.top", "must be an integer"),
    ("baseline_trial", "no", "baseline_trial", "must be true or false"),
    ("objective.modes", ["max", "min"], "objective.modes", "must give one mode per metric (1)"),
    ("objective.metrics", ["test_accuracy", "density", "test_loss"], "objective.metrics",
     "must list 1 or 2 metrics"),
    ("pruning.criterion", ["random", "lottery"], "pruning.criterion[1]",
     "must be one of random, magnitude, snip (got 'lottery')"),
    ("dropping.criterion", "top-k", "dropping.criterion", "must be one of random, magnitude"),
    ("scheduler.grace_budget", 1.0, "scheduler.grace_budget", "must be < 1.0 (got 1.0)"),
    ("scheduler.grace_period", 3, "scheduler.grace_period", "replaced by grace_budget"),
    ("scheduler.reduction_factor", 1, "scheduler.reduction_factor", "must be >= 2"),
    ("device", "cuda", "device", "cuda needs resources_per_trial.gpu > 0"),
    ("pruning.criterion", "snip", "pruning.criterion", "snip needs dataset.public"),
    ("dataset.name", "imagenet", "dataset.name", "must be one of mnist"),
])
def test_out_of_range(path: str, value: Any, field: str, rule: str) -> None:
    one_problem(with_(path, value), field, rule)


def test_name_rules() -> None:
    one_problem(with_("name", _DELETE), "name", "is required (got None)")
    one_problem(with_("name", "my study/1"), "name", "must match")
    spec = StudySpec.from_dict(with_("name", "study_1.v2-a", with_("results", _DELETE)))
    assert spec.results == "results/study_1.v2-a"


def test_noise_multiplier_xor_epochs() -> None:
    rule = "give exactly one of noise_multiplier"
    one_problem(with_("search.epochs", 3), "search.noise_multiplier", rule)
    one_problem(with_("search.noise_multiplier", _DELETE), "search.noise_multiplier", rule)
    spec = StudySpec.from_dict(with_("search.epochs", 3, with_("search.noise_multiplier", None)))
    assert spec.search.noise_multiplier is None and spec.search.epochs.value == 3


def test_required_sections() -> None:
    data = base()
    del data["privacy"], data["search"], data["trials"]
    problems = problems_of(data)
    assert problems == [
        "privacy.epsilon: is required (got None)",
        "search.clip_norm: is required (got None)",
        "search.learning_rate: is required (got None)",
        "search.batch_size: is required (got None)",
        "search.noise_multiplier: give exactly one of noise_multiplier (noise decides the steps) "
        "or epochs (epochs decide the noise) (got None)",
        "trials: is required (got None)",
    ]


@pytest.mark.parametrize(("path", "field", "hint"), [
    ("serach", "serach", "search"),
    ("search.prune_rat", "search.prune_rat", "prune_rate"),
    ("search.clip_norm.hgih", "search.clip_norm.hgih", "high"),
    ("privacy.epsilom", "privacy.epsilom", "epsilon"),
    ("resources_per_trial.gpus", "resources_per_trial.gpus", "gpu"),
    ("scheduler.grace_budgte", "scheduler.grace_budgte", "grace_budget"),
    ("dataset.test_frac", "dataset.test_frac", "test_fraction"),
])
def test_unknown_keys(path: str, field: str, hint: str) -> None:
    data = with_(path, 0.5)
    if path == "search.prune_rat":
        del data["search"]["prune_rate"]
    one_problem(data, field, f"unknown key; did you mean {hint!r}?")


def test_unknown_key_without_hint() -> None:
    assert "did you mean" not in one_problem(with_("zzz", 1), "zzz", "unknown key")


def test_many_problems_reported_together() -> None:
    data = base()
    data.update(name=None, trials="eight", serach={}, privacy={"epsilon": -1, "delta": 2})
    data["search"].update(prune_rate={"low": 0.5, "high": 1.5}, drop_rate=-0.1,
                          clip_norm={"low": 2.0, "high": 1.0}, epochs=3)
    data["dataset"]["foo"] = 1
    with pytest.raises(SpecError) as info:
        StudySpec.from_dict(data)
    problems = info.value.problems
    fields = sorted(p.split(":")[0] for p in problems)
    assert fields == sorted([
        "name", "trials", "serach", "privacy.epsilon", "privacy.delta",
        "search.prune_rate.high", "search.drop_rate", "search.clip_norm.low",
        "search.noise_multiplier", "dataset.foo"]), problems
    text = str(info.value)
    assert text.splitlines()[0] == "invalid study spec (10 problems):"
    assert len(text.splitlines()) == 11


def test_cross_checks_reported_with_other_problems() -> None:
    data = with_("scheduler.grace_budget", 4, with_("trials", 0))
    data["pruning"]["criterion"] = "snip"
    assert sorted(p.split(":")[0] for p in problems_of(data)) == [
        "pruning.criterion", "scheduler.grace_budget", "trials"]


def test_spec_error_single_header() -> None:
    err = SpecError(["x: bad (got 1)"])
    assert str(err) == "invalid study spec (1 problem):\n  - x: bad (got 1)"


def test_top_level_not_mapping() -> None:
    with pytest.raises(SpecError, match="must be a mapping"):
        StudySpec.from_dict([1, 2])


def test_load_spec_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(SpecError, match="study spec file not found") as info:
        load_spec(missing)
    assert str(missing) in info.value.problems[0]
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: x\nsearch: {clip_norm: [1,\ntrials: 3\n")
    with pytest.raises(SpecError, match=r"invalid YAML at line \d+"):
        load_spec(broken)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(SpecError, match="top level must be a mapping"):
        load_spec(listed)


def test_load_spec_reads_exponent_without_dot(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(QUICKSTART.read_text().replace("delta: 1.0e-5", "delta: 1e-5"))
    assert load_spec(path).privacy.delta == 1e-5


def test_param() -> None:
    assert Param(value=3).is_fixed() and Param(value=3).distribution_kind() == "fixed"
    assert Param(choices=(1, 2)).distribution_kind() == "categorical"
    assert Param(low=1, high=4).distribution_kind() == "float"
    assert Param(low=1, high=9, step=2).distribution_kind() == "int"
    assert Param(low=1.0, high=9.0, step=0.5).max_value() == 9.0
    with pytest.raises(ConfigError) as info:
        Param(value=1, low=0, high=2)
    assert "give exactly one of value" in info.value.problems[0]


def test_storage_and_results_paths() -> None:
    spec = StudySpec.from_dict(with_("results", "~/res", with_("storage", "file:///tmp/x")))
    assert spec.results_path == os.path.expanduser("~/res")
    assert spec.storage_path == "file:///tmp/x"


def _sampled(**over: Any) -> dict[str, Any]:
    sampled = {"prune_rate": 0.3, "drop_rate": 0.5, "clip_norm": 1.5,
               "noise_multiplier": 1.2, "learning_rate": 0.8}
    return {**sampled, **over}


def test_trial_config_accepted_by_trial_config() -> None:
    spec = StudySpec.from_dict(base())
    cfg = spec.trial_config(_sampled())
    trial = TrialConfig.from_dict(cfg)
    assert trial.pruning.rate == 0.3 and trial.dropping.rate == 0.5
    assert trial.optim.clip_norm == 1.5 and trial.optim.learning_rate == 0.8
    assert trial.optim.batch_size == 256 and trial.optim.max_epochs == 3
    assert trial.privacy.noise_multiplier == 1.2 and trial.privacy.epochs is None
    assert (trial.privacy.epsilon, trial.privacy.delta, trial.privacy.accountant) == (
        3.0, 1e-5, "prv")
    assert trial.pruning.criterion == "random" and trial.dataset.name == "mnist-5k"
    assert trial.seed == 0 and trial.device == "auto" and trial.optim.name == "sgd"
    assert trial.to_dict()["pruning"] == cfg["pruning"]
    assert TrialConfig.from_dict(spec.trial_config(_sampled(), seed=7)).seed == 7


def test_trial_config_with_epochs_and_categoricals() -> None:
    data = with_("search.epochs", {"low": 1.0, "high": 4.0},
                 with_("search.noise_multiplier", _DELETE))
    data["pruning"] = {"criterion": ["random", "magnitude"], "scope": ["global", "layerwise"]}
    data["optimizer"] = {"name": "adam"}
    spec = StudySpec.from_dict(data)
    params = _sampled(epochs=2.5, pruning_criterion="magnitude", pruning_scope="layerwise")
    del params["noise_multiplier"]
    trial = TrialConfig.from_dict(spec.trial_config(params))
    assert trial.privacy.epochs == 2.5 and trial.privacy.noise_multiplier is None
    assert trial.pruning.criterion == "magnitude" and trial.pruning.scope == "layerwise"
    assert trial.optim.name == "adam"
    assert set(spec.parameters()) == {
        "prune_rate", "drop_rate", "clip_norm", "epochs", "learning_rate", "batch_size",
        "max_epochs", "pruning_criterion", "pruning_scope", "pruning_granularity",
        "dropping_criterion"}


def test_trial_config_rejects_missing_and_unknown() -> None:
    spec = StudySpec.from_dict(base())
    params = _sampled()
    del params["clip_norm"]
    with pytest.raises(ValueError, match="clip_norm is searched"):
        spec.trial_config(params)
    with pytest.raises(ValueError, match="unknown trial parameters"):
        spec.trial_config(_sampled(epochs=3))


@pytest.fixture
def fake_data(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """A stand-in ``trainables.data`` with 4000 training examples and no GPU."""
    from trainables.errors import DataUnavailableError

    module = types.ModuleType("trainables.data")

    def dataset_size(config: Any, *, seed: int = 0) -> int:
        if config.name == "idx":
            raise DataUnavailableError("missing /data/train-images.idx")
        return 4000

    module.dataset_size = dataset_size
    monkeypatch.setitem(sys.modules, "trainables.data", module)
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return module


def test_check_against_data_delta(fake_data: types.ModuleType) -> None:
    check_against_data(load_spec(QUICKSTART))
    spec = StudySpec.from_dict(with_("privacy.delta", 1e-3))
    with pytest.raises(SpecError) as info:
        check_against_data(spec)
    assert info.value.problems == [
        "privacy.delta: must be < 1/n = 0.00025 for n = 4000 training examples (got 0.001)"]


def test_check_against_data_all_problems(fake_data: types.ModuleType) -> None:
    data = with_("privacy.delta", 1e-3, with_("resources_per_trial.gpu", 1))
    data["search"]["batch_size"] = {"low": 64, "high": 8192}
    with pytest.raises(SpecError) as info:
        check_against_data(StudySpec.from_dict(data))
    assert info.value.problems == [
        "privacy.delta: must be < 1/n = 0.00025 for n = 4000 training examples (got 0.001)",
        "search.batch_size.high: must be <= n = 4000 training examples (got 8192)",
        "resources_per_trial.gpu: requested 1 GPUs per trial but no GPU is available on this "
        "machine (got 1)",
    ]


def test_check_against_data_gpu(fake_data: types.ModuleType) -> None:
    spec = StudySpec.from_dict(with_("device", "cuda", with_("resources_per_trial.gpu", 0.5)))
    with pytest.raises(SpecError, match="requested 0.5 GPUs per trial but no GPU"):
        check_against_data(spec)
    check_against_data(spec, cluster=True)


def test_check_against_data_missing_files(fake_data: types.ModuleType) -> None:
    data = with_("dataset", {"name": "idx", "train_images": "/data/train-images.idx",
                             "train_labels": "/data/l.idx", "test_images": "/data/t.idx",
                             "test_labels": "/data/tl.idx"})
    with pytest.raises(SpecError) as info:
        check_against_data(StudySpec.from_dict(data))
    (problem,) = info.value.problems
    assert problem.startswith("dataset: ") and "missing /data/train-images.idx" in problem


def test_check_against_real_mnist_5k() -> None:
    """delta >= 1/n with the real mnist-5k: n = 3600 training examples by default (4000
    less the 10% validation split)."""
    pytest.importorskip("trainables.data")
    spec = StudySpec.from_dict(with_("privacy.delta", 1e-3))
    with pytest.raises(SpecError) as info:
        check_against_data(spec, cluster=True)
    assert info.value.problems == [
        "privacy.delta: must be < 1/n = 0.000278 for n = 3600 training examples (got 0.001)"]


def test_check_against_real_public_too_large() -> None:
    pytest.importorskip("trainables.data")
    spec = StudySpec.from_dict(with_("dataset.public", {"size": 4000}))
    with pytest.raises(SpecError) as info:
        check_against_data(spec, cluster=True)
    (problem,) = info.value.problems
    assert problem.startswith("dataset.public.size: must be smaller than the 3600")



def test_device_cpu_with_a_gpu_reserved_is_an_error() -> None:
    message = one_problem(with_("device", "cpu", with_("resources_per_trial.gpu", 0.5)),
                          "device", "cpu would leave the resources_per_trial.gpu = 0.5")
    assert "(got 'cpu')" in message
    spec = StudySpec.from_dict(with_("device", "auto", with_("resources_per_trial.gpu", 0.5)))
    assert spec.device == "auto"


def test_reproducible_noise_and_deterministic_reach_the_trial() -> None:
    def any_trial(spec: StudySpec) -> TrialConfig:
        params = {k: p[0] if isinstance(p, tuple) else next(
            v for v in (p.value, p.low, (p.choices or [None])[0]) if v is not None)
            for k, p in spec.parameters().items()}
        return TrialConfig.from_dict(spec.trial_config(params))

    spec = StudySpec.from_dict(with_("reproducible_noise", True, with_("deterministic", True)))
    trial = any_trial(spec)
    assert trial.reproducible_noise is True and trial.deterministic is True
    default = any_trial(StudySpec.from_dict(base()))
    assert default.reproducible_noise is False and default.deterministic is False
    one_problem(with_("reproducible_noise", "yes"), "reproducible_noise", "must be true or false")
