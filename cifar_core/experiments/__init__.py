"""Experiments over many runs: one-click studies, presets and the duration estimator."""
