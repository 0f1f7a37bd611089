"""Training-step throughput of jobs.finetune on this machine: pairs/s of the cached
multiple-negatives step (forward without a graph, loss, forward again with a graph, backward,
AdamW step) by precision and mini-batch size, as ratios to fp32 measured in the same run.

    python benchmarks/finetune_step.py [--model sentence-transformers/all-MiniLM-L6-v2]
        [--pairs examples/data/docstring_pairs.jsonl] [--batch 64] [--steps 3] [--threads N]

Real pairs (the fine-tuning example's docstrings), the job's own tower and step
(jobs/text_tower.py), one process. Each setting runs one warm-up step, then ``--steps`` timed
ones on the same batches. Also printed: one plain step (every text of the batch in one forward,
padded to the longest), to show what length-sorted mini-batches save. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    parser.add_argument("--pairs", default=str(REPO / "examples" / "data" / "docstring_pairs.jsonl"))
    parser.add_argument("--batch", type=int, default=64, help="pairs per step (default 64, the job's)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per setting (default 3)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: every core)")
    args = parser.parse_args()

    import torch

    from jobs.finetune import resolve_model
    from jobs.finetune_loop import cpu_runs_bf16
    from jobs.text_tower import TextTower, cached_mnrl_step

    torch.set_num_threads(args.threads)
    spec = resolve_model(argparse.Namespace(model=args.model, max_length=None, trust_remote_code=False))
    rows = [json.loads(line) for line in Path(args.pairs).read_text().splitlines()][: args.batch * (args.steps + 1)]
    tower = TextTower(spec).train()
    columns = [tower.tokenize([r[c] for r in rows]) for c in ("anchor", "positive")]
    optimizer = torch.optim.AdamW(tower.parameters(), lr=1e-6)
    mean_tokens = sum(len(s) for c in columns for s in c) / (2 * len(rows))
    print(f"load average at start: {os.getloadavg()[0]:.2f}; {args.threads} threads; bf16 native: {cpu_runs_bf16()}")
    print(f"{len(rows)} real pairs, {mean_tokens:.0f} tokens per text on average, {args.batch} pairs a step")

    def rate(precision: str, mini_batch: int) -> float:
        amp = None
        if precision == "bf16":
            amp = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
        elapsed = 0.0
        for step in range(args.steps + 1):  # step 0 warms up
            part = slice(step * args.batch, (step + 1) * args.batch)
            started = time.perf_counter()
            optimizer.zero_grad()
            cached_mnrl_step(tower, [columns[0][part], columns[1][part]], mini_batch, amp)
            optimizer.step()
            elapsed += (time.perf_counter() - started) if step else 0.0
        return args.batch * args.steps / elapsed

    base = rate("fp32", 16)
    print(f"\n{'precision':<10}{'mini-batch':>12}{'pairs/s':>10}{'x fp32/16':>11}")
    for precision, mini_batch in [("fp32", 16), ("fp32", 32), ("bf16", 16), ("bf16", 32), ("fp32", 10**9)]:
        value = base if (precision, mini_batch) == ("fp32", 16) else rate(precision, mini_batch)
        label = "all (plain)" if mini_batch == 10**9 else str(mini_batch)
        print(f"{precision:<10}{label:>12}{value:>10.1f}{value / base:>11.2f}")


if __name__ == "__main__":
    main()
