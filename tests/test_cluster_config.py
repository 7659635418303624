"""Offline checks of the Ray cluster launcher configs ``cluster.yaml`` (AWS) and
``cluster.local.yaml`` (on-prem ``local`` provider).

They use Ray's own validation: ``validate_config`` (the JSON schema shipped with Ray plus
its cross-field checks) and ``prepare_config`` (merge with the provider's ``defaults.yaml``,
setup-command merging, per-node-type worker bounds; for ``local`` also the single
``local.cluster.node`` type). For AWS, ``prepare_config`` only reads
``ray/autoscaler/aws/defaults.yaml``: the steps of ``ray up`` that call AWS (instance-type
resource detection, IAM/key pair/subnet/security group bootstrap) come after it, in
``commands._bootstrap_config``, and are not run here. The ``no_network`` fixture makes any
socket use fail, so a network call would fail these tests instead of going unnoticed.
"""

from __future__ import annotations

import copy
import importlib.metadata
import re
import socket
from pathlib import Path

import click
import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]
AWS = REPO / "cluster.yaml"
LOCAL = REPO / "cluster.local.yaml"
TOKEN = "~/.ray/auth_token"


def load(path: Path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to resolve or connect fails loudly."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def start_commands(config: dict) -> list[str]:
    return config["head_start_ray_commands"] + config["worker_start_ray_commands"]


def all_commands(config: dict) -> list[str]:
    keys = ("initialization_commands", "setup_commands", "head_setup_commands",
            "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
    return [cmd for key in keys for cmd in config.get(key) or []]


# --- both configs --------------------------------------------------------------------


@pytest.mark.parametrize("path", [AWS, LOCAL], ids=["aws", "local"])
def test_raw_config_passes_ray_validation(path):
    validate_config(load(path))


@pytest.mark.parametrize("path", [AWS, LOCAL], ids=["aws", "local"])
def test_prepare_config_works_offline(path, no_network):
    raw = load(path)
    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)  # what `ray up` checks after preparing
    assert prepared["head_node_type"] in prepared["available_node_types"]
    head = prepared["available_node_types"][prepared["head_node_type"]]
    assert head["max_workers"] == 0
    # setup_commands are ours, not the provider defaults' (e.g. a nightly Ray wheel)
    assert prepared["setup_commands"] == raw["setup_commands"]
    assert prepared["head_setup_commands"][: len(raw["setup_commands"])] == raw["setup_commands"]
    assert not any("ray-wheels" in cmd for cmd in all_commands(prepared))


@pytest.mark.parametrize("path", [AWS, LOCAL], ids=["aws", "local"])
def test_token_authentication_stays_on(path):
    text = path.read_text()
    config = load(path)
    assert "RAY_AUTH_MODE=disabled" not in text
    assert "RAY_AUTH_MODE=0" not in text
    ray_starts = [cmd for cmd in start_commands(config) if "ray start" in cmd]
    assert any("--head" in cmd for cmd in ray_starts)
    assert any("--address" in cmd for cmd in ray_starts)
    for cmd in ray_starts:
        assert "RAY_AUTH_MODE=token" in cmd, cmd
    mounts = config["file_mounts"]
    token_mounts = {remote: local for remote, local in mounts.items()
                    if remote.endswith(".ray/auth_token")}
    assert list(token_mounts.values()) == [TOKEN], mounts


@pytest.mark.parametrize("path", [AWS, LOCAL], ids=["aws", "local"])
def test_project_is_mounted_from_the_repository_root(path):
    mounts = load(path)["file_mounts"]
    project = [local for local in mounts.values() if local != TOKEN]
    assert project == ["."]
    assert (REPO / project[0] / "pyproject.toml").is_file()


# --- cluster.yaml (AWS) --------------------------------------------------------------


def test_aws_gpu_worker_types():
    config = load(AWS)
    assert config["provider"]["type"] == "aws"
    assert config["provider"]["cache_stopped_nodes"] is False
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "trials must not be scheduled on the head"
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    assert "gpu.g5.xlarge" in workers
    for name, node_type in workers.items():
        assert node_type["resources"].get("GPU", 0) >= 1, name
        assert node_type["resources"].get("CPU", 0) >= 1, name
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"], name
        node_config = node_type["node_config"]
        assert node_config["ImageId"] == head["node_config"]["ImageId"]
        assert "IamInstanceProfile" in node_config, f"{name}: workers write to S3"
        (volume,) = node_config["BlockDeviceMappings"]
        assert volume["Ebs"]["VolumeSize"] >= 200 and volume["Ebs"]["VolumeType"] == "gp3"


def test_aws_max_workers_covers_min_workers():
    config = load(AWS)
    types = config["available_node_types"].values()
    assert config["max_workers"] >= sum(t.get("min_workers", 0) for t in types)
    assert config["max_workers"] >= max(t.get("max_workers", 0) for t in types)


def test_aws_start_commands():
    config = load(AWS)
    (head,) = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    assert "--head" in head and "--port=6379" in head
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert "--dashboard-host=0.0.0.0" in head
    (worker,) = [c for c in config["worker_start_ray_commands"] if "ray start" in c]
    assert "--address=$RAY_HEAD_IP:6379" in worker
    assert config["file_mounts"]["/home/ubuntu/dpstudy"] == "."
    assert any('-e "/home/ubuntu/dpstudy"' in cmd for cmd in config["setup_commands"])


def test_aws_pins_match_this_environment():
    """The cluster runs the Ray (and torch) that the machine running `ray up` has."""
    setup = " ".join(load(AWS)["setup_commands"])
    for package, extra in (("ray", "[default,tune]"), ("torch", ""), ("torchvision", "")):
        version = importlib.metadata.version(package).split("+")[0]
        assert f'"{package}{extra}=={version}"' in setup, (package, version)


def test_aws_edit_markers():
    lines = AWS.read_text().splitlines()

    def marked(pattern: str) -> list[str]:
        hits = [line for line in lines if re.search(pattern, line)]
        assert hits, pattern
        return [line for line in hits if "# EDIT:" not in line]

    for pattern in (r"^\s+region:", r"^\s+availability_zone:", r"ImageId: &ami ami-",
                    r"InstanceType:", r"instance-profile/", r"^max_workers:",
                    r"s3://YOUR-BUCKET/"):
        assert marked(pattern) == [], pattern
    assert sum("YOUR-BUCKET" in line and "# EDIT:" in line for line in lines) >= 2


def test_aws_node_configs_are_valid_run_instances_parameters():
    """Ray passes node_config to EC2 RunInstances; check it against botocore's model."""
    botocore_session = pytest.importorskip("botocore.session", reason="boto3 not installed")
    from botocore.validate import validate_parameters

    model = botocore_session.get_session().get_service_model("ec2")
    shape = model.operation_model("RunInstances").input_shape
    for name, node_type in load(AWS)["available_node_types"].items():
        node_config = node_type["node_config"]
        validate_parameters(dict(node_config, MinCount=1, MaxCount=1), shape)
        assert node_config["InstanceType"] in shape.members["InstanceType"].enum, name


# --- cluster.local.yaml --------------------------------------------------------------


def test_local_config(no_network):
    config = load(LOCAL)
    assert config["provider"] == {"type": "local", "head_ip": "127.0.0.1", "worker_ips": []}
    assert set(config["auth"]) == {"ssh_user", "ssh_private_key"}
    (head,) = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0" in head
    assert "--dashboard-host=127.0.0.1" in head
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    prepared = prepare_config(copy.deepcopy(config))
    assert list(prepared["available_node_types"]) == ["local.cluster.node"]
    assert prepared["max_workers"] == 0


# --- the checks can fail -------------------------------------------------------------


@pytest.mark.parametrize("path", [AWS, LOCAL], ids=["aws", "local"])
def test_misspelled_top_level_key_is_rejected(path):
    config = load(path)
    config["available_node_type"] = config.pop("available_node_types", {})
    with pytest.raises(jsonschema.ValidationError, match="available_node_type"):
        validate_config(config)


def test_misspelled_node_type_key_is_rejected():
    config = load(AWS)
    gpu = config["available_node_types"]["gpu.g5.xlarge"]
    gpu["resource"] = gpu.pop("resources")
    with pytest.raises(jsonschema.ValidationError):
        validate_config(config)


def test_fractional_resources_are_rejected():
    config = load(AWS)
    config["available_node_types"]["gpu.g5.xlarge"]["resources"]["GPU"] = 0.5
    with pytest.raises(jsonschema.ValidationError):
        validate_config(config)


def test_min_workers_above_max_workers_is_rejected():
    config = load(AWS)
    config["available_node_types"]["gpu.g5.xlarge"]["min_workers"] = config["max_workers"] + 1
    with pytest.raises(ValueError, match="max_workers"):
        validate_config(config)


def test_local_without_worker_ips_is_rejected(no_network):
    config = load(LOCAL)
    del config["provider"]["worker_ips"]
    with pytest.raises(click.ClickException):
        prepare_config(config)
