"""Session-wide fixtures shared by several test directories."""

import pytest


@pytest.fixture(scope="session")
def counting_assets(tmp_path_factory):
    """The main job's warm-started counting model, tokenizer and data (built once, ~2 min)."""
    from shear_verl.tiny import TinySpec, build_assets

    return build_assets(tmp_path_factory.mktemp("counting_assets"), TinySpec.counting())
