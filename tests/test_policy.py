"""The tiny backbone, the generic loading path, SFT (full and LoRA, resumable) and token entropy."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import REPO, with_venv, write_jpeg
from transformers import TrainerCallback

from aesr1.backbone.backbone import BackboneConfig, backbone
from aesr1.backbone.pretrain import PretrainConfig
from aesr1.backbone.tiny import TinyModelConfig, build_tiny, build_tokenizer
from aesr1.policy.data import sft_dataset
from aesr1.policy.generation import entropies, load_policy, load_processor, resolve_model, sample
from aesr1.policy.train import TrainConfig, fit
from aesr1.policy.trainer import save_trained
from aesr1.stage import Recorder
from aesr1.trajectory import make_trajectory, parse_score

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SMALL = TinyModelConfig(vocab_size=600, hidden_size=64, layers=2, heads=4, kv_heads=2, intermediate_size=128,
                        vision_depth=2, vision_hidden_size=32, vision_heads=2, patch_size=8, image_size=32)


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory):
    root = tmp_path_factory.mktemp("backbone")
    cfg = BackboneConfig(out_dir=str(root / "backbone"), checkpoint_root=str(root / "ck"), tiny=SMALL,
                         pretrain=PretrainConfig(samples=24, train=TrainConfig(epochs=1, learning_rate=2e-3,
                                                                               logging_steps=1,
                                                                               batch_size=8, freeze_vision=False)))
    metrics = backbone(cfg, Recorder())
    return root / "backbone", metrics


@pytest.fixture
def trajectories(tmp_path):
    rows = []
    for i in range(12):
        path = write_jpeg(tmp_path / f"{i}.jpg", value=20 * i, size=32)
        score = round(i / 11, 2)
        rows.append({"image_path": str(path), "score": score,
                     "trajectory": make_trajectory(f"Exposure: the frame is {'dark' if i < 6 else 'bright'}.", score)})
    return pd.DataFrame(rows)


def test_tokenizer_round_trips_critiques_and_scores():
    tokenizer = build_tokenizer(600)
    text = make_trajectory("Lighting: Directional light falls from the left; the palette is harmonious. "
                           "Überraschend: ünïcode still works.", 0.62)
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    # digits are single tokens, so a score is written digit by digit
    assert [tokenizer.decode([i]) for i in tokenizer("0.62")["input_ids"]] == ["0", ".", "6", "2"]
    for special in ("<|im_start|>", "<|im_end|>", "<|image_pad|>", "<|vision_start|>"):
        assert len(tokenizer(special)["input_ids"]) == 1


def test_tiny_backbone_saves_and_loads_through_the_generic_path(tiny_backbone):
    folder, metrics = tiny_backbone
    assert metrics["kind"] == "tiny" and metrics["pretrain_loss_last"] < metrics["pretrain_loss_first"]
    assert json.loads((folder / "config.json").read_text())["model_type"] == "qwen2_5_vl"
    model, processor = load_policy(folder)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"


def test_sampling_takes_nothing_from_the_model_folders_generation_config(tmp_path, tiny_backbone):
    """A hub model's generation_config.json (Qwen2.5-VL-7B-Instruct: repetition_penalty 1.05, top_k 1, ...)
    must not change what evaluation samples: every sampling field comes from params."""
    folder, _ = tiny_backbone
    image = write_jpeg(tmp_path / "a.jpg", value=90, size=32)
    hub_like = tmp_path / "hub_like"
    model, processor = load_policy(folder)
    model.save_pretrained(hub_like)
    processor.save_pretrained(hub_like)
    config = json.loads((hub_like / "generation_config.json").read_text())
    config.update(repetition_penalty=50.0, no_repeat_ngram_size=1, top_k=1, temperature=0.1, do_sample=True)
    (hub_like / "generation_config.json").write_text(json.dumps(config))
    texts = {}
    for name, path in (("plain", folder), ("hub_like", hub_like)):
        loaded, loaded_processor = load_policy(path)
        for do_sample in (False, True):
            torch.manual_seed(0)
            texts[name, do_sample] = sample(loaded, loaded_processor, [str(image)] * 2, temperature=1.0,
                                            max_new_tokens=24, do_sample=do_sample).texts
    assert texts["plain", False] == texts["hub_like", False] and texts["plain", True] == texts["hub_like", True]


def test_the_tiny_model_is_initialised_from_its_seed_whatever_the_process_state():
    def weights(seed: int, process_seed: int) -> list[torch.Tensor]:
        torch.manual_seed(process_seed)  # each process starts torch from a different seed
        model, _ = build_tiny(SMALL, seed)
        return list(model.state_dict().values())

    first, again, other = weights(0, 1), weights(0, 2), weights(1, 1)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def test_a_real_backbone_is_pointed_at_not_copied(tmp_path, tiny_backbone):
    folder, _ = tiny_backbone
    metrics = backbone(BackboneConfig(name_or_path=str(folder), out_dir=str(tmp_path / "b")), Recorder())
    assert metrics["model_type"] == "qwen2_5_vl"
    assert resolve_model(tmp_path / "b") == str(folder)
    assert not (tmp_path / "b" / "model.safetensors").exists()


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_sft_lowers_the_loss_and_writes_a_loadable_model(tmp_path, tiny_backbone, trajectories, mode):
    folder, _ = tiny_backbone
    model, processor = load_policy(str(folder), training=mode)
    vision_before = {n: p.clone() for n, p in model.named_parameters() if ".visual." in f".{n}"}
    cfg = TrainConfig(mode=mode, epochs=4, learning_rate=5e-3, batch_size=4, freeze_vision=True, lora_r=8,
                      logging_steps=1, save_steps=1000)
    trainer = fit(model, processor, sft_dataset(trajectories, "trajectory"), cfg, tmp_path / "ck")
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]
    for name, param in trainer.model.named_parameters():
        name = name.replace("base_model.model.", "")
        if name in vision_before:
            assert torch.equal(param, vision_before[name]), f"{name} moved although the vision tower is frozen"
    save_trained(trainer, processor, tmp_path / "sft", base=folder if mode == "lora" else None)
    reloaded, reloaded_processor = load_policy(str(tmp_path / "sft"))
    assert not any("lora" in n for n, _ in reloaded.named_parameters())  # LoRA was merged
    out = sample(reloaded, reloaded_processor, list(trajectories.image_path[:2]), n=2, max_new_tokens=12)
    assert len(out.texts) == 4 and out.tokens > 0


def test_a_deepspeed_config_deepspeed_refuses_stops_sft_before_the_model_loads(tmp_path):
    from aesr1.config import ParamsError

    zero = {"stage": 3, "offload_optimizer": {"device": "disk"}}  # not a device DeepSpeed has
    cfg = TrainConfig(batch_size=4, trl={"deepspeed": {"zero_optimization": zero}})
    with pytest.raises(ParamsError, match=r"sft.train.trl.deepspeed \(the mapping given\): DeepSpeed refuses this "
                                          r"config:\n  DeepSpeedZeroConfig: offload_optimizer.device: Input should be"):
        fit(str(tmp_path / "no-model-here"), None, None, cfg, tmp_path / "ck")  # a ParamsError, not an OSError


def test_the_frozen_vision_tower_is_not_back_propagated_under_checkpointing_and_lora(tmp_path, tiny_backbone,
                                                                                      trajectories):
    """Gradient checkpointing with LoRA makes transformers hook every sub-model's input embeddings, the vision
    tower's patch embedding included; frozen, the tower still must not enter the backward graph."""
    folder, _ = tiny_backbone
    model, processor = load_policy(str(folder), training="lora")
    outputs = []
    model.model.visual.register_forward_hook(lambda module, args, out: outputs.append(out.pooler_output))
    cfg = TrainConfig(mode="lora", epochs=1, learning_rate=5e-3, batch_size=4, freeze_vision=True, lora_r=8,
                      gradient_checkpointing=True, logging_steps=1, save_steps=1000)
    trainer = fit(model, processor, sft_dataset(trajectories, "trajectory"), cfg, tmp_path / "ck")
    assert model.model.visual.patch_embed._forward_hooks, "transformers no longer hooks the patch embedding"
    assert len(outputs) == 3 and not any(out.requires_grad for out in outputs)
    adapters = {n: p for n, p in trainer.model.named_parameters() if "lora_B" in n}
    assert adapters and all(p.abs().sum() > 0 for p in adapters.values())  # lora_B starts at 0: it learned


