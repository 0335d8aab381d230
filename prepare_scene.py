"""Provider files in, the model's stacks out: S1 and S2 as cloud-optimised GeoTIFFs on the S2 grid.

    python prepare_scene.py --s1 S1 --s2 S2 --out_s1 S1_STACK.tif --out_s2 S2_STACK.tif \\
        [--s1_scale db|power|amplitude] [--s2_offset N] [--s2_bands B01,B02,...]

--s2: a GeoTIFF stack in the model's band order, or a folder (a SAFE product or any folder of band
files): every JPEG 2000 or GeoTIFF file named with a band (B01 ... B12, B8A, optionally _10m, _20m,
_60m), the finest copy of each band, resampled by nearest neighbour onto the finest band's grid,
out in the order B01-B08, B8A, B09-B12 (no B10 for L2A): uint16, digital numbers + offset (--s2_offset
when given, else the product's MTD_MSIL1C.xml RADIO_ADD_OFFSET or MTD_MSIL2A.xml BOA_ADD_OFFSET, else 0),
clipped at 0; 0 where missing (nodata 0: a pixel is missing where every band is 0).
--s1: a 2-band GeoTIFF (VV, VH), a folder or two files named with VV and VH, in any CRS and
resolution: warped bilinearly onto the S2 grid in the file's own units, then to dB by --s1_scale;
float32, NaN where missing. Both are written block by block (GDAL's cache capped), never whole, into
uncompressed tiled GeoTIFFs beside the outputs (a 10,980 px tile: about 4.3 GB of disk for a while),
then copied as cloud-optimised GeoTIFFs (deflate, overviews) to a temporary name and renamed; an
output that is one of the inputs is refused. docs/predict.md.
"""
from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.enums import Resampling
from rasterio.windows import Window
from tqdm import tqdm

from datasets.scenes import S1_SCALES, Scene, SceneError, describe_grid, open_scene
from util import cli, flags, maps

log = logging.getLogger("prepare_scene")

BLOCK = 1024  # px a side read and written at once: S2's JPEG 2000 tiles are 1024 px at 10 m
GDAL_CACHE = 256 * 2**20  # bytes (rasterio.Env takes GDAL_CACHEMAX in bytes: 256 would be 256 bytes); holds a
# row of blocks of every band. GDAL's default is 5 % of the machine's RAM


def check_outputs(scene: Scene, inputs: Sequence[Path], outputs: Sequence[Path]) -> None:
    """Refuses outputs that are one of the inputs (any file read, or a folder given) or one another."""
    taken = {Path(p).resolve() for p in (*scene.files, *inputs)}
    for out in outputs:
        if out.resolve() in taken or out.is_dir():
            raise SceneError(f"{out} is one of the inputs (or a folder): prepare_scene.py never overwrites an input; "
                             f"give another output name")
    if outputs[0].resolve() == outputs[1].resolve():
        raise SceneError(f"--out_s1 and --out_s2 are both {outputs[0]}")


def grid_side(scene: Scene) -> int:
    return max(scene.grid["width"], scene.grid["height"])


