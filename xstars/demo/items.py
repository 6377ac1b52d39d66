"""STAC items and collections of the demo world, following the Planetary Computer schema.

Same collection ids, asset keys and property names as the real items recorded in
``../shared/fixtures/planetary-computer``, with the variations a robust client must handle:
``proj:epsg`` on older items and ``proj:code`` on newer ones, ``platform`` spelled
``Sentinel-2A`` and ``sentinel-2a``, processing baselines below and above 04.00, a reprocessed
pre-2022 acquisition that appears twice, and Landsat-9 items in the Landsat collection.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from xstars.demo.layout import blob_href
from xstars.demo.render import SensorGrid

COG_TYPE = "image/tiff; application=geotiff; profile=cloud-optimized"

#: Sentinel-2 bands: asset key -> (common name, description, centre um, fwhm um, gsd m).
S2_BANDS: dict[str, tuple[str | None, str, float, float, int]] = {
    "B01": ("coastal", "Band 1 - Coastal aerosol", 0.443, 0.027, 60),
    "B02": ("blue", "Band 2 - Blue", 0.490, 0.098, 10),
    "B03": ("green", "Band 3 - Green", 0.560, 0.045, 10),
    "B04": ("red", "Band 4 - Red", 0.665, 0.038, 10),
    "B05": ("rededge", "Band 5 - Vegetation red edge 1", 0.704, 0.019, 20),
    "B06": ("rededge", "Band 6 - Vegetation red edge 2", 0.740, 0.018, 20),
    "B07": ("rededge", "Band 7 - Vegetation red edge 3", 0.783, 0.028, 20),
    "B08": ("nir", "Band 8 - NIR", 0.842, 0.145, 10),
    "B8A": ("rededge", "Band 8A - Vegetation red edge 4", 0.865, 0.033, 20),
    "B09": (None, "Band 9 - Water vapor", 0.945, 0.026, 60),
    "B11": ("swir16", "Band 11 - SWIR (1.6)", 1.610, 0.143, 20),
    "B12": ("swir22", "Band 12 - SWIR (2.2)", 2.190, 0.242, 20),
}

#: Landsat OLI bands: asset key -> (OLI name, description, centre um, fwhm um, title).
LANDSAT_BANDS: dict[str, tuple[str, str, float, float, str]] = {
    "coastal": ("OLI_B1", "Coastal/Aerosol", 0.44, 0.02, "Coastal/Aerosol Band"),
    "blue": ("OLI_B2", "Visible blue", 0.48, 0.06, "Blue Band"),
    "green": ("OLI_B3", "Visible green", 0.56, 0.06, "Green Band"),
    "red": ("OLI_B4", "Visible red", 0.65, 0.04, "Red Band"),
    "nir08": ("OLI_B5", "Near infrared", 0.87, 0.03, "Near Infrared Band 0.8"),
    "swir16": ("OLI_B6", "Short-wave infrared", 1.61, 0.09, "Short-wave Infrared Band 1.6"),
    "swir22": ("OLI_B7", "Short-wave infrared", 2.20, 0.19, "Short-wave Infrared Band 2.2"),
}


@dataclass(frozen=True)
class S2Acquisition:
    """One Sentinel-2 product in the demo catalogue."""

    datetime: datetime
    platform: str  # as spelled in the item: "Sentinel-2A" or "sentinel-2b"
    processing_baseline: str
    generation_time: datetime
    mgrs_tile: str
    relative_orbit: int
    proj_key: str  # "proj:epsg" or "proj:code"

    @property
    def item_id(self) -> str:
        unit = self.platform[-1].upper()
        return (f"S2{unit}_MSIL2A_{self.datetime:%Y%m%dT%H%M%S}_R{self.relative_orbit:03d}_"
                f"T{self.mgrs_tile}_{self.generation_time:%Y%m%dT%H%M%S}")


def _iso(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _footprint(geometry: dict[str, Any]) -> tuple[list, dict]:
    """bbox and geometry (lon/lat) of the product's data (a polygon)."""
    ring = [[float(x), float(y)] for x, y in geometry["coordinates"][0]]
    lons, lats = [p[0] for p in ring], [p[1] for p in ring]
    return [min(lons), min(lats), max(lons), max(lats)], {"type": "Polygon", "coordinates": [ring]}


