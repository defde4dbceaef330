"""Hydra configs shipped with shear-verl (a package so hydra can load them as pkg://shear_verl.config)."""
