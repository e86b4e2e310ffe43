"""Fill-in-the-middle prompts from a model's FIM tokens.

Editors send the text before and after the cursor (Ollama `suffix`,
llama.cpp `/infill`); a FIM-trained model wants them as
`<fim_prefix> before <fim_suffix> after <fim_middle>` and generates the middle.
The FIM token ids come from GGUF metadata (`tokenizer.ggml.fim_pre_token_id`
and friends, or the older `prefix_token_id`...), else from the vocabulary by
the spellings llama.cpp recognises (llama-vocab.cpp). A model with none cannot
infill: `build_infill_ids` raises engines.errors.InfillUnsupported.

Extra context (other open files, llama.cpp `input_extra`) follows llama.cpp's
server: with repo/file-separator tokens, `<repo_name>myproject\n` then
`<file_sep>` + each chunk before the prefix; without them the chunks are
plain text ahead of the prefix.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from engines.errors import InfillUnsupported

# role -> (metadata keys, new then old; vocabulary spellings, as llama.cpp lists them)
_FIM_SOURCES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "pre": (("tokenizer.ggml.fim_pre_token_id", "tokenizer.ggml.prefix_token_id"),
            ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>")),
    "suf": (("tokenizer.ggml.fim_suf_token_id", "tokenizer.ggml.suffix_token_id"),
            ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>")),
    "mid": (("tokenizer.ggml.fim_mid_token_id", "tokenizer.ggml.middle_token_id"),
            ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>")),
    "pad": (("tokenizer.ggml.fim_pad_token_id",), ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>")),
    "rep": (("tokenizer.ggml.fim_rep_token_id",), ("<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>")),
    "sep": (("tokenizer.ggml.fim_sep_token_id",), ("<|file_sep|>", "<fim-sep>", "<filename>")),
}
PROJECT_NAME = "myproject"


@dataclass(frozen=True)
class FimTokens:
    pre: int
    suf: int
    mid: int
    pad: int | None = None
    rep: int | None = None
    sep: int | None = None


def _find(role: str, vocab: Sequence[str], index: Mapping[str, int],
          meta: Mapping[str, Any]) -> int | None:
    keys, spellings = _FIM_SOURCES[role]
    for key in keys:
        value = meta.get(key)
        if value is not None and 0 <= int(value) < len(vocab):
            return int(value)
    return next((index[s] for s in spellings if s in index), None)


def find_fim_tokens(vocab: Sequence[str], meta: Mapping[str, Any] | None = None) -> FimTokens | None:
    """The model's FIM tokens, or None where it lacks prefix, suffix or middle."""
    meta = meta or {}
    index = {tok: i for i, tok in enumerate(vocab) if tok.startswith(("<", "▁<"))}
    found = {role: _find(role, vocab, index, meta) for role in _FIM_SOURCES}
    if found["pre"] is None or found["suf"] is None or found["mid"] is None:
        return None
    return FimTokens(**found)  # type: ignore[arg-type]


def can_infill(vocab: Sequence[str], meta: Mapping[str, Any] | None = None) -> bool:
    return find_fim_tokens(vocab, meta) is not None


def build_infill_ids(encode: Callable[[str], list[int]], fim: FimTokens | None, prefix: str,
                     suffix: str, extra_context: Sequence[str] = (),
                     bos_id: int | None = None) -> list[int]:
    """Token ids of an infill prompt (prefix-suffix-middle order).

    encode: text -> ids without special tokens added (tokenizer.encode with
    add_special=False, parse_special=False: code may contain "<|...|>" literally).
    """
    if fim is None:
        raise InfillUnsupported("this model has no fill-in-the-middle tokens "
                                "(fim prefix/suffix/middle); use a code model that has them")
    ids: list[int] = [bos_id] if bos_id is not None else []
    if extra_context:
        if fim.rep is not None and fim.sep is not None:
            ids += [fim.rep] + encode(PROJECT_NAME + "\n")
            for chunk in extra_context:
                ids += [fim.sep] + encode(chunk)
            ids += [fim.sep]
        else:
            for chunk in extra_context:
                ids += encode(chunk if chunk.endswith("\n") else chunk + "\n")
    return ids + [fim.pre] + encode(prefix) + [fim.suf] + encode(suffix) + [fim.mid]
