"""The Open Inference Protocol v2 over REST (KServe, Seldon MLServer, Triton): health, model metadata, readiness and
inference with named typed tensors, one per column, BYTES for ocean_proximity. docs/protocols.md shows each call.

Tensor data may come as JSON ("data") or, as tritonclient sends it by default, in the binary tensor data extension
(Triton's: an Inference-Header-Content-Length header, the JSON, then each tensor's raw bytes). Answers are JSON. The
values are checked exactly as /predict checks a record's fields; every problem names its tensor and element.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from names import CATEGORICAL_FEATURE, FEATURES, OPTIONAL_FEATURES, TARGET
from serving.app import Service
from serving.intake import parse_json, read_checked, refuse_json_beyond
from serving.model import RETRY_S, ServedModel
from serving.responses import count_problems, json_response, reported
from serving.schema import CheckedInput, InputProblem, InvalidInput, refuse_rows, to_arrays
from serving.tabular import column_records, finite_or_marked

PLATFORM = "mlflow_sklearn"
# The protocol's tensor types, as little-endian numpy types; BYTES is handled apart.
NUMBER_TYPES = {"UINT8": "<u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8", "INT8": "<i1", "INT16": "<i2",
                "INT32": "<i4", "INT64": "<i8", "FP16": "<f2", "FP32": "<f4", "FP64": "<f8"}
# An MLflow signature's column types, as tensor types.
# Room for what surrounds the values in an acceptable request: each tensor's name, datatype, shape and parameters, the
# id, parameters and outputs.
JSON_SLACK = 256
SIGNATURE_TYPES = {"double": "FP64", "float": "FP32", "long": "INT64", "integer": "INT32", "boolean": "BOOL",
                   "string": "BYTES", "binary": "BYTES"}


def v2_error(status: int, message: str) -> Response:
    headers = {"Retry-After": str(RETRY_S)} if status == 503 else None
    return json_response({"error": message}, status, headers)


def fault(where: str, message: str) -> InvalidInput:
    return InvalidInput([InputProblem(where, "body", message)])


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """The JSON request, and what follows it under the binary tensor data extension."""
    if header_length is None:
        return body, b""
    if not header_length.isdigit() or int(header_length) > len(body):
        raise fault("Inference-Header-Content-Length", f"must be the JSON's length in bytes, at most {len(body)}")
    return body[:int(header_length)], body[int(header_length):]


def tensor_columns(request: Any, binary: bytes, max_rows: int) -> dict[str, list[Any]]:
    """{"inputs": [tensors]} → {column: values}, each tensor's name, datatype, shape and size checked."""
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list) or not request["inputs"]:
        raise fault("inputs", "must be a non-empty list of tensors, one per column")
    columns: dict[str, list[Any]] = {}
    problems: list[InputProblem] = []
    offset = 0
    for tensor in request["inputs"]:
        name = tensor.get("name") if isinstance(tensor, dict) else None
        if type(name) is not str:
            raise fault("inputs", 'each tensor must be an object with a "name"')
        if name not in FEATURES:
            raise InvalidInput([InputProblem(name, "unknown", f"unknown tensor; the inputs are {', '.join(FEATURES)}")])
        values, offset = tensor_values(tensor, binary, offset, max_rows)
        if name in columns:
            problems.append(InputProblem(name, "body", "sent twice"))
        else:
            columns[name] = values
    if offset != len(binary):
        problems.append(InputProblem("body", "body",
                                     f"{len(binary) - offset} bytes of binary data belong to no tensor"))
    problems += [InputProblem(name, name, "is required") for name in FEATURES
                 if name not in columns and name not in OPTIONAL_FEATURES]
    if problems:
        raise InvalidInput(problems)
    sizes = {len(values) for values in columns.values()}
    if len(sizes) != 1:
        raise fault("inputs", f"every tensor must hold one value per record; found sizes {sorted(sizes)}")
    if not sizes.pop():
        raise fault("inputs", "the tensors hold no records")
    return columns


