"""One rank of the multi-process Megatron capture checks (run by test_megatron_*.py, not by pytest).

    python megatron_capture_worker.py unshard[,engine] OUT.pt     (env: RANK, WORLD_SIZE, MASTER_*)

unshard: for every TP x CP layout that fits the world, a known per-sequence tensor is sharded the
  way Megatron holds the final-norm output (verl's own `preprocess_thd_engine` /
  `preprocess_bshd_engine` for the CP zigzag split and padding, megatron's own
  `scatter_to_sequence_parallel_region` for the SP split, sequence-first), then un-sharded by
  `megatron_capture.per_sequence_rows`. The worker only records; the test compares.
engine: a tiny megatron-core GPTModel (local layer spec, CPU init; TP = world size with SP, then
  TP = 1 with the other ranks data parallel) inside verl's real `MegatronEngineWithLMHead` (built with `object.__new__`: no mbridge /
  HF checkpoint here), patched by `patch_megatron_engine`; verl's `infer_batch` ->
  `forward_backward_batch` -> megatron's pipeline schedule -> the patched `forward_step` -> verl's
  BSHD forward + log-prob processor -> verl's micro-batch merge and dynamic-batch restore. THD
  needs TransformerEngine attention (GPU), so the engine runs BSHD; THD is in `unshard`.
  Reference: each sequence run alone through the plain model.
  split: the same engine's flagged pass through `megatron_infer_batch` (weights split among the
  TP group), recording each rank's stash.
"""

import os
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))

LENGTHS = [(5, 9), (7, 3), (4, 12), (6, 6), (3, 8), (8, 2), (5, 11), (4, 7)]  # (prompt, response)
HIDDEN, VOCAB = 32, 64


def nested(xs):
    return torch.nested.as_nested_tensor(xs, layout=torch.jagged)


def layouts(world: int) -> list[tuple[int, int]]:
    """(tp, cp) in {1,2}x{1,2} that divide the world (the rest is data parallel)."""
    return [(tp, cp) for tp in (1, 2) for cp in (1, 2) if world % (tp * cp) == 0]


def run_unshard(rank: int, world: int) -> dict:
    from megatron.core import parallel_state as mpu
    from megatron.core.tensor_parallel import scatter_to_sequence_parallel_region
    from verl.models.mcore.util import preprocess_bshd_engine, preprocess_thd_engine

    from shear_verl.integration.capture import response_rows
    from shear_verl.integration.megatron_capture import per_sequence_rows

    results = {}
    for tp, cp in layouts(world):
        mpu.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp)
        g = torch.Generator().manual_seed(100 + mpu.get_data_parallel_rank())  # DP ranks hold different data
        truth = [torch.randn(p + r, HIDDEN, generator=g) for p, r in LENGTHS[:5]]  # [L_i, H]
        input_ids = nested([torch.zeros(t.shape[0], dtype=torch.long) for t in truth])
        response_mask = nested([torch.ones(r, dtype=torch.long) for _, r in LENGTHS[:5]])
        for fmt in ("thd", "bshd"):
            if fmt == "thd":
                local, packed, _ = preprocess_thd_engine(nested(truth), pre_process=True)  # [1, T_cp, H]
                mask = None
            else:
                local, mask, _ = preprocess_bshd_engine(nested(truth), pre_process=True)  # [b, s_cp, H]
                packed = None
            full = local.transpose(0, 1).contiguous()  # [s_cp, b, H]: sequence-first, like final_layernorm
            for sp in ([False, True] if tp > 1 else [False]):
                hidden = scatter_to_sequence_parallel_region(full) if sp else full  # [s_cp / tp, b, H] with SP
                per_seq = per_sequence_rows(hidden, sequence_parallel=sp, input_ids=input_ids,
                                            packed_seq_params=packed, attention_mask=mask, cp_layout="zigzag")
                results[(tp, cp, fmt, sp)] = {
                    "truth": truth,
                    "per_sequence": list(per_seq.unbind()),
                    "response": list(response_rows(per_seq, response_mask).unbind()),
                    "local_rows": hidden.shape[0],
                    "full_rows": full.shape[0],
                }
        mpu.destroy_model_parallel()
    return results


