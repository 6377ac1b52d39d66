"""The built demo store as a published artefact: card, STAC, Croissant, the released layout, Dataset."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.test_build import build_store
from tests.test_catalog import small_world_config
from xstars import publish, store
from xstars.demo import control
from xstars.errors import DataError
from xstars.layout import open_store, store_sensors

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def built(demo_root: Path, demo_server: control.ServerInfo, tmp_path_factory) -> dict:
    """The small demo world built through the library, one of its sites dropped by the catalog
    (stored with its reason), then published."""
    control.set_faults(demo_server, {})
    config = small_world_config(demo_root, demo_server, build={"samples_per_shard": 3, "margin_m": 240})
    folder = tmp_path_factory.mktemp("published")
    result = build_store(config, folder)
    # One site dropped by the catalog, as a manifest records it: a second build from that manifest.
    import dataclasses

    from tests.test_build import rewritten_manifest

    site = store.stored_sites(result["opened"])[2]
    frozen = folder / "frozen"
    frozen.mkdir()
    rewritten_manifest(result, frozen / "manifest.parquet", lambda rows: [
        dataclasses.replace(r, status="dropped", reason="s2: all 3 scenes have more than 0.2 of the footprint cloudy "
                            "or without data (best 0.31)", reason_code="too_invalid", reason_sensor="s2")
        if r.site_id == site else r for r in rows])
    built = _build_from(config, frozen)
    written = publish.publish(built["path"], frozen / "manifest.parquet", config, frozen)
    return {**built, "config": config, "folder": frozen, "written": written, "dropped_site": site}


def _build_from(config: dict, folder: Path) -> dict:
    from xstars.manifest import Manifest

    manifest = Manifest(folder / "manifest.parquet")
    path = folder / "dataset.zarr"
    n = store.init_store(path, manifest, config)
    parts = [store.build_part(path, manifest, config, k) for k in range(store.n_parts(n, 3))]
    summary = store.finalize(path, manifest, parts, config)
    return {"path": path, "manifest": manifest, "summary": summary, "n": n}


# ==================================================================================== card


def test_the_card_gives_the_stores_own_figures(built: dict) -> None:
    card = (built["folder"] / publish.CARD).read_text()
    root = open_store(built["path"])
    # Counts per split and city, from the store's per-sample arrays.
    regions, splits, status = (root["s2"][k][:] for k in ("region", "split", "status"))
    for city in sorted(set(regions)):
        mine = regions == city
        cells = [int(((splits == s) & (status == "ok") & mine).sum()) for s in ("train", "test")]
        dropped = int((mine & (status != "ok")).sum())
        assert f"| {city} | {cells[0]} | {cells[1]} | {dropped} | {int(mine.sum())} |" in card, city
    assert f"| **all** | **{int(((splits == 'train') & (status == 'ok')).sum())}** |" in card
    # dropped by reason (the detail in parentheses left out)
    assert "- s2: all 3 scenes have more than 0.2 of the footprint cloudy or without data: 1" in card
    # Per-band statistics as the store keeps them, every imaging band.
    for sensor in ("s2", "l8", "ign"):
        norm = root[sensor].attrs["normalization"]
        for band, mean, std in zip(root[sensor]["band"][:], norm["mean"], norm["std"], strict=True):
            assert f"| {sensor} | {band} | {mean:.4f} | {std:.4f} | {norm['pixels']} |" in card, (sensor, band)
    # Sensors with their bands, encoding, pixel size and source collection.
    assert "| s2 | image | sentinel-2-l2a | B02 B03 B04 B08 B05 B06 B07 B8A B11 B12 | surface reflectance | " \
           "int16 x 0.0001 | 1 | 10 m | 24 x 24 px |" in card
    assert "| labels | labels | esa-worldcover | class |" in card
    dates = sorted(d for s in store_sensors(root) for d, ok in zip(root[s]["date"][:], status == "ok",
                                                                             strict=True) if ok)
    assert f"acquired {dates[0][:10]} to {dates[-1][:10]}." in card
    # Hashes of what the build read, and the recipe that uses them.
    assert publish.file_sha256(built["folder"] / "manifest.parquet") in card
    build_config = yaml.safe_load((built["folder"] / publish.BUILD_CONFIG).read_text())
    assert publish.config_sha256(build_config) in card and publish.store_fingerprint(root) in card
    assert "--config \"catalog={manifest: $PWD/manifest.parquet}\"" in card
    assert "> **Synthetic.**" in card  # the demo world says so


def test_the_card_quotes_every_sources_licence_and_attribution(built: dict) -> None:
    card = (built["folder"] / publish.CARD).read_text()
    licences = publish.load_licences()
    for sensor, collection in (("s2", "sentinel-2-l2a"), ("l8", "landsat-c2-l2"), ("ign", "ign-bdortho"),
                               ("labels", "esa-worldcover")):
        years = sorted({int(d[:4]) for d in open_store(built["path"])[sensor]["date"][:] if d})
        entry = licences[collection]
        assert f"### {sensor}: {collection}" in card
        assert f"[{entry['licence']}]({entry['licence_url']})" in card
        assert entry["attribution"].format(years=", ".join(map(str, years))) in card, sensor
    assert "Licence Ouverte / Open Licence 2.0 (Etalab)" in card and "CC-BY-4.0" in card
    assert "Contains modified Copernicus Sentinel data" in card and "U.S. Geological Survey" in card


def test_a_source_without_a_licence_is_not_published(built: dict, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(publish, "load_licences", lambda: {"sentinel-2-l2a": {}})
    with pytest.raises(DataError, match=r"\['esa-worldcover', 'ign-bdortho', 'ign-ortho-sat-spot', 'landsat-c2-l2'\] have no licence"):
        publish.publish(built["path"], built["folder"] / "manifest.parquet", built["config"], tmp_path)


def test_publishing_again_and_rebuilding_from_the_manifest_give_the_same_bytes(built: dict, tmp_path: Path) -> None:
    # The card names the store by a fingerprint of its shards' checksums: the same manifest built
    # again (frozen mode's promise) gives the same fingerprint, and the same published files.
    again = tmp_path / "again"
    again.mkdir()
    built["manifest"].copy_to(again / "manifest.parquet")  # with its items files
    rebuilt = _build_from(built["config"], again)
    publish.publish(rebuilt["path"], again / "manifest.parquet", built["config"], again)
    for name in (publish.CARD, publish.SAMPLES_CSV, publish.BUILD_CONFIG, publish.CROISSANT):
        first, second = (built["folder"] / name).read_text(), (again / name).read_text()
        if name == publish.CROISSANT:  # the store's consolidated metadata holds its own path nowhere,
            first, second = json.loads(first), json.loads(second)  # but compare as data all the same
        assert first == second, name
    assert publish.store_fingerprint(open_store(rebuilt["path"])) == built["written"]["sha256_store"]
    # The build config the card hashes is a file `snakemake --configfile` takes back: it resolves
    # to the same build sections.
    from xstars.config import resolve_config

    build_config = yaml.safe_load((built["folder"] / publish.BUILD_CONFIG).read_text())
    resolved = resolve_config(build_config)
    assert {k: resolved[k] for k in publish.BUILD_SECTIONS} == {k: built["config"][k] for k in publish.BUILD_SECTIONS}


# ==================================================================================== STAC


def test_stac_is_valid_offline_with_one_item_per_kept_site(built: dict, tmp_path: Path) -> None:
    import pystac

    collection_path = built["folder"] / "stac" / "collection.json"
    kept = int((open_store(built["path"])["s2"]["status"][:] == "ok").sum())
    assert kept == built["n"] - 1
    assert publish.validate_stac(collection_path) == kept + 1 == built["written"]["validated"]
    collection = pystac.Collection.from_file(str(collection_path))
    assert set(collection.stac_extensions) == set(publish.STAC_EXTENSIONS.values())
    store_asset = collection.assets["store"]
    assert store_asset.media_type == "application/vnd+zarr"
    assert (collection_path.parent / store_asset.href).resolve() == built["path"].resolve()
    s2 = collection.assets["s2"].extra_fields
    assert s2["cube:dimensions"]["band"]["values"][:3] == ["B02", "B03", "B04"]
    assert {link.target for link in collection.links if link.rel == "license"} >= {
        "https://creativecommons.org/licenses/by/4.0/", "https://www.etalab.gouv.fr/licence-ouverte-open-licence/"}
    root = open_store(built["path"])
    items = {item.id: item for item in collection.get_items(recursive=True)}
    assert built["dropped_site"] not in items and len(items) == kept
    for i, site in enumerate(root["s2"]["site_id"][:]):
        if site not in items:
            continue
        item = items[site]
        assert item.properties["xstars:sample"] == i
        x0, dx, _, y0, _, dy = root["s2"]["transform"][i]
        assert item.properties["proj:bbox"] == [x0, y0 + 24 * dy, x0 + 24 * dx, y0]
        for sensor in store_sensors(root):
            assert item.properties["xstars:source_items"][sensor] == root[sensor]["item_id"][i]
            assert item.assets[sensor].extra_fields["xstars:source_item"] == root[sensor]["item_id"][i]
        # Dates: the item spans its sensors' acquisitions.
        dates = sorted(root[s]["date"][i] for s in store_sensors(root))
        assert item.properties["start_datetime"] == dates[0] and item.properties["end_datetime"] == dates[-1]
        derived = [link.target for link in item.links if link.rel == "derived_from"]
        assert any(target.endswith(f"/collections/sentinel-2-l2a/items/{root['s2']['item_id'][i]}")
                   for target in derived)
        # Footprint in WGS84 around the Lambert-93 bounds.
        from pyproj import Transformer

        lon, lat = Transformer.from_crs("EPSG:2154", "EPSG:4326", always_xy=True).transform(x0 + 12 * dx,
                                                                                             y0 + 12 * dy)
        assert item.bbox[0] < lon < item.bbox[2] and item.bbox[1] < lat < item.bbox[3]
    # The extension schemas do take part: a wrong projection field fails, offline.
    broken = tmp_path / "stac"
    shutil.copytree(collection_path.parent, broken)
    item_path = next(p for p in broken.glob("*/*.json"))
    item_json = json.loads(item_path.read_text())
    item_json["properties"]["proj:code"] = 2154
    item_path.write_text(json.dumps(item_json))
    with pytest.raises(DataError, match=f"{item_path.name}: not valid STAC"):
        publish.validate_stac(broken / "collection.json")


def test_stac_validation_needs_no_network(built: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    import pystac.validation.stac_validator as validator_module

    def refuse(uri: str) -> dict:
        raise AssertionError(f"schema fetched from the network: {uri}")

    monkeypatch.setattr(validator_module.JsonSchemaSTACValidator, "_get_schema",
                        lambda self, uri: self.schema_cache[uri] if uri in self.schema_cache else refuse(uri))
    assert publish.validate_stac(built["folder"] / "stac" / "collection.json") == built["n"]


# =============================================================================== Croissant


def test_croissant_validates_and_its_record_set_is_the_store(built: dict) -> None:
    import mlcroissant as mlc  # a test dependency (pyproject's [test] extra)

    dataset = mlc.Dataset(jsonld=str(built["folder"] / publish.CROISSANT))
    issues = dataset.metadata.issues
    assert not issues.errors, issues.report()
    # Only a publication date is missing (the store has none: publishing records no time).
    assert all("datePublished" in warning for warning in issues.warnings), issues.report()
    records = list(dataset.records("samples"))
    root = open_store(built["path"])
    assert [r["samples/site_id"].decode() for r in records] == list(root["s2"]["site_id"][:])
    assert [r["samples/status"].decode() for r in records] == list(root["s2"]["status"][:])
    assert [(r["samples/s2_item_id"] or b"").decode() for r in records] == [  # empty for the dropped site
        item if ok == "ok" else "" for item, ok in zip(root["s2"]["item_id"][:], root["s2"]["status"][:], strict=True)]
    doc = json.loads((built["folder"] / publish.CROISSANT).read_text())
    shards = next(d for d in doc["distribution"] if d["@type"] == "cr:FileSet")
    assert shards["includes"] == "dataset.zarr/**" and shards["encodingFormat"] == "application/vnd+zarr"


# =========================================================================== released layout


def test_export_writes_the_released_layout(built: dict, tmp_path: Path) -> None:
    from PIL import Image

    from xstars.config import load_config
    from xstars.msc_france import export_store

    settings = load_config(REPO / "config.yaml")["msc_france"]
    out = tmp_path / "MSC-France"
    summary = export_store(built["path"], out, settings)
    # The built store's SPOT 6/7 goes to SPOT/ (IGN orthophotos stand in for it in a store without).
    assert {f: v["sensor"] for f, v in summary["folders"].items()} == {"SPOT": "spot", "Sentinel": "s2",
                                                                       "Landsat": "l8"}
    root = open_store(built["path"])
    kept = [i for i, s in enumerate(root["s2"]["status"][:]) if s == "ok"]
    assert summary["tiles"] == len(kept) and summary["skipped"] == 1
    regions, site_ids = root["s2"]["region"][:], root["s2"]["site_id"][:]
    names = {folder: sorted(p.relative_to(out / folder).as_posix() for p in (out / folder).rglob("*.png"))
             for folder in ("SPOT", "Sentinel", "Landsat")}
    assert names["SPOT"] == names["Sentinel"] == names["Landsat"]  # co-located tiles share one name
    assert names["SPOT"] == sorted(f"{regions[i]}/{site_ids[i].split('_', 1)[1]}.png" for i in kept)
    # 8-bit RGB as the released loader reads them, each sensor on its own grid; the values follow
    # msc_france.export_sensors (Sentinel: B04 B03 B02 reflectance 0-0.3 -> 0-255).
    i = kept[0]
    path = f"{regions[i]}/{site_ids[i].split('_', 1)[1]}.png"
    rgb = np.asarray(Image.open(out / "Sentinel" / path).convert("RGB"))
    assert rgb.shape == (24, 24, 3) and rgb.dtype == np.uint8
    bands = list(root["s2"]["band"][:])
    reflectance = root["s2"]["data"][i][[bands.index(b) for b in ("B04", "B03", "B02")]] * 1e-4
    assert np.array_equal(rgb, np.clip(np.round(reflectance / 0.3 * 255), 0, 255).astype(np.uint8).transpose(1, 2, 0))
    assert np.asarray(Image.open(out / "SPOT" / path)).shape == (150, 150, 3)
    # The README: which sensor each folder holds, and the normalisation measured on the images.
    readme = (out / "README.md").read_text()
    assert "| SPOT/ | `spot`: SPOT 6/7 mosaic DN / 255 | R G B | 0 to 1 | 1.6 m | 150 px |" in readme
    images = np.stack([np.asarray(Image.open(p)) for p in sorted((out / "Landsat").rglob("*.png"))]) / 255.0
    mean = images.reshape(-1, 3).mean(axis=0)
    assert summary["folders"]["Landsat"]["normalization"]["mean"] == pytest.approx(mean, abs=1e-6)
    assert "0.2706, 0.2784, 0.1806" in readme  # the released Landsat mean, beside the measured one
    with (out / "tiles.csv").open() as f:
        tiles = list(csv.DictReader(f))
    assert [t["Sentinel_item_id"] for t in tiles] == [root["s2"]["item_id"][:][i] for i in kept]


# ================================================================================= Dataset


def test_the_readme_dataset_example_runs_on_the_demo_store(built: dict, tmp_path: Path) -> None:
    readme = (REPO / "README.md").read_text()
    block = re.search(r"<!-- dataset-example -->\n```python\n(.*?)```", readme, re.DOTALL)
    assert block, "README.md: the Dataset example (marked <!-- dataset-example -->) is missing"
    code = block.group(1)
    assert len(code.strip().splitlines()) == 5
    script = tmp_path / "example.py"
    script.write_text(code.replace("results/demo/dataset/dataset.zarr", str(built["path"])))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    train = int(((open_store(built["path"])["s2"]["split"][:] == "train")
                 & (open_store(built["path"])["s2"]["status"][:] == "ok")).sum())
    assert result.stdout.split()[:2] == [str(train), "torch.Size([4,"], result.stdout
