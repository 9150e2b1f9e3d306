"""The built wheel carries everything the package reads at run time, and an install from it finds it.

Slow tier: it builds a wheel (a few seconds) and imports the package from an install outside the source tree, so
a data file that only a source checkout has (the top-level `model_cards/` folder, say) fails here.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN_TIME_DATA = (
    "neuclip_hf/model_cards/model_card.md",
    "neuclip_hf/model_cards/normalizer_card.md",
    "neuclip_hf/templates/openai_imagenet_templates.json",
    "neuclip_hf/assets/bpe_simple_vocab_16e6.txt.gz",
    "neuclip_hf/metrics/retrieval_recall/retrieval_recall.py",
    "neuclip_hf/metrics/zero_shot_classification/zero_shot_classification.py",
)


@pytest.mark.slow
def test_an_installed_wheel_finds_its_card_templates_and_data_files(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(wheels), str(ROOT)], check=True, capture_output=True, timeout=300)
    (wheel,) = wheels.glob("neuclip_hf-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert [name for name in RUN_TIME_DATA if name not in names] == []

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    script = (
        "import neuclip_hf, neuclip_hf.model_card as card\n"
        "from neuclip_hf import NeuCLIPModel\n"
        "from neuclip_hf.presets import model_config\n"
        "print(neuclip_hf.__file__)\n"
        "print(card.templates_dir())\n"
        "model = NeuCLIPModel(model_config('tiny', objective='neuclip'))\n"
        "text = str(card.build_model_card(model, repo_id='user/demo')) + str(card.build_normalizer_card(model, "
        "repo_id='user/demo-normalizer'))\n"
        "print(text.count('user/demo'))\n"
    )
    # Only the installed copy may be importable: no source tree on the path, run from an empty directory.
    env = {**os.environ, "PYTHONPATH": str(target)}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    package, templates, mentions = result.stdout.split()
    assert Path(package).is_relative_to(target) and Path(templates) == target / "neuclip_hf" / "model_cards"
    assert int(mentions) >= 2  # both cards rendered from the installed templates
