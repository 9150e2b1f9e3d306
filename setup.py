"""Packaging for neuclip_hf: efficient CLIP pretraining (NeuCLIP, AmorLIP, FastCLIP, SigLIP) on Hugging Face."""

from pathlib import Path

from setuptools import find_namespace_packages, setup

ROOT = Path(__file__).parent
VERSION = {}
exec((ROOT / "neuclip_hf" / "version.py").read_text(), VERSION)

setup(
    name="neuclip_hf",
    version=VERSION["__version__"],
    description="NeuCLIP and its baselines (CLIP, SigLIP, FastCLIP, AmorLIP) for Hugging Face transformers",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # The card templates live in the top-level model_cards/ folder (the project's layout); installed, they are the
    # data of `neuclip_hf.model_cards`, where neuclip_hf.model_card looks first.
    # Data folders (assets/, templates/, the metric scripts' folders) are namespace packages with their data.
    packages=find_namespace_packages(include=["neuclip_hf", "neuclip_hf.*"], exclude=["*.__pycache__"])
    + ["neuclip_hf.model_cards"],
    package_dir={"neuclip_hf.model_cards": "model_cards"},
    package_data={"neuclip_hf.assets": ["*"], "neuclip_hf.templates": ["*"], "neuclip_hf.model_cards": ["*.md"]},
    include_package_data=True,
    # torch is deliberately not listed first-class: install the wheel for your platform before this package
    # (CPU: `pip install torch==2.13.0`), otherwise pip may pull a multi-GB CUDA build. torchvision is not needed.
    install_requires=[
        "torch>=2.4",
        "transformers>=5.23,<6",
        "accelerate>=1.10",
        "datasets>=4.0",
        "peft>=0.17",
        "evaluate>=0.4",
        "huggingface_hub>=1.0",
        "jinja2",  # model cards are rendered from templates (huggingface_hub.ModelCard.from_template)
        "safetensors>=0.4",
        "pillow>=10",
        "tqdm",
        "pyyaml",
        "torchdata>=0.10",  # StatefulDataLoader: exact resume of streaming input across DataLoader workers
        "numpy",
    ],
    extras_require={
        "test": ["pytest>=8", "matplotlib>=3.8", "tensorboard>=2.15"],
        "bench": ["matplotlib>=3.8"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