def overview_factors(side: int, block: int = 512) -> list[int]:
    """2, 4, 8, ... until an overview fits one block (the COG driver's own rule)."""
    factors, factor = [], 2
    while -(-side // (factor // 2)) > block:
        factors.append(factor)
        factor *= 2
    return factors


def temporary(path: Path, what: str) -> Path:
    return path.with_name(f".{path.name}.{what}.{os.getpid()}.tmp")


def write_blocks(scene: Scene, targets: dict[str, Path], block: int) -> None:
    """The scene into tiled GeoTIFFs (S1 float32 NaN nodata, S2 uint16 nodata 0), one block at a time."""
    grid = scene.grid
    profile = dict(driver="GTiff", width=grid["width"], height=grid["height"], crs=grid["crs"],
                   transform=grid["transform"], tiled=True, blockxsize=512, blockysize=512, bigtiff="if_safer")
    names = {"s1": scene.s1_band_names, "s2": scene.s2_band_names}
    kinds = {"s1": ("float32", np.nan), "s2": ("uint16", 0)}
    outs = {}
    try:
        for key, path in targets.items():
            dtype, nodata = kinds[key]
            outs[key] = rasterio.open(path, "w", count=len(names[key]), dtype=dtype, nodata=nodata, **profile)
            for i, name in enumerate(names[key], 1):
                outs[key].set_band_description(i, name)
        windows = [Window(col, row, min(block, grid["width"] - col), min(block, grid["height"] - row))
                   for row in range(0, grid["height"], block) for col in range(0, grid["width"], block)]
        for window in tqdm(windows, desc="prepare", unit="block", disable=None):
            s1, s2 = scene.read(window)
            outs["s1"].write(s1, window=window)
            outs["s2"].write(np.clip(np.nan_to_num(s2, nan=0.0), 0, 65535).round().astype(np.uint16), window=window)
    finally:
        for dst in outs.values():
            dst.close()


def prepare(s1, s2: Path, out_s1: Path, out_s2: Path, *, s1_scale: str = "db", s2_offset: float | None = None,
            s2_bands: Sequence[str] | None = None, block: int = BLOCK) -> dict:
    """Writes out_s1 and out_s2 (cloud-optimised GeoTIFFs on the S2 grid); returns what was done."""
    inputs = [Path(p) for p in (s1 if isinstance(s1, (list, tuple)) else [s1])] + [Path(s2)]
    with open_scene(s1, s2, s1_scale=s1_scale, s2_offset=s2_offset, s2_bands=s2_bands) as scene:
        check_outputs(scene, inputs, [out_s1, out_s2])
        for source in scene.s2_sources:
            if np.issubdtype(np.dtype(source.dtype), np.floating):
                raise SceneError(f"{source.path} holds {source.dtype} values; prepare_scene.py writes uint16 "
                                 f"digital numbers: give the stack to predict.py as it is")
        log.info("%s: S2 %s -> %s, S1 %s (%s) -> %s", scene, ",".join(scene.s2_band_names), out_s2,
                 ",".join(scene.s1_band_names), s1_scale, out_s1)
        outputs = {"s1": out_s1, "s2": out_s2}
        tiled = {key: temporary(path, "tiled") for key, path in outputs.items()}
        finals = {key: temporary(path, "cog") for key, path in outputs.items()}
        try:
            for path in outputs.values():
                path.parent.mkdir(parents=True, exist_ok=True)
            write_blocks(scene, tiled, block)
            for key in outputs:
                # Overviews built in the uncompressed tiled file, in place (compressed blocks rewritten by GDAL's
                # overview pass, or the COG driver's own, grew a 10,980 px tile's temporary file past 4 GB), then
                # copied as they are. For viewing only: S2 keeps its digital numbers (nearest), S1 is averaged.
                with rasterio.open(tiled[key], "r+") as dst:
                    dst.build_overviews(overview_factors(grid_side(scene)), Resampling.nearest if key == "s2"
                                        else Resampling.average)
                # deflate level 1: five times faster than the default level, files 5 % larger (measured)
                rasterio.shutil.copy(tiled[key], finals[key], driver="COG", compress="deflate", level=1,
                                     predictor=2 if key == "s2" else 3, blocksize=512, bigtiff="if_safer")
                tiled[key].unlink()
            for key, path in outputs.items():
                os.replace(finals[key], path)
        finally:
            for path in (*tiled.values(), *finals.values()):
                path.unlink(missing_ok=True)
        offsets = sorted({o for source in scene.s2_sources for o in source.offsets})
        info = {"s1": str(out_s1), "s2": str(out_s2), "grid": describe_grid(scene.grid),
                "s2_bands": scene.s2_band_names, "s2_offsets": offsets, "s1_scale": s1_scale}
    log.info("wrote %s and %s: %s, S2 offsets %s", out_s1, out_s2, info["grid"], offsets)
    return info


def build_parser() -> argparse.ArgumentParser:
    p = flags.parser(__doc__)
    p.add_argument("--s1", type=Path, nargs="+", required=True, metavar="S1",
                   help="a 2-band GeoTIFF (VV, VH), a folder, or two files whose names hold VV and VH")
    p.add_argument("--s2", type=Path, required=True, help="a GeoTIFF stack, or a folder of band files (SAFE)")
    p.add_argument("--out_s1", type=Path, required=True, help="S1 stack to write (float32 dB)")
    p.add_argument("--out_s2", type=Path, required=True, help="S2 stack to write (uint16)")
    p.add_argument("--s1_scale", choices=S1_SCALES, default="db",
                   help="what S1 holds: db (default), power (dB = 10 log10), amplitude (dB = 20 log10)")
    p.add_argument("--s2_offset", type=float, default=None,
                   help="added to S2 digital numbers, in place of the product's metadata offsets when given "
                        "(default: the metadata's, else 0; -1000 for processing baseline 04.00 and later)")
    p.add_argument("--s2_bands", type=lambda text: [b.strip() for b in text.split(",") if b.strip()], default=None,
                   help="comma list of the S2 bands to write, in that order (default: all the input holds)")
    p.add_argument("--block", type=flags.positive_int, default=BLOCK, help=f"px read at once (default {BLOCK})")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if len(args.s1) > 2:
        build_parser().error("--s1 takes one file or folder, or two files (VV and VH)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    s1 = args.s1[0] if len(args.s1) == 1 else args.s1
    with maps.gdal_cache(GDAL_CACHE):
        return prepare(s1, args.s2, args.out_s1, args.out_s2, s1_scale=args.s1_scale, s2_offset=args.s2_offset,
                       s2_bands=args.s2_bands, block=args.block)


if __name__ == "__main__":
    cli.run(main)
