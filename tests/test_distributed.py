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


def _busy_main_process(tmp_path, timeout_s: int, busy_s: float) -> list[dict]:
    params = tmp_path / "params.yaml"
    params.write_text(f"ddp_timeout: {timeout_s}\n")
    done = subprocess.run(
        [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2",
         str(REPO / "tests/multiprocess/slow_main.py"), str(params), str(busy_s), str(tmp_path)],
        cwd=REPO, env=with_venv({**__import__("os").environ}), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_the_process_groups_timeout_is_params_ddp_timeout(tmp_path):
    """The group every stage (and DeepSpeed after it) uses times out after params' ddp_timeout: a short one fails
    the waiting process while the main one is busy, a long enough one lets it wait."""
    (tmp_path / "short").mkdir()
    (tmp_path / "long").mkdir()
    waited = _busy_main_process(tmp_path / "short", timeout_s=2, busy_s=8)
    assert waited[1]["timeout_s"] == 2 and waited[1]["barrier"].startswith("timed out"), waited
    waited = _busy_main_process(tmp_path / "long", timeout_s=120, busy_s=4)
    assert [w["barrier"] for w in waited] == ["passed", "passed"]


def test_the_default_timeout_outlasts_a_7b_save_and_upload(tmp_path):
    """Without ddp_timeout a collective waits two hours, not torch's 10 minutes (NCCL); the trainers get the same."""
    from aesr1.config import ParamsError
    from aesr1.policy.train import TrainConfig, sft_config
    from aesr1.stage import ddp_timeout

    params = tmp_path / "params.yaml"
    params.write_text("launcher: python\n")
    assert ddp_timeout(str(params)) == distributed.DEFAULT_TIMEOUT_S >= 3600
    assert sft_config(TrainConfig(), tmp_path / "ck").ddp_timeout == distributed.timeout_s()
    params.write_text("ddp_timeout: 10m\n")
    with pytest.raises(ParamsError, match="ddp_timeout is '10m': a whole number of seconds"):
        ddp_timeout(str(params))


def test_a_checkpoint_is_resumed_only_by_a_run_on_as_many_processes(monkeypatch):
    """A ZeRO-3 checkpoint holds one optimizer shard per process: a run on another GPU count starts afresh."""
    from aesr1.policy.trainer import run_fingerprint

    on_one = run_fingerprint({"lr": 1e-6})
    assert run_fingerprint({"lr": 1e-6}) == on_one
    monkeypatch.setattr(distributed, "world_size", lambda: 8)
    assert run_fingerprint({"lr": 1e-6}) != on_one