def test_lora_sft_on_two_processes_saves_one_merged_model(tmp_path, tiny_backbone, trajectories):
    """torchrun, 2 processes (gloo): each trains on half the batches; the adapter is saved and merged once."""
    folder, _ = tiny_backbone
    trajectories.to_parquet(tmp_path / "trajectories.parquet")
    done = subprocess.run(
        [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2",
         str(REPO / "tests/multiprocess/lora_sft.py"), str(folder), str(tmp_path / "trajectories.parquet"),
         str(tmp_path)], cwd=REPO, env=with_venv(dict(os.environ)), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # 12 trajectories, 2 per process and step: 3 steps per epoch, 2 epochs, the same count on both
    assert [(r["world"], r["steps"], r["saved"]) for r in ranks] == [(2, 6, True)] * 2
    assert not (tmp_path / "sft" / "adapter").exists()  # merged, then the adapter removed
    merged, _ = load_policy(str(tmp_path / "sft"))
    base, _ = load_policy(str(folder))
    assert not any("lora" in n for n, _ in merged.named_parameters())
    changed = [n for n, p in merged.named_parameters() if not torch.equal(p, base.get_parameter(n))]
    assert changed and all("language_model" in n and n.endswith("proj.weight") for n in changed), changed


class _StopAt(TrainerCallback):
    """Stops training at a step, as a killed run would, after its checkpoint is written."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


def test_a_killed_sft_run_resumes_from_its_checkpoint(tmp_path, tiny_backbone, trajectories):
    folder, _ = tiny_backbone
    cfg = TrainConfig(epochs=2, learning_rate=1e-3, batch_size=4, save_steps=1)  # 6 steps in all
    data = sft_dataset(trajectories, "trajectory")
    processor = load_processor(folder)
    state = fit(str(folder), processor, data, cfg, tmp_path / "ck", callbacks=[_StopAt(2)]).state
    assert state.global_step == 2 and (tmp_path / "ck" / "checkpoint-2").is_dir()
    saved, _ = load_policy(str(tmp_path / "ck" / "checkpoint-2"))

    steps_run = []

    class _Count(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            steps_run.append(state.global_step)

    class _WeightsAtStart(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.weights = {n: p.detach().clone() for n, p in model.named_parameters()}

    at_start = _WeightsAtStart()
    model, processor = load_policy(str(folder), training="full")
    fresh = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = fit(model, processor, data, cfg, tmp_path / "ck", callbacks=[_Count(), at_start]).state
    assert state.global_step == 6 and steps_run == [3, 4, 5, 6]
    # training went on from the checkpoint's weights, not from the fresh backbone's
    for name, param in saved.named_parameters():
        assert torch.equal(at_start.weights[name], param), name
    assert any(not torch.equal(fresh[n], p) for n, p in saved.named_parameters())


def test_entropy_known_answers():
    vocab = 50
    assert entropies(torch.zeros(2, vocab)).tolist() == pytest.approx([math.log(vocab)] * 2)
    peaked = torch.full((1, vocab), -1e4)
    peaked[0, 0] = 0
    assert entropies(peaked).item() == pytest.approx(0.0, abs=1e-6)
    two = torch.tensor([[0.0, math.log(3.0)]])  # probabilities 1/4, 3/4
    expected = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert entropies(two).item() == pytest.approx(expected, rel=1e-5)
    assert entropies(two, temperature=0.5).item() < expected  # temperature sharpens


def test_scores_parse_from_sampled_text_only_when_well_formed():
    assert parse_score(make_trajectory("ok", 0.3)) == 0.3
    assert math.isnan(parse_score("<think>ok</think><answer>0.3"))


def test_a_lora_adapter_merges_into_the_base_in_the_bases_own_dtype(tmp_path, tiny_backbone):
    """A bf16 base (every hub VLM) gives a bf16 merged model: half the bytes of an fp32 merge."""
    from peft import get_peft_model
    from transformers import AutoModelForImageTextToText

    from aesr1.policy.trainer import lora_config, merge_adapter

    folder, _ = tiny_backbone
    base = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.bfloat16)
    base.save_pretrained(tmp_path / "bf16")
    fp32 = AutoModelForImageTextToText.from_pretrained(tmp_path / "bf16", dtype=torch.float32)
    adapted = get_peft_model(fp32, lora_config(TrainConfig(mode="lora", lora_r=4), fp32))
    adapted.save_pretrained(tmp_path / "adapter")
    merge_adapter(tmp_path / "bf16", tmp_path / "adapter", tmp_path / "merged")
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged", dtype="auto")
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
    size = sum(f.stat().st_size for f in (tmp_path / "merged").glob("*.safetensors"))
    assert size < 1.1 * sum(f.stat().st_size for f in (tmp_path / "bf16").glob("*.safetensors"))
