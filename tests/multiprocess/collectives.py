"""Run by tests/test_distributed.py under ``torchrun --nproc_per_node 2`` (gloo): each process writes what it saw."""

import json
import sys

import torch.distributed

from aesr1 import distributed
from aesr1.rl.reward_funcs import RankReward, RewardConfig
from aesr1.trajectory import make_trajectory


def main(out: str) -> None:
    rank = distributed.rank()
    items = list(range(7))
    mine = distributed.shard(items)
    # 4 images x 2 completions in all; process 0 holds images a, b and process 1 images c, d
    ids = [["a", "a", "b", "b"], ["c", "c", "d", "d"]][rank]
    truth = {"a": 0.9, "b": 0.2, "c": 0.6, "d": 0.4}
    preds = {"a": [0.8, 0.7], "b": [0.3, 0.1], "c": [0.5, 0.6], "d": [0.45, 0.3]}
    completions = [[{"role": "assistant", "content": make_trajectory("a critique", p)}]
                   for i in dict.fromkeys(ids) for p in preds[i]]
    rewards = RankReward(RewardConfig())(None, completions, ids, [truth[i] for i in ids])
    seen = {"main": distributed.is_main(), "shard": mine, "gathered": distributed.gather(mine),
            "rank_reward": rewards, "world": distributed.world_size()}
    distributed.close()
    seen["closed"] = not torch.distributed.is_initialized()
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(seen, f)


if __name__ == "__main__":
    main(sys.argv[1])
