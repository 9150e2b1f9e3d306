"""Run under `accelerate launch` with 4 CPU processes: recipes/train.py resumed from the 2-process checkpoints that
tests/scripts/fsdp_recipe_runs.py wrote, at the same global batch (8 per process instead of 16).

    resume_other_layout.py RUNS_DIR OUT_DIR STEPS SAVE_AT [recipe flags...]
        without --resume_with_other_layout: every rank writes OUT_DIR/refused_other_layout_rankR.txt (its message)
        at another global batch (4 per process): every rank writes OUT_DIR/refused_other_batch_rankR.txt
        (files, not stdout: four ranks' lines in one pipe can interleave mid-line)
        OUT_DIR/ddp_w4, OUT_DIR/fsdp_w4: --resume_with_other_layout next_epoch from RUNS_DIR/{ddp,fsdp}/checkpoint-SAVE_AT
            to STEPS (DDP, and FSDP2 with the encoder optimizer's 2 DCP shards re-sharded to 4)
"""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "recipes"))
import train as train_recipe  # noqa: E402


def main() -> None:
    runs, out, steps, save_at, extra = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5:]
    rank = int(os.environ["RANK"])
    common = [str(ROOT / "recipes" / "configs" / "default.yaml"), "--max_steps", steps, "--save_steps", save_at,
              *extra]
    checkpoint = str(runs / "ddp" / f"checkpoint-{save_at}")
    for name, flags in (("other_layout", ["--per_device_train_batch_size", "8"]),
                        ("other_batch", ["--per_device_train_batch_size", "4", "--resume_with_other_layout",
                                         "next_epoch"])):
        try:  # refused on every rank before any collective, so the launch goes on
            train_recipe.main(common + flags + ["--output_dir", str(out / name), "--resume_from_checkpoint",
                                                checkpoint])
        except ValueError as error:
            (out / f"refused_{name}_rank{rank}.txt").write_text(str(error))
        else:
            raise AssertionError(f"the resume {name} was not refused")
    for name, flags in (("ddp_w4", []), ("fsdp_w4", ["--fsdp_encoders", "true"])):
        source = runs / name.removesuffix("_w4") / f"checkpoint-{save_at}"
        train_recipe.main(common + flags + ["--per_device_train_batch_size", "8", "--resume_with_other_layout",
                                            "next_epoch", "--output_dir", str(out / name),
                                            "--resume_from_checkpoint", str(source)])
    if rank == 0:
        print("resumed at world size", os.environ.get("WORLD_SIZE"))


if __name__ == "__main__":
    main()
    train_recipe.end_process_group()
