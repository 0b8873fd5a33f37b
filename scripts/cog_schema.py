"""Write (or --check) .cog/openapi_schema.json, the OpenAPI schema `cog build` bakes into the image.

    python scripts/cog_schema.py           # write .cog/openapi_schema.json
    python scripts/cog_schema.py --check   # exit 1 if the committed file is stale

coglet (Cog's HTTP server) reads this file at start-up: without it no input is validated and SSE
streaming is refused. Without Docker nobody runs `cog build`, so the project writes it itself, from
the same signatures the server calls: the refs in cog.yaml (`run:`/`predict:` and `train:`) are
inspected with the Cog SDK's own helpers (`cog._inspector`, `cog._adt`) and laid out as Cog's
`pkg/schema/openapi_spec.go` does: one OpenAPI 3.0.2 document per mode (Input/Output,
PredictionRequest/Response, /predictions; TrainingInput/TrainingOutput, TrainingRequest/Response,
/trainings), merged into one file with the predict document as the base, keys sorted, 2-space
indent (Go's json.MarshalIndent of the merged map). Output is deterministic.

`x-cog-streaming: true` is set on POST /predictions when the run/predict method is decorated with
`@cog.streaming`, as `cog build` decides it (the decorator is a no-op at run time, so it is read
from the source).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_PATH = Path(".cog") / "openapi_schema.json"

_VALIDATION_ERROR_REF = {"$ref": "#/components/schemas/HTTPValidationError"}


def read_refs(root: Path = ROOT) -> tuple[str | None, str | None]:
    """(predict ref, train ref) from cog.yaml, e.g. ("predict.py:Predictor", "train.py:train")."""
    import yaml

    config = yaml.safe_load((root / "cog.yaml").read_text()) or {}
    return config.get("run") or config.get("predict"), config.get("train")


def _title(name: str) -> str:
    """Go's TitleCase: split on '_', upper-case each part's first letter, join with spaces."""
    return " ".join(part[:1].upper() + part[1:] for part in name.split("_"))


def _number(value: float, integer: bool):
    return int(value) if integer and float(value).is_integer() else value


def _default_json(field) -> tuple[bool, Any]:
    """(has a default, its JSON value); a None default on a non-optional input is no default."""
    from cog import _adt

    default = field.default
    if isinstance(default, dataclasses.Field):  # Input(default_factory=...): no static default
        return False, None
    if default is None:
        return False, None
    if field.type.repetition in (_adt.Repetition.REPEATED, _adt.Repetition.OPTIONAL_REPEATED):
        return True, [field.type.primitive.json_encode(v) for v in default]
    return True, field.type.primitive.json_encode(default)


def _input_schema(inputs: dict, title: str) -> tuple[dict, dict]:
    """The Input (or TrainingInput) component and the enum components of inputs with choices."""
    from cog import _adt

    properties, required, enums = {}, [], {}
    for name, field in sorted(inputs.items(), key=lambda item: item[1].order):
        prop: dict[str, Any] = {"x-order": field.order}
        integer = field.type.primitive is _adt.PrimitiveType.INTEGER
        if field.choices:
            enum_type = field.type.primitive.json_type().get("type") or "string"
            enums[name] = {"title": name, "description": "An enumeration.",
                           "enum": list(field.choices), "type": enum_type}
            prop["allOf"] = [{"$ref": f"#/components/schemas/{name}"}]
        else:
            prop["title"] = _title(name)
            prop.update(field.type.json_type())
        nullable = field.type.repetition in (_adt.Repetition.OPTIONAL, _adt.Repetition.OPTIONAL_REPEATED)
        has_default, default = _default_json(field)
        if not has_default and field.type.repetition in (_adt.Repetition.REQUIRED, _adt.Repetition.REPEATED):
            required.append(name)
        if has_default:
            prop["default"] = default
        if nullable:
            prop["nullable"] = True
        if field.description is not None:
            prop["description"] = field.description
        if field.ge is not None:
            prop["minimum"] = _number(field.ge, integer)
        if field.le is not None:
            prop["maximum"] = _number(field.le, integer)
        if field.min_length is not None:
            prop["minLength"] = field.min_length
        if field.max_length is not None:
            prop["maxLength"] = field.max_length
        if field.regex is not None:
            prop["pattern"] = field.regex
        if field.deprecated:
            prop["deprecated"] = True
        properties[name] = prop
    schema = {"title": title, "type": "object", "properties": properties}
    if required:
        schema["required"] = required
    return schema, enums


def _supports_streaming(root: Path, ref: str) -> bool:
    """True when the ref's run()/predict() carries @streaming / @cog.streaming (read from source)."""
    file_name, object_name = ref.split(":", 1)
    tree = ast.parse((root / file_name).read_text())
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == object_name:
            functions = [n for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                         and n.name in ("run", "predict")]
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == object_name:
            functions = [node]
        else:
            continue
        for function in functions:
            for decorator in function.decorator_list:
                target = decorator.func if isinstance(decorator, ast.Call) else decorator
                if ast.unparse(target) in ("streaming", "cog.streaming"):
                    return True
    return False