def build_model(tp: int):
    from megatron.core import parallel_state as mpu
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    mpu.initialize_model_parallel(tensor_model_parallel_size=tp)
    torch.manual_seed(0)  # CPU init draws the full weights from this seed on every rank, then shards
    cfg = TransformerConfig(
        num_layers=2, hidden_size=HIDDEN, num_attention_heads=4, ffn_hidden_size=64,
        use_cpu_initialization=True, normalization="RMSNorm", params_dtype=torch.float32,
        tensor_model_parallel_size=tp, sequence_parallel=tp > 1, hidden_dropout=0.0, attention_dropout=0.0,
    )
    model = GPTModel(
        config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=VOCAB, max_sequence_length=64, position_embedding_type="rope",
        share_embeddings_and_output_weights=False,
    ).eval()
    return model


def make_engine(impl, model, tp: int):
    from verl.workers.config import McoreEngineConfig

    engine = object.__new__(impl.MegatronEngineWithLMHead)
    engine.engine_config = McoreEngineConfig(
        use_remove_padding=False, pad_bshd_to_minibatch_max=False,
        tensor_model_parallel_size=tp, sequence_parallel=tp > 1,
    )
    engine.model_config = SimpleNamespace(
        mtp=SimpleNamespace(enable=False),
        hf_config=SimpleNamespace(architectures=["Qwen2ForCausalLM"]),
        tokenizer=SimpleNamespace(pad_token_id=0),
    )
    engine.tf_config = model.config
    engine.enable_routing_replay = False
    engine.module = [model]
    return engine


def settings():
    from shear_verl.core import ShearConfig
    from shear_verl.integration.settings import ShearSettings

    return ShearSettings(engine=ShearConfig(span_len=4, stride=2, epsilon=0.1), correct_threshold=0.5)


def make_batch(*, dynamic: bool, flag: bool):
    """A worker-side batch as verl's V1 path delivers it: nested per-sample fields, 2 GRPO groups."""
    from tensordict import NonTensorStack, TensorDict
    from verl.utils import tensordict_utils as tu

    from shear_verl.integration.fields import FLAG_KEY

    g = torch.Generator().manual_seed(0)
    ids, masks = [], []
    for p, r in LENGTHS:
        ids.append(torch.randint(1, VOCAB, (p + r,), generator=g))
        m = torch.ones(r, dtype=torch.long)
        if r > 6:
            m[2:4] = 0  # a multi-turn "tool" span inside the response
        masks.append(m)
    td = TensorDict(
        {
            "input_ids": nested(ids),
            "response_mask": nested(masks),
            "loss_mask": nested(masks),
            "temperature": torch.ones(len(LENGTHS)),
            "rm_scores": nested([torch.zeros(r).index_fill_(0, torch.tensor([r - 1]), float(i % 2))
                                 for i, (_, r) in enumerate(LENGTHS)]),
        },
        batch_size=len(LENGTHS),
    )
    td["uid"] = NonTensorStack.from_list([f"g{i // 4}" for i in range(len(LENGTHS))])
    extra = dict(use_dynamic_bsz=dynamic, max_token_len_per_gpu=40, micro_batch_size_per_gpu=2)
    if flag:
        extra[FLAG_KEY] = settings().to_json()
    tu.assign_non_tensor(td, **extra)
    return td, ids


def reference(model, ids, tp: int) -> dict:
    """Each sequence alone through the plain model: its final-norm rows (this rank's SP shard) and
    its logits (this rank's vocab shard), right-padded to a multiple of TP (causal: no effect)."""
    norm_out, logits = [], []
    handle = model.decoder.final_layernorm.register_forward_hook(lambda m, i, o: norm_out.append(o[:, 0]))
    with torch.no_grad():
        for x in ids:
            padded = torch.nn.functional.pad(x, (0, (-x.shape[0]) % tp))[None]  # [1, S]
            pos = torch.arange(padded.shape[1])[None]
            logits.append(model(input_ids=padded, position_ids=pos, attention_mask=None)[0])  # [S, V/tp]
    handle.remove()
    return {"norm_shards": norm_out, "logits_shards": logits}


