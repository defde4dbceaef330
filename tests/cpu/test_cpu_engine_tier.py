"""Engine tier: verl's actor (an FSDP2 ``TrainingWorker`` on gloo, world size 1) on CPU, no Ray.

The worker is verl's own ``ActorRolloutRefWorker(role="actor")``, configured from the tiny run's
overrides and fed batches the way ``RayPPOTrainer`` feeds them (``left_right_2_no_padding``, the
same meta keys). References: a plain transformers forward of the same checkpoint for the
log-probs, and one hand-written SGD step on the PPO surrogate for the update (at ratio 1 the
clipped PPO loss has gradient ``-A * grad log p`` averaged over response tokens: verl's
token-mean aggregation; SGD without clipping or weight decay makes the step exact to compare).

It runs in a child interpreter (this file, as a script): CPU mode is process-wide (verl resolves
its platform once per process) and the worker joins a process group.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

LR = 0.1


def test_fsdp2_worker_log_probs_and_ppo_update_match_transformers(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "VERL_USE_EXTERNAL_PLUGINS"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env.update(VERL_PLATFORM="cpu", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), TORCH_COMPILE_DISABLE="1")
    proc = subprocess.run([sys.executable, __file__, str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    r = torch.load(tmp_path / "result.pt")
    mask = r["response_mask"].bool()

    assert r["device"] == "cpu" and r["backend"] == "gloo"
    # Log-probs: verl's FSDP2 engine (remove-padding path) vs transformers on the padded batch.
    torch.testing.assert_close(r["verl_logp"][mask], r["hf_logp"][mask], atol=1e-5, rtol=1e-5)
    # The update moved the policy ...
    assert (r["verl_logp_after"] - r["verl_logp"])[mask].abs().max() > 1e-2
    # ... exactly as one SGD step on the PPO surrogate does, with the same gradient norm and loss.
    torch.testing.assert_close(r["verl_logp_after"][mask], r["hf_logp_after"][mask], atol=1e-4, rtol=1e-4)
    assert r["grad_norm"] == pytest.approx(r["hf_grad_norm"], rel=1e-4)
    assert r["pg_loss"] == pytest.approx(r["hf_pg_loss"], rel=1e-4, abs=1e-6)


def _response_log_probs(model, input_ids, attention_mask, position_ids, responses):
    """log p(response token | prefix) from a transformers forward; [B, R]."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits  # [B, T, V]
    resp_logits = logits[:, -responses.shape[1] - 1 : -1].float()  # [B, R, V]: position t predicts token t+1
    return torch.log_softmax(resp_logits, -1).gather(-1, responses.unsqueeze(-1)).squeeze(-1)