def _cancel_path(kind: str, param: str) -> dict:
    return {"post": {
        "summary": "Cancel",
        "operationId": f"cancel_{kind}__{param}__cancel_post",
        "parameters": [{"required": True, "schema": {"title": _title(param), "type": "string"},
                        "name": param, "in": "path"}],
        "responses": {
            "200": {"description": "Successful Response", "content": {"application/json": {"schema": {}}}},
            "422": {"description": "Validation Error",
                    "content": {"application/json": {"schema": _VALIDATION_ERROR_REF}}},
        },
    }}


def mode_schema(info, train: bool, streaming: bool, version: str) -> dict:
    """One mode's OpenAPI document, as Cog's buildOpenAPISpec lays it out."""
    if train:
        endpoint, request, response = "/trainings", "TrainingRequest", "TrainingResponse"
        input_key, output_key, kind, param = "TrainingInput", "TrainingOutput", "trainings", "training_id"
        summary, description, operation_id = "Train", "Run a single training on the model", "train_trainings_post"
    else:
        endpoint, request, response = "/predictions", "PredictionRequest", "PredictionResponse"
        input_key, output_key, kind, param = "Input", "Output", "predictions", "prediction_id"
        summary, description, operation_id = ("Predict", "Run a single prediction on the model",
                                              "predict_predictions_post")
    input_schema, enums = _input_schema(info.inputs, input_key)
    input_ref = {"$ref": f"#/components/schemas/{input_key}"}
    timestamp = {"type": "string", "format": "date-time"}
    components = {
        input_key: input_schema,
        output_key: info.output.json_type(),  # titled "Output" in both modes, as Cog does
        **enums,
        # coglet refuses a body without "input" (422) when any input is required; say so, so that
        # clients and schema-driven testers (schemathesis) send what the server accepts
        request: {"title": request, "type": "object",
                  "properties": {"id": {"title": "Id", "type": "string"}, "input": input_ref},
                  **({"required": ["input"]} if input_schema.get("required") else {})},
        response: {"title": response, "type": "object", "properties": {
            "input": input_ref,
            "output": {"$ref": f"#/components/schemas/{output_key}"},
            "id": {"title": "Id", "type": "string"},
            "version": {"title": "Version", "type": "string"},
            "created_at": {"title": "Created At", **timestamp},
            "started_at": {"title": "Started At", **timestamp},
            "completed_at": {"title": "Completed At", **timestamp},
            "status": {"title": "Status", "type": "string"},
            "error": {"title": "Error", "type": "string"},
            "logs": {"title": "Logs", "type": "string"},
            "metrics": {"title": "Metrics", "type": "object"},
        }},
        "Status": {"title": "Status", "description": "An enumeration.",
                   "enum": ["starting", "processing", "succeeded", "canceled", "failed"], "type": "string"},
        "HTTPValidationError": {"title": "HTTPValidationError", "type": "object", "properties": {
            "detail": {"title": "Detail", "type": "array",
                       "items": {"$ref": "#/components/schemas/ValidationError"}}}},
        "ValidationError": {"title": "ValidationError", "required": ["loc", "msg", "type"], "type": "object",
                            "properties": {
                                "loc": {"title": "Location", "type": "array",
                                        "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
                                "msg": {"title": "Message", "type": "string"},
                                "type": {"title": "Error Type", "type": "string"}}},
    }
    plain_ok = {"200": {"description": "Successful Response", "content": {"application/json": {"schema": {}}}}}
    operation = {
        "summary": summary, "description": description, "operationId": operation_id,
        "requestBody": {**({"required": True} if input_schema.get("required") else {}),
                        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{request}"}}}},
        "responses": {
            "200": {"description": "Successful Response",
                    "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{response}"}}}},
            "422": {"description": "Validation Error",
                    "content": {"application/json": {"schema": _VALIDATION_ERROR_REF}}},
        },
    }
    if streaming and not train:
        operation["x-cog-streaming"] = True
    paths = {
        "/": {"get": {"summary": "Root", "operationId": "root__get", "responses": plain_ok}},
        "/health-check": {"get": {"summary": "Healthcheck", "operationId": "healthcheck_health_check_get",
                                  "responses": plain_ok}},
        endpoint: {"post": operation},
        f"/{kind}/{{{param}}}/cancel": _cancel_path(kind, param),
    }
    document = {"openapi": "3.0.2", "info": {"title": "Cog", "version": version}, "paths": paths,
                "components": {"schemas": components}}
    _remove_title_next_to_ref(document)
    return json.loads(json.dumps(document))  # fresh copies: no shared sub-dicts between modes


