"""Quant tags in GGUF file names: "Q4_K_M" in "SmolLM2-135M-Instruct-Q4_K_M.gguf".

Ollama names a Hugging Face model by its repo and quant tag (hf.co/OWNER/REPO:Q4_K_M);
files name their quant as one dash/dot/underscore-separated part of the name. A tag
matches where it stands between separators, case-insensitively; a tag that is only
the start of a longer one ("Q4_K" in "Q4_K_M") matches only where no exact one does.
Used to choose the file to pull and to find a pulled model by the name it was pulled as.
"""
from __future__ import annotations

import re
from collections.abc import Iterable

_SHARD = re.compile(r"-\d{5}-of-\d{5}$", re.IGNORECASE)


def stem(filename: str) -> str:
    """The file name without folders, .gguf and a split model's -0000N-of-0000M."""
    base = filename.rsplit("/", 1)[-1]
    base = base[: -len(".gguf")] if base.lower().endswith(".gguf") else base
    return _SHARD.sub("", base)


def _matches(name: str, tag: str, exact: bool) -> bool:
    after = r"($|[-.])" if exact else r"($|[-_.])"
    return re.search(r"(^|[-_./])" + re.escape(tag) + after, name, re.IGNORECASE) is not None


def files_for_tag(names: Iterable[str], tag: str) -> list[str]:
    """The names whose stem carries tag: exact matches, else those where it starts a longer tag."""
    names = list(names)
    exact = [n for n in names if _matches(stem(n), tag, exact=True)]
    return exact or [n for n in names if _matches(stem(n), tag, exact=False)]
