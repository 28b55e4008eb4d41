"""Hyper-parameter sweeps (Ray Tune + Optuna): search spaces (`space.py`); the sweep command builds on them."""
