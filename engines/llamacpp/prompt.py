"""Token ids of a request's prompt: chat through the model's template, completion as
text, fill-in-the-middle through the model's FIM tokens.

The chat template comes from the GGUF (engines.text.chat_template, a Jinja2
sandbox) and FIM assembly from engines.text.fim; tokenization is llama.cpp's
own, on the loaded model, so ids match what llama.cpp would compute.
"""
from __future__ import annotations

from collections.abc import Callable

import llama_cpp
from llama_cpp import _internals as internals

from engines.errors import InvalidRequest
from engines.text.chat_template import ChatTemplate, template_variables
from engines.text.fim import FimTokens, build_infill_ids
from engines.types import GenerateRequest, RequestKind


class PromptBuilder:
    """Built once per loaded model: its template, special tokens and FIM tokens."""

    def __init__(self, model: internals.LlamaModel, chat_template: str) -> None:
        self.model = model
        vocab = model.vocab
        self.bos = llama_cpp.llama_vocab_bos(vocab)
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab)) and self.bos >= 0
        eos = llama_cpp.llama_vocab_eos(vocab)
        bos_text = model.token_get_text(self.bos) if self.bos >= 0 else ""
        eos_text = model.token_get_text(eos) if eos >= 0 else ""
        self.bos_text = bos_text
        self.template = ChatTemplate(chat_template or None, bos_text, eos_text)
        self.fim = self._fim_tokens(vocab)
        self._builders: dict[RequestKind, Callable[[GenerateRequest], list[int]]] = {
            RequestKind.CHAT: self._chat, RequestKind.COMPLETION: self._completion,
            RequestKind.INFILL: self._infill}

    @staticmethod
    def _fim_tokens(vocab: llama_cpp.llama_vocab_p) -> FimTokens | None:
        """llama.cpp already found the FIM tokens (metadata keys or vocabulary spellings)."""
        ids = {role: getattr(llama_cpp, f"llama_vocab_fim_{role}")(vocab)
               for role in ("pre", "suf", "mid", "pad", "rep", "sep")}
        if min(ids["pre"], ids["suf"], ids["mid"]) < 0:
            return None
        optional = {r: (ids[r] if ids[r] >= 0 else None) for r in ("pad", "rep", "sep")}
        return FimTokens(pre=ids["pre"], suf=ids["suf"], mid=ids["mid"], **optional)

    @property
    def can_infill(self) -> bool:
        return self.fim is not None

    def tokenize(self, text: str, add_bos: bool, special: bool) -> list[int]:
        return self.model.tokenize(text.encode("utf-8"), add_bos, special)

    def build(self, request: GenerateRequest) -> list[int]:
        tokens = self._builders[request.kind](request)
        if not tokens:
            raise InvalidRequest("the prompt is empty: send some text to continue")
        return tokens

    def _chat(self, request: GenerateRequest) -> list[int]:
        if not request.messages:
            raise InvalidRequest("a chat request needs at least one message")
        text = self.template.render(request.messages, add_generation_prompt=request.add_generation_prompt,
                                    **template_variables(request.tools, request.think))
        # Templates that write the BOS text themselves must not get a second one.
        add_bos = self.add_bos and not (self.bos_text and text.startswith(self.bos_text))
        return self.tokenize(text, add_bos=add_bos, special=True)

    def _completion(self, request: GenerateRequest) -> list[int]:
        return self.tokenize(request.prompt, add_bos=self.add_bos, special=True)

    def _infill(self, request: GenerateRequest) -> list[int]:
        # Code may contain "<|...|>" literally: no special-token parsing inside it.
        return build_infill_ids(lambda t: self.tokenize(t, add_bos=False, special=False), self.fim,
                                request.prompt, request.suffix, request.extra_context,
                                bos_id=self.bos if self.add_bos else None)
