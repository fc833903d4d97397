"""Every shipped config and prefect.yaml load and validate: a typo must fail here, not at 2 a.m."""

from pathlib import Path

import typing

import pytest
import yaml

from doctune.model_settings import EvalSettings, load_train_settings
from doctune.settings import BuildSettings

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_train_configs_validate(path):
    load_train_settings(path)


def test_prefect_yaml_deployments_point_at_flows_with_valid_parameters():
    import importlib

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    names = {d["name"] for d in spec["deployments"]}
    assert names == {"nightly", "build-dataset", "train", "evaluate"}
    for d in spec["deployments"]:
        path, func = d["entrypoint"].split(":")
        module = path.removesuffix(".py").replace("/", ".")
        flow = getattr(importlib.import_module(module), func)
        params = d.get("parameters", {})
        assert set(params) <= set(flow.parameters.properties), (d["name"], params)
        if "settings" in params:  # validated against the flow's own settings model
            typing.get_type_hints(flow.fn)["settings"].model_validate(params["settings"])
        assert d["work_pool"]["name"] in {"cpu", "gpu"}
    pools = {d["name"]: d["work_pool"]["name"] for d in spec["deployments"]}
    assert pools["train"] == pools["evaluate"] == "gpu"
    nightly = next(d for d in spec["deployments"] if d["name"] == "nightly")
    assert nightly["schedules"] == [{"cron": "0 2 * * *", "timezone": "UTC", "active": True}]


def test_settings_reject_unknown_keys_naming_them():
    with pytest.raises(ValueError, match="chunk_size"):
        BuildSettings.model_validate({"chunk": {"chunk_size": 100}})
    with pytest.raises(ValueError, match="promotion_margn"):
        EvalSettings.model_validate({"promotion_margn": 0.1})


def test_kubernetes_and_docker_variants_match_the_root_deployments():
    """deploy/: the same four deployments with the gpu pool swapped (structure only: no cluster here)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, str(ROOT / "deploy" / "check_variants.py")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "variants: OK" in done.stdout, done.stdout + done.stderr


def test_every_field_of_the_nightly_run_form_has_its_default_in_the_schema():
    """The Prefect UI fills a deployment's run form from the parameter schema: a field without a
    default there (a default_factory list) is drawn empty, and submitting the form would send it empty."""
    from flows.nightly import nightly

    schema = nightly.parameters.model_dump()
    missing = []
    for name, model in schema["definitions"].items():
        for field, spec in model.get("properties", {}).items():
            nested = "$ref" in spec or any("$ref" in s for s in spec.get("allOf", []) + spec.get("anyOf", []))
            if "default" not in spec and not nested:
                missing.append(f"{name}.{field}")
    assert not missing, missing
    ingest = schema["definitions"]["IngestSettings"]["properties"]["exclude"]
    assert ingest["default"] == ["gold/**", "**/.*", "**/~$*"]
