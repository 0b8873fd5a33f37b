""".cog/openapi_schema.json (what coglet validates against) is generated and committed: stale fails.

Also checks the schema says what the settings say (one source of truth), and that cog.yaml holds
only what Cog 0.23's configuration accepts.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest
import yaml
from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))

import cog_schema  # noqa: E402

from alpaca_tune.settings import GenerateSettings, TrainSettings, fields_of  # noqa: E402


@pytest.fixture(scope="module")
def generated():
    return cog_schema.build_schema(ROOT)


def test_committed_schema_is_up_to_date(generated):
    committed = ROOT / ".cog" / "openapi_schema.json"
    assert committed.is_file(), "run: python scripts/cog_schema.py"
    assert committed.read_text() == cog_schema.render(generated), "stale: run python scripts/cog_schema.py"
    assert cog_schema.main(["--check"]) == 0


def test_layout_of_cog_build(generated):
    assert generated["openapi"] == "3.0.2" and generated["info"]["title"] == "Cog"
    assert set(generated["paths"]) == {"/", "/health-check", "/predictions", "/predictions/{prediction_id}/cancel",
                                       "/trainings", "/trainings/{training_id}/cancel"}
    predictions = generated["paths"]["/predictions"]["post"]
    assert predictions["x-cog-streaming"] is True  # SSE: predict() is @streaming
    assert "x-cog-streaming" not in generated["paths"]["/trainings"]["post"]
    schemas = generated["components"]["schemas"]
    assert predictions["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/PredictionRequest"}
    assert schemas["TrainingRequest"]["properties"]["input"] == {"$ref": "#/components/schemas/TrainingInput"}
    assert schemas["Output"] == {"title": "Output", "type": "array", "items": {"type": "string"},
                                 "x-cog-array-type": "iterator", "x-cog-array-display": "concatenate"}
    assert schemas["TrainingOutput"]["properties"]["weights"] == {"type": "string", "format": "uri",
                                                                 "title": "Weights"}
    assert schemas["TrainingOutput"]["required"] == ["weights"]


@pytest.mark.parametrize("key, settings_cls", [("Input", GenerateSettings), ("TrainingInput", TrainSettings)])
def test_inputs_match_the_settings(generated, key, settings_cls):
    schemas = generated["components"]["schemas"]
    schema = schemas[key]
    fields = fields_of(settings_cls, cog_only=True)
    assert list(schema["properties"]) == [f.name for f in fields]  # x-order: signature order
    assert schema["required"] == [f.name for f in fields if f.default is dataclasses.MISSING]
    for order, field in enumerate(fields):
        prop = schema["properties"][field.name]
        meta = field.metadata
        assert prop["x-order"] == order and prop["description"] == meta["help"]
        if field.default is not dataclasses.MISSING:
            assert prop["default"] == field.default and type(prop["default"]) is type(field.default)
        if meta["ge"] is not None:
            assert prop["minimum"] == meta["ge"] and prop["maximum"] == meta["le"]
        if meta["choices"]:
            assert prop["allOf"] == [{"$ref": f"#/components/schemas/{field.name}"}]
            assert schemas[field.name]["enum"] == meta["choices"]
        else:
            expected = {bool: "boolean", int: "integer", float: "number", str: "string"}[
                {"bool": bool, "int": int, "float": float, "str": str}[str(field.type)]]
            assert prop["type"] == expected
    if key == "TrainingInput":
        assert schema["properties"]["train_data"]["format"] == "uri"  # a file: data: URI or URL


def test_file_is_valid_json_with_sorted_keys():
    text = (ROOT / ".cog" / "openapi_schema.json").read_text()
    assert json.dumps(json.loads(text), indent=2, sort_keys=True, ensure_ascii=False) + "\n" == text


# Top-level and build keys of Cog's configuration schema (pkg/config/data/config_schema_v1.0.json).
COG_KEYS = {"build", "image", "model", "run", "predict", "train", "concurrency", "environment", "weights"}
BUILD_KEYS = {"cuda", "cudnn", "gpu", "python_version", "python_packages", "pre_install", "python_requirements",
              "system_packages", "sdk_version", "run"}


def test_cog_yaml_is_valid_for_cog_023():
    config = yaml.safe_load((ROOT / "cog.yaml").read_text())
    assert set(config) <= COG_KEYS and set(config["build"]) <= BUILD_KEYS
    assert "predict" not in config, "Cog 0.23 names the predictor ref run: (only one of run/predict)"
    assert config["run"] == "predict.py:Predictor" and config["train"] == "train.py:train"
    build = config["build"]
    assert build["gpu"] is True and isinstance(build["python_version"], str)
    assert not (build.get("python_packages") and build.get("python_requirements"))
    requirements = (ROOT / build["python_requirements"]).read_text().splitlines()
    pins = dict(line.split("==") for line in requirements if "==" in line and not line.startswith("#"))
    assert "torch" in pins and "transformers" in pins and "peft" in pins
    # Cog derives CUDA from torch only for the versions in its table; torch pinned past it needs cuda:
    assert build.get("cuda"), "pin build.cuda to the CUDA of the pinned torch wheel"
    assert build.get("sdk_version") == pins["cog"]  # Cog strips cog from requirements; pin it here
    for command in build.get("run") or []:
        assert isinstance(command, str) or "command" in command


def test_the_declared_concurrency_is_one_number():
    """cog.yaml, predict.py's @concurrent and scripts/serve.py's COG_MAX_CONCURRENCY agree."""
    import serve

    import predict
    from alpaca_tune.serving.limits import DEFAULT_CONCURRENCY

    config = yaml.safe_load((ROOT / "cog.yaml").read_text())
    assert config["concurrency"]["max"] == DEFAULT_CONCURRENCY == predict.CONCURRENCY
    assert predict.Predictor.predict.__cog_concurrent_max__ == DEFAULT_CONCURRENCY
    assert serve.server_env(base_env={})["COG_MAX_CONCURRENCY"] == str(DEFAULT_CONCURRENCY)
    assert serve.server_env(base_env={"COG_MAX_CONCURRENCY": "4"})["COG_MAX_CONCURRENCY"] == "4"
    assert "COG_MAX_CONCURRENCY" not in serve.server_env(train=True, base_env={"COG_MAX_CONCURRENCY": "4"})
