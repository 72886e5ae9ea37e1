"""Arrays and files: sources, .npy layouts, stores, NIfTI and NFDH5 formats, caches."""
