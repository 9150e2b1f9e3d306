"""OpenAI's CLIP tokenizer built offline from the vendored BPE vocabulary, and the matching processor.

`bpe_simple_vocab_16e6.txt.gz` (MIT, see `assets/LICENSE-CLIP-BPE.txt`) holds the BPE merges of OpenAI's CLIP.
The vocabulary is derived from it exactly as OpenAI's tokenizer does: the 256 byte symbols, the same with the
end-of-word marker `</w>`, one token per merge, then `<|startoftext|>` and `<|endoftext|>` (49,408 tokens).
"""

from __future__ import annotations

import gzip
from functools import lru_cache
from pathlib import Path

from transformers import CLIPImageProcessorPil, CLIPProcessor, CLIPTokenizer

ASSETS = Path(__file__).parent / "assets"
BPE_FILE = ASSETS / "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # OpenAI's tokenizer keeps the first 48,894 merges of the file
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP pixel statistics
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@lru_cache(maxsize=1)
def byte_symbols() -> list[str]:
    """The printable stand-ins of the 256 bytes used by byte-level BPE (GPT-2 / CLIP), in vocabulary order.

    Printable Latin-1 bytes stand for themselves and come first; the remaining bytes follow in increasing order,
    mapped to code points from 256 upwards, so every byte has a visible, whitespace-free symbol.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """OpenAI CLIP's vocabulary (token -> id) and BPE merges, from the vendored merges file."""
    lines = gzip.open(BPE_FILE).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]  # line 0 is a version header
    tokens = byte_symbols() + [s + "</w>" for s in byte_symbols()]
    tokens += ["".join(pair) for pair in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}, merges


def build_clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """OpenAI's CLIP tokenizer ("a photo of a cat" -> [49406, 320, 1125, 539, 320, 2368, 49407]).

    Args:
        model_max_length: Context length; texts are truncated to it (77 in OpenAI's CLIP).
    """
    vocab, merges = clip_vocab_and_merges()
    # Keyword `vocab=` / `merges=` with tuples: `vocab_file=` silently builds a broken tokenizer in transformers 5.
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=model_max_length)


def build_image_processor(image_size: int = 224, mean=CLIP_MEAN, std=CLIP_STD) -> CLIPImageProcessorPil:
    """CLIP's resize-shortest-edge + centre-crop + normalise, implemented with PIL (no torchvision needed)."""
    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(mean),
        image_std=list(std),
    )


def build_clip_processor(
    image_size: int = 224, model_max_length: int = 77, tokenizer: CLIPTokenizer | str | None = None
) -> CLIPProcessor:
    """A `CLIPProcessor` with the offline OpenAI tokenizer (or `tokenizer`: an instance or a directory)."""
    if isinstance(tokenizer, (str, Path)):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    tokenizer = tokenizer or build_clip_tokenizer(model_max_length)
    return CLIPProcessor(image_processor=build_image_processor(image_size), tokenizer=tokenizer)
