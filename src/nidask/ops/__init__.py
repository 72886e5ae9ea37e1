"""Operations on dask arrays of volumes: resampling and its compiled kernels."""
