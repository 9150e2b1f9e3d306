"""Several evaluation sets in one run (the DataComp / CLIP_benchmark suite): one results table, JSON + markdown.

A suite is a YAML (or JSON) file, or a folder:

```yaml
# name: spec, or name: {data: spec, split, task, class_names, templates, main_metric, *_column}
cifar10: /data/datacomp/wds_cifar10_test             # CLIP_benchmark webdataset folder
imagenet1k:
  data: /data/imagenet/val                           # image folder with class sub-folders
  class_names: /data/imagenet/classnames.txt         # one name per label, or `label: name` lines
mscoco: {data: /data/coco/captions_val2017.json, task: zeroshot_retrieval}
```

A folder whose sub-folders are datasets (DataComp's `download_evalsets.py` layout, `wds_<task>_test`) is a suite
of every sub-folder, named as DataComp names them (`wds_vtab-cifar100_test` -> `vtab/cifar100`).

Each set is read by `data.open_eval_data` and scored by `evaluation.ZeroShotEvaluator` with CLIP_benchmark's
metric names. The table has one row per set with its main metric (DataComp's convention: `acc1`, or the entry's
`main_metric`; `mean_recall@1` = (image R@1 + text R@1) / 2 for retrieval-only sets) and their average.
`write_clip_benchmark_json` also writes CLIP_benchmark's own per-run JSON files, which its `clip_benchmark build`
command (and DataComp-style aggregation scripts) read.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .data.eval_data import class_name_mapping_lines, open_eval_data
from .evaluation import CLASSIFICATION, RETRIEVAL, TASKS, ZeroShotEvaluator
from .metrics import RECALL_KS

AUTO = "auto"
SUITE_FILE_SUFFIXES = (".yaml", ".yml", ".json")
ENTRY_KEYS = ("data", "split", "task", "class_names", "templates", "main_metric", "image_column", "caption_column",
              "label_column")
TABLE_COLUMNS = ("acc1", "acc5", "mean_per_class_recall", "image_retrieval_recall@1", "text_retrieval_recall@1",
                 "mean_recall@1")


@dataclass
class SuiteEntry:
    """One evaluation set of a suite.

    Attributes:
        name: Its name in the table (and CLIP_benchmark's `dataset` field).
        data: The spec (`open_eval_data`).
        split: Split of a dataset folder / Hub dataset / Karpathy file.
        task: `auto` (whatever the data allows), `zeroshot_classification` or `zeroshot_retrieval`.
        class_names: Names per label (a list, a `{label: name}` mapping, or a file read by `read_class_names`).
        templates: Prompt templates (None: the data's own, else `openai`).
        main_metric: The table's main metric for this set (default: DataComp's choice, see the module docstring).
        image_column: Image column (default: detected).
        caption_column: Caption column.
        label_column: Label column.
    """

    name: str
    data: str
    split: str | None = None
    task: str = AUTO
    class_names: Any = None
    templates: Any = None
    main_metric: str | None = None
    image_column: str | None = None
    caption_column: str | None = None
    label_column: str | None = None

    def __post_init__(self):
        if self.task not in (AUTO, *TASKS):
            raise ValueError(f"suite entry {self.name!r}: task={self.task!r} is invalid; choose from "
                             f"{[AUTO, *TASKS]}")


@dataclass
class SuiteResult:
    """The metrics of one set, with what was run."""

    name: str
    tasks: list[str]
    main_metric: str | None
    metrics: dict[str, float]
    data: str = ""
    templates: str = ""
    class_names: list[str] | None = field(default=None, repr=False)


def read_class_names(value) -> list[str] | dict | None:
    """Class names from a file or a string: one name per line (label order), or `label: name` lines (a mapping),
    or a comma-separated list; a list or dict is returned as it is."""
    if value is None or isinstance(value, (list, dict)):
        return value
    text = str(value)
    path = Path(os.path.expanduser(text))
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()] if path.is_file() else None
    if lines is None:
        if text.endswith((".txt", ".json", ".yaml", ".csv")) or os.sep in text:
            raise FileNotFoundError(f"class-names file {text} does not exist")
        return [name.strip() for name in text.split(",") if name.strip()]
    if path.suffix == ".json":
        return json.loads(path.read_text(encoding="utf-8"))
    lines = [line for line in lines if line]
    if lines and all(":" in line for line in lines):  # label: name
        return {key.strip(): name.strip() for key, name in (line.split(":", 1) for line in lines)}
    return lines


def datacomp_name(folder: str) -> str:
    """DataComp's task name of an evaluation-set folder: `wds_vtab-cifar100_test` -> `vtab/cifar100`."""
    name = folder.removeprefix("wds_").removesuffix("_test")
    return name.replace("-", "/", 1) if name.startswith(("vtab-", "fairness-", "retrieval-", "misc-")) else name


def read_suite(spec: str | Path | dict | list) -> list[SuiteEntry]:
    """The entries of a suite: a YAML / JSON file, a folder of dataset folders, a mapping or a list of entries.

    Raises:
        ValueError: an empty suite, an unknown key in an entry, or a folder without dataset sub-folders.
        FileNotFoundError: a suite file or folder that does not exist.
    """
    if isinstance(spec, (str, Path)):
        path = Path(os.path.expanduser(str(spec)))
        if path.is_dir():
            folders = sorted(child for child in path.iterdir() if child.is_dir() and not child.name.startswith("."))
            if not folders:
                raise ValueError(f"suite folder {spec} has no dataset sub-folders")
            return [SuiteEntry(datacomp_name(child.name), str(child)) for child in folders]
        if not path.is_file():
            raise FileNotFoundError(f"no such suite file or folder: {spec}")
        if path.suffix not in SUITE_FILE_SUFFIXES:
            raise ValueError(f"suite file {spec}: expected one of {SUITE_FILE_SUFFIXES}")
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))  # YAML reads JSON too
        base = path.parent
    else:
        base = Path.cwd()
    items = list(spec.items()) if isinstance(spec, dict) else [(entry.get("name"), entry) for entry in spec or []]
    entries = []
    for name, value in items:
        options = {"data": value} if isinstance(value, str) else dict(value or {})
        unknown = sorted(set(options) - set(ENTRY_KEYS) - {"name"})
        if unknown or "data" not in options or not name:
            raise ValueError(f"suite entry {name!r}: needs a name and `data`; unknown keys {unknown} "
                             f"(allowed: {list(ENTRY_KEYS)})")
        options.pop("name", None)
        data = str(options.pop("data"))
        if not os.path.isabs(os.path.expanduser(data)) and (base / data).exists():
            data = str(base / data)  # relative to the suite file
        entries.append(SuiteEntry(str(name), data, **options))
    if not entries:
        raise ValueError("the suite is empty")
    return entries


