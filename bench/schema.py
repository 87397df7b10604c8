"""The sweep CSV schema (results/<dataset>/runs.csv): one row per grid point, documented in the README."""

from __future__ import annotations

RUN_COLUMNS: list[str] = [
    "point_key",           # the row's key: readable prefix + hash of training recipe, steps and evaluation protocol
    "run_key",             # hash of everything that determines the training trajectory (diffusion.run)
    "recipe_key",          # the point key without the architecture: plots fit one curve per recipe
    "dataset", "image_size", "channels",
    "backbone", "size", "patch", "depth", "width",   # patch empty where the backbone has none (DiCo)
    "params",              # total parameters, frozen positional embeddings included
    "gmacs",               # forward GMACs, batch 1, one evaluation, no CFG doubling
    "vae_gmacs",           # VAE decoder GMACs per sample (latent data; empty for pixels): not part of gmacs
    "train_steps", "batch", "lr",
    "train_compute_gmacs",  # gmacs * 3 * batch * train_steps (forward + backward ~ 3x forward)
    "metric_name", "metric_value",        # e.g. fd_fmnist_classifier (never labelled "fid" unless Inception FID)
    "classifier_accuracy",               # accuracy of the metric classifier on class-conditional samples
    "diffusion_classifier_accuracy",     # zero-shot diffusion-classifier accuracy (eval.diffusion_classifier=true)
    "num_samples", "sampler", "sample_steps", "cfg_scale", "seed",
    "train_img_per_s",     # steady-state median img/s of the training log (diffusion.run.steady_throughput)
    "sample_img_per_s",
    "peak_mem_mb",         # training step: CUDA allocator peak, or CPU resident-set growth after data + model load
    "device", "torch_version",
    "git_commit",          # short commit, "-dirty" when tracked files differed
    "wall_time_s",
    "status",              # ok | failed
    "error",               # the error message of a failed point
    "run_dir",
]
