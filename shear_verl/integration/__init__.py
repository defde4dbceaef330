"""SHEAR inside verl 0.9.x: hidden-state capture, worker-side weights, estimator, driver wiring.

Everything that touches verl's classes is installed by :mod:`shear_verl.integration.patches`;
the other modules here hold the logic as plain functions so they can be tested on their own.
"""
