"""Quantized weights inside the torch model (issue 16): modules over `QuantWeight`.

`modules.py` holds `QuantLinear` (a projection or the output head whose weight
stays in GGUF blocks; `qlinear` multiplies) and `QuantEmbedding` (the token
embedding, which dequantizes only the rows a step looks up); `adopt.py` swaps
them into a model built on the meta device, by HF module name.
"""