def _main_metric(entry: SuiteEntry, metrics: dict[str, float]) -> str | None:
    if entry.main_metric:
        return entry.main_metric
    if "acc1" in metrics:
        return "acc1"
    return "mean_recall@1" if "mean_recall@1" in metrics else None


def run_suite(model, processor, entries: list[SuiteEntry], batch_size: int = 256, max_samples: int | None = None,
              tie_break: str = "expected", templates=None, log=print) -> list[SuiteResult]:
    """Evaluate `model` on every entry, one after the other.

    Args:
        model: Any `CLIPModel` (NeuCLIP or plain).
        processor: Its processor.
        entries: The sets (`read_suite`).
        batch_size: Images encoded at a time.
        max_samples: The first N readable samples of each set.
        tie_break: `expected` or CLIP_benchmark's `topk`.
        templates: Templates for entries that name none (None: each set's own, else `openai`).
        log: Where progress lines go (None: silent).
    """
    results = []
    for entry in entries:
        data = open_eval_data(entry.data, read_class_names(entry.class_names), entry.split,
                              image_column=entry.image_column, caption_column=entry.caption_column,
                              label_column=entry.label_column)
        tasks = TASKS if entry.task == AUTO else (entry.task,)
        evaluator = ZeroShotEvaluator(processor, data, templates=entry.templates or templates, batch_size=batch_size,
                                      max_samples=max_samples, tie_break=tie_break, tasks=tasks)
        if log is not None:
            log(f"[{entry.name}] {data.description}; {evaluator.templates_description}")
            if data.class_names_source == "given":
                log("\n".join(f"  {line}" for line in class_name_mapping_lines(data.class_names,
                                                                                data.data_class_names)))
        metrics = evaluator(model)
        if "image_retrieval_recall@1" in metrics and "text_retrieval_recall@1" in metrics:
            # DataComp's main retrieval metric (eval_utils/retr_eval.py)
            metrics["mean_recall@1"] = 0.5 * (metrics["image_retrieval_recall@1"] + metrics["text_retrieval_recall@1"])
        ran = [task for task, key in ((CLASSIFICATION, "acc1"), (RETRIEVAL, "image_retrieval_recall@1"))
               if key in metrics]
        results.append(SuiteResult(entry.name, ran, _main_metric(entry, metrics), metrics, data.description,
                                    evaluator.templates_description, data.class_names))
        if log is not None:
            main = results[-1].main_metric
            shown = f"{main} {100 * metrics[main]:.2f} %" if main in metrics else "no main metric"
            log(f"[{entry.name}] {', '.join(ran)}: {shown} ({metrics['num_samples']} samples)")
    return results


