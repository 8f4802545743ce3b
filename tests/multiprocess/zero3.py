"""Run by tests/test_zero3.py under ``torchrun --nproc_per_node 2`` with ``DS_ACCELERATOR=cpu`` (gloo).

The project's own load, sampling, save and LoRA-merge code under a live DeepSpeed ZeRO-3 config, as the
Trainer holds it on GPU workers: the policy loads partitioned, trains a step through DeepSpeed's engine,
samples on partitioned weights with an uneven share of images per process, is saved gathered, and a LoRA
adapter is merged on the main process alone (the merge must not enter ZeRO-3's collective load).
"""

import json
import sys
from pathlib import Path

import deepspeed
import torch
from transformers.integrations import HfDeepSpeedConfig

from aesr1 import distributed
from aesr1.images import load_image
from aesr1.policy.data import prompt_messages
from aesr1.policy.generation import load_policy, sample
from aesr1.policy.trainer import freeze_vision, merge_adapter, outside_zero3

ZERO3 = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "zero_allow_untested_optimizer": True,
         "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True,
                               "stage3_param_persistence_threshold": 0}}


def main(backbone: str, adapter: str, images: str, out: str) -> None:
    out = Path(out)
    deepspeed.init_distributed(dist_backend="gloo")
    live = HfDeepSpeedConfig(ZERO3)  # as the Trainer's arguments hold it: every model loaded now is partitioned
    rank = distributed.rank()
    model, processor = load_policy(backbone, training="full")
    total = sum(p.ds_numel for p in model.parameters())
    local = sum(p.ds_tensor.numel() for p in model.parameters())
    whole_here = sum(p.numel() for p in model.parameters())
    frozen = freeze_vision(model)

    engine, *_ = deepspeed.initialize(model=model, config=ZERO3, optimizer=torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-3))
    paths = sorted(str(p) for p in Path(images).glob("*.jpg"))
    prompt = processor.apply_chat_template(prompt_messages(None), add_generation_prompt=True, tokenize=False)
    batch = processor(text=[prompt], images=[load_image(paths[rank])], return_tensors="pt")
    loss = engine(**batch, labels=batch["input_ids"]).loss
    engine.backward(loss)
    engine.step()

    # the evaluation's and the probes' sampling on partitioned weights: three images over two processes
    greedy = sample(engine.module, processor, paths[:3], do_sample=False, max_new_tokens=16, batch_size=1)

    state = engine._zero3_consolidated_16bit_state_dict()  # what the Trainer's save_model gathers under ZeRO-3
    if distributed.is_main():
        engine.module.save_pretrained(out / "saved", state_dict=state)
        processor.save_pretrained(out / "saved")
        torch.save(state, out / "gathered.pt")
        merge_adapter(backbone, Path(adapter), out / "merged")  # one process; the other waits at the barrier
        with outside_zero3():
            whole = load_policy(backbone)[0]
        whole_frozen = freeze_vision(whole)
    distributed.barrier()
    (out / f"rank{rank}.json").write_text(json.dumps({
        "world": distributed.world_size(), "total": total, "local": local, "whole_here": whole_here,
        "frozen": frozen, "whole_frozen": whole_frozen if distributed.is_main() else None,
        "loss": float(loss), "greedy": greedy.texts, "zero3_alive": live.is_zero3()}))
    distributed.close()


if __name__ == "__main__":
    main(*sys.argv[1:5])
