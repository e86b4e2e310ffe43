"""A model's text side for the torch engine: request -> prompt ids, ids -> text.

Chat goes through the GGUF's chat template (engines.text.chat_template),
completion is tokenized as is, infill is built from the model's FIM tokens
(engines.text.fim). Generation ends on every end-of-generation token the
model knows, as llama.cpp's EOG set does: a chat model ends a turn with
`<|im_end|>` or `<|eot_id|>` even where the file's eos is `<|endoftext|>`.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from engines.errors import InvalidRequest
from engines.text.chat_template import ChatTemplate, template_variables
from engines.text.fim import build_infill_ids, find_fim_tokens
from engines.text.tokenizer import TOKEN_TYPE_CONTROL, StreamDecoder, Tokenizer, load_tokenizer
from engines.types import GenerateRequest, RequestKind

# Spellings llama.cpp treats as end-of-generation when they are control tokens (llama-vocab.cpp).
EOG_SPELLINGS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>",
                 "</s>", "<end_of_turn>", "<|end|>", "<EOT>", "<|fim_pad|>", "<|file_sep|>")
EOG_META_KEYS = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                 "tokenizer.ggml.eom_token_id")


class TextSide:
    def __init__(self, tokenizer: Tokenizer, template: ChatTemplate, meta: dict[str, Any],
                 extra_eog: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self.fim = find_fim_tokens(tokenizer.vocab, meta)
        vocab = tokenizer.vocab
        eog = {int(meta[k]) for k in EOG_META_KEYS if meta.get(k) is not None}
        eog |= {i for i, tok in enumerate(vocab)
                if tok in EOG_SPELLINGS and tokenizer.token_types[i] == TOKEN_TYPE_CONTROL}
        self.eog_ids = frozenset(eog | set(extra_eog))
        self.guide_tokenizer = None   # engines/torch/serve/guide.GuideTokenizer, made on first use
        arch = meta.get("general.architecture", "")
        # llama.cpp's pooling enum as the GGUF declares it (1 mean, 2 CLS, 3 last); none: mean.
        self.pooling = int(meta.get(f"{arch}.pooling_type") or 1)

    @classmethod
    def from_gguf(cls, meta: dict[str, Any], path: str, extra_eog: Sequence[int] = ()) -> TextSide:
        return cls(load_tokenizer(meta, path), ChatTemplate.from_gguf(meta), meta, extra_eog)

    @property
    def can_infill(self) -> bool:
        return self.fim is not None

    def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        return self.tokenizer.encode(text, add_special=add_special, parse_special=True)

    def detokenize(self, ids: Sequence[int]) -> str:
        vocab_size = len(self.tokenizer.vocab)
        bad = [i for i in ids if not 0 <= i < vocab_size]
        if bad:
            raise InvalidRequest(f"token ids {bad[:5]} are not in this model's vocabulary of {vocab_size}")
        return self.tokenizer.decode(list(ids))

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.token_bytes(token_id, skip_special=False).decode("utf-8", "replace")

    def decoder(self) -> StreamDecoder:
        return StreamDecoder(self.tokenizer)

    def prompt_ids(self, request: GenerateRequest) -> list[int]:
        return _BUILDERS[request.kind](self, request)

    def _chat_ids(self, request: GenerateRequest) -> list[int]:
        if not request.messages:
            raise InvalidRequest("a chat request needs at least one message")
        text = self.template.render(request.messages, add_generation_prompt=request.add_generation_prompt,
                                    **template_variables(request.tools, request.think))
        # Templates that write the BOS token themselves must not get a second one.
        has_bos = bool(self.template.bos_token) and text.startswith(self.template.bos_token)
        return self.tokenize(text, add_special=not has_bos)

    def _completion_ids(self, request: GenerateRequest) -> list[int]:
        return self.tokenize(request.prompt, add_special=True)

    def _infill_ids(self, request: GenerateRequest) -> list[int]:
        tok = self.tokenizer
        bos = tok.bos_id if tok.add_bos else None
        # Code may contain "<|...|>" literally: no special-token parsing inside the user's text.
        return build_infill_ids(lambda s: tok.encode(s, add_special=False, parse_special=False),
                                self.fim, request.prompt, request.suffix, request.extra_context, bos)


_BUILDERS = {
    RequestKind.CHAT: TextSide._chat_ids,
    RequestKind.COMPLETION: TextSide._completion_ids,
    RequestKind.INFILL: TextSide._infill_ids,
}
