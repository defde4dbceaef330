"""Data preparation and evaluation for the paper's math and code experiments.

The scripts in scripts/ (prepare_math.py, prepare_code.py, evaluate.py) are thin wrappers around
this package: math_sets / code_sets build verl parquet files, evaluation computes avg@k per
benchmark and the best-checkpoint table.
"""