def _proj(key: str, crs: str) -> dict[str, Any]:
    epsg = int(crs.split(":")[1])
    return {"proj:epsg": epsg} if key == "proj:epsg" else {"proj:code": f"EPSG:{epsg}"}


def _grid_fields(grid: SensorGrid) -> dict[str, Any]:
    t = grid.transform
    return {"proj:bbox": list(grid.bounds), "proj:shape": list(grid.shape),
            "proj:transform": [t.a, t.b, t.c, t.d, t.e, t.f]}


def _href(collection: str, item_id: str, asset: str, ext: str = "tif") -> str:
    # On the Planetary Computer's blob storage, as its items have them: signed before each read.
    return blob_href(collection, f"{item_id}/{asset}.{ext}")


def s2_item(acq: S2Acquisition, grid10: SensorGrid, footprint: dict[str, Any], percentages: dict[str, float],
            sun: tuple[float, float]) -> dict[str, Any]:
    """A ``sentinel-2-l2a`` item with PC's property names and asset keys (``grid10``: the tile's)."""
    bbox, geometry = _footprint(footprint)
    assets: dict[str, Any] = {}
    for key, (common, desc, center, fwhm, gsd) in S2_BANDS.items():
        band = {"name": key, "description": desc, "center_wavelength": center, "full_width_half_max": fwhm}
        if common:
            band["common_name"] = common
        assets[key] = {"href": _href("sentinel-2-l2a", acq.item_id, key), **_grid_fields(grid10.with_gsd(gsd)),
                       "gsd": float(gsd), "type": COG_TYPE, "roles": ["data"],
                       "title": f"{desc} - {gsd}m", "eo:bands": [band]}
    assets["SCL"] = {"href": _href("sentinel-2-l2a", acq.item_id, "SCL"), **_grid_fields(grid10.with_gsd(20)),
                     "gsd": 20.0, "type": COG_TYPE, "roles": ["data"], "title": "Scene classfication map (SCL)"}
    assets["visual"] = {"href": _href("sentinel-2-l2a", acq.item_id, "visual"), **_grid_fields(grid10),
                        "gsd": 10.0, "type": COG_TYPE, "roles": ["data"], "title": "True color image",
                        "eo:bands": [assets[k]["eo:bands"][0] for k in ("B04", "B03", "B02")]}
    unit = acq.platform[-1].upper()
    props = {
        "datetime": _iso(acq.datetime),
        "platform": acq.platform,
        "constellation": "Sentinel 2",
        "instruments": ["msi"],
        "eo:cloud_cover": round(percentages["cloud"], 6),
        **_proj(acq.proj_key, grid10.crs),
        "s2:mgrs_tile": acq.mgrs_tile,
        "s2:processing_baseline": acq.processing_baseline,
        "s2:product_type": "S2MSI2A",
        "s2:generation_time": _iso(acq.generation_time),
        "s2:product_uri": f"{acq.item_id.replace('_R', '_N' + acq.processing_baseline.replace('.', '') + '_R', 1)}.SAFE",
        "s2:datatake_id": f"GS2{unit}_{acq.datetime:%Y%m%dT%H%M%S}_000000_N{acq.processing_baseline}",
        "s2:datatake_type": "INS-NOBS",
        "s2:datastrip_id": f"S2{unit}_OPER_MSI_L2A_DS_DEMO_{acq.generation_time:%Y%m%dT%H%M%S}_N{acq.processing_baseline}",
        "s2:granule_id": f"S2{unit}_OPER_MSI_L2A_TL_DEMO_{acq.generation_time:%Y%m%dT%H%M%S}_T{acq.mgrs_tile}_N{acq.processing_baseline}",
        "s2:mean_solar_azimuth": sun[0],
        "s2:mean_solar_zenith": 90.0 - sun[1],
        "s2:reflectance_conversion_factor": 0.97,
        "s2:cloud_shadow_percentage": round(percentages["shadow"], 6),
        "s2:high_proba_clouds_percentage": round(percentages["cloud_high"], 6),
        "s2:medium_proba_clouds_percentage": round(percentages["cloud_medium"], 6),
        "s2:thin_cirrus_percentage": round(percentages["cirrus"], 6),
        "s2:vegetation_percentage": round(percentages["vegetation"], 6),
        "s2:not_vegetated_percentage": round(percentages["not_vegetated"], 6),
        "s2:water_percentage": round(percentages["water"], 6),
        "s2:nodata_pixel_percentage": round(percentages["nodata"], 6),
        "s2:dark_features_percentage": 0.0,
        "s2:snow_ice_percentage": 0.0,
        "s2:unclassified_percentage": 0.0,
        "s2:saturated_defective_pixel_percentage": 0.0,
        "s2:degraded_msi_data_percentage": 0.0,
        "sat:orbit_state": "descending",
        "sat:relative_orbit": acq.relative_orbit,
    }
    return _item("sentinel-2-l2a", acq.item_id, bbox, geometry, props, assets, [
        "https://stac-extensions.github.io/eo/v1.0.0/schema.json",
        "https://stac-extensions.github.io/sat/v1.0.0/schema.json",
        "https://stac-extensions.github.io/projection/v1.0.0/schema.json" if acq.proj_key == "proj:epsg"
        else "https://stac-extensions.github.io/projection/v2.0.0/schema.json",
    ])


