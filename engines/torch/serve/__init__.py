"""Serving: the step loop, continuous-batching scheduler, runner (CUDA graphs),
KV access over kvcached, admission against the broker's budget, sampling, stops."""
