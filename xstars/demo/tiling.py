"""The real tile grids the demo world's scenes are cut on: Sentinel-2 (MGRS), Landsat (WRS-2), WorldCover.

Pure functions of longitude and latitude, no file and no randomness, so that the demo's items carry
the ids, CRSs and pixel grids the real services give the same places:

* **Sentinel-2** tiles are MGRS 100 km squares (zone, latitude band, column and row letters in the
  standard lettering: column letters A-H, J-R, S-Z by zone modulo 3, row letters A-V without I and O,
  offset by 5 in even zones). A tile's upper-left corner is its square's west and north edges and it
  spans 109 800 m east and south, so neighbouring tiles overlap by 9.8 km; 10980, 5490 and 1830 px
  at 10, 20 and 60 m. A tile exists in a zone where its 100 km square meets the zone's 6 degrees of
  longitude (the square is cut at the zone edge, the tile is not): near a zone border a place is
  in tiles of both zones.
* **Landsat** scenes are WRS-2 path/rows: a circular sun-synchronous orbit (inclination 98.2 deg,
  233 paths in 16 days, 248 rows per orbit, row 60 on the equator descending), the path's node
  longitude fitted on a real scene (``LC08_L2SP_033032``: centre lon -104.22, lat 40.33). Not USGS's
  ephemeris: centres agree to a few kilometres, enough for ids, zones and footprints. A scene is on
  the grid of the UTM zone of its centre (as USGS does), ~185 x 198 km turned along the track.
* **WorldCover** tiles are 3 x 3 degrees (``N45E003``: lat 45-48, lon 3-6) at 1/12000 degree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

from pyproj import Geod, Transformer

S2_TILE_M = 109_800.0
S2_SQUARE_M = 100_000.0
LAT_BANDS = "CDEFGHJKLMNPQRSTUVWX"
COLUMN_SETS = ("STUVWXYZ", "ABCDEFGH", "JKLMNPQR")  # zone % 3 == 0, 1, 2
ROW_LETTERS = "ABCDEFGHJKLMNPQRSTUV"


def utm_zone(lon: float) -> int:
    """The UTM zone of a longitude (without the Norway and Svalbard exceptions: none in France)."""
    return min(int((lon + 180.0) // 6.0) + 1, 60)


def utm_epsg(zone: int, north: bool = True) -> int:
    return (32600 if north else 32700) + zone


def zone_lon_range(zone: int) -> tuple[float, float]:
    west = -180.0 + 6.0 * (zone - 1)
    return west, west + 6.0


def latitude_band(lat: float) -> str:
    """The MGRS latitude band letter (8 degrees each from 80 S, X spans 72-84 N)."""
    return LAT_BANDS[min(int((lat + 80.0) // 8.0), len(LAT_BANDS) - 1)]


def square_letters(zone: int, easting: float, northing: float) -> str:
    """The two letters of the MGRS 100 km square holding (easting, northing) in ``zone``."""
    column = COLUMN_SETS[zone % 3][int(easting // S2_SQUARE_M) - 1]
    row = ROW_LETTERS[(int(northing // S2_SQUARE_M) + (5 if zone % 2 == 0 else 0)) % len(ROW_LETTERS)]
    return column + row


@cache
def _to_utm(zone: int) -> Transformer:
    return Transformer.from_crs("EPSG:4326", f"EPSG:{utm_epsg(zone)}", always_xy=True)


@cache
def _from_utm(zone: int) -> Transformer:
    return Transformer.from_crs(f"EPSG:{utm_epsg(zone)}", "EPSG:4326", always_xy=True)


@dataclass(frozen=True)
class S2Tile:
    """One Sentinel-2 tile: its MGRS id and its grid (upper-left corner, 109.8 km square)."""

    zone: int
    band: str
    letters: str
    xmin: float
    ymax: float

    @property
    def tile_id(self) -> str:
        return f"{self.zone:02d}{self.band}{self.letters}"

    @property
    def crs(self) -> str:
        return f"EPSG:{utm_epsg(self.zone)}"

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        return self.xmin, self.ymax - S2_TILE_M, self.xmin + S2_TILE_M, self.ymax

    def shape(self, gsd_m: float) -> tuple[int, int]:
        n = round(S2_TILE_M / gsd_m)
        return n, n

    def corners_lonlat(self, per_side: int = 8) -> list[tuple[float, float]]:
        """The tile's outline in lon/lat, ``per_side`` points a side (closed ring)."""
        xmin, ymin, xmax, ymax = self.bounds
        ring = _ring(xmin, ymin, xmax, ymax, per_side)
        lon, lat = _from_utm(self.zone).transform([p[0] for p in ring], [p[1] for p in ring])
        return list(zip(lon, lat))


