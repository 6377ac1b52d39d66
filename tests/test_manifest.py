"""The manifest's files: items once (stac-geoparquet), each job reads only its rows, frozen
rebuilds, and manifests of the first layout (issue 15). On the demo world's real servers."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.test_catalog import build_manifest, small_world_config
from xstars import store
from xstars.demo import control
from xstars.errors import ConfigError, DataError
from xstars.manifest import ITEMS_PER_ROW_GROUP, ItemsFile, Manifest, items_dir, write_items
from xstars.selection import summary

REPO = Path(__file__).resolve().parents[1]
PER_SHARD = 3


@pytest.fixture(scope="module")
def catalogued(demo_root: Path, demo_server: control.ServerInfo, tmp_path_factory) -> dict:
    control.set_faults(demo_server, {})
    config = small_world_config(demo_root, demo_server, build={"samples_per_shard": PER_SHARD, "margin_m": 240},
                                catalog={"search_shards": 2, "search_cell_m": 4800})
    folder = tmp_path_factory.mktemp("catalogued")
    build_manifest(config, folder / "manifest.parquet")
    return {"config": config, "path": folder / "manifest.parquet", "manifest": Manifest(folder / "manifest.parquet")}


def build(config: dict, manifest: Manifest, path: Path, parts: list[int] | None = None) -> list[dict]:
    n = store.init_store(path, manifest, config)
    records = [store.build_part(path, manifest, config, k)
               for k in (parts if parts is not None else range(store.n_parts(n, PER_SHARD)))]
    if parts is None:
        store.finalize(path, manifest, records, config)
    return records


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def corrupt_row_groups(path: Path, keep: set[int]) -> None:
    """Overwrite the column chunks (data pages) of every row group not in ``keep`` with garbage;
    the footer stays, so the file opens and names its row groups as before."""
    metadata = pq.ParquetFile(path).metadata
    data = bytearray(path.read_bytes())
    for group in range(metadata.num_row_groups):
        if group in keep:
            continue
        for column in range(metadata.num_columns):
            chunk = metadata.row_group(group).column(column)
            start = min(o for o in (chunk.dictionary_page_offset, chunk.data_page_offset) if o is not None)
            data[start:start + chunk.total_compressed_size] = b"\xa5" * chunk.total_compressed_size
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------------------ the layout


def test_items_are_stored_once_and_rows_name_them(catalogued) -> None:
    manifest = catalogued["manifest"]
    frame = manifest.frame()
    # Row group k holds the sites of build part k.
    assert manifest.file.num_row_groups == store.n_parts(manifest.n_sites, PER_SHARD)
    for group in range(manifest.file.num_row_groups):
        sites = sorted(set(manifest.file.read_row_group(group, columns=["site_id"]).column("site_id").to_pylist()))
        assert sites == manifest.site_ids()[group * PER_SHARD:(group + 1) * PER_SHARD]
    for sensor, rows in frame[frame.status == "ok"].groupby("sensor"):
        named = {i for row in rows.itertuples() for i in [row.item_id, *(f["item_id"] for f in row.fallbacks)]}
        stored = pq.read_table(manifest.items_path(sensor), columns=["id"]).column("id").to_pylist()
        assert stored == sorted(stored) and len(stored) == len(set(stored))  # sorted, once each
        assert named <= set(stored)
        # A scene shared by several sites is one item, not one copy per row.
        if sensor == "s2":
            assert rows.item_id.nunique() < len(rows)
        # The files are stac-geoparquet, as rustac (and the Planetary Computer) read them.
        import rustac

        assert {i["id"] for i in rustac.read_sync(str(manifest.items_path(sensor)))["features"]} == set(stored)
        for item in manifest.items(sensor).get(sorted(named)).values():
            assert all("sig=" not in a["href"] for a in item["assets"].values())
    # Every items file is pinned by the manifest.
    assert set(manifest.layout["items"]) == set(frame.sensor)
    assert all(len(pin["sha256"]) == 64 for pin in manifest.layout["items"].values())


def test_a_part_reads_only_its_rows(catalogued, tmp_path: Path) -> None:
    """Part 1 builds the same bytes from a manifest whose other row groups are garbage: they
    are not even decoded (reading one of them fails, so the garbage is real)."""
    config, original = catalogued["config"], catalogued["manifest"]
    corrupt = tmp_path / "corrupt.parquet"
    shutil.copyfile(original.path, corrupt)
    shutil.copytree(items_dir(original.path), items_dir(corrupt))
    corrupt_row_groups(corrupt, keep={1})
    damaged = Manifest(corrupt)  # the footer is intact: it opens
    with pytest.raises(Exception):  # noqa: B017  (whatever pyarrow raises for garbage pages)
        damaged.part(0, PER_SHARD)
    assert damaged.part(1, PER_SHARD) == original.part(1, PER_SHARD)
    a = build(config, original, tmp_path / "a.zarr", [1])
    b = build(config, damaged, tmp_path / "b.zarr", [1])
    assert a == b
    assert files_of(tmp_path / "a.zarr") == files_of(tmp_path / "b.zarr")


def test_an_items_file_is_read_by_the_row_groups_of_the_ids_asked(catalogued, tmp_path: Path) -> None:
    """With more items than a row group holds, asking for one item decodes its row group only."""
    import copy

    manifest = catalogued["manifest"]
    template = next(iter(manifest.items("s2").get([manifest.part(0, PER_SHARD)[0][0].item_id]).values()))
    many = []
    for k in range(2 * ITEMS_PER_ROW_GROUP + 10):
        item = copy.deepcopy(template)
        item["id"] = f"{template['id']}-{k:04d}"
        many.append(item)
    path = tmp_path / "s2.parquet"
    pin = write_items(many, path)
    assert pin["items"] == len(many) and pq.ParquetFile(path).num_row_groups == 3
    last = many[-1]["id"]
    corrupt_row_groups(path, keep={2})
    assert ItemsFile(path).get([last])[last]["assets"] == template["assets"]
    with pytest.raises(Exception):  # noqa: B017
        ItemsFile(path).get([many[0]["id"]])
    with pytest.raises(DataError, match=r"s2\.parquet: no item 'no-such-item'"):
        ItemsFile(path).get(["no-such-item"])


def test_the_manifest_job_chooses_as_the_rule_does_site_by_site(catalogued) -> None:
    """The manifest job's rows (candidates of two shards, a row group of sites at a time) are
    those of the selection rule applied to all the candidates at once."""
    from xstars.catalog import manifest_rows
    from xstars.manifest import read_candidates
    from xstars.selection import select
    from xstars.sites import sample_sites

    config, manifest = catalogued["config"], catalogued["manifest"]
    shards = sorted((manifest.path.parent / "manifest.search").glob("shard-*[0-9].parquet"))
    assert len(shards) == 2
    expected = select(config, sample_sites(config), read_candidates(shards))
    assert manifest_rows(manifest) == expected
    assert {r.n_candidates for r in expected if r.sensor == "s2"} != {0}


def test_the_manifest_job_puts_the_shards_rows_in_order_and_ranks_nothing(catalogued, tmp_path: Path) -> None:
    """Each search shard chose its own sites' rows (a site's candidates are all in its shard):
    the manifest job reads no candidate. With every candidates file destroyed it writes the same
    manifest, byte for byte; a shard's rows missing, or a site in two shards' rows, is an error
    that names the file or the site."""
    import pyarrow as pa

    from xstars.catalog import merge_manifest, rows_path
    from xstars.sites import sample_sites

    config, manifest = catalogued["config"], catalogued["manifest"]
    search = tmp_path / "manifest.search"
    shutil.copytree(manifest.path.parent / "manifest.search", search)
    shards = sorted(search.glob("shard-*[0-9].parquet"))
    assert len(shards) == 2 and all(rows_path(s).exists() for s in shards)
    for shard in shards:
        shard.write_bytes(b"not a candidates file")
    sites = sample_sites(config)
    out = tmp_path / "manifest.parquet"
    merge_manifest(config, sites, shards, out)
    assert out.read_bytes() == manifest.path.read_bytes()
    assert files_of(items_dir(out)) == files_of(items_dir(manifest.path))

    first, second = (pq.read_table(rows_path(s)) for s in shards)
    pq.write_table(pa.concat_tables([second, first.slice(0, 5)]), rows_path(shards[1]))  # site 0 of shard 0, twice
    with pytest.raises(DataError, match=r"site '[^']+' has 10 rows \(in two shards' rows\?\)"):
        merge_manifest(config, sites, shards, tmp_path / "again.parquet")
    rows_path(shards[1]).unlink()
    with pytest.raises(DataError, match=r"shard-1\.rows\.parquet: no rows beside the shard's candidates"):
        merge_manifest(config, sites, shards, tmp_path / "again.parquet")
    assert out.read_bytes() == manifest.path.read_bytes()  # what was built is untouched


def test_the_items_jobs_merge_each_sensor_and_the_manifest_job_checks_and_copies_them(catalogued, tmp_path: Path,
                                                                                        capsys) -> None:
    """The workflow's way: one items job per sensor (`xstars catalog items`), then the manifest
    job with `--items`. Same manifest and items, byte for byte, as the merge in one process; an
    items file that lacks an id the rows name, or that is missing, is an error naming it, and
    what was built is untouched."""
    import pyarrow as pa

    from xstars.catalog import merge_sensor_items
    from xstars.cli import main
    from xstars.sites import sample_sites, write_sites

    config, manifest = catalogued["config"], catalogued["manifest"]
    shards = sorted((manifest.path.parent / "manifest.search").glob("shard-*[0-9].parquet"))
    merged = tmp_path / "items"
    cfg = json.dumps(config)
    for sensor in config["sensors"]:
        assert main(["catalog", "items", "--config-json", cfg, "--sensor", sensor,
                     "--out", str(merged / f"{sensor}.parquet"), *map(str, shards)]) == 0
    sites = tmp_path / "sites.parquet"
    write_sites(sample_sites(config), sites, config["sites"]["crs"])
    out = tmp_path / "manifest.parquet"
    assert main(["catalog", "manifest", "--config-json", cfg, "--sites", str(sites), "--items", str(merged),
                 "--out", str(out), *map(str, shards)]) == 0
    assert out.read_bytes() == manifest.path.read_bytes()
    assert files_of(items_dir(out)) == files_of(items_dir(manifest.path))

    with pytest.raises(ConfigError, match="--sensor 'modis'"):
        merge_sensor_items(config, "modis", shards, tmp_path / "modis.parquet")
    again = ["catalog", "manifest", "--config-json", cfg, "--sites", str(sites), "--items", str(merged),
             "--out", str(out), *map(str, shards)]
    s2 = merged / "s2.parquet"
    table = pq.read_table(s2)
    pq.write_table(table.slice(1), s2)  # the first item gone
    capsys.readouterr()
    assert main(again) == 2
    assert re.search(rf"items/s2\.parquet: items \[{table.column('id')[0].as_py()!r}\] are named by the shards' "
                     r"rows but not in it", capsys.readouterr().err)
    s2.unlink()
    assert main(again) == 2
    assert re.search(r"items/s2\.parquet: no merged items .*--sensor s2", capsys.readouterr().err)
    assert out.read_bytes() == manifest.path.read_bytes()
    assert files_of(items_dir(out)) == files_of(items_dir(manifest.path))
    assert pa.types.is_string(pq.read_schema(merged / "labels.parquet").field("id").type)


def test_the_table_selection_chooses_as_the_rule_does_on_every_tie(tmp_path: Path) -> None:
    """The manifest job's NumPy ranking (:class:`TableSelection`) against the rule
    (:func:`select_site`) on random candidates made for ties: few dates and fractions, items met
    in several windows and shards, Tier-2 items ranked last, labels, candidates over the limit,
    sensors and sites without any, unconfigured sensors; three shards whose sites interleave,
    a row group per site. Every row must be the same."""
    import random

    from xstars.manifest import Candidate, CandidatesWriter, candidates_table, row_from_record
    from xstars.selection import Choosing, TableSelection, select_site
    from xstars.sites import Site

    sensors = [Choosing("s2", True, 0.5, ("B04",)), Choosing("l8", True, 0.4, ("red",)),
               Choosing("ign", True, 1.0, ("RGB",)), Choosing("labels", False, 0.0, ("map",))]
    dates = [f"2021-0{m}-1{d}T10:5{d}:0{m}Z" for m in range(4, 8) for d in range(3)] + ["2021-05-11T10:51:05.5+00:00"]
    for seed in range(4):
        rng = random.Random(seed)
        cat = {"anchor_sensor": "s2", "cloud_fraction_step": rng.choice([0.05, 0.1, 0.25]),
               "fallbacks": rng.choice([0, 2, 3]), "max_invalid_fraction": 0.5}
        sites = [Site(f"c{seed}_{i}_{j}", "c", i, j, 480.0, "train") for i in range(9) for j in range(9)]
        paths = []
        for shard in range(3):
            writer = CandidatesWriter(tmp_path / f"{seed}" / f"shard-{shard}.parquet")
            for site in sites[shard::3]:
                if rng.random() < 0.05:
                    continue  # a site no search found anything for
                rows = []
                for sensor in ("s2", "l8", "ign", "labels", "spot"):
                    for _ in range(rng.choice([0, 1, 2, 5, 9] if rng.random() < 0.1 else [2, 5, 9])):
                        invalid = rng.choice([0.0, 0.04, 0.05, 0.1, 0.24, 0.25, 0.3, 0.45, 0.6, 1.0]
                                             if sensor != "labels" else [0.0, 0.0, 0.0, 0.3])
                        rows.append(Candidate(site.site_id, sensor, f"{sensor}-{rng.randrange(6)}", f"col-{sensor}",
                                              rng.choice(["2021-spring", "2021-summer", "-"]), rng.choice(dates),
                                              rng.choice([None, 3.0]), invalid / 2, invalid / 2, invalid,
                                              rank_last=rng.random() < 0.2))
                writer.write(rows)
            paths.append(writer.close())
        table = candidates_table(paths)
        by_site: dict[str, list[Candidate]] = {}
        for candidate in candidates_in_all(table):
            by_site.setdefault(candidate.site_id, []).append(candidate)
        choice = TableSelection(table, sorted(sites, key=lambda s: s.site_id), sensors, cat)
        compared = {"ok": 0, "dropped": 0}
        every = []
        for site in sites:
            expected = select_site(site, by_site.get(site.site_id, []), sensors, cat)
            assert choice.rows(site) == expected, site.site_id
            compared[expected[0].status] += 1
            every += expected
        # The row groups the job writes: many sites a table.
        assert [row_from_record(r) for a in range(0, len(sites), 7)
                for r in choice.table_of(a, min(a + 7, len(sites))).to_pylist()] == every
        assert choice.summary().as_dict() == summary(every)
        assert compared["ok"] > 5 and compared["dropped"] > 5, compared


def candidates_in_all(table):
    from xstars.manifest import candidates_in

    return candidates_in(table, 0, table.num_rows)


# ------------------------------------------------------------------------------ frozen rebuilds


def test_a_frozen_rebuild_from_the_new_files_is_byte_identical(catalogued, tmp_path: Path) -> None:
    config, manifest = catalogued["config"], catalogued["manifest"]
    frozen = tmp_path / "frozen" / "manifest.parquet"
    result = subprocess.run(
        [sys.executable, "-m", "xstars", "catalog", "freeze", "--config-json",
         json.dumps({"catalog": {"manifest": str(manifest.path)}}), "--out", str(frozen)],
        capture_output=True, text=True, cwd=REPO, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert files_of(items_dir(frozen)) == files_of(items_dir(manifest.path)) and files_of(items_dir(frozen))
    build(config, manifest, tmp_path / "first.zarr")
    build(config, Manifest(frozen), tmp_path / "again.zarr")
    first, again = files_of(tmp_path / "first.zarr"), files_of(tmp_path / "again.zarr")
    assert first.keys() == again.keys() and first == again
    # An items file changed after the catalog ran is refused, by name, before anything is built.
    pinned = items_dir(frozen) / "l8.parquet"
    pinned.write_bytes(pinned.read_bytes()[:-100] + b"\0" * 100)
    result = subprocess.run(
        [sys.executable, "-m", "xstars", "catalog", "freeze", "--config-json",
         json.dumps({"catalog": {"manifest": str(frozen)}}), "--out", str(tmp_path / "refrozen.parquet")],
        capture_output=True, text=True, cwd=REPO, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {pinned}: SHA-256 differs from the one manifest {frozen} pins; the items changed since the catalog ran")


# ------------------------------------------------------------------------------ layout 1


def layout_one(manifest: Manifest, out: Path) -> Path:
    """``manifest`` as the first layout wrote it: every row carries its item's JSON, and its
    fallbacks' JSON in ``fallbacks_json``; no reason codes; the provenance alone in the footer."""
    import geopandas as gpd

    frame = manifest.frame()
    items = {sensor: manifest.items(sensor).get(sorted({i for row in rows.itertuples() for i in
                                                        [row.item_id, *(f["item_id"] for f in row.fallbacks)] if i}))
             for sensor, rows in frame.groupby("sensor")}

    def as_json(sensor: str, item_id: str) -> str:
        return json.dumps(items[sensor][item_id], sort_keys=True, separators=(",", ":")) if item_id else ""

    frame["item_json"] = [as_json(r.sensor, r.item_id) for r in frame.itertuples()]
    frame["fallbacks_json"] = [json.dumps([f | {"item_json": as_json(r.sensor, f["item_id"])} for f in r.fallbacks],
                                          sort_keys=True) for r in frame.itertuples()]
    old = gpd.GeoDataFrame(frame.drop(columns=["fallbacks", "reason_code", "reason_sensor"]), crs=frame.crs)
    old.to_parquet(out, index=False)
    table = pq.read_table(out)
    pq.write_table(table.replace_schema_metadata({**table.schema.metadata,
                                                  b"xstars": json.dumps(manifest.provenance).encode()}), out)
    return out


