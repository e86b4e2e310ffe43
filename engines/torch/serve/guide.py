"""Constrained decoding on the torch engine, through llguidance.

Why llguidance (over xgrammar, the other well-kept grammar engine on PyPI):
it installs here as one abi3 wheel with no dependencies (xgrammar's wheels
pull a pinned torch and triton stack and its CPU path is second-class); it
takes JSON schemas and llama.cpp's GBNF (through its Lark frontend), so the
torch engine honours exactly what the llama.cpp engine does; and its mask is
computed on the CPU in Rust from a tokenizer we describe ourselves (token
bytes from the GGUF vocabulary), with no Hugging Face `transformers`. Masks
are computed per request before sampling and applied as -inf on that row; an
end-of-generation token is let through only where the grammar may end, and
a complete grammar ends the answer itself (a model may have no such token).

The tokenizer it needs is built once per model (`GuideTokenizer`, ~a second for
a 150k vocabulary) on the first constrained request.
"""
from __future__ import annotations

import logging
import threading

import llguidance
import numpy as np
import torch

from engines.errors import InvalidRequest
from engines.torch.cuda_libraries import process_stream
from engines.types import Constraint

log = logging.getLogger(__name__)


class _Wrapper:
    """What llguidance.TokenizerWrapper reads: token bytes, eos/bos, and an encode call."""

    def __init__(self, tokenizer, eos_id: int) -> None:
        n = len(tokenizer.vocab)
        self.eos_token_id = eos_id
        self.bos_token_id = tokenizer.bos_id
        # Control tokens are marked with a 0xff prefix, llguidance's convention for specials.
        self.tokens = [b"\xff" + tokenizer.vocab[i].encode() if tokenizer.is_control(i)
                       else tokenizer.token_bytes(i, skip_special=False) for i in range(n)]
        self.special_token_ids = [i for i in range(n) if tokenizer.is_control(i)]
        self._tokenizer = tokenizer

    def __call__(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special=False, parse_special=False)


class GuideTokenizer:
    """The llguidance tokenizer of one model, made on first use."""

    def __init__(self, tokenizer, eog_ids: frozenset[int], vocab_size: int) -> None:
        self._tokenizer = tokenizer
        self._eog = sorted(eog_ids)
        self.vocab_size = vocab_size
        self._lock = threading.Lock()
        self._ll: llguidance.LLTokenizer | None = None

    def get(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._ll is None:
                wrapper = _Wrapper(self._tokenizer, self._eog[0] if self._eog else 0)
                self._ll = llguidance.LLTokenizer(llguidance.TokenizerWrapper(wrapper), n_vocab=self.vocab_size,
                                                  eos_token=self._eog or None)
            return self._ll


# JSON without free whitespace (llguidance's separators only). A whitespace pattern does not
# bound it: llguidance lexes whitespace as an ignored token, which may repeat, and a random
# bf16 model on the H100 filled 600 tokens with newlines after `{"title"` (the bound
# `( |\n\n?[ \t]{0,20})?` held one newline per gap, not per answer). Compact JSON is what
# a constrained answer is parsed as anyway; the grammar, not the model, decides the layout.
JSON_OPTIONS = {"whitespace_flexible": False}


def llguidance_grammar(constraint: Constraint) -> str:
    if constraint.kind == "gbnf":
        return llguidance.grammar_from("gbnf", constraint.text)
    return llguidance.LLMatcher.grammar_from_json_schema(constraint.text,
                                                         defaults=JSON_OPTIONS)


class Guide:
    """One request's matcher: mask() before sampling, accept() after."""

    def __init__(self, tokenizer: GuideTokenizer, constraint: Constraint) -> None:
        try:
            grammar = llguidance_grammar(constraint)
        except Exception as exc:   # llguidance's compilers raise ValueError and others on odd input
            raise InvalidRequest(f"{constraint.kind}: not a grammar this server can follow: {exc}") from None
        self.matcher = llguidance.LLMatcher(tokenizer.get(), grammar, log_level=0)
        if self.matcher.is_error():
            raise InvalidRequest(f"{constraint.kind}: {self.matcher.get_error()}")
        self.vocab_size = tokenizer.vocab_size
        # The packed mask llguidance writes each step, and the same unpacked to one bool a
        # token (True: forbidden), in pinned memory: the copy to the device waits for nothing.
        # Reused: the last step's copy is done (its token was read back) before the next write.
        pinned = torch.cuda.is_available()
        self._words = np.empty(-(-self.vocab_size // 32), dtype=np.uint32)
        self._forbidden = torch.empty(self._words.size * 32, dtype=torch.bool, pin_memory=pinned)
        self._forbidden_np = self._forbidden.numpy()
        self._on_device: torch.Tensor | None = None
        self._copied: torch.cuda.Event | None = None

    def forbidden(self, device: torch.device) -> torch.Tensor:
        """Bool [32*ceil(V/32)]: the tokens the grammar forbids next. Unpacked on the host
        (~10 us) and copied on a stream of its own while the step still runs, so the step's
        stream waits for nothing but one masked_fill (on the H100 a pageable copy and two
        unpacking kernels behind the step cost 5-15% of a SmolLM2 step)."""
        self.matcher.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)
        bits = np.unpackbits(np.invert(self._words).view(np.uint8), bitorder="little")
        np.copyto(self._forbidden_np, bits.view(np.bool_))
        if device.type != "cuda":
            return self._forbidden
        if self._on_device is None:
            self._on_device = torch.empty_like(self._forbidden, device=device)
            self._copied = torch.cuda.Event()
        with torch.cuda.stream(process_stream(device, "grammar masks")):
            self._on_device.copy_(self._forbidden, non_blocking=True)
            self._copied.record()
        torch.cuda.current_stream(device).wait_event(self._copied)
        return self._on_device

    @torch.inference_mode()   # the logits are the model's inference tensors
    def mask_(self, logits: torch.Tensor) -> None:
        """logits [V]: what the grammar forbids set to -inf, in place."""
        forbidden = self.forbidden(logits.device)
        n = logits.shape[0]
        if forbidden.shape[0] < n:   # the model's vocabulary is padded past the tokenizer's
            forbidden = torch.cat([forbidden, forbidden.new_ones(n - forbidden.shape[0])])
        logits.masked_fill_(forbidden[:n], float("-inf"))

    def accept(self, token: int) -> None:
        # A refused token means the mask and the sampled token disagreed (non-finite logits,
        # say): the matcher stops there (`done`), and the log says why the answer ended.
        if not self.matcher.consume_token(token):
            log.warning("the grammar refused token %d: %s", token, self.matcher.get_error())

    @property
    def done(self) -> bool:
        """The grammar is complete: nothing but an end-of-generation token may follow. A model
        with no such token (the synthetic ones) would otherwise sample from an empty mask."""
        return self.matcher.is_stopped()
