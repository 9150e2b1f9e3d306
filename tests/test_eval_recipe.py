"""The held-out evaluator, its training callback, the eval data readers and `recipes/eval.py` end to end."""

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPModel, Trainer, TrainerState, TrainingArguments
from zero_shot_helpers import random_images, save_model

from neuclip_hf.default_data import FASHION_MNIST_CLASSES, prepare_default_data
from neuclip_hf.data import open_eval_data
from neuclip_hf.evaluation import ZeroShotEvalCallback, ZeroShotEvaluator

ROOT = Path(__file__).resolve().parents[1]
RETRIEVAL_KEYS = {f"{side}_retrieval_recall@{k}" for side in ("image", "text") for k in (1, 5, 10)}
CLASSIFICATION_KEYS = {"acc1", "acc5", "mean_per_class_recall"}
LIMIT = 120  # images per split of the prepared default data


@pytest.fixture(scope="module")
def default_split(tmp_path_factory) -> list[str]:
    """Parquet shards of a small default test split, in a temporary directory (never the real cache)."""
    return prepare_default_data(out_dir=tmp_path_factory.mktemp("data"), limit=LIMIT)["test"]


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_evaluator_on_the_default_split_gives_classification_and_retrieval(default_split, clip_model, clip_processor):
    evaluator = ZeroShotEvaluator(clip_processor, default_split, templates="simple", batch_size=50)
    assert evaluator.data.class_names is None  # read from the parquet `class_name` column
    results = evaluator(clip_model)
    assert CLASSIFICATION_KEYS | RETRIEVAL_KEYS <= set(results)
    assert all(0.0 <= results[key] <= 1.0 for key in CLASSIFICATION_KEYS | RETRIEVAL_KEYS)
    assert results["num_samples"] == LIMIT and results["num_skipped"] == 0
    assert results["images_per_second"] > 0 and results["seconds"] > 0
    named = ZeroShotEvaluator(clip_processor, default_split, class_names=FASHION_MNIST_CLASSES, templates="simple")
    assert named(clip_model)["acc1"] == pytest.approx(results["acc1"])  # the column gives the same class order


def test_evaluator_caches_inputs_and_respects_max_samples(default_split, clip_model, clip_processor):
    evaluator = ZeroShotEvaluator(clip_processor, default_split, templates="simple", max_samples=30, cache_inputs=True)
    first = evaluator(clip_model)
    assert first["num_samples"] == 30 and evaluator._cache is not None
    second = evaluator(clip_model)
    assert {k: v for k, v in second.items() if k not in ("seconds", "images_per_second")} == pytest.approx(
        {k: v for k, v in first.items() if k not in ("seconds", "images_per_second")}
    )


def test_unreadable_images_and_bad_captions_are_skipped_and_counted(clip_model, clip_processor):
    images = random_images(6, seed=3)
    rows = [{"image": _png(im), "caption": f"a photo of item {i}.", "label": i % 3} for i, im in enumerate(images)]
    rows[1]["image"] = b"\x89PNG broken"
    rows[4]["caption"] = "   "
    results = ZeroShotEvaluator(clip_processor, rows, class_names=["a", "b", "c"], templates=["a {}."])(clip_model)
    assert results["num_samples"] == 4
    assert results["num_skipped"] == 2
    assert results["num_skipped_image_undecodable"] == 1 and results["num_skipped_caption_empty"] == 1
    assert "acc5" not in results and "acc1" in results  # 3 classes
    assert RETRIEVAL_KEYS <= set(results)


def test_evaluator_errors(clip_model, clip_processor):
    unlabelled = [{"image": _png(image)} for image in random_images(2)]
    with pytest.raises(ValueError, match="nothing to evaluate"):
        ZeroShotEvaluator(clip_processor, unlabelled, templates="simple")(clip_model)
    with pytest.raises(ValueError, match="no readable sample"):
        ZeroShotEvaluator(clip_processor, [{"image": b"junk", "label": 0}], ["a"], templates="simple")(clip_model)
    with pytest.raises(ValueError, match="class_names is empty"):
        ZeroShotEvaluator(clip_processor, unlabelled, class_names=[])
    with pytest.raises(ValueError, match="placeholder"):
        ZeroShotEvaluator(clip_processor, unlabelled, templates=["no slot"])
    labelled = [{"image": _png(image), "label": 5} for image in random_images(2)]
    with pytest.raises(ValueError, match="label 5 has no class name"):
        ZeroShotEvaluator(clip_processor, labelled, class_names=["a", "b"], templates="simple")(clip_model)
    with pytest.raises(ValueError, match="cannot read evaluation data"):
        open_eval_data("/nonexistent/shards-*.tar")


