"""Fetching models by name, with progress: `ebbtide pull`, Ollama's /api/pull, /api/copy, /api/delete.

names.py reads a pull name (hf.co/OWNER/REPO[:QUANT], LM Studio's OWNER/REPO);
choose.py picks the GGUF file(s) of a repo by quant tag; hub.py downloads them
through huggingface_hub into the Hugging Face cache (shared with other tools),
checks room on the disk first and each file's sha256 after; progress.py turns
the download's byte counts into Ollama's status lines and the CLI's bar;
own_folder.py copies and deletes models in Ebbtide's own folder, and nowhere else.
"""