def _ring(xmin: float, ymin: float, xmax: float, ymax: float, per_side: int) -> list[tuple[float, float]]:
    """A closed rectangle ring, clockwise from the upper-left corner, ``per_side`` points a side."""
    t = [i / per_side for i in range(per_side)]
    top = [(xmin + f * (xmax - xmin), ymax) for f in t]
    right = [(xmax, ymax - f * (ymax - ymin)) for f in t]
    bottom = [(xmax - f * (xmax - xmin), ymin) for f in t]
    left = [(xmin, ymin + f * (ymax - ymin)) for f in t]
    ring = top + right + bottom + left
    return ring + [ring[0]]


def s2_tile_at(zone: int, easting: float, northing: float) -> S2Tile:
    """The tile whose 100 km square holds (easting, northing) in ``zone``."""
    x0 = math.floor(easting / S2_SQUARE_M) * S2_SQUARE_M
    y1 = math.floor(northing / S2_SQUARE_M) * S2_SQUARE_M + S2_SQUARE_M
    _, lat = _from_utm(zone).transform(x0 + S2_SQUARE_M / 2, y1 - S2_SQUARE_M / 2)
    return S2Tile(zone, latitude_band(lat), square_letters(zone, easting, northing), x0, y1)


def _square_meets_zone(tile: S2Tile) -> bool:
    """Whether the tile's 100 km square reaches into its zone's longitudes (else the tile does not exist)."""
    x0, y1 = tile.xmin, tile.ymax
    ring = _ring(x0, y1 - S2_SQUARE_M, x0 + S2_SQUARE_M, y1, 4)
    lons, _ = _from_utm(tile.zone).transform([p[0] for p in ring], [p[1] for p in ring])
    west, east = zone_lon_range(tile.zone)
    return max(lons) > west and min(lons) < east


def s2_tiles_covering(west: float, south: float, east: float, north: float) -> list[S2Tile]:
    """Every Sentinel-2 tile that holds the whole lon/lat box, in zones that reach it, sorted by id.

    A place in the 9.8 km overlap of two tiles is in both; near a zone border, in tiles of both
    zones (each tile of a zone reaches up to ~100 km past its zone edge).
    """
    zones = {utm_zone(west) - 1, utm_zone(west), utm_zone(east), utm_zone(east) + 1}
    found: dict[str, S2Tile] = {}
    for zone in sorted(z for z in zones if 1 <= z <= 60):
        xs, ys = _to_utm(zone).transform([west, east, east, west], [south, south, north, north])
        box = (min(xs), min(ys), max(xs), max(ys))
        # Squares whose tile can hold the box: the box's own square and the one west and north of it.
        for x in (box[0], box[0] - (S2_TILE_M - S2_SQUARE_M)):
            for y in (box[3], box[3] + (S2_TILE_M - S2_SQUARE_M)):
                if not 100_000 <= x < 900_000:
                    continue
                tile = s2_tile_at(zone, x, y)
                t = tile.bounds
                if t[0] <= box[0] and t[1] <= box[1] and box[2] <= t[2] and box[3] <= t[3] \
                        and _square_meets_zone(tile):
                    found[tile.tile_id] = tile
    return [found[k] for k in sorted(found)]


# ============================================================================== Landsat WRS-2

WRS2_INCLINATION_DEG = 98.2
WRS2_PATHS, WRS2_ROWS, WRS2_EQUATOR_ROW = 233, 248, 60
#: Earth's rotation under the satellite per degree of orbit arc: 24.72 deg a 98.88-minute orbit.
_EARTH_TURN_PER_ARC_DEG = 16 / WRS2_PATHS  # (360 * 16 / 233 deg an orbit) / 360 deg of arc
LANDSAT_SCENE_M = (185_000.0, 198_000.0)  # across, along the track (the recorded items: 36,700 km2)
_GEOD = Geod(ellps="WGS84")
_WGS84_F = 1 / 298.257223563


def _track_point(path: int, arc_deg: float, node_lon: float) -> tuple[float, float]:
    """(lon, lat) at ``arc_deg`` of orbit arc from the ascending node of ``path``."""
    i, u = math.radians(WRS2_INCLINATION_DEG), math.radians(arc_deg)
    geocentric = math.asin(math.sin(i) * math.sin(u))
    lat = math.degrees(math.atan(math.tan(geocentric) / (1 - _WGS84_F) ** 2))  # geodetic: up to 0.19 deg more
    lon = node_lon + math.degrees(math.atan2(math.cos(i) * math.sin(u), math.cos(u)))
    lon -= _EARTH_TURN_PER_ARC_DEG * arc_deg
    return (lon + 180.0) % 360.0 - 180.0, lat


def _arc_of_row(row: float) -> float:
    return 180.0 + (row - WRS2_EQUATOR_ROW) * 360.0 / WRS2_ROWS


def _node_lon(path: int) -> float:
    """The ascending-node longitude of ``path``: paths go westwards by 360/233 degrees."""
    return _NODE_LON_PATH1 - (path - 1) * 360.0 / WRS2_PATHS


