"""The sweep CSV schema (results/<dataset>/runs.csv): one row per grid point, documented in the README."""

from __future__ import annotations

RUN_COLUMNS: list[str] = [
    "point_id",            # stable key of the grid point (backbone + architecture + budget + seed)
    "dataset", "image_size", "channels",
    "backbone", "size", "patch", "depth", "width",   # patch empty where the backbone has none (DiCo)
    "params",              # total parameters, frozen positional embeddings included
    "gmacs",               # forward GMACs, batch 1, one evaluation, no CFG doubling
    "train_steps", "batch", "lr",
    "train_compute_gmacs",  # gmacs * 3 * batch * train_steps (forward + backward ~ 3x forward)
    "metric_name", "metric_value",        # e.g. fd_fmnist_classifier (never labelled "fid" unless Inception FID)
    "classifier_accuracy",               # accuracy of the metric classifier on class-conditional samples
    "num_samples", "sampler", "sample_steps", "cfg_scale", "seed",
    "train_img_per_s", "sample_img_per_s", "peak_mem_mb",
    "device", "torch_version", "git_commit", "wall_time_s",
    "status",              # ok | failed
    "error",               # the error message of a failed point
    "run_dir",
]
