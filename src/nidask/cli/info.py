"""``nidask info``: describe a series from its headers, without reading its data.

:func:`describe` gathers the facts (shape, dtype, chunking, storage format, size
on disk and in RAM, modality metadata) as a JSON-friendly dict, :func:`_print_info`
prints them as a table, :func:`cmd_info` runs the subcommand and
:func:`add_parser` adds it to the ``nidask`` parser.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from nidask.cli.common import add_companion_options, human_bytes, open_dataset, say
from nidask.data.base import BaseDataset, by_modality
from nidask.data.bold import BOLD
from nidask.data.dmri import DWI
from nidask.data.pet import PET
from nidask.io.sources import HDF5Source, is_hdf5, nifti_scaling


def _file_facts(path: str) -> dict:
    """Storage facts read from the file's header only."""
    import h5py
    import nibabel as nb

    lower = path.lower()
    facts: dict = {"bytes_on_disk": os.path.getsize(path)}
    if is_hdf5(path):
        # the layout as the reader takes it (``volume_axis`` 0, -1 or absent)
        volume_major = HDF5Source(path, "/0/dataobj").volume_major
        with h5py.File(path, "r") as f:
            dset = f["/0/dataobj"]
            version = f.attrs.get("Version")
            facts.update(
                format=f"NFDH5 v{int(version) if version is not None else '?'}",
                layout="(N, X, Y, Z)" if volume_major else "(X, Y, Z, N)",
                on_disk_dtype=str(dset.dtype),
                hdf5_chunks=list(dset.chunks) if dset.chunks else None,
                compression=dset.compression,
            )
    elif lower.endswith((".nii", ".nii.gz")):
        image = nb.load(path)
        facts.update(
            format="NIfTI-2" if isinstance(image, nb.Nifti2Image) else "NIfTI-1",
            compression="gzip" if lower.endswith(".gz") else None,
            on_disk_dtype=str(image.get_data_dtype()),
            scaled=nifti_scaling(image) is not None,
            volumes_in_file=int(image.shape[3]) if len(image.shape) > 3 else 1,
        )
    elif lower.endswith(".npy"):
        from nidask.io.npy import read_npy_header

        shape, fortran, dtype, _ = read_npy_header(path)
        facts.update(
            format="npy",
            layout="volume-contiguous (Fortran)" if fortran else "C order",
            on_disk_dtype=str(dtype),
        )
    return facts


def _bzero_kind(bzero) -> str | None:
    if bzero is None:
        return None
    return "lazy (computed when needed)" if hasattr(bzero, "dask") else "stored"


def _dwi_facts(dataset: DWI, volumes_in_file: int | None) -> dict:
    in_file = volumes_in_file or int(dataset.original_index.max()) + 1
    shells = [{"bvalue": round(b, 1), "volumes": len(m)} for b, m in dataset.get_shells()]
    return {
        "dwi": {
            "b0_volumes": int(in_file - len(dataset)),
            "bzero": _bzero_kind(dataset.bzero),
            "shells": shells,
        }
    }


def _pet_facts(dataset: PET, volumes_in_file: int | None) -> dict:
    return {
        "pet": {
            "frames": len(dataset),
            "total_duration_s": float(dataset.total_duration),
            "first_midframe_s": float(dataset.midframe[0]),
            "last_midframe_s": float(dataset.midframe[-1]),
        }
    }


def _bold_facts(dataset: BOLD, volumes_in_file: int | None) -> dict:
    return {
        "bold": {
            "volumes": len(dataset),
            "repetition_time_s": dataset.repetition_time,
            "duration_s": float(len(dataset) * dataset.repetition_time),
            "slice_timing": dataset.slice_timing is not None,
        }
    }


#: Dataset class -> its modality's facts (JSON-friendly; reads no data).
MODALITY_FACTS = {
    BaseDataset: lambda dataset, volumes_in_file: {},
    DWI: _dwi_facts,
    PET: _pet_facts,
    BOLD: _bold_facts,
}


def modality_facts(dataset, volumes_in_file: int | None = None) -> dict:
    """The facts ``nidask info`` reports for the dataset's modality."""
    return by_modality(MODALITY_FACTS, dataset)(dataset, volumes_in_file)


