"""One timed open_clip training run (CLIP model + `ClipLoss` + AdamW), as open_clip's `train_one_epoch` does it.

Run by `openclip_step.py` in its own process, with an interpreter (or `PYTHONPATH`) that has `open_clip` — never
imported by the package or the tests' default tier:

    python benchmarks/openclip_worker.py '{"geometry": {...}, "batch_size": 8, "steps": 3, "warmup": 1}'

It prints one JSON line: the wall and CPU seconds of every timed step and the process's peak RSS.

`import open_clip` imports torchvision at module level (image transforms, a frozen batch-norm used by its ResNets);
torchvision's registry builds do not load beside the CPU torch here, and neither the CLIP model nor `ClipLoss` uses
it. `install_torchvision_stand_in` puts a stand-in package on the import path whose every name is a class that
raises on use, so the import succeeds and any real use of torchvision fails loudly.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import math
import resource
import sys
import time
import types

from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import summarise_profile  # noqa: E402  (torch and the standard library only)


class TorchvisionUnavailable(RuntimeError):
    """Raised when open_clip code really uses torchvision (the stand-in has none of its functionality)."""


class _MissingType(type):
    """Metaclass of the stand-in names: attribute access gives more stand-ins, instantiation raises."""

    def __getattr__(cls, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _missing(f"{cls.__qualname__}.{name}")

    def __call__(cls, *args, **kwargs):
        raise TorchvisionUnavailable(f"torchvision's {cls.__qualname__} was used, but only a stand-in is installed")


def _missing(name: str) -> type:
    return _MissingType(name, (), {"__qualname__": name})


class _StandInLoader(importlib.abc.Loader):
    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []  # a package, so `torchvision.ops.misc` resolves through this finder too

        def __getattr__(name: str):
            if name.startswith("__"):
                raise AttributeError(name)
            return _missing(f"{spec.name}.{name}")

        module.__getattr__ = __getattr__
        return module

    def exec_module(self, module):
        pass


class _StandInFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, _StandInLoader(), is_package=True)
        return None


def install_torchvision_stand_in() -> importlib.abc.MetaPathFinder:
    """Serve `torchvision` and its submodules from the stand-in (first on `sys.meta_path`); returns its finder."""
    for finder in sys.meta_path:
        if isinstance(finder, _StandInFinder):
            return finder
    finder = _StandInFinder()
    sys.meta_path.insert(0, finder)
    return finder


def build_model(model_name: str | None = None, geometry: dict | None = None):
    """open_clip's model `model_name` (e.g. `ViT-B-32`, randomly initialised: nothing is downloaded), or a `CLIP` of
    the given geometry (the dict layout of open_clip's model_configs JSON files)."""
    import open_clip

    if model_name is not None:
        return open_clip.create_model(model_name, pretrained=None)
    return open_clip.CLIP(embed_dim=geometry["embed_dim"], vision_cfg=geometry["vision_cfg"],
                          text_cfg=geometry["text_cfg"])


def adamw(model: torch.nn.Module) -> torch.optim.AdamW:
    """open_clip's `main.py` optimizer: no weight decay on gains, biases and the logit scale; its default ViT
    hyper-parameters; torch's default AdamW implementation for the device."""
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
              {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": 0.2}]
    return torch.optim.AdamW(groups, lr=5e-4, betas=(0.9, 0.98), eps=1e-6)


def measure(batch_size: int, steps: int, warmup: int, model_name: str | None = None, geometry: dict | None = None,
            threads: int | None = None, seed: int = 0, profile: bool = False) -> dict:
    """Time `steps` open_clip training steps after `warmup` ones on random images and captions (`profile`: one
    more step under the profiler)."""
    install_torchvision_stand_in()
    import open_clip

    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = build_model(model_name, geometry)
    model.train()
    loss_fn = open_clip.ClipLoss()
    optimizer = adamw(model)
    image_size = model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else model.visual.image_size
    context_length, vocab_size = model.context_length, model.vocab_size
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
    # Random tokens ending in end-of-text, the highest id (open_clip pools at the argmax of the ids).
    tokens = torch.randint(1, vocab_size - 1, (batch_size, context_length), generator=generator)
    tokens[:, -1] = vocab_size - 1

    def step() -> torch.Tensor:
        optimizer.zero_grad()
        image_features, text_features, logit_scale = model(images, tokens)
        loss = loss_fn(image_features, text_features, logit_scale)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        return loss.detach()

    times, cpu_times = [], []
    for index in range(warmup + steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = step()
        if index >= warmup:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    result = {"step_seconds": times, "step_cpu_seconds": cpu_times, "loss": float(loss),
              "threads": torch.get_num_threads(),
            "open_clip": open_clip.__version__, "torch": torch.__version__,
            "parameters": sum(p.numel() for p in model.parameters()),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            step()
        result["profile"] = summarise_profile(prof)
    return result


if __name__ == "__main__":
    print(json.dumps(measure(**json.loads(sys.argv[1]))))
