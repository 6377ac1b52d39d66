"""SAS tokens against the demo gateway: its token endpoint and its fake Azure blob storage, read by
the pipeline's real signing path (the Planetary Computer SDK's get_token and sign, its cache,
re-signing on 403) and GDAL through the gateway as a proxy. Nothing is mocked."""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import requests

from tests.conftest import free_port
from tests.test_catalog import build_manifest, small_world_config
from xstars import acquire, remote, store
from xstars.demo import control, layout
from xstars.demo.gateway import GatewayServer, GatewayState
from xstars.demo.tokens import TokenIssuer
from xstars.errors import ServiceError
from xstars.manifest import Manifest

ACCOUNT, CONTAINER = layout.BLOB_CONTAINERS["sentinel-2-l2a"]


@pytest.fixture
def gateway(demo_server: control.ServerInfo):
    """The session's gateway, faults off, counters reset, the SDK's settings and token cache fresh."""
    from planetary_computer import sas
    from planetary_computer.settings import Settings

    control.set_faults(demo_server, {})
    control.reset_stats(demo_server)
    Settings.get.cache_clear()
    sas.TOKEN_CACHE.clear()
    yield demo_server
    control.set_faults(demo_server, {})
    Settings.get.cache_clear()
    sas.TOKEN_CACHE.clear()


@pytest.fixture(scope="module")
def world(demo_root: Path, demo_server: control.ServerInfo, tmp_path_factory) -> dict:
    """The small world's config and a manifest of it (its catalog stage read the masks signed)."""
    control.set_faults(demo_server, {})
    config = small_world_config(demo_root, demo_server, build={"samples_per_shard": 3, "margin_m": 240})
    path = tmp_path_factory.mktemp("tokens") / "manifest.parquet"
    build_manifest(config, path)
    return {"config": config, "manifest": Manifest(path), "path": path}


def some_asset(world: dict, sensor: str = "s2", key: str = "B04") -> tuple[dict, str, remote.Grid]:
    """A chosen item of the manifest, the href of its asset ``key`` and its first site's grid."""
    frame = world["manifest"].frame()
    row = frame[(frame.status == "ok") & (frame.sensor == sensor)].iloc[0]
    item = world["manifest"].items(sensor).get([row.item_id])[row.item_id]
    return item, item["assets"][key]["href"], acquire.site_grid(row.geometry.bounds, 10, "EPSG:2154")


# ------------------------------------------------------------------------------ the tokens


def test_a_token_opens_its_container_until_it_expires() -> None:
    issuer = TokenIssuer(ttl_s=600, secret=b"k" * 32)
    now = datetime(2026, 12, 2, 13, 0, tzinfo=UTC)
    answer = issuer.issue(ACCOUNT, CONTAINER, now=now)
    assert answer["msft:expiry"] == "2026-12-02T13:10:00Z"
    fields = dict(part.split("=", 1) for part in answer["token"].split("&"))
    assert set(fields) == {"st", "se", "sp", "sv", "sr", "skoid", "sig"} and fields["sr"] == "c"
    token = answer["token"]
    assert issuer.check(ACCOUNT, CONTAINER, token, now=now + timedelta(seconds=599)) is None
    assert "time frame" in issuer.check(ACCOUNT, CONTAINER, token, now=now + timedelta(seconds=600))
    assert issuer.check(ACCOUNT, "other", token, now=now) == "Signature did not match."
    assert "missing" in issuer.check(ACCOUNT, CONTAINER, "", now=now)
    forged = token.replace("se=2026-12-02T13%3A10", "se=2027-12-02T13%3A10")
    assert issuer.check(ACCOUNT, CONTAINER, forged, now=now) == "Signature did not match."
    assert TokenIssuer(ttl_s=600).check(ACCOUNT, CONTAINER, token, now=now) == "Signature did not match."  # another gateway
    issuer.expire_all()
    assert issuer.check(ACCOUNT, CONTAINER, token, now=now) == "Signature did not match."
    assert issuer.check(ACCOUNT, CONTAINER, issuer.issue(ACCOUNT, CONTAINER, now=now)["token"], now=now) is None
    assert "sig=" not in issuer.check(ACCOUNT, CONTAINER, token, now=now)


def test_the_storage_refuses_a_read_without_a_token(gateway, world: dict) -> None:
    item, href, grid = some_asset(world)
    assert href.startswith(f"http://{ACCOUNT}.blob.core.windows.net/{CONTAINER}/sentinel-2-l2a/")
    answer = requests.get(href, proxies={"http": f"http://{gateway.proxy}"}, timeout=10)
    assert answer.status_code == 403 and b"<Code>AuthenticationFailed</Code>" in answer.content
    # Read as a catalogue without signing would: one clear line naming the item and asset.
    what = f"sentinel-2-l2a/{item['id']}/B04"
    with pytest.raises(ServiceError) as failure:
        remote.read_source(href, grid, catalog_cfg={"signing": "none"}, what=what,
                           http_cfg=world["config"]["http"] | {"max_retries": 1})
    message = str(failure.value)
    assert message.startswith(f"reading {what} from {href} failed after 2 attempt(s)") and "403" in message
    assert control.get_stats(gateway)["tokens"]["refused"] >= 2


