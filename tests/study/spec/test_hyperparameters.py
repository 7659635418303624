"""The one table of hyperparameters: every entry names a real place in the trial config,
and every module that lists hyperparameters reads the table."""

from __future__ import annotations

from study.privacy import release
from study.report import html as report
from study.report import plots
from study.spec import hyperparameters, params
from study.spec.hyperparameters import HYPERPARAMETERS
from study.storage.schema import TRIALS_SCHEMA
from trainables.config import TrialConfig


def test_every_hyperparameter_lives_in_the_trial_config() -> None:
    config = TrialConfig().to_dict()
    for h in HYPERPARAMETERS:
        assert h.key in config.get(h.section, {}), f"{h.section}.{h.key}"


def test_recorded_hyperparameters_are_trial_columns_read_from_the_config() -> None:
    config = TrialConfig().to_dict()
    config["optim"]["clip_norm"], config["pruning"]["criterion"] = 0.25, "magnitude"
    values = hyperparameters.recorded_values(config)
    assert values["clip_norm"] == 0.25 and values["pruning_criterion"] == "magnitude"
    assert set(values) <= set(TRIALS_SCHEMA.names)
    assert "max_epochs" not in values and "epochs" not in values  # results' epochs: trained


def test_the_modules_list_the_table() -> None:
    assert params.SEARCH_PARAMS == hyperparameters.names(searched=True)
    assert report.HYPERPARAMS == plots.SEARCHED_PARAMS == hyperparameters.names(reported=True)
    assert set(hyperparameters.names(reported=True)) <= set(release.CONFIG_KEYS)
    assert set(hyperparameters.names(criterion=True)) <= set(release.CONFIG_KEYS)
    assert hyperparameters.names(summarised=True) == (
        "prune_rate", "drop_rate", "clip_norm", "noise_multiplier", "learning_rate")