def describe(dataset, path: str) -> dict:
    """What ``nidask info`` reports, as a JSON-friendly dict (no data are read)."""
    path = os.path.abspath(path)
    chunks = dataset.dataobj.chunks[3]
    volume_bytes = dataset.size3d * dataset.dtype.itemsize
    zooms = np.linalg.norm(dataset.affine[:3, :3], axis=0)
    facts = {
        "file": path,
        **_file_facts(path),
        "type": type(dataset).__name__,
        "shape": list(dataset.shape),
        "volumes": len(dataset),
        "voxel_size_mm": [round(float(z), 4) for z in zooms],
        "dtype": str(dataset.dtype),
        "chunks": {
            "volumes_per_chunk": int(max(chunks)),
            "n_chunks": len(chunks),
            "bytes_per_chunk": int(max(chunks) * volume_bytes),
        },
        "bytes_in_ram": int(dataset.dataobj.nbytes),
        "bytes_in_ram_float32": int(dataset.size3d * len(dataset) * 4),
        "mask_voxels": None if dataset.brainmask is None else int(dataset.brainmask.sum()),
        "motion": dataset.motion_affines is not None,
    }
    facts.update(modality_facts(dataset, facts.get("volumes_in_file")))
    return facts


def _print_info(facts: dict) -> None:
    rows = [("file", facts["file"])]
    storage = facts.get("format", "unknown")
    if facts.get("compression"):
        storage += f", {facts['compression']}-compressed"
    if facts.get("layout"):
        storage += f", layout {facts['layout']}"
    if facts.get("hdf5_chunks"):
        storage += f", HDF5 chunks {tuple(facts['hdf5_chunks'])}"
    rows.append(("format", storage))
    rows.append(("type", facts["type"]))
    x, y, z, n = facts["shape"]
    volumes = f"{x} x {y} x {z} x {n} volumes"
    if "volumes_in_file" in facts and facts["volumes_in_file"] != n:
        volumes += f" ({facts['volumes_in_file']} in the file)"
    rows.append(("shape", volumes))
    rows.append(("voxel size", " x ".join(f"{v:g}" for v in facts["voxel_size_mm"]) + " mm"))
    dtype = facts["dtype"]
    if facts.get("on_disk_dtype") and facts["on_disk_dtype"] != dtype:
        dtype += f" (stored as {facts['on_disk_dtype']}" + (
            ", scaled)" if facts.get("scaled") else ")"
        )
    rows.append(("dtype", dtype))
    c = facts["chunks"]
    rows.append(
        (
            "chunks",
            f"{c['volumes_per_chunk']} volume(s) per chunk, {c['n_chunks']} chunk(s), "
            f"{human_bytes(c['bytes_per_chunk'])} per chunk",
        )
    )
    rows.append(
        (
            "size",
            f"{human_bytes(facts['bytes_on_disk'])} on disk, "
            f"{human_bytes(facts['bytes_in_ram'])} in RAM "
            f"({facts['dtype']}; {human_bytes(facts['bytes_in_ram_float32'])} as float32)",
        )
    )
    if "dwi" in facts:
        dwi = facts["dwi"]
        shells = [f"b={s['bvalue']:g}: {s['volumes']}" for s in dwi["shells"]]
        rows.append(("b-values", ", ".join([f"b=0: {dwi['b0_volumes']}", *shells])))
        rows.append(("b=0 ref", dwi["bzero"] or "none"))
    if "pet" in facts:
        pet = facts["pet"]
        rows.append(
            (
                "frames",
                f"{pet['frames']} frames over {pet['total_duration_s']:g} s "
                f"(mid-frames {pet['first_midframe_s']:g} .. {pet['last_midframe_s']:g} s)",
            )
        )
    mask = facts["mask_voxels"]
    rows.append(("brain mask", "none" if mask is None else f"{mask} voxels"))
    rows.append(("motion", "set" if facts["motion"] else "none"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        say(f"{key:<{width}}  {value}")


def cmd_info(args) -> int:
    dataset = open_dataset(args.file, args)
    with dataset:
        facts = describe(dataset, args.file)
    if args.json:
        say(json.dumps(facts, indent=2))
    else:
        _print_info(facts)
    return 0


def add_parser(subparsers, parents) -> argparse.ArgumentParser:
    """Add ``nidask info`` to ``subparsers``; ``parents`` hold the shared options."""
    info = subparsers.add_parser(
        "info",
        parents=parents,
        help="describe a series without reading its data",
        description="Shape, dtype, chunking, modality metadata (b-shells, frame timing) "
        "and size on disk vs in RAM, from headers only.",
    )
    info.add_argument("file", help="NIfTI (.nii, .nii.gz), NFDH5 (.h5) or .npy series")
    add_companion_options(info)
    info.add_argument("--json", action="store_true", help="print the facts as JSON")
    info.set_defaults(func=cmd_info)
    return info
