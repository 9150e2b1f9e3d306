"""The architecture's promises: a method is one registered class (a toy sixth method trains, saves, loads and gets a
model card without touching any package file), the package has no import cycles and no function-level imports
that hide one, no module outside the method files is keyed by an objective name, and inference does not import
the training data stack."""

import ast
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_config
from trainer_helpers import PairDataset

from neuclip_hf import NeuCLIPConfig, NeuCLIPModel, registered_objectives
from neuclip_hf.model_card import build_model_card
from neuclip_hf.normalizer_base import (
    NORMALIZERS,
    NormalizerEstimator,
    number_field,
    register_normalizer,
    zero_counter,
)
from neuclip_hf.trainer import NeuCLIPTrainer, NeuCLIPTrainingArguments

PACKAGE = Path(__file__).resolve().parents[1] / "neuclip_hf"
BUILT_IN = ("clip", "siglip", "fastclip", "amorlip", "neuclip")


class GlobalMeanNormalizer(NormalizerEstimator):
    """A deliberately simple sixth method: one moving average of the batch-mean log-normalizer per direction."""

    objective = "toy_global_mean"
    title = "Toy global mean"
    summary = "One moving average of the batch-mean log-normalizer per direction (a test of the registry)."
    citation = "@misc{toy2026, title = {A toy normalizer for the registry test}, year = {2026}}"
    config_prefix = "toy_"
    config_fields = {"decay": number_field(0.5, "Weight of the old average.", 0, 1, high_open=True)}
    count_diagnostics = ("nonfinite", "refresh")

    def __init__(self, config):
        super().__init__(config)
        self.decay = float(self.settings(config).decay)
        self.register_buffer("log_mean", torch.zeros(2))
        self.register_buffer("num_updates", zero_counter())

    @torch.no_grad()
    def update(self, inputs):
        batch_mean = torch.stack([inputs.log_g_image.mean(), inputs.log_g_text.mean()])
        first = int(self.num_updates) == 0
        self.log_mean.copy_(batch_mean if first else self.decay * self.log_mean + (1 - self.decay) * batch_mean)
        self.num_updates += 1
        return {"refresh": torch.tensor(float(first))}

    def estimate(self, inputs):
        rows = inputs.positive[inputs.local].shape[0]
        return self.log_mean[0].expand(rows), self.log_mean[1].expand(rows)


@pytest.fixture
def toy_method():
    """The toy method registered for one test (and removed again, so other tests see only the built-in methods)."""
    register_normalizer(GlobalMeanNormalizer)
    yield GlobalMeanNormalizer
    NORMALIZERS.pop(GlobalMeanNormalizer.objective)


def test_a_sixth_method_is_one_class_and_needs_no_other_file(tmp_path, toy_method):
    assert registered_objectives()[:5] == BUILT_IN and "toy_global_mean" in registered_objectives()
    config = tiny_config("toy_global_mean", toy_decay=0.25)
    assert config.toy_decay == 0.25 and NeuCLIPConfig(objective="toy_global_mean").toy_decay == 0.5
    with pytest.raises(ValueError, match=r"toy_decay=1.5 is invalid: expected a value in \[0, 1\)"):
        tiny_config("toy_global_mean", toy_decay=1.5)

    torch.manual_seed(0)
    model = NeuCLIPModel(config)
    args = NeuCLIPTrainingArguments(output_dir=str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=8,
                                    logging_steps=2, report_to=[], use_cpu=True, disable_tqdm=True,
                                    save_strategy="no", warmup_steps=1)
    trainer = NeuCLIPTrainer(model=model, args=args, train_dataset=PairDataset())
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logs and all(math.isfinite(entry["loss"]) for entry in logs)
    assert [entry["normalizer_refresh"] for entry in logs] == [1, 0]  # a count: summed over the window
    assert int(model.normalizer.num_updates) == 4 and model.normalizer.log_mean.abs().sum() > 0

    model.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["toy_decay"] == 0.25
    loaded = NeuCLIPModel.from_pretrained(tmp_path / "saved")
    assert type(loaded.normalizer) is GlobalMeanNormalizer
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name

    card = build_model_card(loaded, repo_id="user/toy").text
    for needle in ("Toy global mean", "toy2026", "| `toy_decay` | 0.25 |", "2511.08417"):
        assert needle in card, needle


