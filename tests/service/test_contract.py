"""The API contract: whatever a client sends, the server answers what its own OpenAPI schema says.

A bounded schemathesis run (its CLI, in this process, fixed seed, one worker) against a real
``unet-tile serve``: every operation, the uploads included, through the coverage, fuzzing and
stateful phases (the stateful one follows the links from ``POST /jobs`` to the job's status,
result and cancel), checked for no 5xx, documented status codes, content types, headers and
bodies, and for refusing what the schema does not allow. Bodies sent as ``image/tiff`` are
real small TIFFs, so the 200/202 paths are exercised too; the other upload forms get
schemathesis's own bytes, which the server must refuse with a documented 400/415. Fast tests
hold every error status of every operation to the one JSON body ``{"detail": string}``.

(schemathesis's pytest loader, ``schemathesis.pytest.from_fixture``, needs a pytest node's
``_nodeid``, which pytest 9.2 no longer has; the CLI is its stable interface.)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import schemathesis
from click.testing import CliRunner
from hypothesis import strategies as st
from schemathesis.cli import schemathesis as schemathesis_cli

from service.app import create_app
from service.routes.docs import service_openapi
from service.settings import Settings
from tests.service.conftest import Server, tiff_bytes

SEED = 20240611
# negative_data_rejection passes honestly: the app refuses every schema-violating request with a 4xx;
# positive_data_acceptance cannot (most valid-by-schema bytes are not a TIFF), nor use_after_free (DELETE of
# a queued job cancels it and the job stays visible, by design).
CHECKS = (
    "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,"
    "response_headers_conformance,negative_data_rejection"
)


@st.composite
def small_tiffs(draw: st.DrawFn) -> bytes:
    """A real TIFF the server segments in milliseconds (2-D or a 2-plane stack, three dtypes), or one cut short."""
    shape = (draw(st.integers(1, 40)), draw(st.integers(1, 40)))
    planes = draw(st.sampled_from([(), (2,)]))
    dtype = draw(st.sampled_from([np.uint8, np.uint16, np.float32]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    data = tiff_bytes((rng.random(planes + shape) * 200).astype(dtype), photometric="minisblack")
    if draw(st.integers(0, 4)) == 0:  # truncated: /segment refuses it (400), a job fails with a clear error
        return data[: draw(st.integers(8, len(data) - 1))]
    return data


# the documented way to give a binary media type real content (global; only this module uses schemathesis)
schemathesis.openapi.media_type("image/tiff", small_tiffs())


def run_schemathesis(
    server: Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, *args: str, checks: str = CHECKS
) -> tuple[int, str]:
    """``st run`` against ``server``; its files (crash cache) go to ``tmp_path``, no hypothesis database."""
    monkeypatch.chdir(tmp_path)  # no schemathesis.toml picked up from the checkout, nothing written to it
    monkeypatch.setenv("NO_COLOR", "1")  # what --no-color would set for the rest of the process
    argv = ["run", server.url + "/openapi.json", "--checks", checks, "--seed", str(SEED), "--workers", "1"]
    argv += ["--generation-database", "none", "--request-timeout", "60", *args]
    # every route: unfiltered, schemathesis leaves out the one it loaded the schema from
    argv += ["--include-path-regex", "^/"]
    result = CliRunner().invoke(schemathesis_cli, argv, catch_exceptions=False)
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def server(launch: Callable[..., Server], small_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Server:
    return launch(small_checkpoint, jobs_dir=str(tmp_path_factory.mktemp("contract-jobs")))


def _count_operations(server: Server, **kw: Any) -> int:
    return sum(len(item) for item in server.get("/openapi.json", **kw).json()["paths"].values())


@pytest.mark.slow
def test_every_operation_answers_as_its_schema_says(
    server: Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    code, out = run_schemathesis(
        server, monkeypatch, tmp_path, "--phases", "coverage,fuzzing,stateful", "--max-examples", "50"
    )
    assert code == 0, out
    assert f"Tested: {_count_operations(server)}" in out, out  # every operation, the uploads included
    links = re.search(r"API Links:\s+(\d+) covered", out)
    assert links is not None and int(links.group(1)) >= 3, out  # POST /jobs -> status, result, cancel


@pytest.mark.slow
def test_with_an_api_key_every_operation_still_answers_as_documented(
    launch: Callable[..., Server],
    small_checkpoint: Path,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """The 401s (missing, malformed, wrong key) and their WWW-Authenticate header, and that no route ignores it."""
    keyed = launch(small_checkpoint, api_key="contract-key", jobs_dir=str(tmp_path_factory.mktemp("contract-jobs")))
    auth = "Authorization: Bearer contract-key"
    code, out = run_schemathesis(
        keyed,
        monkeypatch,
        tmp_path,
        *("-H", auth, "--phases", "coverage,fuzzing", "--max-examples", "10"),
        checks=CHECKS + ",ignored_auth",
    )
    assert code == 0, out
    assert f"Tested: {_count_operations(keyed, headers={'Authorization': 'Bearer contract-key'})}" in out, out


def test_tile_size_enum_is_what_the_model_takes_and_the_422_stays_helpful(server: Server) -> None:
    spec = server.get("/openapi.json").json()
    sizes = server.get("/model").json()["tile_sizes"]
    for path in ("/segment", "/jobs"):
        (param,) = (p for p in spec["paths"][path]["post"]["parameters"] if p["name"] == "tile_size")
        assert param["schema"]["enum"] == sizes
    r = server.post("/segment?tile_size=389", content=tiff_bytes(np.zeros((8, 8), np.uint8)))
    assert r.status_code == 422 and "nearest valid" in r.json()["detail"]


def _schema(api_key: str | None) -> dict[str, Any]:
    app = create_app(Settings(api_key=api_key))
    return service_openapi(app, app.state.service)


def _operations(spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for path, item in spec["paths"].items():
        for method, op in item.items():
            yield f"{method.upper()} {path}", op


# what each route can answer; a status added to a route belongs here and in its responses=
DOCUMENTED = {
    "GET /healthz": {200, 503},
    "GET /readyz": {200, 503},
    "POST /segment": {200, 400, 401, 408, 413, 415, 422, 503, 504, 507},
    "GET /model": {200, 401, 503},
    "GET /metrics": {200, 401, 503},
    "GET /openapi.json": {200, 401, 503},
    "GET /docs": {200, 401, 503},
    "POST /jobs": {202, 400, 401, 408, 413, 415, 422, 503, 507},
    "GET /jobs/{job_id}": {200, 401, 404, 422, 503},
    "DELETE /jobs/{job_id}": {200, 202, 204, 401, 404, 422, 503, 507},
    "GET /jobs/{job_id}/result": {200, 401, 404, 409, 422, 503},
    "GET /jobs/{job_id}/table": {200, 401, 404, 409, 422, 503},
    "GET /jobs/{job_id}/geojson": {200, 401, 404, 409, 422, 503},
    "GET /jobs/{job_id}/preview": {200, 401, 404, 409, 422, 503},
    "GET /jobs/{job_id}/preview.png": {200, 401, 404, 409, 422, 503},
    "GET /jobs/{job_id}/tiles/{level}/{y}/{x}.png": {200, 401, 404, 409, 422, 503},
}


def test_every_error_status_documents_the_json_detail_body() -> None:
    spec = _schema("k")
    error = spec["components"]["schemas"]["ErrorDetail"]
    assert error["type"] == "object" and error["required"] == ["detail"]
    assert error["properties"]["detail"]["type"] == "string"
    assert "HTTPValidationError" not in spec["components"]["schemas"]  # FastAPI's 422 (detail an array) is not ours
    assert {name for name, _ in _operations(spec)} == set(DOCUMENTED)
    for name, op in _operations(spec):
        assert {int(s) for s in op["responses"]} == DOCUMENTED[name], name
        for status, response in op["responses"].items():
            if int(status) >= 400:
                assert response["content"] == {
                    "application/json": {"schema": {"$ref": "#/components/schemas/ErrorDetail"}}
                }, (name, status)
                assert response["description"], (name, status)
        assert "Retry-After" in op["responses"]["503"]["headers"], name
        if "401" in op["responses"]:
            assert "WWW-Authenticate" in op["responses"]["401"]["headers"], name
            assert op["security"] == [{"HTTPBearer": []}], name


def test_without_an_api_key_the_schema_asks_for_none() -> None:
    spec = _schema(None)
    assert "securitySchemes" not in spec.get("components", {})
    for name, op in _operations(spec):
        assert "security" not in op and "401" not in op["responses"], name
        assert {int(s) for s in op["responses"]} == DOCUMENTED[name] - {401}, name


def test_upload_routes_document_the_bodies_and_options_the_app_takes() -> None:
    spec = _schema(None)
    for path in ("/segment", "/jobs"):
        op = spec["paths"][path]["post"]
        body = op["requestBody"]
        assert body["required"] is True
        assert set(body["content"]) == {"image/tiff", "application/octet-stream", "multipart/form-data"}
        assert body["content"]["multipart/form-data"]["schema"]["required"] == ["file"]
        params = {p["name"]: p["schema"] for p in op["parameters"]}
        outputs = ["labels", "probabilities", "instances"] + (["table", "geojson"] if path == "/segment" else [])
        assert params["output"]["enum"] == outputs
        assert params["tile_size"]["type"] == "integer"
    assert {p["name"]: p["schema"].get("type") for p in spec["paths"]["/jobs"]["post"]["parameters"]}[
        "pyramid"
    ] == "boolean"
    assert spec["paths"]["/jobs"]["post"]["responses"]["202"]["headers"]["Location"]["required"] is True
    assert spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"] == {
        "text/plain": {"schema": {"type": "string"}}
    }
    segmented = set(spec["paths"]["/segment"]["post"]["responses"]["200"]["content"])
    assert segmented == {
        "image/tiff",
        "text/csv",
        "application/geo+json",
    }  # an image, or the instances' table or shapes
    for side, media in (("table", "text/csv"), ("geojson", "application/geo+json")):
        assert set(spec["paths"][f"/jobs/{{job_id}}/{side}"]["get"]["responses"]["200"]["content"]) == {media}
    result = spec["paths"]["/jobs/{job_id}/result"]["get"]["responses"]["200"]["content"]
    assert set(result) == {"image/tiff", "application/zip"}  # a TIFF, or with format=ome-zarr a zip of the store
