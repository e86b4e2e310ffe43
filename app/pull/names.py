"""Pull names: which Hugging Face repo and which quant a user or client asked for.

Accepted, as Ollama and LM Studio write them:
  hf.co/OWNER/REPO[:QUANT]         Ollama's Hugging Face names (huggingface.co/ too)
  OWNER/REPO[:QUANT]               LM Studio's names
QUANT is a quant tag (Q4_K_M, q8_0, IQ2_XS, BF16...) or "latest" (the default choice).
Ollama library names (`llama3.2`) have no owner and are refused with a sentence
saying so: Ebbtide fetches from Hugging Face only.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from app.pull.errors import BadModelName

HOSTS = ("hf.co/", "huggingface.co/", "https://huggingface.co/", "https://hf.co/")
_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")  # the hub's repo-id rule
_QUANT = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


@dataclass(frozen=True)
class PullRef:
    repo_id: str          # OWNER/REPO
    quant: str | None     # None: the default choice

    @property
    def name(self) -> str:
        """The name the model is listed under once pulled (as Ollama names it)."""
        return f"hf.co/{self.repo_id}" + (f":{self.quant}" if self.quant else "")


def parse_pull_name(text: str) -> PullRef:
    name = text.strip()
    for host in HOSTS:
        if name.lower().startswith(host):
            name = name[len(host):]
            break
    repo, _, quant = name.partition(":")
    parts = repo.split("/")
    if len(parts) != 2:
        raise BadModelName(f"{text!r} is not a Hugging Face repo: write hf.co/OWNER/REPO[:QUANT] or OWNER/REPO "
                           "(Ebbtide fetches GGUF models from Hugging Face, not from Ollama's library)")
    if not all(_PART.match(p) and ".." not in p for p in parts):
        raise BadModelName(f"{repo!r} is not a valid Hugging Face repo id")
    if quant and not _QUANT.match(quant):
        raise BadModelName(f"{quant!r} is not a quant tag (such as Q4_K_M)")
    return PullRef("/".join(parts), None if quant.lower() in ("", "latest") else quant)