def _fit_node_lon_path1() -> float:
    """Path 1's node longitude such that the centre of path 33 row 32 is at the real scene's (-104.22)."""
    lon, _ = _track_point(33, _arc_of_row(32), 0.0)
    return (-104.22 - lon + (33 - 1) * 360.0 / WRS2_PATHS + 180.0) % 360.0 - 180.0


_NODE_LON_PATH1 = 0.0
_NODE_LON_PATH1 = _fit_node_lon_path1()


def wrs2_centre(path: int, row: int) -> tuple[float, float]:
    """(lon, lat) of a WRS-2 scene centre."""
    return _track_point(path, _arc_of_row(row), _node_lon(path))


@dataclass(frozen=True)
class WrsScene:
    """A WRS-2 scene: path/row, its centre, the UTM zone of the centre and its footprint corners."""

    path: int
    row: int
    centre: tuple[float, float]
    heading_deg: float  # azimuth of the ground track at the centre (descending: about 190 at 45 N)

    @property
    def zone(self) -> int:
        return utm_zone(self.centre[0])

    @property
    def crs(self) -> str:
        return f"EPSG:{utm_epsg(self.zone)}"

    def corners_lonlat(self) -> list[tuple[float, float]]:
        """Footprint corners (closed ring): the 185 km x 198 km scene turned along the track."""
        across, along = LANDSAT_SCENE_M
        half_diag = math.hypot(across, along) / 2
        angle = math.degrees(math.atan2(across, along))
        ring = []
        for bearing in (-angle, angle, 180 - angle, 180 + angle):  # front left, front right, back right, back left
            lon, lat, _ = _GEOD.fwd(self.centre[0], self.centre[1], self.heading_deg + bearing, half_diag)
            ring.append((lon, lat))
        return ring + [ring[0]]

    def contains(self, lon: float, lat: float) -> bool:
        from shapely.geometry import Point, Polygon
        return Polygon(self.corners_lonlat()).contains(Point(lon, lat))


def wrs2_scene(path: int, row: int) -> WrsScene:
    arc = _arc_of_row(row)
    lon0, lat0 = _track_point(path, arc - 0.05, _node_lon(path))
    lon1, lat1 = _track_point(path, arc + 0.05, _node_lon(path))
    heading, _, _ = _GEOD.inv(lon0, lat0, lon1, lat1)
    return WrsScene(path, row, wrs2_centre(path, row), heading % 360.0)


def wrs2_scenes_covering(west: float, south: float, east: float, north: float) -> list[WrsScene]:
    """Every WRS-2 scene whose footprint holds the whole lon/lat box (typically 2 paths x 1-2 rows)."""
    lon, lat = (west + east) / 2, (south + north) / 2
    found = []
    for path in range(1, WRS2_PATHS + 1):
        c_lon, _ = wrs2_centre(path, WRS2_EQUATOR_ROW - round(lat / 1.42))
        if abs((c_lon - lon + 180.0) % 360.0 - 180.0) > 4.0:
            continue
        for row in range(1, WRS2_ROWS + 1):
            c_lon, c_lat = wrs2_centre(path, row)
            if abs(c_lat - lat) > 2.5 or abs((c_lon - lon + 180.0) % 360.0 - 180.0) > 4.0:
                continue
            scene = wrs2_scene(path, row)
            if all(scene.contains(x, y) for x in (west, east) for y in (south, north)):
                found.append(scene)
    return sorted(found, key=lambda s: (s.path, s.row))


# ================================================================================= WorldCover

WORLDCOVER_STEP_DEG = 1.0 / 12000.0
WORLDCOVER_TILE_DEG = 3


def worldcover_tile_name(lon: float, lat: float) -> str:
    """The 3-degree tile holding (lon, lat), named by its south-west corner (``N45E003``)."""
    lat0 = math.floor(lat / WORLDCOVER_TILE_DEG) * WORLDCOVER_TILE_DEG
    lon0 = math.floor(lon / WORLDCOVER_TILE_DEG) * WORLDCOVER_TILE_DEG
    return f"{'N' if lat0 >= 0 else 'S'}{abs(lat0):02d}{'E' if lon0 >= 0 else 'W'}{abs(lon0):03d}"


def worldcover_tile_origin(name: str) -> tuple[float, float]:
    """(west, north) of a tile named like ``N45E003``."""
    lat0 = int(name[1:3]) * (1 if name[0] == "N" else -1)
    lon0 = int(name[4:7]) * (1 if name[3] == "E" else -1)
    return float(lon0), float(lat0 + WORLDCOVER_TILE_DEG)


def worldcover_tiles_covering(west: float, south: float, east: float, north: float) -> list[str]:
    """The 3-degree tiles a lon/lat box touches (two for a box across a tile edge)."""
    names = set()
    for lon in (west, east - 1e-9):
        for lat in (south, north - 1e-9):
            names.add(worldcover_tile_name(lon, lat))
    return sorted(names)
