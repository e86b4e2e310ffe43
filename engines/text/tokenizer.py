"""Tokenization identical to llama.cpp's for the same GGUF file.

Two backends, both well-kept libraries, chosen by the file's
`tokenizer.ggml.model` in one table:
- "gpt2" (byte-level BPE: SmolLM, Llama 3, Qwen2, StarCoder...): a Hugging Face
  `tokenizers.Tokenizer` built from the GGUF vocabulary and merges, with the
  pre-tokenizer regexes llama.cpp uses for the file's `tokenizer.ggml.pre`
  (copied from llama.cpp's llama-vocab.cpp, one table entry per pre-type).
  Fast, no native llama.cpp needed, works on the GPU machine too.
- anything else (SentencePiece "llama", "t5", "rwkv"...): llama-cpp-python's
  vocab-only model on the same file, i.e. llama.cpp's own tokenizer.

Special tokens follow llama.cpp: CONTROL tokens (type 3) are matched in the text
only when parse_special is set; USER_DEFINED tokens (type 4) always are.
`token_bytes` gives each token's raw bytes so streaming can cut UTF-8 safely
(see StreamDecoder).
"""
from __future__ import annotations

import codecs
import functools
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from engines.errors import ModelLoadError

TOKEN_TYPE_NORMAL, TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED = 1, 3, 4

_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_REGEX = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
                 r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
                r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# tokenizer.ggml.pre -> llama.cpp's regex sequence (llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_*).
PRE_TOKENIZER_REGEXES: dict[str, tuple[str, ...]] = {
    "default": (_GPT2_REGEX,),
    "gpt-2": (_GPT2_REGEX,),
    "gpt2": (_GPT2_REGEX,),
    "mpt": (_GPT2_REGEX,),
    "olmo": (_GPT2_REGEX,),
    "smollm": (r"\p{N}", _GPT2_REGEX),
    "starcoder": (r"\p{N}", _GPT2_REGEX),
    "refact": (r"\p{N}", _GPT2_REGEX),
    "command-r": (r"\p{N}", _GPT2_REGEX),
    "codeshell": (r"\p{N}", _GPT2_REGEX),
    "llama3": (_LLAMA3_REGEX,),
    "llama-v3": (_LLAMA3_REGEX,),
    "llama-bpe": (_LLAMA3_REGEX,),
    "falcon3": (_LLAMA3_REGEX,),
    "qwen2": (_QWEN2_REGEX,),
    "deepseek-r1-qwen": (_QWEN2_REGEX,),
}


class Tokenizer(Protocol):
    vocab: list[str]
    token_types: list[int]
    bos_id: int | None
    eos_id: int | None
    add_bos: bool
    add_eos: bool

    def encode(self, text: str, add_special: bool = False, parse_special: bool = True) -> list[int]: ...
    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str: ...
    def token_bytes(self, token_id: int, skip_special: bool = True) -> bytes: ...
    def prepare(self) -> None: ...   # what encode would build on first use, built now (idle time)


class SpecialModes:
    """A `tokenizers.Tokenizer` for each parse_special mode. encode_special_tokens=True makes
    CONTROL tokens plain text (llama.cpp's parse_special=False: infill, constrained output);
    it is a flag on the object, so that mode gets a tokenizer of its own rather than one
    flipped under concurrent HTTP threads. The copy is made by prepare(), or on first use,
    not at load: copying a 128k-token vocabulary took ~1 s, on the path of the request
    that loaded the model (engines call prepare once the model is quiet)."""

    def __init__(self, parsing: Any) -> None:
        self.parsing = parsing
        self._literal: Any = None
        self._lock = threading.Lock()

    def prepare(self) -> None:
        with self._lock:
            if self._literal is None:
                literal = type(self.parsing).from_str(self.parsing.to_str())
                literal.encode_special_tokens = True
                self._literal = literal

    def for_mode(self, parse_special: bool) -> Any:
        if parse_special:
            return self.parsing
        if self._literal is None:
            self.prepare()
        return self._literal


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, inverted: the printable char standing for each byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class _Common:
    """Metadata every backend shares, read from the GGUF key/values."""

    def __init__(self, meta: dict[str, Any]) -> None:
        self.vocab: list[str] = list(meta.get("tokenizer.ggml.tokens") or [])
        if not self.vocab:
            raise ModelLoadError("GGUF file has no tokenizer.ggml.tokens vocabulary")
        types = meta.get("tokenizer.ggml.token_type")
        self.token_types: list[int] = list(types) if types is not None else \
            [TOKEN_TYPE_NORMAL] * len(self.vocab)
        bos, eos = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
        self.bos_id = int(bos) if bos is not None else None
        self.eos_id = int(eos) if eos is not None else None
        self.add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", True)) and self.bos_id is not None
        self.add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and self.eos_id is not None

    def is_control(self, token_id: int) -> bool:
        return self.token_types[token_id] == TOKEN_TYPE_CONTROL

    def _with_specials(self, ids: list[int], add_special: bool) -> list[int]:
        if not add_special:
            return ids
        head = [self.bos_id] if self.add_bos and self.bos_id is not None else []
        tail = [self.eos_id] if self.add_eos and self.eos_id is not None else []
        return head + ids + tail


