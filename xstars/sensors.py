"""Sensors as data: what each ``sensors.<name>`` entry of the config means, in one place.

A sensor is one group of the dataset. Its config entry says what kind of source it is, and
everything the stages need to know about it follows from that entry through this module; no
other module branches on a sensor's name. Three kinds exist:

``stac_raster`` (Sentinel-2 L2A, Landsat C2 L2)
    A STAC collection of scenes whose bands are Cloud-Optimized GeoTIFFs, one asset per band,
    with a quality mask asset (a class map such as SCL, or a bit field such as qa_pixel).
``wms_layers`` (IGN BD ORTHO aerial orthophotos, CNES SPOT 6/7 yearly mosaics)
    A family of per-year WMS layers; each of the sensor's bands comes from the first of its
    ``layers`` that provides it (BD ORTHO: R, G, B from the RGB layer, NIR from the IRC one).
    These sources have no STAC catalogue: the catalog stage describes each (site, year) as a
    STAC-like item whose assets are the exact GetMap requests.
``stac_labels`` (ESA WorldCover)
    A STAC collection of class maps: the labels of the downstream tasks, never co-registered
    nor normalised.

Per sensor, the entry gives:

* **where**: ``catalog`` (an entry of ``catalogs``: the Planetary Computer, Earth Search, the
  Géoplateforme...) and ``collection`` or ``layers``. Band names are the dataset's own
  (``B04``); the catalogue says under which asset key it serves each (:meth:`Sensor.asset_key`):
  Earth Search calls ``B04`` ``red``.
* **units** (:meth:`Sensor.to_physical`): ``s2_processing_baseline`` (reflectance = (DN +
  offset) / 10000, the offset decided by ``s2:processing_baseline``), ``raster_bands`` (DN x
  scale + offset from the asset's ``raster:bands``, the config's values when absent), ``scale``
  (DN x scale, e.g. 8-bit orthophotos / 255). How a sensor is stored follows from it
  (:attr:`Sensor.encoding`).
* **validity** (:meth:`Sensor.invalid_from_mask`, :meth:`Sensor.fill_from_mask`,
  :meth:`Sensor.valid_pixels`): mask classes or bits, fill values, the valid DN range, the fill
  colours of a WMS.
* **grid**: ``gsd_m``, the stored resolution (the footprint must be a whole number of pixels).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from xstars import items as stac_items
from xstars.errors import ConfigError
from xstars.layout import IMAGE, LABELS

#: Kinds of sensor, and the role their group plays in the dataset.
KINDS: dict[str, str] = {"stac_raster": IMAGE, "wms_layers": IMAGE, "stac_labels": LABELS}

#: Stored reflectance: int16 with this CF scale_factor (1e-4: the 10000 of Sentinel-2's DNs).
REFLECTANCE_SCALE = 1e-4


@dataclass(frozen=True)
class Encoding:
    """How a sensor's physical values are stored in the Zarr store."""

    dtype: str  # numpy dtype of the `data` array
    attrs: dict[str, Any]  # CF attributes of the `data` array (scale_factor, units, long_name...)

    @property
    def scale_factor(self) -> float:
        return float(self.attrs.get("scale_factor", 1.0))

    def pack(self, data: np.ndarray) -> np.ndarray:
        """Physical values -> stored values (rounded, clipped to the dtype's range)."""
        if "scale_factor" not in self.attrs:  # class codes
            return data.astype(self.dtype)
        info = np.iinfo(self.dtype)
        low = info.min + 1 if info.min < 0 else info.min  # int16: -32768 is left free
        return np.clip(np.round(data / self.scale_factor), low, info.max).astype(self.dtype)


