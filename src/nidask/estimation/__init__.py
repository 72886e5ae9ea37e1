"""Motion estimation: models, registration, frames, leave-one-out, the estimator."""