def tensor_values(tensor: dict[str, Any], binary: bytes, offset: int, max_rows: int) -> tuple[list[Any], int]:
    """One tensor's values as JSON values; and where the next tensor's binary data starts."""
    name, datatype, shape = tensor["name"], tensor.get("datatype"), tensor.get("shape")
    wanted = "BYTES" if name == CATEGORICAL_FEATURE else "FP64 (or another number type)"
    fits = datatype == "BYTES" if name == CATEGORICAL_FEATURE else type(datatype) is str and datatype in NUMBER_TYPES
    if not fits:
        raise fault(name, f"datatype {datatype!r} does not fit this column; send {wanted}")
    if not (isinstance(shape, list) and len(shape) in (1, 2) and all(type(n) is int and n >= 0 for n in shape)
            and shape[1:] in ([], [1])):
        raise fault(name, f"shape {shape!r} must be [records] or [records, 1]")
    size = shape[0]
    refuse_rows(size, max_rows)  # before any value is decoded
    parameters = tensor.get("parameters", {})
    if not isinstance(parameters, dict):
        raise fault(f"{name}.parameters", "must be an object")
    binary_size = parameters.get("binary_data_size")
    if binary_size is not None:
        if type(binary_size) is not int or not 0 <= binary_size <= len(binary) - offset:
            raise fault(name, f"binary_data_size {binary_size!r} runs past the end of the body")
        raw = binary[offset:offset + binary_size]
        if datatype == "BYTES":
            values = decode_strings(name, raw, size)
        else:
            values = decode_numbers(name, raw, str(datatype), size)
        offset += binary_size
    else:
        data = tensor.get("data")
        if not isinstance(data, list):
            raise fault(name, 'must hold "data" (a list) or binary data')
        values = [value[0] if isinstance(value, list) and len(value) == 1 else value for value in data]
    if len(values) != size:
        raise fault(name, f"holds {len(values)} values; its shape {shape} says {size}")
    return values, offset


def decode_numbers(name: str, raw: bytes, datatype: str, size: int) -> list[Any]:
    kind = np.dtype(NUMBER_TYPES[datatype])
    if len(raw) != size * kind.itemsize:
        raise fault(name, f"binary data of {len(raw)} bytes is not the {size} {datatype} of its shape")
    array = np.frombuffer(raw, kind)
    if array.dtype.kind in "iu":
        integers: list[int] = array.tolist()  # as JSON would hold them
        return integers
    return [finite_or_marked(value) for value in array.astype(float).tolist()]


def decode_strings(name: str, raw: bytes, size: int) -> list[str | bytes]:
    """BYTES in binary: each element a 4-byte little-endian length, then that many bytes (UTF-8 here). At most `size`
    elements are decoded: one more is the shape's mismatch."""
    values: list[str | bytes] = []
    at = 0
    while at < len(raw) and len(values) <= size:
        if at + 4 > len(raw) or at + 4 + (length := struct.unpack_from("<I", raw, at)[0]) > len(raw):
            raise fault(name, "binary BYTES data is cut short: each element is a 4-byte length, then its bytes")
        element = raw[at + 4:at + 4 + length]
        at += 4 + length
        try:
            values.append(element.decode("utf-8"))
        except UnicodeDecodeError:
            values.append(element)  # not a string: to_arrays names it
    return values


def read_infer(body: bytes, header_length: str | None, model_name: str, max_rows: int) -> CheckedInput:
    """An infer request → its checked records (intake.py's steps)."""
    head, binary = split_body(body, header_length)
    limit = max_rows * len(FEATURES) + JSON_SLACK  # a value per column per record, each in a list of one at most
    refuse_json_beyond(head, limit, limit, max_rows)
    request = parse_json(head, lenient=True)
    columns = tensor_columns(request, binary, max_rows)
    if not isinstance(request.get("id", ""), str):
        raise fault("id", "must be a string")
    if not isinstance(request.get("parameters", {}), dict):
        raise fault("parameters", "must be an object")
    outputs = request.get("outputs", [])
    if not isinstance(outputs, list):
        raise fault("outputs", "must be a list of the outputs wanted")
    for output in outputs:
        if not isinstance(output, dict) or output.get("name") != TARGET:
            raise fault("outputs", f"{model_name} has one output, {TARGET!r}")
    records = column_records(columns)
    numeric, codes = to_arrays(records, lambda row, field: f"{field}[{row}]")
    return CheckedInput(records, numeric, codes, client_id=request.get("id"))