@dataclass(frozen=True)
class Sensor:
    """One ``sensors.<name>`` entry, with the behaviour of its kind. Build with :func:`sensors_of`."""

    name: str
    cfg: Mapping[str, Any]
    catalog_name: str
    catalog_cfg: Mapping[str, Any]

    # ------------------------------------------------------------------------- what it is
    @property
    def kind(self) -> str:
        return str(self.cfg["kind"])

    @property
    def role(self) -> str:
        """``image`` (pretrained on, co-registered, normalised) or ``labels``."""
        return KINDS[self.kind]

    @property
    def is_image(self) -> bool:
        return self.role == IMAGE

    @property
    def gsd_m(self) -> float:
        return float(self.cfg["gsd_m"])

    @property
    def collection(self) -> str:
        """STAC collection id (for a WMS family: the collection of its STAC-like items)."""
        return str(self.cfg["collection"])

    @property
    def bands(self) -> list[str]:
        """Band names of the dataset, in channel order (labels: one band, ``class``)."""
        return ["class"] if self.role == LABELS else list(self.cfg["bands"])

    @property
    def rgb_bands(self) -> list[str] | None:
        """Bands shown as true colour in figures (None: the sensor has no true-colour view)."""
        rgb = self.cfg.get("rgb_bands")
        return list(rgb) if rgb else None

    @property
    def coregister_band(self) -> str | None:
        return self.cfg.get("coregister_band")

    def pixels(self, footprint_m: float) -> int:
        """Pixels per side of a footprint at the sensor's gsd (ConfigError if not whole)."""
        size = footprint_m / self.gsd_m
        if abs(size - round(size)) > 1e-6:
            raise ConfigError(f"sensors.{self.name}.gsd_m: sites.footprint_m ({footprint_m:g}) is {size:.3f} "
                              f"pixels of {self.gsd_m:g} m: pick a gsd_m that divides the footprint")
        return round(size)

    # ----------------------------------------------------------------------- where it is
    def asset_key(self, band: str) -> str:
        """Asset key under which the sensor's catalogue serves ``band`` (or the mask)."""
        keys = self.catalog_cfg.get("asset_keys", {}).get(self.collection, {})
        return str(keys.get(band, band))

    @property
    def mask_band(self) -> str | None:
        mask = self.cfg.get("mask")
        return str(mask["asset"]) if mask else None

    def assets(self) -> list[str]:
        """Asset keys the build stage reads for this sensor (the manifest records them)."""
        if self.kind == "stac_labels":
            return [self.asset_key(self.cfg["asset"])]
        if self.kind == "wms_layers":
            return list(self.layers_needed())
        keys = [self.asset_key(b) for b in self.cfg["bands"]]
        return [*keys, self.asset_key(self.mask_band)] if self.mask_band else keys

    # ------------------------------------------------------------- a family of WMS layers
    def layer_names(self, year: int) -> dict[str, str]:
        """Asset key -> WMS layer name of every configured layer, for one year."""
        return {layer["key"]: layer["name"].format(year=year) for layer in self.cfg["layers"]}

    def layers_needed(self) -> dict[str, list[str]]:
        """Asset key -> the bands the sensor takes from it: each band from the first layer that
        has it, and only the layers that provide a band (BD ORTHO: NIR alone needs IRC)."""
        needed: dict[str, list[str]] = {}
        for band in self.cfg["bands"]:
            layer = next((lay for lay in self.cfg["layers"] if band in lay["bands"]), None)
            if layer is None:
                raise ConfigError(f"sensors.{self.name}.bands: no layer of sensors.{self.name}.layers "
                                  f"provides {band!r}")
            needed.setdefault(layer["key"], []).append(band)
        return needed

    def layer_bands(self, key: str) -> list[str]:
        """The bands of the layer ``key`` in image order (``irc``: NIR, R, G)."""
        return list(next(lay for lay in self.cfg["layers"] if lay["key"] == key)["bands"])

    # ----------------------------------------------------------------------------- units
    @property
    def encoding(self) -> Encoding:
        """How the sensor is stored: reflectance as int16 x 1e-4, scaled DNs (WMS images) as the
        uint8 DN with their scale, class codes as uint8 with their ``flag_values``."""
        base: dict[str, Any] = {"grid_mapping": "spatial_ref", "gsd_m": self.cfg["gsd_m"]}
        if self.role == LABELS:
            return Encoding("uint8", base | {"long_name": self.cfg["long_name"],
                                             "flag_values": list(self.cfg["classes"])})
        units = self.cfg["units"]
        if units["rule"] == "scale":
            return Encoding("uint8", base | {"scale_factor": float(units["scale"]), "add_offset": 0.0, "units": "1",
                                             "long_name": units["long_name"]})
        return Encoding("int16", base | {"scale_factor": REFLECTANCE_SCALE, "add_offset": 0.0, "units": "1",
                                         "long_name": units["long_name"]})

    def to_physical(self, dn: np.ndarray, item: Mapping[str, Any], band: str) -> np.ndarray:
        """Digital numbers of ``band`` (float32) -> physical values, by the sensor's unit rule."""
        units = self.cfg["units"]
        rule = units["rule"]
        if rule == "s2_processing_baseline":
            offset = stac_items.s2_offset_for_baseline(stac_items.processing_baseline(item))
            return (dn + offset) / 10000.0
        if rule == "raster_bands":
            declared = (item["assets"][self.asset_key(band)].get("raster:bands") or [{}])[0]
            return dn * float(declared.get("scale", units["scale"])) + float(declared.get("offset", units["offset"]))
        # Divided by the reciprocal: a scale of 1/255 then gives exactly DN / 255.0 in float32,
        # where DN * 0.0039215... differs in the last bit for a third of the values.
        return dn / float(1.0 / units["scale"])

    # -------------------------------------------------------------------------- validity
    def invalid_from_mask(self, mask: np.ndarray) -> np.ndarray:
        """Pixels made invalid by the quality mask: class values (SCL) or set bits (qa_pixel)."""
        rule = self.cfg["mask"]
        if "invalid_classes" in rule:
            return np.isin(mask, np.asarray(rule["invalid_classes"], dtype=mask.dtype))
        return _any_bit(mask, rule["invalid_bits"])

    def fill_from_mask(self, mask: np.ndarray) -> np.ndarray:
        """Pixels the mask itself flags as no data (outside the scene): SCL class 0, qa_pixel bit 0."""
        rule = self.cfg["mask"]
        if "invalid_classes" in rule:
            return np.isin(mask, np.asarray(rule["fill_classes"], dtype=mask.dtype))
        return _any_bit(mask, rule["fill_bits"])

    def valid_pixels(self, dn: np.ndarray) -> np.ndarray:
        """Pixels of one band's digital numbers (or class codes) that hold data: not a fill
        value, and inside the valid range where the sensor has one."""
        valid = ~np.isin(dn, np.asarray(self.cfg["fill_values"], dtype=dn.dtype))
        if self.cfg.get("valid_range"):
            low, high = self.cfg["valid_range"]
            valid &= (dn >= low) & (dn <= high)
        return valid

    @property
    def fill_value(self) -> float | None:
        """The source no-data value given to the warper, so that fill never blends into the
        edge pixels of a bilinear resampling."""
        values = self.cfg.get("fill_values") or []
        return float(values[0]) if values else None

    def item_rule(self, item: Mapping[str, Any]) -> str | None:
        """What ``item_rules`` say of an item: ``exclude``, ``rank_last`` or None."""
        for rule in self.cfg.get("item_rules", []):
            if item["properties"].get(rule["property"]) in rule["values"]:
                return str(rule["action"])
        return None

    def fill_colour_pixels(self, image: np.ndarray) -> np.ndarray:
        """Pixels of a WMS image (bands, h, w) painted in one of the layer's fill colours."""
        empty = np.zeros(image.shape[1:], dtype=bool)
        for colour in self.cfg["fill_colours"]:
            empty |= (image[: len(colour)] == np.asarray(colour, dtype=image.dtype)[:, None, None]).all(axis=0)
        return empty

    def empty_pixels(self, image: np.ndarray, key: str) -> np.ndarray:
        """Pixels of layer ``key``'s GetMap image (bands, h, w) without an image: transparent (the
        alpha band after the layer's bands, below opaque) or painted in a fill colour (an opaque
        ROK4 layer outside the area flown that year)."""
        bands = len(self.layer_bands(key))
        empty = self.fill_colour_pixels(image[:bands])
        if image.shape[0] > bands:
            empty |= image[bands] < 255
        return empty

    def eligible(self, invalid_fraction: float, max_invalid_fraction: float) -> bool:
        """Whether a scene with this invalid fraction of the footprint may be used."""
        return invalid_fraction <= self.invalid_limit(max_invalid_fraction)

    def invalid_limit(self, max_invalid_fraction: float) -> float:
        """The largest invalid fraction of the footprint a scene may have. Images: at most
        ``catalog.max_invalid_fraction`` cloudy or without data. Labels: the whole footprint
        labelled (a map with holes would teach the probes nothing there)."""
        return max_invalid_fraction if self.is_image else 1e-6