def test_a_token_of_the_gateway_expires_after_its_lifetime(demo_root: Path) -> None:
    """A gateway (in this process) whose tokens live 1 s: a token read at once, refused later."""
    state = GatewayState(demo_root, "127.0.0.1", free_port(), free_port(), token_ttl_s=1)
    server = GatewayServer(("127.0.0.1", state.port), state)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{state.port}"
        token = requests.get(f"{base}/api/sas/v1/token/{ACCOUNT}/{CONTAINER}", timeout=10).json()
        assert token["msft:expiry"] > datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        files = sorted((layout.files_dir(demo_root) / "sentinel-2-l2a").glob("*/B04.tif"))
        href = layout.blob_href("sentinel-2-l2a", files[0].relative_to(files[0].parents[1]).as_posix())
        proxy = {"http": f"127.0.0.1:{state.port}"}
        read = requests.get(f"{href}?{token['token']}", proxies=proxy, headers={"Range": "bytes=0-15"}, timeout=10)
        assert read.status_code == 206 and read.content == files[0].read_bytes()[:16]
        time.sleep(2.1)
        late = requests.get(f"{href}?{token['token']}", proxies=proxy, headers={"Range": "bytes=0-15"}, timeout=10)
        assert late.status_code == 403 and b"Signature not valid in the specified time frame" in late.content
        # A host the gateway does not fake is not proxied anywhere.
        assert requests.get("http://example.org/x", proxies=proxy, timeout=10).status_code == 502
    finally:
        server.shutdown()
        server.server_close()


def test_a_throttled_token_endpoint_is_waited_for(gateway, world: dict, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    _, href, grid = some_asset(world)
    control.set_faults(gateway, {"status_429_first": 2, "retry_after_s": 0, "routes": ["tokens"]})
    pc = world["config"]["catalogs"]["planetary_computer"]
    source = remote.read_source(href, grid, catalog_cfg=pc, http_cfg=world["config"]["http"], what="x/B04")
    assert source.data.size > 0
    stats = control.get_stats(gateway)
    assert stats["requests"]["tokens"] == 3 and stats["faults"]["status_429"] == 2
    assert stats["tokens"] == {"issued": 1, "refused": 0}
    assert "sig=" not in caplog.text


# ---------------------------------------------------------------- a token expired mid-build


def build_part_zero(world: dict, path: Path) -> dict:
    store.init_store(path, world["manifest"], world["config"])
    return store.build_part(path, world["manifest"], world["config"], 0)


def test_a_token_expired_mid_build_is_renewed_and_the_part_unchanged(gateway, world: dict, tmp_path: Path,
                                                                     monkeypatch, caplog) -> None:
    """Part 0 built twice: once as is, once with every token expired after its first reads (the
    SDK still trusts its cached token, the storage refuses it): the reads refused with 403 sign
    again with a fresh token, and the part stores the same bytes."""
    import zarr

    caplog.set_level(logging.DEBUG)  # every logger, GDAL's messages (naming the signed files) included
    reference = build_part_zero(world, tmp_path / "reference.zarr")
    # New tokens for the second build: GDAL keeps what it fetched by URL (token included,
    # http.cache_mb), so with the same tokens the second build would be read from that cache.
    from planetary_computer import sas

    control.expire_tokens(gateway)
    sas.TOKEN_CACHE.clear()
    control.reset_stats(gateway)
    signs = {"n": 0, "fresh": 0}
    real_sign = remote.sign_href

    def sign_and_expire_once(href, signing, fresh=False, **kw):
        signs["n"] += 1
        signs["fresh"] += fresh
        if signs["n"] == 6:  # after five signed reads: the cached tokens are refused from now on
            control.expire_tokens(gateway)
        return real_sign(href, signing, fresh=fresh, **kw)

    monkeypatch.setattr(remote, "sign_href", sign_and_expire_once)
    renewed = build_part_zero(world, tmp_path / "renewed.zarr")
    stats = control.get_stats(gateway)
    assert stats["tokens"]["refused"] > 0 and signs["fresh"] > 0, "a read was refused and signed again"
    assert stats["tokens"]["issued"] >= 1  # a fresh token after the refusals (the first ones may be cached)
    assert renewed["records"] and [(r["site_id"], r["status"], r.get("items")) for r in renewed["records"]] == \
        [(r["site_id"], r["status"], r.get("items")) for r in reference["records"]]
    assert any(r["status"] == "ok" for r in renewed["records"])
    a, b = (zarr.open_group(str(tmp_path / name), mode="r") for name in ("reference.zarr", "renewed.zarr"))
    per_shard = world["config"]["build"]["samples_per_shard"]
    for sensor in a.group_keys():
        for name in ("data", "valid"):
            np.testing.assert_array_equal(a[sensor][name][:per_shard], b[sensor][name][:per_shard],
                                          err_msg=f"{sensor}/{name}")
    assert "sig=" not in caplog.text and "skoid" not in caplog.text


def test_no_token_in_the_manifest_items_or_the_gateway_log(gateway, world: dict, demo_root: Path) -> None:
    folder = world["path"].parent
    written = [p for p in folder.rglob("*") if p.is_file()]
    assert any(p.suffix == ".parquet" and p.parent.name.endswith(".items") for p in written)
    for path in written:
        data = path.read_bytes()
        assert b"sig=" not in data and b"skoid" not in data, path
    log = control.log_path(demo_root).read_text()
    assert "route=tokens" in log and ".blob.core.windows.net/" in log
    assert "sig=" not in log and "skoid" not in log
