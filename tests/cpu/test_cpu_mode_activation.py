"""CPU mode switches on only when asked, through the real entry points, and fails loudly.

The device checks run in fresh interpreters: verl resolves its platform once per process, and the
`verl.plugins` / `vllm.general_plugins` entry points only fire on a first import.
"""

import json
import logging
import os
import subprocess
import sys

import pytest

import shear_verl.cpu
from shear_verl.cpu import patches

VERL_DEVICE_PROBE = """
import json, os, sys
import verl
from verl.plugin.platform import PlatformRegistry
from verl.utils import device
import shear_verl.plugin
out = {
    "device": device.get_device_name(),
    "backend": device.get_nccl_backend(),
    "ray_resource": device.get_resource_name(),
    "cpu_registered": "cpu" in PlatformRegistry.registered_names(),
    "env": os.environ.get("VERL_PLATFORM"),
    "plugin": shear_verl.plugin.status().get("cpu"),
}
if os.environ.get("PROBE_PATCHES"):
    from verl.utils import distributed
    from verl.workers import engine_workers  # as verl's workers import the engines
    from verl.workers.engine import EngineRegistry
    from verl.workers.engine.fsdp import transformer_impl
    from shear_verl._patching import is_patched
    out["pg_patched"] = is_patched(distributed.initialize_global_process_group_ray)
    out["pg_rebound"] = engine_workers.initialize_global_process_group_ray is distributed.initialize_global_process_group_ray
    out["fsdp2_cpu_engine"] = EngineRegistry.get_engine_cls("language_model", "fsdp2") is transformer_impl.FSDPEngineWithLMHead
    out["offload_pin_memory"] = transformer_impl.CPUOffloadPolicy().pin_memory
    out["shear_plugin"] = shear_verl.plugin.status().get("shear")
print("PROBE" + json.dumps(out))
"""

VLLM_GEMM_PROBE = """
import json, torch
import torch.nn.functional as F
from vllm.plugins import load_general_plugins
load_general_plugins()  # what vLLM runs in each of its processes
from vllm.model_executor.layers import utils
from shear_verl._patching import is_patched
layer = torch.nn.Linear(8, 4)
weight = layer.weight
utils.dispatch_cpu_unquantized_gemm(layer, remove_weight=True)  # vLLM's post-load hook for Linear
with torch.no_grad():
    layer.weight.mul_(-2.0)  # an in-place weight sync, as verl's rollout reload does
x = torch.randn(3, 8)
y = layer.cpu_linear(x, layer.weight, layer.bias)
print("PROBE" + json.dumps({
    "patched": is_patched(utils.dispatch_cpu_unquantized_gemm),
    "weight_kept": layer.weight is weight and layer.weight.shape == (4, 8),
    "uses_synced_weight": torch.allclose(y, F.linear(x, weight, layer.bias)),
}))
"""


def _probe(code: str, env: dict, *args: str) -> dict:
    base = {k: v for k, v in os.environ.items() if k not in ("VERL_PLATFORM", "VERL_USE_EXTERNAL_PLUGINS")}
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], env={**base, **env}, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE")][-1]
    return json.loads(line[len("PROBE") :])


def test_inactive_unless_asked_leaves_verls_device_detection_unchanged():
    ours = _probe(VERL_DEVICE_PROBE, {})
    # Reference: the same process with verl's plugin discovery off (stock verl, our plugin never runs).
    stock = _probe(VERL_DEVICE_PROBE, {"VERL_USE_EXTERNAL_PLUGINS": "none"})
    for key in ("device", "backend", "ray_resource"):
        assert ours[key] == stock[key], key
    assert ours["plugin"] == "inactive"  # the entry point did run, and chose to do nothing
    assert not ours["cpu_registered"] and ours["env"] is None


def test_env_var_activates_platform_and_patches_through_the_entry_point():
    out = _probe(VERL_DEVICE_PROBE, {"VERL_PLATFORM": "cpu", "PROBE_PATCHES": "1"})
    assert out["plugin"] == "active"
    assert (out["device"], out["backend"], out["ray_resource"]) == ("cpu", "gloo", "GPU")
    assert out["pg_patched"] and out["pg_rebound"]
    assert out["fsdp2_cpu_engine"]
    assert out["offload_pin_memory"] is False
    # The SHEAR integration's own post-import patches (same process, same modules) coexist.
    assert out["shear_plugin"] == "registered"


def test_trainer_device_cpu_override_activates_and_exports_env():
    out = _probe(VERL_DEVICE_PROBE, {}, "trainer.device=cpu", "data.train_batch_size=8")
    assert out["plugin"] == "active"
    assert out["device"] == "cpu"
    assert out["env"] == "cpu"  # what Ray workers and vLLM's processes inherit


def test_vllm_plugin_keeps_linear_weights_live_for_in_place_sync():
    out = _probe(VLLM_GEMM_PROBE, {"VERL_PLATFORM": "cpu"})
    assert out == {"patched": True, "weight_kept": True, "uses_synced_weight": True}


def test_vllm_plugin_is_a_no_op_without_cpu_mode(monkeypatch):
    monkeypatch.delenv("VERL_PLATFORM", raising=False)
    from shear_verl.cpu import vllm_plugin

    modules = set(sys.modules)
    vllm_plugin.register()
    assert not {m for m in set(sys.modules) - modules if m.startswith("vllm")}


@pytest.mark.parametrize(
    "environ, argv, expected",
    [
        ({}, [], False),
        ({"VERL_PLATFORM": "cpu"}, [], True),
        ({"VERL_PLATFORM": " CPU "}, [], True),
        ({"VERL_PLATFORM": "cuda"}, ["trainer.device=cpu"], False),  # an explicit platform wins
        ({}, ["trainer.device=cpu"], True),
        ({}, ["++trainer.device='cpu'"], True),
        ({}, ["trainer.device=cuda"], False),
        ({}, ["trainer.device=cpu_offload"], False),
        ({}, ["actor.device=cpu"], False),
    ],
)
def test_cpu_requested(environ, argv, expected):
    assert shear_verl.cpu.cpu_requested(environ=environ, argv=argv) is expected


def test_unsupported_verl_version_fails_loudly_before_any_side_effect(monkeypatch, caplog):
    monkeypatch.setenv("VERL_PLATFORM", "cpu")
    monkeypatch.delenv("VLLM_TARGET_DEVICE", raising=False)
    monkeypatch.setattr(patches, "SUPPORTED_VERL", ("0.0.1",))
    monkeypatch.setattr(shear_verl.cpu, "_active", False)
    with caplog.at_level(logging.WARNING, logger="shear_verl.cpu"):
        with pytest.raises(patches.UnsupportedVersionError, match=r"supports verl 0\.0\.1.*0\.9\.1 is installed"):
            shear_verl.cpu.activate_if_requested()
    assert any(r.levelno == logging.WARNING and "could not be activated" in r.getMessage() for r in caplog.records)
    assert "VLLM_TARGET_DEVICE" not in os.environ and shear_verl.cpu._active is False


def test_missing_patched_symbol_names_supported_versions():
    import types

    module = types.ModuleType("verl.utils.distributed")
    with pytest.raises(patches.UnsupportedVersionError, match=r"initialize_global_process_group_ray.*0\.9\.1"):
        patches._patch_process_group(module)


def test_required_overrides_rejects_bad_worker_count():
    with pytest.raises(ValueError, match="n_workers"):
        shear_verl.cpu.required_overrides(n_workers=0)