def suite_average(results: list[SuiteResult]) -> float | None:
    """The mean of the sets' main metrics (DataComp's "Average"), None when no set has one."""
    values = [r.metrics[r.main_metric] for r in results if r.main_metric in r.metrics]
    return sum(values) / len(values) if values else None


def suite_table_markdown(results: list[SuiteResult], model_name: str = "") -> str:
    """A markdown table: one row per set (main metric first, then CLIP_benchmark's metrics), plus the average."""

    def cell(value: float | None) -> str:
        return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}"

    header = ["dataset", "tasks", "samples", "main metric", "main"] + list(TABLE_COLUMNS)
    lines = [f"Zero-shot results{f' of {model_name}' if model_name else ''} (%)", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        row = [r.name, ", ".join(t.removeprefix("zeroshot_") for t in r.tasks), str(r.metrics.get("num_samples", "")),
               r.main_metric or "-", cell(r.metrics.get(r.main_metric) if r.main_metric else None)]
        row += [cell(r.metrics.get(name)) for name in TABLE_COLUMNS]
        lines.append("| " + " | ".join(row) + " |")
    average = suite_average(results)
    lines += ["", f"Average of the main metrics over {len(results)} set(s): {cell(average)} %"]
    duplicates = [r for r in results if r.metrics.get("num_distinct_texts", 0) < r.metrics.get("num_texts", 0)]
    for r in duplicates:  # retrieval over repeated captions: say what the plain recall can reach
        lines.append(f"{r.name}: {int(r.metrics['num_distinct_texts'])} distinct texts among "
                     f"{int(r.metrics['num_texts'])}; best reachable image R@1 "
                     f"{cell(r.metrics['image_retrieval_recall@1_ceiling'])} %, text R@1 "
                     f"{cell(r.metrics['text_retrieval_recall@1_ceiling'])} %; caption-aware image R@1 "
                     f"{cell(r.metrics['image_retrieval_recall@1_caption_aware'])} %, text R@1 "
                     f"{cell(r.metrics['text_retrieval_recall@1_caption_aware'])} %")
    return "\n".join(lines) + "\n"


def suite_json(results: list[SuiteResult], model_name: str, model_class: str, tie_break: str) -> dict:
    """The JSON record of a suite run (no local paths: sets are named, the model as given)."""
    return {
        "model": model_name, "model_class": model_class, "tie_break": tie_break,
        "average_main_metric": suite_average(results),
        "results": [{k: v for k, v in asdict(r).items() if k not in ("class_names", "data")} for r in results],
    }


def clip_benchmark_records(results: list[SuiteResult], model: str, pretrained: str, language: str = "en",
                           ks: tuple[int, ...] = RECALL_KS) -> list[dict]:
    """CLIP_benchmark's per-run JSON (`clip_benchmark eval --output`): one record per (set, task) with only its
    metric names; `acc5` is NaN below 5 classes, as CLIP_benchmark writes it."""
    records = []
    for r in results:
        for task in r.tasks:
            if task == CLASSIFICATION:
                metrics = {"acc1": r.metrics["acc1"], "acc5": r.metrics.get("acc5", float("nan")),
                           "mean_per_class_recall": r.metrics["mean_per_class_recall"]}
            else:
                metrics = {f"{side}_retrieval_recall@{k}": r.metrics[f"{side}_retrieval_recall@{k}"]
                           for k in ks for side in ("image", "text") if f"{side}_retrieval_recall@{k}" in r.metrics}
            records.append({"dataset": r.name, "model": model, "pretrained": pretrained, "task": task,
                            "metrics": metrics, "language": language})
    return records


def write_clip_benchmark_json(results: list[SuiteResult], directory: str | Path, model: str, pretrained: str,
                              language: str = "en") -> list[Path]:
    """Write CLIP_benchmark's files, named as its default `{dataset}_{pretrained}_{model}_{language}_{task}.json`
    (slashes replaced by `_`), so `clip_benchmark build <directory>` makes its CSV from them."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for record in clip_benchmark_records(results, model, pretrained, language):
        name = "_".join(str(record[key]).replace("/", "_") for key in ("dataset", "pretrained", "model", "language",
                                                                         "task"))
        path = directory / f"{name}.json"
        path.write_text(json.dumps(record))  # json.dumps writes NaN as CLIP_benchmark's json.dump does
        written.append(path)
    return written


__all__ = [
    "SuiteEntry",
    "SuiteResult",
    "clip_benchmark_records",
    "datacomp_name",
    "read_class_names",
    "read_suite",
    "run_suite",
    "suite_average",
    "suite_json",
    "suite_table_markdown",
    "write_clip_benchmark_json",
]