def _remove_title_next_to_ref(value) -> None:
    """OpenAPI 3.0 allows no sibling keywords next to $ref (Cog's removeTitleNextToRef)."""
    if isinstance(value, dict):
        if "$ref" in value:
            value.pop("title", None)
        for child in value.values():
            _remove_title_next_to_ref(child)
    elif isinstance(value, list):
        for child in value:
            _remove_title_next_to_ref(child)


def merge(predict: dict, train: dict) -> dict:
    """Cog's MergeSchemas: the predict document plus the train document's new paths and components."""
    for key, value in train["paths"].items():
        predict["paths"].setdefault(key, value)
    for key, value in train["components"]["schemas"].items():
        predict["components"]["schemas"].setdefault(key, value)
    return predict


def inspect_ref(root: Path, ref: str):
    """cog._inspector's PredictorInfo for "file.py:Name" (imports the module from root)."""
    import warnings

    from cog import _inspector

    file_name, object_name = ref.split(":", 1)
    module_name = re.sub(r"\.py$", "", file_name).replace("/", ".")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    with warnings.catch_warnings():  # BasePredictor/predict() deprecation notices
        warnings.simplefilter("ignore", DeprecationWarning)
        return _inspector.create_predictor(module_name, object_name)


def build_schema(root: Path = ROOT, predict_ref: str | None = None, train_ref: str | None = None) -> dict:
    """The combined document for the refs (default: those in cog.yaml)."""
    import cog

    if predict_ref is None and train_ref is None:
        predict_ref, train_ref = read_refs(root)
    if not predict_ref and not train_ref:
        raise ValueError("cog.yaml names neither a predictor (run:/predict:) nor a trainer (train:)")
    documents = []
    if predict_ref:
        documents.append(mode_schema(inspect_ref(root, predict_ref), train=False,
                                     streaming=_supports_streaming(root, predict_ref), version=cog.__version__))
    if train_ref:
        documents.append(mode_schema(inspect_ref(root, train_ref), train=True, streaming=False,
                                     version=cog.__version__))
    return merge(*documents) if len(documents) == 2 else documents[0]


def render(schema: dict) -> str:
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_schema(root: Path = ROOT, target: Path | None = None) -> Path:
    """Write the schema (default: root/.cog/openapi_schema.json) if its content changed."""
    target = target or root / SCHEMA_PATH
    text = render(build_schema(root))
    if not target.is_file() or target.read_text() != text:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=inspect.cleandoc(__doc__ or "").splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the written file is stale")
    parser.add_argument("--root", type=Path, default=ROOT, help="model directory (with cog.yaml)")
    args = parser.parse_args(argv)
    target = args.root / SCHEMA_PATH
    if args.check:
        expected = render(build_schema(args.root))
        if not target.is_file() or target.read_text() != expected:
            print(f"{target} is stale: run python scripts/cog_schema.py", file=sys.stderr)
            return 1
        print(f"{target} is up to date")
        return 0
    print(write_schema(args.root))
    return 0


if __name__ == "__main__":
    sys.exit(main())
