"""BIDS: finding series and their sidecars, naming derivatives, participant runs."""

from nidask.bids.layout import (
    BIDS_VERSION,
    BIDSIGNORE,
    DATATYPES,
    MODALITIES,
    build_name,
    dataset_description,
    dataset_root,
    derivative_paths,
    find_mask,
    find_series,
    find_sidecars,
    parse_name,
    sidecar_metadata,
    write_bidsignore,
    write_dataset_description,
)

__all__ = [
    "BIDS_VERSION",
    "BIDSIGNORE",
    "DATATYPES",
    "MODALITIES",
    "build_name",
    "dataset_description",
    "dataset_root",
    "derivative_paths",
    "find_mask",
    "find_series",
    "find_sidecars",
    "parse_name",
    "sidecar_metadata",
    "write_bidsignore",
    "write_dataset_description",
]