def _image_folder(root: Path) -> Path:
    for label, name in enumerate(["ankle_boot", "bag", "sneaker"]):
        (root / name).mkdir(parents=True)
        for i, image in enumerate(random_images(3, seed=10 + label)):
            image.save(root / name / f"{i}.png")
    (root / "bag" / "broken.jpg").write_bytes(b"not a jpeg")
    (root / "bag" / "notes.txt").write_text("not an image file, ignored")
    return root


def test_webdataset_shards_give_retrieval_and_classification(tmp_path, clip_model, clip_processor):
    shard = tmp_path / "shard-00000.tar"
    with tarfile.open(shard, "w") as archive:
        for i, image in enumerate(random_images(5, seed=4)):
            members = (("png", _png(image)), ("txt", f"item {i}".encode()), ("cls", str(i % 2).encode()))
            for extension, payload in members:
                info = tarfile.TarInfo(f"sample{i:04d}.{extension}")
                info.size = len(payload)
                archive.addfile(info, io.BytesIO(payload))
    data = open_eval_data(str(tmp_path / "*.tar"), class_names=["dark", "light"])
    assert data.description.startswith("webdataset:")
    first = next(iter(data))
    assert first["caption"] == b"item 0" and first["label"] == 0
    results = ZeroShotEvaluator(clip_processor, data, templates="simple")(clip_model)
    assert results["num_samples"] == 5 and RETRIEVAL_KEYS | {"acc1"} <= set(results)


def _run_recipe(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}  # import this checkout's neuclip_hf
    return subprocess.run([sys.executable, str(ROOT / "recipes" / "eval.py"), *args], capture_output=True, text=True,
                          env=environment, cwd=ROOT, timeout=120)


@pytest.mark.slow
def test_recipe_on_the_default_split_without_data_argument(tmp_path, clip_model, clip_processor):
    # The real default cache (prepared by scripts/setup.sh; prepared here on first use otherwise): the recipe
    # streams it, so --max_samples keeps the run short.
    prepare_default_data()
    model_dir = save_model(tmp_path / "model", clip_model, clip_processor)
    output = tmp_path / "out" / "results.json"
    completed = _run_recipe(["--model", str(model_dir), "--templates", "simple", "--batch_size", "64",
                             "--max_samples", str(LIMIT), "--output_json", str(output)])
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads(output.read_text())
    assert results["model_class"] == "NeuCLIPModel" and results["data"].startswith("default:test")
    assert results["num_templates"] == 7
    assert CLASSIFICATION_KEYS | RETRIEVAL_KEYS <= set(results["metrics"])
    assert results["metrics"]["num_samples"] == LIMIT
    assert "acc1" in completed.stdout and "%" in completed.stdout  # the printed table


def test_recipe_on_an_image_folder_in_process(tmp_path, clip_model, clip_processor, capsys):
    import runpy

    recipe = runpy.run_path(str(ROOT / "recipes" / "eval.py"))  # same process: this checkout is on sys.path
    model_dir = save_model(tmp_path / "model", clip_model, clip_processor)
    folder = _image_folder(tmp_path / "images")
    output = tmp_path / "folder.json"
    results = recipe["main"](["--model", str(model_dir), "--data", str(folder), "--templates", "simple",
                              "--max_samples", "100", "--output_json", str(output)])
    written = json.loads(output.read_text())
    assert written == json.loads(json.dumps(results))
    metrics = written["metrics"]
    assert set(metrics) >= {"acc1", "mean_per_class_recall"}
    assert "acc5" not in metrics and "text_retrieval_recall@1" not in metrics  # 3 classes, no captions
    assert metrics["num_samples"] == 9 and metrics["num_skipped_image_undecodable"] == 1
    assert "imagefolder:" in written["data"] and "mean_per_class_recall" in capsys.readouterr().out


def test_recipe_plain_clip_dir_with_class_names_file(tmp_path, clip_model, clip_processor, default_split):
    import runpy

    recipe = runpy.run_path(str(ROOT / "recipes" / "eval.py"))
    source = save_model(tmp_path / "src", clip_model, clip_processor)
    CLIPModel.from_pretrained(source).save_pretrained(tmp_path / "clip")
    clip_processor.save_pretrained(tmp_path / "clip")
    names = tmp_path / "names.txt"
    names.write_text("\n".join(FASHION_MNIST_CLASSES))
    results = recipe["main"](["--model", str(tmp_path / "clip"), "--data", str(Path(default_split[0]).parent),
                              "--class_names", str(names), "--templates", "simple", "--max_samples", "40"])
    assert results["model_class"] == "CLIPModel" and results["metrics"]["num_samples"] == 40


