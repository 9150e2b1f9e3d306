"""No Hub token and no local path is written (issue 12): `--hub_token` never reaches training_args.bin, a checkpoint,
TensorBoard events, logs, the card or the Hub; nothing pushed names a local absolute path or the user."""

import getpass
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
from fake_hub import fake_hub  # noqa: F401  (pytest fixture)
from trainer_helpers import make_trainer

from neuclip_hf.model_card import public_text

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_CLItokenMUSTneverBEwritten0123456"


def files_containing(root: Path, needle: bytes) -> list[str]:
    """Every file under `root` whose bytes contain `needle` (relative names)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and needle in p.read_bytes())


def test_hub_token_is_in_no_file_of_the_output_dir(tmp_path, capfd):
    # (TensorBoard events are scanned by the slow recipe test below: importing TensorBoard costs seconds here.)
    trainer = make_trainer("clip", tmp_path / "run", 2, save_steps=1, hub_token=TOKEN)
    trainer.train()
    trainer.save_model()
    out = tmp_path / "run"
    written = [p for p in out.rglob("*") if p.is_file()]
    # What is scanned: both checkpoints and the final save, pickled arguments included.
    assert {"checkpoint-1/training_args.bin", "checkpoint-2/training_args.bin", "training_args.bin"} <= {
        str(p.relative_to(out)) for p in written}
    assert files_containing(out, TOKEN.encode()) == []
    assert torch.load(out / "training_args.bin", weights_only=False).hub_token is None
    assert trainer._hub_token == TOKEN  # still there for the pushes
    captured = capfd.readouterr()
    assert TOKEN not in captured.out + captured.err


@pytest.mark.parametrize("text, public", [
    ("/home/ann/data/shard-{00000..00009}.tar", "shard-{00000..00009}.tar"),
    ("2 parquet file(s) from '/home/ann/x/*.parquet'", "2 parquet file(s) from '*.parquet'"),
    ("image folder /srv/ann/pets (3 captions files)", "image folder pets (3 captions files)"),
    ("~/data/a.parquet,/mnt/b.parquet", "a.parquet,b.parquet"),
    ("user/dataset", "user/dataset"), ("hf://datasets/user/x", "hf://datasets/user/x"),
    ("https://example.org/a/b.tar", "https://example.org/a/b.tar"), (None, None),
])
def test_public_text_drops_local_paths(text, public):
    assert public_text(text) == public


PUSHING_RUN = """
import json, logging, sys
logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)  # every library logger at its most verbose
sys.path.insert(0, {recipes!r})
import train
summary = train.main(sys.argv[1:])
print(json.dumps({{"global_step": summary["global_step"]}}))
"""


@pytest.mark.slow  # a recipe run in a subprocess against the loopback Hub
def test_a_pushed_recipe_run_writes_no_token_and_pushes_no_local_path(fake_hub, tmp_path):
    """`recipes/train.py --hub_token ... --push_to_hub` with an absolute output dir and absolute data paths: the
    token is in no byte under the output dir, in nothing pushed and in no log line; no pushed byte holds the local
    paths, the home directory or the user's name."""
    import subprocess

    from fake_hub import hub_env

    from neuclip_hf.default_data import default_data_files, prepare_default_data

    prepare_default_data()
    train_files = default_data_files("train")
    out = (tmp_path / "work" / "run").absolute()
    script = tmp_path / "run_recipe.py"
    script.write_text(PUSHING_RUN.format(recipes=str(ROOT / "recipes")))
    args = [str(ROOT / "recipes" / "configs" / "default.yaml"), "--output_dir", str(out), "--max_steps", "4",
            "--save_steps", "2", "--per_device_train_batch_size", "32", "--eval_max_samples", "64",
            "--zero_shot_eval_steps", "2", "--logging_steps", "1", "--report_to", "tensorboard",
            "--train_data", ",".join(train_files), "--disable_tqdm", "true", "--push_to_hub",
            "--hub_model_id", "user/secret-check", "--hub_strategy", "every_save", "--hub_token", TOKEN,
            "--hub_push_tensorboard", "true"]
    env = hub_env(fake_hub, tmp_path / "hf_home", token=None)
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    assert TOKEN not in output and "DEBUG" in output
    assert any(p.name.startswith("events.out.tfevents.") for p in out.rglob("*"))  # scanned too
    assert any(p.name == "training_args.bin" for p in out.glob("checkpoint-*/*"))
    assert files_containing(out, TOKEN.encode()) == []
    pushed = fake_hub.files("user/secret-check")
    assert {"README.md", "config.json", "model.safetensors", "eval_results.json"} <= set(pushed)
    assert any(name.startswith("runs/") and ".tfevents." in name for name in pushed)  # the curves went too
    local = {str(tmp_path), str(Path(train_files[0]).parent), os.path.expanduser("~"), f"/{getpass.getuser()}/"}
    host = socket.gethostname()
    for name, content in pushed.items():
        assert TOKEN.encode() not in content, name
        assert host not in name, name  # TensorBoard names its files and run folder after the host
        for text in local:
            assert text.encode() not in content, f"{name} holds {text!r}"
    events = next(content for name, content in pushed.items() if ".tfevents." in name)
    assert b"output_dir" in events and b'"run"' in events  # the args text is there, with the run folder's last part