def run_split(engine, raw_infer) -> dict:
    """The weights step split among the TP group (megatron_peers), through `megatron_infer_batch`
    with verl's own infer_batch as `orig`, wrapped to record what this rank stashed in the pass."""
    from shear_verl.integration.capture import HIDDEN_KEY
    from shear_verl.integration.megatron_capture import megatron_infer_batch, megatron_peers

    seen = {}

    def recording_infer(d, *args, **kwargs):
        res = raw_infer(engine, d, *args, **kwargs)
        mo = res["model_output"]
        seen["stash_rows"] = [t.shape[0] for t in mo[HIDDEN_KEY].unbind()] if HIDDEN_KEY in mo else None
        return res

    data, _ = make_batch(dynamic=True, flag=True)
    res = megatron_infer_batch(engine, recording_infer, data)
    peers = megatron_peers(engine)
    return {
        "stash_rows": seen["stash_rows"],
        "share_after": getattr(engine, "_shear_share", None),
        "peers": (peers.rank, peers.size, peers.has_rows, peers.collects),
        "uids": [str(u) for u in data["uid"]],
        "output": {k: (list(v.unbind()) if getattr(v, "is_nested", False) else v)
                   for k, v in res["model_output"].items()},
    }


def run_engine(tp: int) -> dict:
    import verl.workers.engine.megatron.transformer_impl as impl
    from megatron.core import parallel_state as mpu

    from shear_verl.integration.capture import HIDDEN_KEY
    from shear_verl.integration.patches import patch_megatron_engine

    model = build_model(tp)
    patch_megatron_engine(impl)
    engine = make_engine(impl, model, tp)
    raw_infer = type(engine).__dict__["infer_batch"].__wrapped__  # verl's infer_batch, before the weights step

    out = {"collects": engine.is_mp_src_rank_with_outputs(), "tp_rank": mpu.get_tensor_model_parallel_rank(),
           "output_weight": model.output_layer.weight.detach().clone()}  # [V/tp, H]
    for dynamic in (True, False):
        data, ids = make_batch(dynamic=dynamic, flag=True)
        res = raw_infer(engine, data)
        mo = res.get("model_output", {})
        out[f"raw_dynamic={dynamic}"] = {
            "keys": sorted(mo),
            "hidden": list(mo[HIDDEN_KEY].unbind()) if HIDDEN_KEY in mo else None,
            "log_probs": list(mo["log_probs"].unbind()),
        }
    data, ids = make_batch(dynamic=True, flag=True)
    res = engine.infer_batch(data)
    out["weighted"] = {k: (list(v.unbind()) if getattr(v, "is_nested", False) else v)
                       for k, v in res["model_output"].items()}
    out["split"] = run_split(engine, raw_infer)
    plain, _ = make_batch(dynamic=True, flag=False)
    res = engine.infer_batch(plain)
    out["plain"] = {"keys": sorted(res["model_output"]), "log_probs": list(res["model_output"]["log_probs"].unbind())}
    out["ids"] = ids
    out["settings"] = settings().to_json()
    out["response_mask"] = list(data["response_mask"].unbind())
    out.update(reference(model, ids, tp))
    mpu.destroy_model_parallel()
    return out


def main(scenarios: str, out_path: str) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from conftest import install_cpu_redirects

    install_cpu_redirects()
    result = {}
    with torch.no_grad():
        if "unshard" in scenarios.split(","):
            result["unshard"] = run_unshard(rank, world)
        if "engine" in scenarios.split(","):  # TP = world (SP on), then TP = 1 (the rest data parallel)
            result["engine"] = {tp: run_engine(tp) for tp in sorted({world, 1}, reverse=True)}
    torch.save(result, out_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
