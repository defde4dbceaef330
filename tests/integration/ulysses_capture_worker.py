"""One rank of the Ulysses capture checks (run by test_ulysses_capture.py, not by pytest).

    python ulysses_capture_worker.py OUT.pt     (env: RANK, WORLD_SIZE, MASTER_*, SP: the SP size)

verl's Ulysses attention needs flash-attention kernels (GPU only), so the model here is a real
transformers Qwen2 with zero decoder layers: its last hidden state is final_norm(embedding) of each
token, a per-token function, so slicing the packed sequence across the SP group changes nothing in
the model and any error can only come from the capture's gather / unpad / row layout -- which is
what this checks, through verl's real `prepare_model_inputs` (ulysses pad + slice) and
`_gather_and_unpad_packed` (all-gather + unpad).
"""

import os
import sys

import torch
import torch.distributed as dist


def main(out_path: str) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import Qwen2Config, Qwen2ForCausalLM

    import verl.utils.seqlen_balancing as seqlen_balancing
    import verl.workers.engine.fsdp.transformer_impl as impl
    from verl.utils.ulysses import set_ulysses_sequence_parallel_group

    from shear_verl.integration import engine_hooks, patches
    from shear_verl.integration.capture import HIDDEN_KEY

    sys.path.insert(0, os.path.dirname(__file__))
    from conftest import fsdp_engine_around
    from test_fsdp_capture import LENGTHS, make_batch  # shared batch builder

    patches.install()
    # Stock verl has no CPU device: point its device lookup at the CPU (test-only redirect).
    impl.get_device_id = lambda: "cpu"
    impl.get_device_name = lambda: "cpu"
    seqlen_balancing.get_device_name = lambda: "cpu"

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=0,
                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(cfg).eval()
    engine = fsdp_engine_around(model)
    sp = int(os.environ.get("SP", "2"))
    mesh = init_device_mesh("cpu", mesh_shape=(world // sp, sp), mesh_dim_names=["dp", "sp"])
    engine.ulysses_device_mesh = mesh
    engine.ulysses_parallel_group = mesh["sp"].get_group()
    engine.ulysses_sequence_parallel_size = sp
    engine.use_ulysses_sp = True
    set_ulysses_sequence_parallel_group(engine.ulysses_parallel_group)

    data, ids, prompts = make_batch(LENGTHS, cfg.vocab_size, rmpad=True, dynamic=True, fused=False)
    raw = impl.FSDPEngineWithLMHead.__dict__["infer_batch"].__wrapped__(engine, data)
    data, _, _ = make_batch(LENGTHS, cfg.vocab_size, rmpad=True, dynamic=True, fused=False)
    full = engine.infer_batch(data)

    def reference(ids, prompts):
        with torch.no_grad():
            return [model(input_ids=x[None], output_hidden_states=True).hidden_states[-1][0][p - 1 : x.shape[0] - 1]
                    for x, p in zip(ids, prompts)]

    # The split weights step, through the hook verl's patched infer_batch runs, with verl's own
    # infer_batch as `orig` wrapped to record what each rank stashed during the pass.
    split_lengths = LENGTHS + LENGTHS[::-1]  # 4 groups of 4 (make_batch: uid g{i // 4})
    seen = {}

    def recording_infer(d, *args, **kwargs):
        res = impl.FSDPEngineWithLMHead.__dict__["infer_batch"].__wrapped__(engine, d, *args, **kwargs)
        seen["stash_rows"] = [t.shape[0] for t in res["model_output"][HIDDEN_KEY].unbind()]
        return res

    split_data, split_ids, split_prompts = make_batch(split_lengths, cfg.vocab_size, rmpad=True, dynamic=True,
                                                      fused=False)
    split = engine_hooks.infer_batch_with_weights(engine, recording_infer, split_data)["model_output"]
    torch.save(
        {
            "captured": [t.clone() for t in raw["model_output"][HIDDEN_KEY].unbind()],
            "reference": reference(ids, prompts),
            "collects": engine.is_mp_src_rank_with_outputs(),
            "output_fields": sorted(full["model_output"].keys()),
            "split": {
                "stash_rows": seen["stash_rows"],
                "uids": [str(u) for u in split_data["uid"]],
                "response_mask": list(split_data["response_mask"].unbind()),
                "output": {k: (list(v.unbind()) if getattr(v, "is_nested", False) else v) for k, v in split.items()},
                "reference": reference(split_ids, split_prompts),
            },
        },
        out_path,
    )
    dist.barrier()  # no rank tears gloo down while a peer still talks to it
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
