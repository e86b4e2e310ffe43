"""Text side of a Hugging Face model folder: tokenizer.json, tokenizer_config.json.

Safetensors folders carry their tokenizer as `tokenizer.json` (read by the
`tokenizers` library itself, so it is exactly what transformers would do) and
their chat template and special tokens in `tokenizer_config.json` (or a
`chat_template.jinja` file). `load_hf_folder_text` returns a tokenizer with the
same interface as the GGUF ones and a metadata dict under the GGUF key names,
so the engines' text code (chat templates, FIM, end-of-generation ids) treats
both kinds of model alike.
"""
from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engines.errors import ModelLoadError
from engines.text.tokenizer import (
    TOKEN_TYPE_CONTROL,
    TOKEN_TYPE_NORMAL,
    TOKEN_TYPE_USER_DEFINED,
    SpecialModes,
    _byte_decoder,
)

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_SPM_SPACE = "\u2581"   # SentencePiece's word-start mark


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path} is not valid JSON: {exc}") from None


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as strings or {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class HfTokenizer:
    """A `tokenizers.Tokenizer` from tokenizer.json behind the engines' Tokenizer interface."""

    def __init__(self, folder: Path, config: dict[str, Any]) -> None:
        from tokenizers import Tokenizer as HfTok

        path = folder / "tokenizer.json"
        try:
            tk = HfTok.from_file(str(path))
        except Exception as exc:  # the Rust side raises plain Exception subclasses
            raise ModelLoadError(f"cannot read {path}: {exc}") from None
        size = tk.get_vocab_size(with_added_tokens=True)
        self.vocab: list[str] = [tk.id_to_token(i) or "" for i in range(size)]
        added = tk.get_added_tokens_decoder()
        self.token_types: list[int] = [TOKEN_TYPE_NORMAL] * size
        for idx, tok in added.items():
            self.token_types[idx] = TOKEN_TYPE_CONTROL if tok.special else TOKEN_TYPE_USER_DEFINED
        self.bos_id = self._id_of(tk, config.get("bos_token"))
        self.eos_id = self._id_of(tk, config.get("eos_token"))
        self.add_bos = bool(config.get("add_bos_token", False)) and self.bos_id is not None
        self.add_eos = bool(config.get("add_eos_token", False)) and self.eos_id is not None
        self._modes = SpecialModes(tk)
        self._byte_level = '"ByteLevel"' in json.dumps(json.loads(tk.to_str()).get("decoder"))
        self._byte_of = _byte_decoder()

    def prepare(self) -> None:
        self._modes.prepare()

    @staticmethod
    def _id_of(tk: Any, value: Any) -> int | None:
        text = _token_text(value)
        return tk.token_to_id(text) if text else None

    def encode(self, text: str, add_special: bool = False, parse_special: bool = True) -> list[int]:
        ids = self._modes.for_mode(parse_special).encode(text, add_special_tokens=False).ids
        if not add_special:
            return ids
        head = [self.bos_id] if self.add_bos and self.bos_id is not None else []
        tail = [self.eos_id] if self.add_eos and self.eos_id is not None else []
        return head + ids + tail

    def token_bytes(self, token_id: int, skip_special: bool = True) -> bytes:
        piece = self.vocab[token_id]
        kind = self.token_types[token_id]
        if kind == TOKEN_TYPE_CONTROL:
            return b"" if skip_special else piece.encode()
        if kind == TOKEN_TYPE_USER_DEFINED:
            return piece.encode()
        if self._byte_level:
            return bytes(self._byte_of[c] for c in piece if c in self._byte_of)
        match = _BYTE_TOKEN.fullmatch(piece)
        if match:
            return bytes([int(match.group(1), 16)])
        return piece.replace(_SPM_SPACE, " ").encode()

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        return b"".join(self.token_bytes(i, skip_special) for i in ids).decode("utf-8", errors="replace")


def _chat_template(folder: Path, config: dict[str, Any]) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):   # named templates: [{"name": "default", "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        return named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None


def load_hf_folder_text(folder: str | Path) -> tuple[HfTokenizer, dict[str, Any]]:
    """(tokenizer, metadata under GGUF key names) for a Hugging Face model folder."""
    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file():
        raise ModelLoadError(f"{folder} has no tokenizer.json")
    config = _read_json(folder / "tokenizer_config.json")
    tokenizer = HfTokenizer(folder, config)
    meta: dict[str, Any] = {
        "tokenizer.ggml.tokens": tokenizer.vocab,
        "tokenizer.ggml.token_type": tokenizer.token_types,
        "tokenizer.ggml.add_bos_token": tokenizer.add_bos,
        "tokenizer.ggml.add_eos_token": tokenizer.add_eos,
    }
    if tokenizer.bos_id is not None:
        meta["tokenizer.ggml.bos_token_id"] = tokenizer.bos_id
    if tokenizer.eos_id is not None:
        meta["tokenizer.ggml.eos_token_id"] = tokenizer.eos_id
    template = _chat_template(folder, config)
    if template:
        meta["tokenizer.chat_template"] = template
    return tokenizer, meta