# -- the training callback ----------------------------------------------------------------------------------------
class _PairDataset(torch.utils.data.Dataset):
    def __init__(self, processor, count: int = 16):
        images = random_images(count, seed=5)
        self.pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        self.ids = processor.tokenizer([f"a photo of item {i}" for i in range(count)], padding="max_length",
                                       max_length=16, return_tensors="pt")["input_ids"]

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        return {"pixel_values": self.pixels[index], "input_ids": self.ids[index]}


def _collate(rows):
    return {"pixel_values": torch.stack([r["pixel_values"] for r in rows]),
            "input_ids": torch.stack([r["input_ids"] for r in rows]), "return_loss": True}


def test_callback_logs_through_a_trainer_every_n_steps_and_at_the_end(
    tmp_path, clip_model, default_split, clip_processor
):
    clip = CLIPModel.from_pretrained(save_model(tmp_path / "model", clip_model, clip_processor))
    evaluator = ZeroShotEvaluator(None, default_split, templates="simple", max_samples=40, cache_inputs=True)
    callback = ZeroShotEvalCallback(evaluator, eval_steps=2)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=5, per_device_train_batch_size=4,
                             learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="no", logging_steps=100,
                             remove_unused_columns=False, disable_tqdm=True)
    trainer = Trainer(model=clip, args=args, train_dataset=_PairDataset(clip_processor), data_collator=_collate,
                      processing_class=clip_processor)  # the evaluator takes the processor from the trainer
    callback.attach(trainer)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "eval_acc1" in entry]
    assert [entry["step"] for entry in logged] == [2, 4, 5]  # every 2 steps and once at the end
    assert RETRIEVAL_KEYS <= {key.removeprefix("eval_") for key in logged[-1]}
    assert callback.results["latest"]["acc1"] == logged[-1]["eval_acc1"]
    assert callback.results["best"]["acc1"] == max(entry["eval_acc1"] for entry in logged)
    assert callback.results["best_step"] in (2, 4, 5) and len(callback.results["history"]) == 3
    assert clip.training  # evaluation restored the training mode


def test_callback_without_trainer_appends_to_log_history(clip_model, clip_processor, default_split):
    evaluator = ZeroShotEvaluator(clip_processor, default_split, templates="simple", max_samples=20)
    callback = ZeroShotEvalCallback(evaluator, eval_steps=None)
    state = TrainerState(max_steps=3, global_step=3)
    callback.on_step_end(None, state, None, model=clip_model)  # the last step: evaluated
    callback.on_train_end(None, state, None, model=clip_model)  # already done at this step: not repeated
    assert len(state.log_history) == 1 and state.log_history[0]["step"] == 3
    assert set(state.log_history[0]) >= {"eval_acc1", "eval_image_retrieval_recall@1", "eval_num_samples"}
    other_rank = TrainerState(max_steps=3, global_step=3, is_world_process_zero=False)
    callback.on_train_end(None, other_rank, None, model=clip_model)
    assert other_rank.log_history == []  # only the main process evaluates


def test_image_arrays_in_rows_are_accepted(clip_model, clip_processor):
    arrays = [np.asarray(image) for image in random_images(3, seed=6)]
    rows = [{"image": array, "label": i} for i, array in enumerate(arrays)]
    results = ZeroShotEvaluator(clip_processor, rows, class_names=["a", "b", "c"], templates=["{}"])(clip_model)
    assert results["num_samples"] == 3 and 0.0 <= results["acc1"] <= 1.0


def test_a_datasets_dataset_with_image_and_class_label_features(clip_model, clip_processor):
    import datasets

    images = random_images(4, seed=7)
    images[2] = b"broken"  # an Image feature would raise while decoding; the evaluator must skip it instead
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["coat", "bag"])})
    dataset = datasets.Dataset.from_dict(
        {"image": [{"bytes": _png(im) if isinstance(im, Image.Image) else im, "path": None} for im in images],
         "label": [0, 1, 0, 1]},
        features=features,
    )
    evaluator = ZeroShotEvaluator(clip_processor, dataset, templates="simple")
    assert evaluator.data.class_names == ["coat", "bag"]  # from the ClassLabel feature
    results = evaluator(clip_model)
    assert results["num_samples"] == 3 and results["num_skipped_image_undecodable"] == 1
