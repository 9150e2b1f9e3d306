"""Issue 13: ties and duplicate captions against CLIP_benchmark's definitions, batching independence, the evaluation
layouts people have (CLIP_benchmark webdataset, image folders, parquet / COCO / Karpathy / Flickr retrieval sets),
the suite runner and its outputs, class-name mapping, and the loading conventions."""

import io
import itertools
import json
import os
import random
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from zero_shot_helpers import random_images, save_model

from neuclip_hf.data.eval_data import map_class_names, open_eval_data
from neuclip_hf.default_data import FASHION_MNIST_CLASSES, prepare_default_data
from neuclip_hf.evaluation import ZeroShotEvaluator, evaluate_pretrained
from neuclip_hf.metrics import classification_metrics, recall_ceilings, retrieval_metrics
from neuclip_hf.suite import (
    clip_benchmark_records,
    datacomp_name,
    read_suite,
    run_suite,
    suite_json,
    suite_table_markdown,
    write_clip_benchmark_json,
)

ROOT = Path(__file__).resolve().parents[1]
PLAIN = {"seconds", "images_per_second"}


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _add(archive: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    archive.addfile(info, io.BytesIO(payload))


# -- references written from the definitions ----------------------------------------------------------------------
def _clip_benchmark_classification(logits: torch.Tensor, target: torch.Tensor) -> dict:
    """CLIP_benchmark's zeroshot_classification: topk(max k, sorted) for acc@k, argmax + balanced accuracy."""
    ks = (1, 5) if logits.shape[1] >= 5 else (1,)
    pred = logits.topk(max(ks), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    results = {f"acc{k}": float(correct[:k].reshape(-1).float().sum()) / len(target) for k in ks}
    top1 = logits.argmax(dim=1)
    recalls = [float((top1[target == c] == c).float().mean()) for c in target.unique()]
    results["mean_per_class_recall"] = sum(recalls) / len(recalls)
    return results


def _clip_benchmark_recall(scores: torch.Tensor, positives: torch.Tensor, k: int) -> float:
    """CLIP_benchmark's recall_at_k (one-hot of topk indices times positives) > 0, averaged over the queries."""
    top = torch.topk(scores, k, dim=1)[1]
    true_positives = (F.one_hot(top, scores.shape[1]) * positives[:, None, :]).sum(dim=(1, 2))
    return float((true_positives / positives.sum(dim=1) > 0).float().mean())


def _expected_by_enumeration(scores: torch.Tensor, positives: torch.Tensor, k: int) -> float:
    """The expected top-k hit under random tie-breaking, by enumerating every order of the candidates."""
    total = 0.0
    for row, positive in zip(scores.tolist(), positives.tolist()):
        orders = list(itertools.permutations(range(len(row))))
        hits = 0
        for order in orders:  # a tie-break order: sort by score, ties by the permutation's rank
            rank = {candidate: position for position, candidate in enumerate(order)}
            ranked = sorted(range(len(row)), key=lambda c: (-row[c], rank[c]))
            hits += any(positive[c] for c in ranked[:k])
        total += hits / len(orders)
    return total / len(scores)


def test_ties_and_duplicates_against_clip_benchmark_definitions():
    # classification: a row of 6 equal scores, and rows with two-way ties
    logits = torch.tensor([[0.0] * 6, [1.0, 1.0, 0, 0, 0, 0], [0, 2.0, 2.0, 1, 0, 0], [3.0, 0, 0, 0, 0, 1]])
    labels = torch.tensor([4, 1, 1, 0])
    assert classification_metrics(logits, labels, tie_break="topk") == pytest.approx(
        _clip_benchmark_classification(logits, labels))
    expected = classification_metrics(logits, labels)
    assert expected["acc1"] == pytest.approx((1 / 6 + 1 / 2 + 1 / 2 + 1) / 4)
    assert expected["acc5"] == pytest.approx((5 / 6 + 1 + 1 + 1) / 4)

    # retrieval with duplicate captions: texts 0, 1 and 2 are the same caption (identical embeddings)
    images = F.normalize(torch.tensor([[1.0, 0.2, 0], [0.9, 0.1, 0.3], [0, 1.0, 0], [0.1, 0, 1.0]]), dim=-1)
    caption = F.normalize(torch.tensor([1.0, 0.1, 0.1]), dim=0)
    texts = torch.stack([caption, caption, caption, F.normalize(torch.tensor([0.0, 0.2, 1.0]), dim=0)])
    text_to_image = torch.tensor([0, 1, 2, 3])
    scores = texts @ images.T
    image_positives = F.one_hot(text_to_image, 4).bool()
    text_positives = image_positives.T
    for k in (1, 2, 3):
        topk = retrieval_metrics(images, texts, text_to_image, ks=(k,), tie_break="topk")
        assert topk[f"image_retrieval_recall@{k}"] == pytest.approx(_clip_benchmark_recall(scores, image_positives, k))
        assert topk[f"text_retrieval_recall@{k}"] == pytest.approx(_clip_benchmark_recall(scores.T, text_positives, k))
        ours = retrieval_metrics(images, texts, text_to_image, ks=(k,), text_groups=[7, 7, 7, 9])
        assert ours[f"text_retrieval_recall@{k}"] == pytest.approx(
            _expected_by_enumeration(scores.T, text_positives, k))  # image queries see the 3 copies tied
        assert ours[f"image_retrieval_recall@{k}"] == pytest.approx(
            _expected_by_enumeration(scores, image_positives, k))
    ours = retrieval_metrics(images, texts, text_to_image, ks=(1, 2), text_groups=[7, 7, 7, 9])
    assert ours["num_texts"] == 4 and ours["num_distinct_texts"] == 2
    # ceilings: the 3 copies rank images identically, so at most one of them hits @1 (two @2); the image queries
    # of images 0-2 find their caption among 3 tied copies: 1/3 @1, 2/3 @2
    assert ours["image_retrieval_recall@1_ceiling"] == pytest.approx((1 + 1) / 4)
    assert ours["image_retrieval_recall@2_ceiling"] == pytest.approx((2 + 1) / 4)
    assert ours["text_retrieval_recall@1_ceiling"] == pytest.approx((3 * (1 / 3) + 1) / 4)
    assert ours["text_retrieval_recall@2_ceiling"] == pytest.approx((3 * (2 / 3) + 1) / 4)
    # caption-aware: a copy of the true caption is a hit, as is an image whose caption equals the query
    aware_text = text_positives | (text_positives.float() @ (F.one_hot(torch.tensor([0, 0, 0, 1])).float()
                                                             @ F.one_hot(torch.tensor([0, 0, 0, 1])).float().T) > 0)
    aware_image = aware_text.T
    assert ours["text_retrieval_recall@1_caption_aware"] == pytest.approx(
        _expected_by_enumeration(scores.T, aware_text, 1))
    assert ours["image_retrieval_recall@1_caption_aware"] == pytest.approx(
        _expected_by_enumeration(scores, aware_image, 1))
    assert ours["image_retrieval_recall@1_caption_aware"] >= ours["image_retrieval_recall@1"]


def test_templated_captions_ceiling_matches_the_distinct_fraction():
    # 10,000 texts, one per image, drawn from 228 templates: plain R@1 cannot exceed 228 / 10,000 on either side
    generator = torch.Generator().manual_seed(0)
    groups = torch.cat([torch.arange(228), torch.randint(0, 228, (10_000 - 228,), generator=generator)])
    ceilings = recall_ceilings(torch.arange(10_000), groups, ks=(1,))
    assert ceilings["image_retrieval_recall@1_ceiling"] == pytest.approx(0.0228)
    assert ceilings["text_retrieval_recall@1_ceiling"] == pytest.approx(0.0228)


def test_topk_rule_differs_where_documented():
    flat = torch.zeros(1, 10)  # a collapsed model
    topk = classification_metrics(flat, torch.tensor([int(flat.topk(1)[1])]), tie_break="topk")
    assert topk["acc1"] == 1.0 and topk["mean_per_class_recall"] == (1.0 if int(flat.topk(1)[1]) == 0 else 0.0)
    assert classification_metrics(flat, torch.tensor([3]))["acc1"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="tie_break='random' is invalid"):
        classification_metrics(flat, torch.tensor([3]), tie_break="random")


# -- batching independence --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def default_rows(tmp_path_factory) -> list[dict]:
    files = prepare_default_data(out_dir=tmp_path_factory.mktemp("data"), limit=150)["test"]
    return list(open_eval_data(files))


def test_metrics_identical_under_shuffled_order_and_other_batch_sizes(default_rows, clip_model, clip_processor):
    def run(rows, batch_size):
        metrics = ZeroShotEvaluator(clip_processor, rows, templates="simple", batch_size=batch_size)(clip_model)
        return {key: value for key, value in metrics.items() if key not in PLAIN}

    reference = run(default_rows, 64)
    shuffled = default_rows[:]
    random.Random(1).shuffle(shuffled)
    assert run(default_rows, 7) == reference
    assert run(shuffled, 64) == reference
    assert run(shuffled, 33) == reference
    assert reference["num_distinct_texts"] < reference["num_texts"] == 150  # templated captions repeat


# -- layouts ------------------------------------------------------------------------------------------------------
def _clip_benchmark_classification_folder(root: Path, classes=("cat", "dog", "fox"), count=6) -> Path:
    (root / "test").mkdir(parents=True)
    images = random_images(count, seed=21)
    for shard in range(2):
        with tarfile.open(root / "test" / f"{shard}.tar", "w") as archive:
            for i in range(shard * count // 2, (shard + 1) * count // 2):
                _add(archive, f"s{i:04d}.webp" if i % 2 else f"s{i:04d}.png", _png(images[i]))
                _add(archive, f"s{i:04d}.cls", str(i % len(classes)).encode())
    (root / "test" / "nshards.txt").write_text("2\n")
    (root / "classnames.txt").write_text("\n".join(classes) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\na drawing of a {c}.\n")
    return root


def _clip_benchmark_retrieval_folder(root: Path, count=4) -> Path:
    (root / "test").mkdir(parents=True)
    with tarfile.open(root / "test" / "0.tar", "w") as archive:
        for i, image in enumerate(random_images(count, seed=22)):
            _add(archive, f"r{i:04d}.jpg", _png(image))
            _add(archive, f"r{i:04d}.txt", f"caption one of {i}\ncaption two of {i}\n".encode())
    (root / "test" / "nshards.txt").write_text("1")
    (root / "dataset_type.txt").write_text("retrieval\n")
    return root


def test_clip_benchmark_webdataset_layout(tmp_path, clip_model, clip_processor):
    folder = _clip_benchmark_classification_folder(tmp_path / "wds_toy_test")
    for spec in (folder, folder / "test", f"{folder}/test/*.tar"):  # the folder, the split folder, the shards
        data = open_eval_data(str(spec))
        assert data.class_names == ["cat", "dog", "fox"] and data.templates == ["a photo of a {c}.",
                                                                                 "a drawing of a {c}."]
        assert [row["label"] for row in data] == [0, 1, 2, 0, 1, 2]
    evaluator = ZeroShotEvaluator(clip_processor, open_eval_data(str(folder)), templates=None)
    assert evaluator.templates == ["a photo of a {}.", "a drawing of a {}."]
    assert "2 templates from" in evaluator.templates_description
    metrics = evaluator(clip_model)
    assert metrics["num_samples"] == 6 and "acc1" in metrics and "image_retrieval_recall@1" not in metrics

    retrieval = _clip_benchmark_retrieval_folder(tmp_path / "wds_flickr_test")
    metrics = ZeroShotEvaluator(clip_processor, open_eval_data(str(retrieval)), templates=None)(clip_model)
    assert metrics["num_samples"] == 4 and metrics["num_texts"] == 8 and metrics["num_distinct_texts"] == 8
    assert "acc1" not in metrics  # a retrieval set: each line of `txt` is a caption of the image
    (retrieval / "test" / "nshards.txt").write_text("3")
    with pytest.raises(ValueError, match="announces 3 shards but 2 are missing"):
        open_eval_data(str(retrieval))


def test_retrieval_sets_parquet_coco_karpathy_and_flickr_json(tmp_path, clip_model, clip_processor):
    images = random_images(3, seed=23)
    for i, image in enumerate(images):
        image.save(tmp_path / f"img{i}.png")
    captions = [[f"a picture number {i}", f"another view of {i}"] for i in range(3)]
    pq.write_table(pa.table({"image": [_png(image) for image in images], "captions": captions}),
                   tmp_path / "pairs.parquet")
    coco = {"images": [{"id": 10 + i, "file_name": f"img{i}.png"} for i in range(3)],
            "annotations": [{"image_id": 10 + i, "caption": text} for i in range(3) for text in captions[i]]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    karpathy = {"images": [{"filename": f"img{i}.png", "filepath": "", "split": "test" if i < 2 else "train",
                            "sentences": [{"raw": text} for text in captions[i]]} for i in range(3)]}
    (tmp_path / "karpathy.json").write_text(json.dumps(karpathy))
    (tmp_path / "flickr.json").write_text(json.dumps([{"image": f"img{i}.png", "caption": captions[i]}
                                                       for i in range(3)]))
    results = {}
    for name in ("pairs.parquet", "coco.json", "karpathy.json", "flickr.json"):
        metrics = ZeroShotEvaluator(clip_processor, open_eval_data(str(tmp_path / name)))(clip_model)
        results[name] = {k: v for k, v in metrics.items() if k not in PLAIN}
    assert results["karpathy.json"]["num_samples"] == 2 and results["karpathy.json"]["num_texts"] == 4  # test split
    assert results["pairs.parquet"]["num_texts"] == 6
    assert results["pairs.parquet"] == results["coco.json"] == results["flickr.json"]  # same images and captions
    # an image with two captions: the image query hits when either caption is retrieved
    assert results["coco.json"]["text_retrieval_recall@5"] == 1.0


def test_image_folder_and_class_name_mapping(tmp_path, clip_model, clip_processor):
    for label, name in enumerate(["ankle_boot", "bag", "coat"]):
        (tmp_path / "folder" / name).mkdir(parents=True)
        for i, image in enumerate(random_images(2, seed=30 + label)):
            image.save(tmp_path / "folder" / name / f"{i}.png")
    data = open_eval_data(str(tmp_path / "folder"))
    assert data.class_names == ["ankle boot", "bag", "coat"] and data.class_names_source == "the sorted folder names"
    with pytest.raises(ValueError, match="another order: label 0 is 'ankle boot' in the data .* but 'coat'"):
        open_eval_data(str(tmp_path / "folder"), class_names=["coat", "bag", "ankle boot"])
    mapped = open_eval_data(str(tmp_path / "folder"), class_names={"coat": "a coat", "0": "a boot", "bag": "a bag"})
    assert mapped.class_names == ["a boot", "a bag", "a coat"]
    renamed = open_eval_data(str(tmp_path / "folder"), class_names=["boot", "handbag", "jacket"])  # no shared name
    assert renamed.class_names == ["boot", "handbag", "jacket"]
    with pytest.raises(ValueError, match="2 class names given but the data has 3 classes"):
        open_eval_data(str(tmp_path / "folder"), class_names=["a", "b"])
    with pytest.raises(ValueError, match="key 'shoe' is neither a label index"):
        map_class_names({"shoe": "x"}, ["ankle boot", "bag"])
    metrics = ZeroShotEvaluator(clip_processor, mapped, templates="simple")(clip_model)
    assert metrics["num_samples"] == 6 and "acc1" in metrics


# -- the suite ------------------------------------------------------------------------------------------------------
def test_suite_runs_several_sets_into_one_table_and_clip_benchmark_json(tmp_path, clip_model, clip_processor):
    suite_dir = tmp_path / "datacomp"
    _clip_benchmark_classification_folder(suite_dir / "wds_vtab-toy_test")
    _clip_benchmark_retrieval_folder(suite_dir / "wds_flickr_test")
    entries = read_suite(suite_dir)
    assert [e.name for e in entries] == ["flickr", "vtab/toy"] and datacomp_name("wds_cifar10_test") == "cifar10"
    (tmp_path / "suite.yaml").write_text(
        f"toy: {suite_dir / 'wds_vtab-toy_test'}\n"
        f"flickr: {{data: {suite_dir / 'wds_flickr_test'}, task: zeroshot_retrieval}}\n"
        f"toy_recall: {{data: {suite_dir / 'wds_vtab-toy_test'}, main_metric: mean_per_class_recall}}\n")
    lines = []
    results = run_suite(clip_model, clip_processor, read_suite(tmp_path / "suite.yaml"), batch_size=4,
                        log=lines.append)
    assert [r.name for r in results] == ["toy", "flickr", "toy_recall"]
    assert [r.main_metric for r in results] == ["acc1", "mean_recall@1", "mean_per_class_recall"]
    flickr = results[1].metrics
    assert flickr["mean_recall@1"] == pytest.approx((flickr["image_retrieval_recall@1"]
                                                     + flickr["text_retrieval_recall@1"]) / 2)
    table = suite_table_markdown(results, "tiny")
    assert "| toy | classification | 6 | acc1 |" in table and "Average of the main metrics over 3 set(s)" in table
    record = suite_json(results, "tiny", "NeuCLIPModel", "expected")
    assert record["average_main_metric"] == pytest.approx(
        sum(r.metrics[r.main_metric] for r in results) / 3)
    assert str(tmp_path) not in json.dumps(record)  # no local path in the written record
    written = write_clip_benchmark_json(results, tmp_path / "cb", "NeuCLIPModel", "tiny")
    names = sorted(path.name for path in written)
    assert names == ["flickr_tiny_NeuCLIPModel_en_zeroshot_retrieval.json",
                     "toy_recall_tiny_NeuCLIPModel_en_zeroshot_classification.json",
                     "toy_tiny_NeuCLIPModel_en_zeroshot_classification.json"]
    toy = json.loads((tmp_path / "cb" / names[2]).read_text())
    assert set(toy) == {"dataset", "model", "pretrained", "task", "metrics", "language"}
    assert set(toy["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"} and toy["metrics"]["acc5"] != \
        toy["metrics"]["acc5"]  # NaN below 5 classes, as CLIP_benchmark writes it
    assert clip_benchmark_records(results[1:2], "m", "p")[0]["metrics"].keys() == {
        f"{side}_retrieval_recall@{k}" for side in ("image", "text") for k in (1, 5, 10)}


# -- the eval recipe ----------------------------------------------------------------------------------------------
def _recipe(args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "recipes" / "eval.py"), *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=cwd, timeout=300)


@pytest.mark.slow  # four recipe subprocesses
def test_recipe_captions_only_missing_directory_and_bad_class_order(tmp_path, clip_model, clip_processor):
    model_dir = save_model(tmp_path / "model", clip_model, clip_processor)
    images = random_images(4, seed=40)
    pq.write_table(pa.table({"image": [_png(image) for image in images], "text": ["a b", "c d", "a b", "e f"]}),
                   tmp_path / "captions.parquet")
    done = _recipe(["--model", str(model_dir), "--data", str(tmp_path / "captions.parquet"), "--templates", "simple"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert "nan" not in done.stdout.lower() and "no zero-shot classification: it needs class labels" in done.stdout
    assert "3 distinct texts among 4" in done.stdout
    missing = _recipe(["--model", str(tmp_path / "nowhere")])
    assert missing.returncode != 0
    assert missing.stderr.strip() == f"error: no such model directory: {tmp_path / 'nowhere'}"
    no_data = _recipe(["--model", str(model_dir), "--data", str(tmp_path / "no_such_dir")])
    assert no_data.stderr.strip().splitlines()[-1].startswith("error: cannot read evaluation data")
    assert "Traceback" not in no_data.stderr and "no such local file or directory" in no_data.stderr
    folder = tmp_path / "fashion"
    for name in sorted(n.replace("/", "_") for n in FASHION_MNIST_CLASSES):
        (folder / name).mkdir(parents=True)
        images[0].save(folder / name / "0.png")
    names = tmp_path / "names.txt"
    names.write_text("\n".join(FASHION_MNIST_CLASSES))  # the usual order, not the sorted folder order
    refused = _recipe(["--model", str(model_dir), "--data", str(folder), "--class_names", str(names)])
    assert refused.returncode != 0 and "another order" in refused.stderr and "Traceback" not in refused.stderr


# -- loading conventions ------------------------------------------------------------------------------------------
def test_pipeline_long_labels_are_truncated_like_the_tokenizer(tmp_path, clip_model, clip_processor):
    from transformers import pipeline

    directory = save_model(tmp_path / "model", clip_model, clip_processor)
    classify = pipeline("zero-shot-image-classification", model=str(directory))
    long_label = "a " + "very " * 60 + "long label"
    images = random_images(2, seed=41)
    outputs = classify(images, candidate_labels=[long_label, "cat"])
    truncated = classify(images, candidate_labels=[long_label, "cat"], tokenizer_kwargs={"truncation": True})
    for out, reference in zip(outputs, truncated):
        assert {o["label"]: o["score"] for o in out} == pytest.approx({o["label"]: o["score"] for o in reference})


def test_processor_without_the_package_and_the_pil_training_path(tmp_path, clip_model, clip_processor):
    from neuclip_hf.data.samples import BatchEncoder, DecodedSample

    directory = save_model(tmp_path / "model", clip_model, clip_processor)
    code = ("from transformers import AutoProcessor; import sys; "
            f"p = AutoProcessor.from_pretrained({str(directory)!r}, trust_remote_code=True, backend='pil'); "
            "print(type(p.image_processor).__name__); print('neuclip_hf' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          env={**os.environ, "PYTHONPATH": ""}, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["CLIPImageProcessorPil", "False"]
    assert "Do you wish to run the custom code" not in done.stdout + done.stderr
    # the PIL processor gives the training pipeline's pixels exactly
    from transformers import AutoProcessor

    loaded = AutoProcessor.from_pretrained(directory, backend="pil")
    images = random_images(3, seed=42, size=(40, 57))
    training = BatchEncoder(clip_processor, max_length=32, augment=False)(
        [DecodedSample(image, "a cat", i) for i, image in enumerate(images)])["pixel_values"]
    assert torch.equal(loaded(images=images, return_tensors="pt")["pixel_values"], training)


def test_fresh_normalizer_and_saves_print_no_load_report_or_escape_codes(tmp_path, clip_model):
    clip_model.save_pretrained(tmp_path / "neuclip")
    code = ("import neuclip_hf; from neuclip_hf import NeuCLIPModel; from neuclip_hf.trainer import "
            "library_progress_bars\n"
            f"m = NeuCLIPModel.from_clip_pretrained({str(tmp_path / 'neuclip')!r}, objective='neuclip', "
            "neuclip_num_prototypes=8)\n"
            f"with library_progress_bars(enabled=False): m.save_pretrained({str(tmp_path / 'again')!r})\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    output = done.stdout + done.stderr
    assert "LOAD REPORT" not in output and "UNEXPECTED" not in output and "MISSING" not in output
    assert "\x1b" not in output and "Writing model shards" not in output
