"""DeepSpeed ZeRO-3 on CPU (2 gloo processes): the project's load, sampling, save and LoRA merge under a live
ZeRO-3 config, as on GPU workers. The sft and rl stages' Trainers run under ZeRO-3 on one CPU process
(``aesr1 doctor --smoke --cpu --zero3 on``, tests/test_smoke.py; SFT with no launcher at all, below) but not on
two: there accelerate counts one process where DeepSpeed counts two ("train_batch_size 4 != 2 * 1 * 1"), so the
stages' multi-process ZeRO-3 path is left to ``aesr1 doctor --smoke`` on GPUs."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, with_venv, write_jpeg

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow


def test_zero3_partitions_samples_saves_gathered_and_merges_lora_without_hanging(tmp_path):
    from peft import PeftModel, get_peft_model
    from test_policy import SMALL
    from transformers import AutoModelForImageTextToText

    from aesr1.backbone.backbone import BackboneConfig, backbone
    from aesr1.backbone.pretrain import PretrainConfig
    from aesr1.policy.generation import load_policy, sample
    from aesr1.policy.train import TrainConfig
    from aesr1.policy.trainer import lora_config
    from aesr1.stage import Recorder

    backbone(BackboneConfig(out_dir=str(tmp_path / "backbone"), checkpoint_root=str(tmp_path / "ck"), tiny=SMALL,
                            pretrain=PretrainConfig(samples=8, train=TrainConfig(epochs=1, batch_size=8))),
             Recorder())
    base = tmp_path / "backbone"
    whole, processor = load_policy(base, training="full")
    torch.manual_seed(0)
    lora = get_peft_model(whole, lora_config(TrainConfig(mode="lora", lora_r=4), whole))
    for name, param in lora.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.05)  # a trained adapter changes the weights
    lora.save_pretrained(tmp_path / "adapter")
    for i, (w, h) in enumerate(((32, 32), (48, 24), (20, 40))):
        write_jpeg(tmp_path / "images" / f"{i}.jpg", value=60 * i + 30, size=max(w, h))

    env = with_venv({**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    launched = subprocess.Popen(
        [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2",
         str(REPO / "tests/multiprocess/zero3.py"), str(base), str(tmp_path / "adapter"), str(tmp_path / "images"),
         str(tmp_path)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    try:
        output, _ = launched.communicate(timeout=420)  # a hang (a collective one process never joins) fails here
    finally:
        if launched.poll() is None:
            os.killpg(launched.pid, signal.SIGKILL)  # torchrun and both workers
            launched.wait()
    assert launched.returncode == 0, output[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]

    expected = sum(p.numel() for p in AutoModelForImageTextToText.from_pretrained(base).parameters())
    for r in ranks:
        assert r["world"] == 2 and r["zero3_alive"] and r["whole_here"] == 0  # nothing whole on a process
        assert r["total"] == expected and 0.4 * expected < r["local"] < 0.6 * expected  # about half each
    assert ranks[0]["frozen"] == ranks[1]["frozen"] == ranks[0]["whole_frozen"] > 0  # counted, not 0

    saved = AutoModelForImageTextToText.from_pretrained(tmp_path / "saved")
    gathered = torch.load(tmp_path / "gathered.pt")
    state = saved.state_dict()
    assert all(torch.equal(state[k].float(), v.float()) for k, v in gathered.items() if k in state)
    assert len(set(gathered) & set(state)) >= len(state) - 1  # every weight saved (the tied head once)
    trained = [k for k, v in AutoModelForImageTextToText.from_pretrained(base).state_dict().items()
               if not torch.equal(v, state[k])]
    assert trained and not any(".visual." in f".{k}" for k in trained)  # the step moved the text model only

    # sampling on partitioned weights, 2 images on one process and 1 on the other, gives what the saved
    # weights give whole, on one process
    assert ranks[0]["greedy"] == ranks[1]["greedy"]
    reloaded, reloaded_processor = load_policy(tmp_path / "saved")
    images = sorted(str(p) for p in (tmp_path / "images").glob("*.jpg"))
    assert sample(reloaded, reloaded_processor, images, do_sample=False, max_new_tokens=16).texts == ranks[0]["greedy"]

    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged").state_dict()
    reference = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base),
                                          tmp_path / "adapter").merge_and_unload().state_dict()
    assert all(torch.allclose(merged[k], v) for k, v in reference.items())
    assert not torch.equal(merged[next(k for k in merged if "q_proj" in k and "language_model" in k)],
                           AutoModelForImageTextToText.from_pretrained(base).state_dict()[
                               next(k for k in merged if "q_proj" in k and "language_model" in k)])


def test_one_process_without_a_launcher_trains_under_zero3(tmp_path):
    """``launcher: python`` with the recipes' DeepSpeed config (one GPU, no torchrun): DeepSpeed needs a process
    group; without one, and without a launcher's environment, it looked for MPI (ModuleNotFoundError: mpi4py)."""
    import math

    import pandas as pd
    from test_policy import SMALL
    from transformers import AutoModelForImageTextToText

    from aesr1.backbone.backbone import BackboneConfig, backbone
    from aesr1.backbone.pretrain import PretrainConfig
    from aesr1.policy.train import TrainConfig
    from aesr1.stage import Recorder
    from aesr1.trajectory import make_trajectory

    backbone(BackboneConfig(out_dir=str(tmp_path / "backbone"), checkpoint_root=str(tmp_path / "ck"), tiny=SMALL,
                            pretrain=PretrainConfig(samples=8, train=TrainConfig(epochs=1, batch_size=8))),
             Recorder())
    rows = [{"image_path": str(write_jpeg(tmp_path / "images" / f"{i}.jpg", value=30 * i, size=32)),
             "trajectory": make_trajectory(f"Exposure: the frame is {'dark' if i < 4 else 'bright'}.", i / 7)}
            for i in range(8)]
    pd.DataFrame(rows).to_parquet(tmp_path / "trajectories.parquet")
    launcher_variables = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = with_venv({k: v for k, v in os.environ.items() if k not in launcher_variables} | {"DS_ACCELERATOR": "cpu"})
    done = subprocess.run([sys.executable, str(REPO / "tests/multiprocess/one_process_zero3.py"),
                           str(tmp_path / "backbone"), str(tmp_path / "trajectories.parquet"), str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=420)
    assert done.returncode == 0, done.stderr[-4000:]
    seen = json.loads((tmp_path / "seen.json").read_text())
    assert (seen["world"], seen["steps"], seen["zero_stage"]) == (1, 2, 3) and math.isfinite(seen["loss"])
    assert AutoModelForImageTextToText.from_pretrained(tmp_path / "sft").num_parameters() > 0
