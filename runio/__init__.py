"""Run I/O shared by every package: safe (weights-only) loading, atomic writes that clean up after killed
writers, plain-words disk errors, and the run-environment helpers (device, git provenance)."""