class BpeTokenizer(_Common):
    """Byte-level BPE through Hugging Face `tokenizers`, built from GGUF data."""

    def __init__(self, meta: dict[str, Any]) -> None:
        super().__init__(meta)
        from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as HfTokenizer

        pre = str(meta.get("tokenizer.ggml.pre", "default"))
        if pre not in PRE_TOKENIZER_REGEXES:
            raise ModelLoadError(f"tokenizer pre-type {pre!r} is not known here "
                                 f"(known: {', '.join(sorted(PRE_TOKENIZER_REGEXES))})")
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
        bpe = models.BPE({t: i for i, t in enumerate(self.vocab)}, merges,
                         ignore_merges=pre in ("llama3", "llama-v3", "llama-bpe"))
        tk = HfTokenizer(bpe)
        splits = [pre_tokenizers.Split(Regex(r), behavior="isolated")
                  for r in PRE_TOKENIZER_REGEXES[pre]]
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tk.decoder = decoders.ByteLevel()
        added_types = {TOKEN_TYPE_CONTROL: True, TOKEN_TYPE_USER_DEFINED: False}
        tk.add_tokens([AddedToken(tok, special=added_types[kind], normalized=False)
                       for tok, kind in zip(self.vocab, self.token_types) if kind in added_types])
        self._modes = SpecialModes(tk)
        self._byte_of = _byte_decoder()

    def prepare(self) -> None:
        self._modes.prepare()

    def encode(self, text: str, add_special: bool = False, parse_special: bool = True) -> list[int]:
        ids = self._modes.for_mode(parse_special).encode(text, add_special_tokens=False).ids
        return self._with_specials(ids, add_special)

    def token_bytes(self, token_id: int, skip_special: bool = True) -> bytes:
        piece = self.vocab[token_id]
        kind = self.token_types[token_id]
        if kind == TOKEN_TYPE_CONTROL:
            return b"" if skip_special else piece.encode()
        if kind == TOKEN_TYPE_USER_DEFINED:
            return piece.encode()
        return bytes(self._byte_of[c] for c in piece if c in self._byte_of)

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        raw = b"".join(self.token_bytes(i, skip_special) for i in ids)
        return raw.decode("utf-8", errors="replace")


class LlamaCppTokenizer(_Common):
    """llama.cpp's own tokenizer through llama-cpp-python's vocab-only model."""

    def __init__(self, meta: dict[str, Any], path: str | Path) -> None:
        super().__init__(meta)
        try:
            from llama_cpp import Llama
        except ImportError:
            raise ModelLoadError(f"tokenizer model {meta.get('tokenizer.ggml.model')!r} needs "
                                 "llama-cpp-python, which is not installed") from None
        self._llama = Llama(model_path=str(path), vocab_only=True, verbose=False)

    def prepare(self) -> None:
        """Nothing is built on first use here."""

    def encode(self, text: str, add_special: bool = False, parse_special: bool = True) -> list[int]:
        # llama.cpp adds BOS only; EOS per metadata is added like the BPE backend does.
        ids = self._llama.tokenize(text.encode("utf-8"), add_bos=False, special=parse_special)
        return self._with_specials(list(ids), add_special)

    def token_bytes(self, token_id: int, skip_special: bool = True) -> bytes:
        if self.is_control(token_id):
            return b"" if skip_special else self.vocab[token_id].encode()
        return self._llama.detokenize([token_id], special=True)

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        raw = b"".join(self.token_bytes(i, skip_special) for i in ids)
        return raw.decode("utf-8", errors="replace")


def load_tokenizer(meta: dict[str, Any], path: str | Path | None = None) -> Tokenizer:
    """The tokenizer for a GGUF file's metadata (`path` is needed by the llama.cpp backend)."""
    model = str(meta.get("tokenizer.ggml.model", ""))
    if model == "gpt2":
        return BpeTokenizer(meta)
    if path is None:
        raise ModelLoadError(f"tokenizer model {model!r} needs the GGUF path (llama.cpp backend)")
    return LlamaCppTokenizer(meta, path)


class StreamDecoder:
    """Turns generated token ids into text pieces as they come, never cutting a
    UTF-8 character in two (an emoji spans several byte-level tokens)."""

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        return self._decoder.decode(self._tokenizer.token_bytes(token_id, self._skip_special))

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)