@dataclass(frozen=True)
class LandsatAcquisition:
    datetime: datetime
    platform: str  # "landsat-8" or "landsat-9"
    wrs_path: int
    wrs_row: int
    processed: datetime
    collection_category: str = "T1"  # "T1" or "T2" (worse geolocation)
    processing_level: str = "L2SP"  # "L2SP" (with surface temperature) or "L2SR" (reflectance only)

    @property
    def item_id(self) -> str:
        sat = "LC08" if self.platform == "landsat-8" else "LC09"
        return (f"{sat}_{self.processing_level}_{self.wrs_path:03d}{self.wrs_row:03d}_{self.datetime:%Y%m%d}_02_"
                f"{self.collection_category}")


def landsat_item(acq: LandsatAcquisition, grid30: SensorGrid, footprint: dict[str, Any], cloud_cover: float,
                 sun: tuple[float, float]) -> dict[str, Any]:
    """A ``landsat-c2-l2`` item with PC's property names, asset keys and ``raster:bands`` (``grid30``:
    the scene's whole grid; an L2SR product has no surface temperature asset)."""
    bbox, geometry = _footprint(footprint)
    sr = {"scale": 2.75e-05, "nodata": 0, "offset": -0.2, "data_type": "uint16", "spatial_resolution": 30}
    assets: dict[str, Any] = {}
    for key, (oli, desc, center, fwhm, title) in LANDSAT_BANDS.items():
        assets[key] = {"href": _href("landsat-c2-l2", acq.item_id, key), "type": COG_TYPE,
                       "roles": ["data", "reflectance"], "title": title, "raster:bands": [dict(sr)],
                       "eo:bands": [{"name": oli, "common_name": key, "description": desc,
                                     "center_wavelength": center, "full_width_half_max": fwhm}]}
    if acq.processing_level == "L2SP":
        assets["lwir11"] = {"href": _href("landsat-c2-l2", acq.item_id, "lwir11"), "type": COG_TYPE,
                            "roles": ["data", "temperature"], "title": "Surface Temperature Band",
                            "raster:bands": [{"unit": "kelvin", "scale": 0.00341802, "nodata": 0, "offset": 149.0,
                                              "data_type": "uint16", "spatial_resolution": 30}],
                            "eo:bands": [{"name": "TIRS_B10", "common_name": "lwir11",
                                          "description": "Long-wave infrared", "center_wavelength": 10.9,
                                          "full_width_half_max": 0.59}]}
    assets["qa_pixel"] = {"href": _href("landsat-c2-l2", acq.item_id, "qa_pixel"), "type": COG_TYPE,
                          "roles": ["cloud", "cloud-shadow", "snow-ice", "water-mask"],
                          "title": "Pixel Quality Assessment Band",
                          "raster:bands": [{"unit": "bit index", "nodata": 1, "data_type": "uint16",
                                            "spatial_resolution": 30}]}
    assets["mtl.json"] = {"href": _href("landsat-c2-l2", acq.item_id, "MTL", "json"), "type": "application/json",
                          "roles": ["metadata"], "title": "Product Metadata File (json)"}
    props = {
        "datetime": _iso(acq.datetime),
        "platform": acq.platform,
        "instruments": ["oli", "tirs"],
        "created": _iso(acq.processed),
        "description": "Landsat Collection 2 Level-2",
        "gsd": 30,
        "eo:cloud_cover": round(cloud_cover, 2),
        "landsat:cloud_cover_land": round(cloud_cover, 2),
        "landsat:collection_category": acq.collection_category,
        "landsat:collection_number": "02",
        "landsat:correction": acq.processing_level,
        "landsat:scene_id": f"{'LC8' if acq.platform == 'landsat-8' else 'LC9'}{acq.wrs_path:03d}{acq.wrs_row:03d}"
                            f"{acq.datetime:%Y%j}LGN00",
        "landsat:wrs_path": f"{acq.wrs_path:03d}",
        "landsat:wrs_row": f"{acq.wrs_row:03d}",
        "landsat:wrs_type": "2",
        "proj:epsg": int(grid30.crs.split(":")[1]),
        "proj:shape": list(grid30.shape),
        "proj:transform": list(grid30.transform)[:6],
        "sci:doi": "10.5066/P9OGBGM6",
        "view:off_nadir": 0,
        "view:sun_azimuth": sun[0],
        "view:sun_elevation": sun[1],
    }
    return _item("landsat-c2-l2", acq.item_id, bbox, geometry, props, assets, [
        "https://stac-extensions.github.io/raster/v1.1.0/schema.json",
        "https://stac-extensions.github.io/eo/v1.0.0/schema.json",
        "https://stac-extensions.github.io/view/v1.0.0/schema.json",
        "https://stac-extensions.github.io/projection/v1.1.0/schema.json",
        "https://landsat.usgs.gov/stac/landsat-extension/v1.1.1/schema.json",
        "https://stac-extensions.github.io/scientific/v1.0.0/schema.json",
    ])


