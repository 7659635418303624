"""``dpstudy schema``: the JSON Schema generated from the spec dataclasses."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from study.cli import main
from study.spec.model import SAMPLERS, StudySpec, load_spec
from study.spec.params import SEARCH_PARAMS
from study.spec.schema import spec_schema
from trainables.config import DATASETS, PRUNING_CRITERIA

EXAMPLES = sorted((Path(__file__).parents[3] / "examples").glob("*.yaml"))
GOOD = {"name": "s", "trials": 2, "privacy": {"epsilon": 3},
        "search": {"clip_norm": 1.0, "noise_multiplier": {"low": 0.8, "high": 2},
                   "learning_rate": 2.0, "batch_size": [128, 256]},
        "scheduler": "asha", "dataset": "mnist-5k",
        "pruning": {"criterion": ["random", "magnitude"]}, "loggers": ["mlflow"]}


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    schema = spec_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_cli_prints_the_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema"]) == 0
    assert json.loads(capsys.readouterr().out) == spec_schema()


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_validates(validator: jsonschema.Draft202012Validator,
                                 path: Path) -> None:
    errors = [e.message for e in validator.iter_errors(yaml.safe_load(path.read_text()))]
    assert errors == []


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_is_a_valid_study(path: Path) -> None:
    """Beyond the JSON Schema: the cross-field rules too (e.g. no selection on test)."""
    spec = load_spec(str(path))
    assert spec.name == yaml.safe_load(path.read_text())["name"]


def test_generated_from_the_dataclasses() -> None:
    schema = spec_schema()
    fields = [f for f in StudySpec.model_fields if f != "selection"]
    assert list(schema["properties"]) == fields  # selection is search.mode/search.trials
    assert schema["required"] == ["name", "privacy", "search"]  # trials: unless private
    assert schema["then"] == {"required": ["trials"]}
    sampler = schema["properties"]["sampler"]["anyOf"]  # None: tpe, or random when private
    assert sampler[0]["enum"] == list(SAMPLERS) and sampler[1] == {"type": "null"}
    assert schema["$defs"]["DataConfig"]["properties"]["name"]["enum"] == list(DATASETS)
    criterion = schema["$defs"]["PruningSpec"]["properties"]["criterion"]["anyOf"][0]
    assert criterion["enum"] == list(PRUNING_CRITERIA)
    assert list(schema["$defs"]["SearchSpec"]["properties"]) == [*SEARCH_PARAMS, "mode",
                                                                 "trials"]
    assert schema["$defs"]["SearchSpec"]["required"] == ["batch_size", "clip_norm",
                                                         "learning_rate"]


def test_short_forms_validate_and_load(validator: jsonschema.Draft202012Validator,
                                       tmp_path: Path) -> None:
    assert [e.message for e in validator.iter_errors(GOOD)] == []
    path = tmp_path / "good.yaml"
    path.write_text(yaml.safe_dump(GOOD))
    assert load_spec(path).scheduler.name == "asha"  # the parser accepts the same forms


BAD = {
    "unknown key": ({"sampeler": "tpe"}, "Additional properties"),
    "unknown sampler": ({"sampler": "bayes"}, "'bayes' is not one of"),
    "trials not an integer": ({"trials": "ten"}, "'ten' is not of type 'integer'"),
    "privacy missing": ({"privacy": None}, "'privacy' is a required property"),
    "param as a word": ({"search": {**GOOD["search"], "clip_norm": "big"}}, "'big' is not"),
    "range key typo": ({"search": {**GOOD["search"], "learning_rate": {"lo": 1, "high": 2}}},
                       "Additional properties"),
    "unknown criterion": ({"dropping": {"criterion": ["random", "largest"]}}, "'largest'"),
    "unknown scheduler": ({"scheduler": "hyperband"}, "'hyperband'"),
    "unknown logger": ({"loggers": ["wandb"]}, "'wandb' is not one of"),
}


@pytest.mark.parametrize("change", BAD.values(), ids=BAD.keys())
def test_bad_specs_do_not_validate(validator: jsonschema.Draft202012Validator,
                                   change: tuple[dict, str]) -> None:
    update, message = change
    spec = {k: v for k, v in {**GOOD, **update}.items() if v is not None}
    errors = list(validator.iter_errors(spec))  # None above: the key left out
    messages = [e.message for e in errors] + [c.message for e in errors for c in e.context]
    assert any(message in m for m in messages), messages


@pytest.mark.parametrize("argv", [["--help"], ["schema", "--help"], ["confirm", "--help"]])
def test_help_lists_the_schema_command(argv: list[str],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:  # a '%' in a help text once broke --help
        main(argv)
    assert exited.value.code == 0
    assert "schema" in capsys.readouterr().out or argv[0] == "confirm"