class OpenInferenceProtocol:
    """The v2 REST endpoints, on the Service that answers /predict."""

    def __init__(self, service: Service) -> None:
        self.service = service

    async def live(self, request: Request) -> Response:
        return json_response({"live": True})

    async def ready(self, request: Request) -> Response:
        if self.service.keeper.current is None:
            return json_response({"ready": False}, 503, {"Retry-After": str(RETRY_S)})
        return json_response({"ready": True})

    async def server_metadata(self, request: Request) -> Response:
        return json_response({"name": "housing-mlops", "version": "1", "extensions": ["binary_tensor_data"]})

    def _model(self, request: Request) -> ServedModel | Response:
        """The served model if the path names it (and its version, if any); else the answer to send."""
        model = self.service.keeper.current
        name, version = request.path_params["name"], request.path_params.get("version")
        if name != self.service.settings.model_name:
            return v2_error(404, f"unknown model {name!r}; this server serves {self.service.settings.model_name!r}")
        if model is None:
            return v2_error(503, "no model loaded yet")
        if version is not None and version != model.ref.version:
            return v2_error(404, f"version {version!r} of {name!r} is not served; version {model.ref.version} is")
        return model

    async def model_metadata(self, request: Request) -> Response:
        model = self._model(request)
        if isinstance(model, Response):
            return model
        signature = model.signature
        inputs = signature.inputs.inputs if signature else []
        outputs = signature.outputs.inputs if signature and signature.outputs else []
        return json_response({
            "name": model.name,
            "versions": [model.ref.version] if model.ref.version else [],
            "platform": PLATFORM,
            "inputs": [tensor_metadata(column) for column in inputs],
            "outputs": [tensor_metadata(column) for column in outputs],
        })

    async def model_ready(self, request: Request) -> Response:
        model = self._model(request)
        return model if isinstance(model, Response) else json_response({"name": model.name, "ready": True})

    async def infer(self, request: Request) -> Response:
        service = self.service
        model = self._model(request)  # another model's name is a 404 whatever the body holds
        if isinstance(model, Response):
            return model
        header_length = request.headers.get("inference-header-content-length")
        settings = service.settings
        try:
            # Any Content-Type: the protocol names none, and tritonclient sends none.
            checked = await read_checked(request, settings, service.parsers, (), lambda body, _: read_infer(
                body, header_length, settings.model_name, settings.max_batch_rows))
        except HTTPException as refused:
            return v2_error(refused.status_code, refused.detail)
        except InvalidInput as invalid:
            count_problems(invalid.problems)
            shown = "; ".join(f"{problem['path']}: {problem['message']}" for problem in reported(invalid))
            return v2_error(400, f"{len(invalid.problems)} problem(s) in the request: {shown}")
        scored = await service.score(request, model, checked)
        answer: dict[str, Any] = {"model_name": model.name, "model_version": model.ref.version or "",
                                  "outputs": [{"name": TARGET, "datatype": "FP64", "shape": [len(scored.values)],
                                               "data": scored.values}]}
        if checked.client_id is not None:
            answer["id"] = checked.client_id
        return json_response(answer, headers={"X-Request-ID": scored.request_id})


def tensor_metadata(column: Any) -> dict[str, Any]:
    """An MLflow ColSpec as the protocol describes a tensor: one value per record."""
    return {"name": column.name, "datatype": SIGNATURE_TYPES.get(column.type.name, "BYTES"), "shape": [-1]}
