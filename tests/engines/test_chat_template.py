"""Chat templates: the bundled model's own template, the ChatML fallback, the sandbox."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from text_fixtures import gguf_meta  # noqa: E402,F401

from engines.errors import InvalidRequest, ModelLoadError
from engines.text.chat_template import CHATML_TEMPLATE, ChatTemplate, TemplateError
from engines.types import ChatMessage


def test_bundled_template_renders_smollm_chatml(gguf_meta):
    tpl = ChatTemplate.from_gguf(gguf_meta)
    assert not tpl.is_fallback
    text = tpl.render([{"role": "user", "content": "Hi"}])
    # SmolLM2's template adds its default system prompt when none is given.
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_add_generation_prompt_off_and_system_kept(gguf_meta):
    tpl = ChatTemplate.from_gguf(gguf_meta)
    text = tpl.render([ChatMessage("system", "Be terse."), ChatMessage("user", "Hi")],
                      add_generation_prompt=False)
    assert text == "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"


def test_fallback_is_chatml_when_file_has_none():
    tpl = ChatTemplate.from_gguf({"tokenizer.ggml.tokens": ["a"]})
    assert tpl.is_fallback and tpl.source == CHATML_TEMPLATE
    assert tpl.render([{"role": "user", "content": "x"}]) == \
        "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"


def test_bos_eos_and_tojson_keep_unicode():
    tpl = ChatTemplate("{{ bos_token }}{% for m in messages %}{{ m | tojson }}{% endfor %}"
                       "{{ eos_token }}", bos_token="<s>", eos_token="</s>")
    out = tpl.render([{"role": "user", "content": "日本語 🤗"}])
    assert out == '<s>{"role": "user", "content": "日本語 🤗"}</s>'


def test_bos_eos_from_gguf_ids():
    meta = {"tokenizer.ggml.tokens": ["<unk>", "<s>", "</s>"], "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2, "tokenizer.chat_template": "{{bos_token}}|{{eos_token}}"}
    assert ChatTemplate.from_gguf(meta).render([]) == "<s>|</s>"


def test_raise_exception_becomes_typed_error():
    tpl = ChatTemplate("{% if messages[0]['role'] != 'user' %}"
                       "{{ raise_exception('Conversation roles must alternate') }}{% endif %}")
    with pytest.raises(TemplateError, match="alternate"):
        tpl.render([{"role": "assistant", "content": "x"}])
    assert issubclass(TemplateError, InvalidRequest)


def test_sandbox_blocks_python_internals():
    tpl = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(TemplateError):
        tpl.render([{"role": "user", "content": "x"}])


def test_sandbox_is_immutable():
    tpl = ChatTemplate("{% set _ = messages.append({'role': 'x'}) %}{{ messages | length }}")
    with pytest.raises(TemplateError):
        tpl.render([{"role": "user", "content": "x"}])


def test_broken_template_is_a_load_error():
    with pytest.raises(ModelLoadError, match="does not compile"):
        ChatTemplate("{% for m in messages %}")


def test_message_without_role_is_invalid():
    with pytest.raises(InvalidRequest, match="role"):
        ChatTemplate(None).render([{"content": "x"}])
