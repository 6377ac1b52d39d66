"""xstars.remote against real loopback servers: redaction of SAS tokens, signing as a request."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from affine import Affine

from tests.loopback import TOKEN, Answer, range_answer, serve, token_answer
from xstars import remote
from xstars.errors import ServiceError
from xstars.remote import redact

REPO = Path(__file__).resolve().parents[1]
HTTP = {"max_retries": 2, "backoff_s": 0.01, "timeout_s": 10}


# ================================================================================= redaction


@pytest.mark.parametrize("text", [
    f"B04.tif?{TOKEN}, band 1: IReadBlock failed at X offset 0, Y offset 0: TIFFReadEncodedTile() failed.",
    f"<open DatasetReader name='http://127.0.0.1:8000/c/B04.tif?{TOKEN}' mode='r'>",
    f"`/vsicurl/https://a.blob.core.windows.net/c/B04.tif?{TOKEN}' not recognized",
    f"token answered: {TOKEN}",                                   # a bare token, no '?'
    "GDAL_HTTP: /c/B04.tif%3Fst%3D2024%26se%3D2099%26sig%3DSECRET",  # percent-encoded
    "c/B04.tif?se=2099-01-01&sig=SECRET",
])
def test_redact_removes_every_sas_query(text: str) -> None:
    assert "SECRET" not in redact(text)
    assert "<redacted>" in redact(text)


def test_redact_keeps_what_is_not_a_token() -> None:
    for text in ("search shard=0 group 1/2 g_0_0 sites=4 candidates=12", "file.tif?overview=2",
                 "bounds=(1, 2, 3, 4) gsd_m=1.0"):
        assert redact(text) == text


def cog_bytes(tmp_path: Path) -> bytes:
    from xstars.demo.render import write_cog

    path = tmp_path / "B04.tif"
    values = np.random.default_rng(0).integers(1, 10000, (1, 1024, 1024)).astype("uint16")
    write_cog(path, values, "EPSG:32631", Affine(10, 0, 500000, 0, -10, 4800000), nodata=0, blocksize=256)
    return path.read_bytes()


def test_a_block_read_failing_after_the_open_leaks_no_token_at_debug(tmp_path: Path, caplog, monkeypatch) -> None:
    """The file answers its header, then fails every later range: GDAL's IReadBlock error names
    the file with its query (no scheme), rasterio._base logs the signed name at DEBUG."""
    data = cog_bytes(tmp_path)
    monkeypatch.setenv("CPL_DEBUG", "ON")  # GDAL's own debug messages too, through rasterio's loggers
    caplog.set_level(logging.DEBUG)  # the root: every logger, child loggers included
    reads = {"n": 0}

    def answer(request) -> Answer:
        reads["n"] += request.method == "GET"
        return range_answer(data, request) if reads["n"] <= 1 else Answer(500, b"busy")

    grid = remote.Grid.from_bounds((501000, 4791000, 509000, 4799000), 10, "EPSG:32631")
    with serve(answer) as server:
        href = f"{server.url}/container/B04.tif?{TOKEN}"
        with pytest.raises(ServiceError) as failure:
            remote.read_source(href, grid, catalog_cfg={"signing": "none"}, http_cfg=HTTP, what="c/item/B04")
    messages = [record.getMessage() for record in caplog.records]
    assert any("IReadBlock failed" in m for m in messages), "the failing block read was logged"
    assert any("rasterio._base" == r.name for r in caplog.records)
    assert all(q.query == TOKEN for q in server.requests), "the token was sent to the server"
    assert "SECRET" not in str(failure.value)
    assert "SECRET" not in caplog.text and not any("SECRET" in m for m in messages)


def test_the_cli_error_line_is_redacted(tmp_path: Path) -> None:
    missing = tmp_path / f"manifest.parquet?{TOKEN}"
    result = subprocess.run(
        [sys.executable, "-m", "xstars", "--log-level", "DEBUG", "catalog", "freeze", "--config-json",
         json.dumps({"catalog": {"manifest": str(missing)}}), "--out", str(tmp_path / "m.parquet")],
        capture_output=True, text=True, cwd=REPO, check=False)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1].startswith(f"error: manifest {tmp_path}/manifest.parquet?<redacted>")
    assert "SECRET" not in result.stderr + result.stdout


# =================================================================================== signing

BLOB_HREF = "https://xstarstest.blob.core.windows.net/container/S2A_X/B04.tif"


def test_a_broken_token_answer_is_asked_again(token_endpoint) -> None:
    broken = token_answer()
    broken.truncate = True  # the connection drops in the middle of the JSON
    server = token_endpoint(broken, token_answer())
    signed = remote.sign_href(BLOB_HREF, "planetary_computer", http_cfg=HTTP, what="sentinel-2-l2a/S2A_X/B04")
    assert signed == f"{BLOB_HREF}?{TOKEN}"
    assert [r.path for r in server.requests] == ["/api/sas/v1/token/xstarstest/container"] * 2
    # The token is cached by the SDK: the next href of the container costs no request.
    remote.sign_href(BLOB_HREF.replace("B04", "B03"), "planetary_computer", http_cfg=HTTP, what="x")
    assert len(server.requests) == 2


@pytest.mark.parametrize(("answer", "requests_made", "detail"), [
    (Answer(503, b"busy"), 3, "too many 503 error responses"),         # urllib3's retries, then final
    (Answer(200, b'{"msft:expiry": "2099-01-01T00:00:00Z", "tok'), 3, "after 3 attempt(s)"),  # broken, asked again
    (Answer(403, b"bad subscription key"), 1, "HTTP 403"),                # refused: final at once
])
def test_a_token_request_that_keeps_failing_is_a_service_error(token_endpoint, answer, requests_made, detail) -> None:
    server = token_endpoint(answer)
    with pytest.raises(ServiceError) as failure:
        remote.sign_href(BLOB_HREF, "planetary_computer", http_cfg=HTTP, what="sentinel-2-l2a/S2A_X/B04")
    message = str(failure.value)
    assert message.startswith("signing sentinel-2-l2a/S2A_X/B04 (SAS token from http://127.0.0.1:")
    assert detail in message
    assert len(server.requests) == requests_made


def test_other_hosts_are_not_signed(token_endpoint) -> None:
    server = token_endpoint(token_answer())
    href = "https://sentinel-cogs.s3.us-west-2.amazonaws.com/B04.tif"
    assert remote.sign_href(href, "planetary_computer", http_cfg=HTTP, what="x") == href
    assert remote.sign_href(BLOB_HREF, "none", http_cfg=HTTP, what="x") == BLOB_HREF
    assert server.requests == []


def test_signing_is_retried_and_the_signed_href_read(token_endpoint, tmp_path: Path, monkeypatch) -> None:
    """A whole read of a blob-storage href: the SDK signs it (its token answer broken once),
    GDAL reads it signed (through a loopback proxy, as the blob host is not reachable here)."""
    data = cog_bytes(tmp_path)
    token_server = token_endpoint(Answer(200, b'{"msft:expiry": "2099-01-01T00:00:00Z", "tok'), token_answer())
    grid = remote.Grid.from_bounds((501000, 4791000, 509000, 4799000), 10, "EPSG:32631")
    with serve(lambda request: range_answer(data, request)) as blob:
        monkeypatch.setenv("GDAL_HTTP_PROXY", blob.proxy)
        source = remote.read_source(BLOB_HREF.replace("https:", "http:"), grid, catalog_cfg={"signing": "planetary_computer"},
                                    http_cfg=HTTP, what="sentinel-2-l2a/S2A_X/B04")
    assert source.data.shape == (1, 804, 804)
    assert len(token_server.requests) == 2
    assert blob.requests and all(r.query == TOKEN and r.path == "/container/S2A_X/B04.tif" for r in blob.requests)


def test_a_read_whose_signing_keeps_failing_is_a_service_error(token_endpoint, tmp_path: Path) -> None:
    token_server = token_endpoint(Answer(200, b"{}"))  # no token in the answer, every time
    grid = remote.Grid.from_bounds((501000, 4791000, 509000, 4799000), 10, "EPSG:32631")
    with pytest.raises(ServiceError, match=r"^signing sentinel-2-l2a/S2A_X/B04 \(SAS token from .*\) failed after 3"):
        remote.read_source(BLOB_HREF, grid, catalog_cfg={"signing": "planetary_computer"}, http_cfg=HTTP,
                           what="sentinel-2-l2a/S2A_X/B04")
    assert len(token_server.requests) == 3