def _child(out_dir: Path) -> None:
    import verl  # noqa: F401 - loads the shear_verl plugin: CPU mode from VERL_PLATFORM=cpu
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from verl import DataProto
    from verl.utils import tensordict_utils as tu
    from verl.utils.device import get_device_name, get_nccl_backend
    from verl.utils.model import compute_position_id_with_mask
    from verl.workers.engine_workers import ActorRolloutRefWorker
    from verl.workers.utils.padding import left_right_2_no_padding, no_padding_2_padding

    from shear_verl.tiny import build_assets, compose_tiny_config, tiny_overrides

    assets = build_assets(out_dir / "assets")
    config = compose_tiny_config(
        tiny_overrides(assets, out_dir)
        + [
            "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2",
            "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",  # 2 micro-batches per update
            "actor_rollout_ref.actor.optim.optimizer=SGD",
            f"actor_rollout_ref.actor.optim.lr={LR}",
            "actor_rollout_ref.actor.optim.weight_decay=0",
            "actor_rollout_ref.actor.optim.clip_grad=1e9",
        ]
    )
    worker = ActorRolloutRefWorker(config.actor_rollout_ref, role="actor")
    worker.init_model()

    # A left/right padded batch like the rollout's: prompts left-padded, responses right-padded.
    tok = AutoTokenizer.from_pretrained(assets.model_dir)
    gen = torch.Generator().manual_seed(0)
    B, P, R = 4, 12, 8
    prompt_lens, response_lens = [12, 9, 7, 10], [8, 5, 8, 3]
    prompts = torch.full((B, P), tok.pad_token_id)
    responses = torch.full((B, R), tok.pad_token_id)
    prompt_mask = torch.zeros(B, P, dtype=torch.long)
    response_mask = torch.zeros(B, R, dtype=torch.long)
    for i, (p, n) in enumerate(zip(prompt_lens, response_lens)):
        prompts[i, P - p :] = torch.randint(3, len(tok), (p,), generator=gen)
        responses[i, :n] = torch.randint(3, len(tok), (n,), generator=gen)
        prompt_mask[i, P - p :] = 1
        response_mask[i, :n] = 1
    input_ids = torch.cat([prompts, responses], 1)  # [B, P+R]
    attention_mask = torch.cat([prompt_mask, response_mask], 1)
    position_ids = compute_position_id_with_mask(attention_mask)
    batch = DataProto.from_dict(
        tensors=dict(prompts=prompts, responses=responses, input_ids=input_ids, attention_mask=attention_mask,
                     position_ids=position_ids, response_mask=response_mask),
        meta_info={"temperature": 1.0},
    )

    def verl_log_probs():  # as RayPPOTrainer._compute_old_log_prob
        td = left_right_2_no_padding(batch.to_tensordict())
        tu.assign_non_tensor(td, calculate_entropy=True, compute_loss=False)
        return no_padding_2_padding(tu.get(worker.compute_log_prob(td), "log_probs"), td).float()  # [B, R]

    verl_logp = verl_log_probs()
    advantages = torch.randn(B, R, generator=gen) * response_mask  # [B, R]
    update = batch.union(DataProto.from_dict(tensors=dict(old_log_probs=verl_logp, advantages=advantages)))
    td = left_right_2_no_padding(update.to_tensordict())
    tu.assign_non_tensor(  # as RayPPOTrainer._update_actor: the whole batch is one mini-batch
        td, calculate_entropy=False, global_batch_size=B, mini_batch_size=B, epochs=1, seed=0,
        dataloader_kwargs={"shuffle": False}, compute_loss=True,
    )
    metrics = tu.get(worker.update_actor(td), "metrics")
    verl_logp_after = verl_log_probs()

    # Reference: transformers + torch.optim.SGD on the PPO surrogate at ratio 1.
    hf = AutoModelForCausalLM.from_pretrained(assets.model_dir, attn_implementation="sdpa", dtype=torch.float32)
    with torch.no_grad():
        hf_logp = _response_log_probs(hf, input_ids, attention_mask, position_ids, responses)
    mask = response_mask.float()
    logp = _response_log_probs(hf, input_ids, attention_mask, position_ids, responses)
    ratio = torch.exp(logp - logp.detach())  # 1, with the gradient of log p
    loss = -(advantages * ratio * mask).sum() / mask.sum()  # token-mean PPO surrogate
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(hf.parameters(), float("inf"))
    torch.optim.SGD(hf.parameters(), lr=LR).step()
    with torch.no_grad():
        hf_logp_after = _response_log_probs(hf, input_ids, attention_mask, position_ids, responses)

    torch.save(
        dict(device=get_device_name(), backend=get_nccl_backend(), response_mask=response_mask,
             verl_logp=verl_logp, hf_logp=hf_logp, verl_logp_after=verl_logp_after, hf_logp_after=hf_logp_after,
             grad_norm=float(metrics["grad_norm"][0]), hf_grad_norm=grad_norm.item(),
             pg_loss=float(metrics["actor/pg_loss"][0]), hf_pg_loss=loss.item()),
        out_dir / "result.pt",
    )
    print(json.dumps({k: (v[0] if isinstance(v, list) else v) for k, v in metrics.items()}, default=float))


if __name__ == "__main__":
    _child(Path(sys.argv[1]))
