"""Several processes: sharding and gathering, and the rank reward over the global batch (torchrun, gloo)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, with_venv

from aesr1 import distributed
from aesr1.rl.reward_funcs import RankReward, RewardConfig
from aesr1.trajectory import make_trajectory


def test_one_process_keeps_everything():
    assert distributed.shard([1, 2, 3]) == [1, 2, 3] and distributed.gather([1, 2]) == [1, 2]
    assert distributed.is_main() and distributed.world_size() == 1


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    done = subprocess.run(
        [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2",
         str(REPO / "tests/multiprocess/collectives.py"), str(out)],
        cwd=REPO, env=with_venv({**__import__("os").environ}), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_shards_cover_each_item_once_and_gather_restores_the_order(two_processes):
    first, second = two_processes
    assert first["world"] == second["world"] == 2
    assert (first["main"], second["main"]) == (True, False)
    assert first["shard"] + second["shard"] == list(range(7))
    assert first["gathered"] == second["gathered"] == list(range(7))


def test_close_ends_the_process_group_on_every_process(two_processes):
    assert all(seen["closed"] for seen in two_processes)


def test_the_rank_reward_ranks_against_the_global_batch(two_processes):
    """Each process ranks its images against all four, so the rewards equal one process's over the whole batch."""
    ids = ["a", "a", "b", "b", "c", "c", "d", "d"]
    truth = {"a": 0.9, "b": 0.2, "c": 0.6, "d": 0.4}
    preds = [0.8, 0.7, 0.3, 0.1, 0.5, 0.6, 0.45, 0.3]
    completions = [[{"role": "assistant", "content": make_trajectory("a critique", p)}] for p in preds]
    whole = RankReward(RewardConfig())(None, completions, ids, [truth[i] for i in ids])
    local = RankReward(RewardConfig())(None, completions[:4], ids[:4], [truth[i] for i in ids[:4]])
    got = two_processes[0]["rank_reward"] + two_processes[1]["rank_reward"]
    assert got == pytest.approx(whole)
    assert two_processes[0]["rank_reward"] != pytest.approx(local)  # not ranked against its own half only
