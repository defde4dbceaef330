"""One rank of test_oar_g_fsdp_ranks.py: a float64 GPT-2 sharded over 2 gloo ranks (FSDP2), each
rank's rows for `batch_saliency` a different count (rank 0: 3 rollouts with an answer span,
rank 1: 1), and the plain model's saliency of the same rows as the reference."""

import copy
import os
import sys

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import GPT2Config, GPT2LMHeadModel

from shear_verl.baselines.oar_g import OarGSettings
from shear_verl.integration.saliency import batch_saliency, input_gradient_saliency


class Tokenizer:
    all_special_ids = [0]

    def decode(self, ids, **_):
        return "".join(chr(65 + i) for i in ids)


def main(out):
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    torch.manual_seed(1)  # the same weights on every rank
    cfg = GPT2Config(vocab_size=53, n_embd=32, n_layer=2, n_head=2, n_positions=64, attn_implementation="eager")
    plain = GPT2LMHeadModel(cfg).double().eval()
    model = copy.deepcopy(plain)
    mesh = init_device_mesh("cpu", (2,))
    for layer in model.transformer.h:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    lengths = [(4, 9), (5, 7), (3, 10)] if rank == 0 else [(6, 8), (4, 2)]  # (prompt, response); (4, 2): no span
    g = torch.Generator().manual_seed(10 + rank)
    ids = [torch.randint(1, 53, (p + r,), generator=g) for p, r in lengths]
    masks = [torch.ones(r, dtype=torch.int64) for _, r in lengths]
    settings = OarGSettings(target="answer_joint", noise_std=0.0, answer_marker="", no_marker="tail", tail_tokens=3)
    sal, keep, stats = batch_saliency(model, ids, masks, settings, Tokenizer(), group=torch.distributed.group.WORLD)
    ref = []
    for (p, r), x in zip(lengths, ids):
        row = torch.zeros(r)
        if r - 3 >= 1:
            row[: r - 3] = input_gradient_saliency(plain, x, p, p + r - 3, p + r, "answer_joint")
        ref.append(row)
    grads = [p.grad for p in model.parameters()]
    torch.save({"saliency": sal, "reference": ref, "stats": stats, "no_grad": all(x is None for x in grads)}, out)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