def test_an_old_manifest_gets_one_clear_error_and_converts_to_the_same_build(catalogued, tmp_path: Path) -> None:
    config, manifest = catalogued["config"], catalogued["manifest"]
    old = layout_one(manifest, tmp_path / "old.parquet")
    result = subprocess.run(
        [sys.executable, "-m", "xstars", "build", "init", "--config-json", json.dumps(config), "--manifest", str(old),
         "--store", str(tmp_path / "dataset.zarr"), "--out", str(tmp_path / "init.json")],
        capture_output=True, text=True, cwd=REPO, check=False)
    assert result.returncode == 2 and not (tmp_path / "dataset.zarr").exists()
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {old}: a manifest of layout 1 (item JSON in every row), which this version reads no more; convert it "
        f"once with `xstars catalog convert --manifest {old} --out NEW.parquet` (writes NEW.parquet and its items in "
        "NEW.items/; the build from it is the same)")
    converted = tmp_path / "new.parquet"
    result = subprocess.run(
        [sys.executable, "-m", "xstars", "catalog", "convert", "--config-json", json.dumps(config), "--manifest",
         str(old), "--out", str(converted)], capture_output=True, text=True, cwd=REPO, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    again = Manifest(converted)
    assert again.part(0, PER_SHARD) == manifest.part(0, PER_SHARD)  # the same rows, reason codes recovered
    build(config, manifest, tmp_path / "first.zarr")
    build(config, again, tmp_path / "converted.zarr")
    assert files_of(tmp_path / "first.zarr") == files_of(tmp_path / "converted.zarr")


# ------------------------------------------------------------------------------ drop reasons


def test_drops_are_counted_by_their_code_not_by_parsing_the_sentence(catalogued) -> None:
    rows = [r for site in catalogued["manifest"].part(0, PER_SHARD) for r in site]
    site = rows[0].site_id
    dropped = [dataclasses.replace(r, status="dropped", reason="Landsat: nothing clear, see the log",
                                   reason_code="too_invalid", reason_sensor="l8") if r.site_id == site else r
               for r in rows]
    counts = summary(dropped)
    assert counts["dropped_by_reason"] == {
        "l8: every scene has too much of the footprint cloudy or without data": 1}
    assert counts["kept"] == counts["sites"] - 1
    with pytest.raises(ValueError, match="unknown drop reason code 'cloudy'"):
        dataclasses.replace(dropped[0], reason_code="cloudy").drop_reason  # noqa: B018


def test_a_subset_of_the_sites_is_a_manifest_with_their_items(catalogued, tmp_path: Path) -> None:
    """A city out of a France-wide catalog run: its rows, the items they name, nothing else."""
    config, manifest = catalogued["config"], catalogued["manifest"]
    keep = manifest.site_ids()[1:3]
    sub = manifest.subset(keep, tmp_path / "city.parquet")
    assert sub.site_ids() == keep and sub.provenance == manifest.provenance
    assert sub.part(0, PER_SHARD) == [site for site in manifest.part(0, PER_SHARD) if site[0].site_id in keep]
    plan = store.plan_part(sub, config, 0)

    def named(sites) -> dict[str, set[str]]:
        return {sensor: {i for rows in sites for i in rows[sensor].item_ids} for sensor in plan.items}

    kept = [rows for rows in plan.sites if all(r.status == "ok" for r in rows.values())]
    assert {sensor: set(items) for sensor, items in plan.items.items()} == named(kept)  # what the part reads
    for sensor, ids in named(plan.sites).items():  # what the subset stores: every item its rows name
        stored = set(pq.read_table(sub.items_path(sensor), columns=["id"]).column("id").to_pylist()) if ids else set()
        assert stored == ids
