"""Text of Hugging Face model folders: tokenizer.json + tokenizer_config.json give
the same tokens, template and special ids as the GGUF of the same model."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_tokenizer import TEXTS  # noqa: E402
from text_fixtures import gguf_meta, tokenizer  # noqa: E402,F401

from engines.errors import ModelLoadError  # noqa: E402
from engines.text.chat_template import ChatTemplate  # noqa: E402
from engines.text.hf_folder import load_hf_folder_text  # noqa: E402


@pytest.fixture(scope="module")
def smollm_folder(tmp_path_factory, tokenizer, gguf_meta) -> Path:
    """The default model's tokenizer written as a HF folder, as the HF repo ships it."""
    folder = tmp_path_factory.mktemp("hf")
    tokenizer._modes.parsing.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": False, "bos_token": "<|im_start|>",
        "eos_token": {"content": "<|im_end|>", "special": True},
        "chat_template": gguf_meta["tokenizer.chat_template"]}))
    return folder


def test_folder_tokenizer_matches_gguf_tokenizer(smollm_folder, tokenizer):
    hf, _ = load_hf_folder_text(smollm_folder)
    for text in TEXTS:
        for parse_special in (True, False):
            assert hf.encode(text, parse_special=parse_special) == \
                tokenizer.encode(text, parse_special=parse_special), text
        ids = hf.encode(text, parse_special=False)
        assert hf.decode(ids) == text
    assert hf.vocab == tokenizer.vocab
    assert hf.token_types[1] == tokenizer.token_types[1] == 3   # <|im_start|> is CONTROL


def test_folder_meta_feeds_chat_template(smollm_folder, gguf_meta):
    _, meta = load_hf_folder_text(smollm_folder)
    assert meta["tokenizer.ggml.bos_token_id"] == 1 and meta["tokenizer.ggml.eos_token_id"] == 2
    msgs = [{"role": "user", "content": "Hi"}]
    assert ChatTemplate.from_gguf(meta).render(msgs) == ChatTemplate.from_gguf(gguf_meta).render(msgs)


def test_chat_template_jinja_file_wins(smollm_folder, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((smollm_folder / name).read_bytes())
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")
    _, meta = load_hf_folder_text(tmp_path)
    assert ChatTemplate.from_gguf(meta).render([{"role": "user", "content": "x"}]) == "x!"


def test_sentencepiece_style_pieces_decode_to_bytes(tmp_path):
    from tokenizers import Tokenizer, decoders, models

    tk = Tokenizer(models.BPE({"\u2581hello": 0, "b": 1, "<0x0A>": 2, "<unk>": 3}, [], unk_token="<unk>"))
    tk.decoder = decoders.Metaspace()
    tk.add_special_tokens(["<s>"])
    tk.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "add_bos_token": True}))
    hf, meta = load_hf_folder_text(tmp_path)
    assert hf.decode([0, 2, 1]) == " hello\nb"
    assert hf.decode([4, 0]) == " hello" and hf.decode([4], skip_special=False) == "<s>"
    assert hf.encode("b", add_special=True) == [4, 1] and meta["tokenizer.ggml.add_bos_token"]


def test_missing_or_broken_files_are_load_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="no tokenizer.json"):
        load_hf_folder_text(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="cannot read"):
        load_hf_folder_text(tmp_path)
