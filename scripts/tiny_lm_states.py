"""Hidden states of a trained language model for scripts/bench_weights.py --states, made on a CPU.

    python scripts/tiny_lm_states.py --out outputs/tiny_lm_states.pt   # ~20 min on 2 CPU cores

No pretrained weights can be fetched here, and the benchmark's synthetic states are only a guess at
how real hidden states look. So this trains a small byte-level Qwen2 (d=256, 4 layers) from scratch
on the Python standard library's sources, found on any machine with Python. It then samples
rollouts for a few prompts (the opening bytes of random stdlib files) and keeps each response's
last-layer hidden states, in the row convention SHEAR uses: the state at the position that
predicts response token t. Saved as the bench's groups: a list of {"hidden_states", "correct"}.

The correct/incorrect labels are a seeded random split (4/4 and 2/6), because there is no task to
grade. Pruning depends on the states' geometry, not on what the labels mean. A trained model of this
size is still far from a 7B one: the states are real LM states, but not the paper's.
"""

from __future__ import annotations

import argparse
import random
import sysconfig
import time
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM


def corpus(limit_bytes: int) -> torch.Tensor:
    """The stdlib's .py files as one byte sequence (sorted, so the same on every run). [N]"""
    data = bytearray()
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        data += path.read_bytes() + b"\n"
        if len(data) >= limit_bytes:
            break
    return torch.tensor(list(data[:limit_bytes]), dtype=torch.long)


def train(data: torch.Tensor, steps: int, seq: int, batch: int, seed: int) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=256, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
                         tie_word_embeddings=True)
    model = Qwen2ForCausalLM(config)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    start = time.monotonic()
    for step in range(1, steps + 1):
        starts = torch.randint(0, data.shape[0] - seq - 1, (batch,), generator=gen)
        ids = torch.stack([data[s:s + seq] for s in starts.tolist()])  # [B, seq]
        loss = model(input_ids=ids, labels=ids).loss
        optim.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        if step % 100 == 0:
            print(f"step {step}: loss {loss.item():.3f} nats/byte ({time.monotonic() - start:.0f} s)", flush=True)
    return model.eval()


@torch.no_grad()
def rollouts(model: Qwen2ForCausalLM, prompt: torch.Tensor, lengths: list[int], seed: int) -> list[torch.Tensor]:
    """Sampled responses' last-layer states, row t = the state predicting response token t. [T_i, d] each"""
    out = []
    for k, length in enumerate(lengths):
        torch.manual_seed(seed + k)
        ids = model.generate(prompt[None], do_sample=True, temperature=1.0, top_k=0, max_new_tokens=length,
                             min_new_tokens=length, pad_token_id=0)  # [1, P + length]
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]  # [P + length, d]
        out.append(hidden[prompt.shape[0] - 1:-1].clone())  # positions P-1 .. P+length-2 predict the response
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=1800, help="training steps of 16 x 256 bytes")
    parser.add_argument("--corpus-mb", type=float, default=16.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    data = corpus(int(args.corpus_mb * 2**20))
    model = train(data, args.steps, seq=256, batch=16, seed=args.seed)
    rng = random.Random(args.seed)
    groups = []
    for split in ("4/4", "2/6", "4/4", "2/6"):
        start = rng.randrange(data.shape[0] - 200)
        prompt = data[start:start + 200]
        lengths = [rng.randint(300, 1500) for _ in range(8)]
        n_good = int(split.split("/")[0])
        correct = [True] * n_good + [False] * (8 - n_good)
        rng.shuffle(correct)
        groups.append({"hidden_states": rollouts(model, prompt, lengths, rng.randrange(2**31)), "correct": correct})
        print(f"group {len(groups)}: {split}, T={min(lengths)}-{max(lengths)}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(groups, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