def test_a_method_name_or_config_prefix_cannot_be_registered_twice(toy_method):
    with pytest.raises(ValueError, match="objective 'neuclip' is already registered by PrototypeNormalizer"):
        register_normalizer(type("Clash", (NormalizerEstimator,), {"objective": "neuclip"}))
    with pytest.raises(ValueError, match="config prefix 'toy_' is already used by GlobalMeanNormalizer"):
        register_normalizer(type("Clash2", (NormalizerEstimator,), {
            "objective": "toy_two", "config_prefix": "toy_", "config_fields": {"x": number_field(1.0, "x")}}))
    with pytest.raises(ValueError, match=r"NeuCLIPConfig has no field\(s\) \['neuclip_num_protoypes'\]"):
        NeuCLIPConfig(neuclip_num_protoypes=3)


# -- static structure of the package ----------------------------------------------------------------------------
def _modules() -> dict[str, ast.Module]:
    trees = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if "metrics" in path.parts and path.parent.name != "metrics":  # evaluate modules: loaded by path
            continue
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        trees[name] = ast.parse(path.read_text())
    return trees


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> list[str]:
    """Package modules named by a relative import (`from .x import y` may import the submodule `x.y`)."""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
    target = ".".join(base + ([node.module] if node.module else []))
    return [target] + [f"{target}.{alias.name}" for alias in node.names]


def test_no_import_cycles_and_no_hidden_relative_imports():
    trees = _modules()
    packages = {name for name in trees if (PACKAGE.parent / name.replace(".", "/") / "__init__.py").exists()}
    graph: dict[str, set[str]] = {name: set() for name in trees}
    hidden = []
    for name, tree in trees.items():
        for node in tree.body:  # module-level imports only: what runs at import time
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                graph[name] |= {t for t in _resolve(name, node, name in packages) if t in trees}
        for function in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            for node in ast.walk(function):
                if isinstance(node, ast.ImportFrom) and node.level > 0:
                    hidden.append(f"{name}.{function.name}: from {'.' * node.level}{node.module or ''}")
    assert not hidden, f"relative imports inside functions (they hide import cycles): {hidden}"
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for child in sorted(graph[node]):
            if child == node:
                continue
            if state.get(child) == 1:
                raise AssertionError(f"import cycle: {' -> '.join(path + [child])}")
            if child not in state:
                visit(child, path + [child])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_no_module_outside_the_method_files_is_keyed_by_an_objective_name():
    offenders = []
    for name, tree in _modules().items():
        if name.split(".")[-1].startswith("normalizer_"):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Dict):
                keys = [k.value for k in node.keys if isinstance(k, ast.Constant)]
                if any(key in BUILT_IN for key in keys):
                    offenders.append(f"{name}: dict keyed by {keys}")
            if isinstance(node, ast.Compare):
                constants = [c.value for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
                if any(value in BUILT_IN for value in constants):
                    offenders.append(f"{name}: comparison with {constants} (line {node.lineno})")
    assert not offenders, offenders


def test_inference_does_not_import_the_data_stack(tmp_path):
    code = f"""
import sys
import neuclip_hf
from helpers import tiny_config
model = neuclip_hf.NeuCLIPModel(tiny_config("neuclip"))
model.save_pretrained({str(tmp_path / "m")!r})
model = neuclip_hf.NeuCLIPModel.from_pretrained({str(tmp_path / "m")!r})
neuclip_hf.zero_shot_classify, neuclip_hf.zero_shot_classifier, neuclip_hf.encode_images
loaded = sorted({{m.split(".")[0] for m in sys.modules}} & {{"datasets", "torchdata", "pyarrow"}})
print("LOADED", loaded)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).parent)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "LOADED []" in done.stdout, done.stdout
