"""shear-verl: SHEAR credit assignment (span-level Wasserstein token weights) for verl."""

__version__ = "0.1.0"
