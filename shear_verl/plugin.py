"""`verl.plugins` entry point: loaded by `import verl` in every verl process.

verl swallows plugin errors at DEBUG level, so every failure here is logged at WARNING with what
it breaks. Kept light: it registers the `shear` estimator and the baselines' and installs lazy patches; nothing heavy
is imported until verl imports the module being patched.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("shear_verl")

_STATUS: dict[str, str] = {}


def _load() -> None:
    try:
        from shear_verl.cpu import activate_if_requested

        _STATUS["cpu"] = "active" if activate_if_requested() else "inactive"
    except Exception as exc:  # noqa: BLE001 - must not break `import verl`
        _STATUS["cpu"] = f"failed: {exc!r}"
        logger.warning("shear-verl: CPU platform failed to load, CPU mode unavailable: %r", exc)
    try:
        from shear_verl.integration.estimator import register_estimator
        from shear_verl.integration.patches import install

        install()
        register_estimator()
        _STATUS["shear"] = "registered"
    except Exception as exc:  # noqa: BLE001
        _STATUS["shear"] = f"failed: {exc!r}"
        logger.warning("shear-verl: algorithm.adv_estimator=shear is NOT available in this process: %r", exc)
    try:
        from shear_verl.baselines import BASELINES, register_baselines

        register_baselines()
        _STATUS["baselines"] = "registered: " + ", ".join(BASELINES)
    except Exception as exc:  # noqa: BLE001
        _STATUS["baselines"] = f"failed: {exc!r}"
        logger.warning("shear-verl: the baseline estimators are NOT available in this process: %r", exc)


def status() -> dict[str, str]:
    """What the plugin did in this process, e.g. {'cpu': 'inactive', 'shear': 'registered'}."""
    return dict(_STATUS)


if not _STATUS:
    _load()
