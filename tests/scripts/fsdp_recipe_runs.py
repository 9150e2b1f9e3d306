"""Run under `accelerate launch` with 2 CPU processes: recipes/train.py ten times in one launch (one process group),
on the embedded default data with the tiny preset.

    fsdp_recipe_runs.py OUT_DIR STEPS SAVE_AT [recipe flags...]
        OUT_DIR/ddp      STEPS steps under DDP
        OUT_DIR/fsdp     STEPS steps with --fsdp_encoders true (checkpoints every SAVE_AT steps)
        OUT_DIR/resumed  --fsdp_encoders true, resumed from OUT_DIR/fsdp/checkpoint-SAVE_AT to STEPS
        OUT_DIR/fsdp_to_ddp  DDP, resumed from OUT_DIR/fsdp/checkpoint-SAVE_AT (the optimizer's DCP shards read whole)
        OUT_DIR/ddp_to_fsdp  --fsdp_encoders true, resumed from OUT_DIR/ddp/checkpoint-SAVE_AT (optimizer.pt sharded)
        OUT_DIR/fsdp_checkpointed  STEPS steps with --fsdp_encoders true --activation_checkpointing true (prints how
                                   many layer forwards ran under torch.utils.checkpoint)
        OUT_DIR/ddp_compiled, OUT_DIR/fsdp_compiled  STEPS steps with --torch_compile true, DDP and FSDP2 (prints the
                                   graphs dynamo compiled in each; each rank writes the collectives it left unwaited to
                                   OUT_DIR/unwaited_collectives_rankR.txt)
        OUT_DIR/ddp_bf16, OUT_DIR/fsdp_bf16  STEPS steps with --bf16 true --use_cpu true (CPU autocast), DDP and FSDP2
Each run writes its final model with save_pretrained (full weights, rank 0); tests/test_fsdp.py compares them.
"""

import os
import sys
from pathlib import Path

import torch._dynamo
from torch._C._distributed_c10d import _get_work_registry_size
from transformers import modeling_utils

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "recipes"))
import train as train_recipe  # noqa: E402


def main() -> None:
    out, steps, save_at, extra = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]
    common = [str(ROOT / "recipes" / "configs" / "default.yaml"), "--max_steps", steps, "--save_steps", save_at,
              *extra]
    train_recipe.main(common + ["--output_dir", str(out / "ddp")])
    train_recipe.main(common + ["--output_dir", str(out / "fsdp"), "--fsdp_encoders", "true"])
    train_recipe.main(common + ["--output_dir", str(out / "resumed"), "--fsdp_encoders", "true",
                                "--resume_from_checkpoint", str(out / "fsdp" / f"checkpoint-{save_at}")])
    train_recipe.main(common + ["--output_dir", str(out / "fsdp_to_ddp"),
                                "--resume_from_checkpoint", str(out / "fsdp" / f"checkpoint-{save_at}")])
    train_recipe.main(common + ["--output_dir", str(out / "ddp_to_fsdp"), "--fsdp_encoders", "true",
                                "--resume_from_checkpoint", str(out / "ddp" / f"checkpoint-{save_at}")])
    checkpointed = count_checkpointed_calls()
    train_recipe.main(common + ["--output_dir", str(out / "fsdp_checkpointed"), "--fsdp_encoders", "true",
                                "--activation_checkpointing", "true"])
    graphs = {}
    for name, flags in (("ddp_compiled", []), ("fsdp_compiled", ["--fsdp_encoders", "true"])):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        train_recipe.main(common + ["--output_dir", str(out / name), "--torch_compile", "true", *flags])
        graphs[name] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    # Collectives that a compiled graph launched and never waited on (0: they all run eagerly).
    # (a file per rank: two ranks' lines in one stdout pipe can interleave mid-line)
    (out / f"unwaited_collectives_rank{os.environ.get('RANK', 0)}.txt").write_text(str(_get_work_registry_size()))
    for name, flags in (("ddp_bf16", []), ("fsdp_bf16", ["--fsdp_encoders", "true"])):
        train_recipe.main(common + ["--output_dir", str(out / name), "--bf16", "true", "--use_cpu", "true",
                                    *flags])
    if int(os.environ.get("RANK", 0)) == 0:
        print("checkpointed layer forwards:", checkpointed[0])
        print("compiled graphs:", graphs["ddp_compiled"], graphs["fsdp_compiled"])
        print("ten runs done, world size", os.environ.get("WORLD_SIZE"))


def count_checkpointed_calls() -> list[int]:
    """Count the calls of torch's checkpoint function from now on (transformers binds the name it imported when the
    Trainer enables activation checkpointing, so the runs before are not counted)."""
    count, original = [0], modeling_utils.checkpoint

    def counted(*args, **kwargs):
        count[0] += 1
        return original(*args, **kwargs)

    modeling_utils.checkpoint = counted
    return count


if __name__ == "__main__":
    main()
    train_recipe.end_process_group()
