"""The data model: the base dataset, each modality, loading and NIfTI export."""
