"""Bridges to other tools' data models: nidask's series handed over without a copy."""

from nidask.interop.nifreeze import to_nifreeze

__all__ = ["to_nifreeze"]