def _any_bit(mask: np.ndarray, bits: Sequence[int]) -> np.ndarray:
    value = 0
    for bit in bits:
        value |= 1 << int(bit)
    return (mask.astype(np.uint32) & value) != 0


# ================================================================================ the set


def sensors_of(config: Mapping[str, Any]) -> dict[str, Sensor]:
    """Every sensor of the config, in dataset order: the images in config order, then the labels.

    Raises ConfigError naming ``sensors.<name>.catalog`` when it is not one of ``catalogs``.
    """
    catalogs = config.get("catalogs", {})
    out = {}
    for name, cfg in config["sensors"].items():
        catalog_name = cfg["catalog"]
        if catalog_name not in catalogs:
            raise ConfigError(f"config key 'sensors.{name}.catalog': {catalog_name!r} is not one of catalogs "
                              f"({', '.join(sorted(catalogs)) or 'none'})")
        out[name] = Sensor(name, cfg, catalog_name, catalogs[catalog_name])
    images = [s for s in out.values() if s.is_image]
    labels = [s for s in out.values() if not s.is_image]
    return {s.name: s for s in images + labels}


def image_sensors(config: Mapping[str, Any]) -> dict[str, Sensor]:
    """The sensors whose groups are images (every sensor but the labels)."""
    return {name: s for name, s in sensors_of(config).items() if s.is_image}