def worldcover_item(item_id: str, grid: SensorGrid, footprint: dict[str, Any], year: int) -> dict[str, Any]:
    """An ``esa-worldcover`` item (asset ``map``: uint8 class codes, EPSG:4326, 1/12000 degree; ``grid``: the
    whole 3-degree tile's)."""
    bbox, geometry = _footprint(footprint)
    assets = {"map": {"href": _href("esa-worldcover", item_id, "map"), "type": COG_TYPE, "roles": ["data"],
                      "title": "Land Cover Classes", **_grid_fields(grid),
                      "raster:bands": [{"nodata": 0, "data_type": "uint8", "spatial_resolution": 10}]}}
    props = {
        "datetime": None,
        "start_datetime": f"{year}-01-01T00:00:00Z",
        "end_datetime": f"{year}-12-31T23:59:59Z",
        "esa_worldcover:product_tile": item_id.split("_")[-1],
        "esa_worldcover:product_version": "2.0.0" if year == 2021 else "1.0.0",
        "mission": "sentinel-1, sentinel-2",
        "platform": "sentinel-1a, sentinel-1b, sentinel-2a, sentinel-2b",
        "instruments": ["c-sar", "msi"],
        "proj:epsg": 4326,
    }
    return _item("esa-worldcover", item_id, bbox, geometry, props, assets, [
        "https://stac-extensions.github.io/projection/v1.0.0/schema.json",
        "https://stac-extensions.github.io/raster/v1.1.0/schema.json",
    ])


def _item(collection: str, item_id: str, bbox: list, geometry: dict, props: dict, assets: dict,
          extensions: list[str]) -> dict[str, Any]:
    return {"type": "Feature", "stac_version": "1.0.0", "stac_extensions": extensions, "id": item_id,
            "collection": collection, "bbox": bbox, "geometry": geometry, "properties": props,
            "links": [], "assets": assets}


def collection(collection_id: str, title: str, items: list[dict[str, Any]]) -> dict[str, Any]:
    """A STAC collection whose extent covers ``items``."""
    west = min(i["bbox"][0] for i in items)
    south = min(i["bbox"][1] for i in items)
    east = max(i["bbox"][2] for i in items)
    north = max(i["bbox"][3] for i in items)
    times = sorted(i["properties"].get("datetime") or i["properties"]["start_datetime"] for i in items)
    return {"type": "Collection", "stac_version": "1.0.0", "id": collection_id, "title": title,
            "description": f"{title} (xstars offline demo world)", "license": "proprietary", "links": [],
            "extent": {"spatial": {"bbox": [[west, south, east, north]]},
                       "temporal": {"interval": [[times[0], times[-1]]]}}}
