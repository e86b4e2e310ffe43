"""The torch engine's weights on the broker's ladder: pause KV, then weights to host, then unload.

At load the model's tensors (parameters, buffers, quantized planes, the fused
projections the runner makes) are adopted into a kvcached `WeightArena`, before
anything is compiled or captured. A paused model can then hand back its weights
(`step_aside`) and get them back at copy speed (`bring_back`) with its CUDA
graphs, compiled step and KV addresses unchanged: its next request needs no
load, no capture and, its KV kept on the host, no prefill.

On by default where the model is on CUDA (EngineConfig.torch_weights_to_host;
None there). On the CPU the weights already live in host memory, so the rung
would only copy them; tests turn it on to check the mechanics on the host backend.

Host memory guards the step: the weights go to host memory only when the host
has room for them and `HOST_MARGIN` besides (MemAvailable); otherwise the step
gives back nothing and the broker's next rung (unload) frees them.
"""
from __future__ import annotations

import logging
import threading

import torch

from kvcached.page_pool import PagePool
from kvcached.rss import meminfo_bytes
from kvcached.weight_arena import WeightArena

log = logging.getLogger(__name__)

HOST_MARGIN = 2 << 30   # host memory left to the desktop after the weights are copied there
MiB = 1 << 20


def model_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """Every tensor the model reads and never writes: parameters, buffers, quantized planes,
    and the CPU's dequantized copies of quantized weights (QuantLinear.dense)."""
    from engines.torch.quant.modules import QuantLinear, quant_weights

    tensors = [p for _, p in model.named_parameters(remove_duplicate=False)]
    tensors += [b for _, b in model.named_buffers(remove_duplicate=False)]
    for qweight in quant_weights(model):
        tensors += list(qweight.planes.values())
    tensors += [m.dense for m in model.modules() if isinstance(m, QuantLinear) and m.dense is not None]
    return tensors


def host_has_room(nbytes: int) -> bool:
    try:
        return meminfo_bytes("MemAvailable") >= nbytes + HOST_MARGIN
    except (OSError, KeyError):   # no /proc/meminfo: cannot tell, so do not risk it
        return False


class WeightsRung:
    """One model's weights in pool pages, movable to host memory and back."""

    def __init__(self, model: torch.nn.Module, pool: PagePool) -> None:
        self.arena = WeightArena(pool, model_tensors(model))
        self._preparing: threading.Thread | None = None
        log.info("weights in pool pages: %d tensors, %d MiB", self.arena.num_tensors, self.arena.nbytes // MiB)

    def prepare_ahead(self) -> None:
        """Make the host buffer the weights would go to now, on a thread, where the host has
        room for it and the margin besides: pinning it when another application needs the GPU
        is most of the step's time (WeightArena.prepare_staging). Host memory short later,
        relieve_host gives it back and the step pays the allocation again."""
        if not host_has_room(self.arena.nbytes):
            log.info("weights' host buffer not made ahead: the host lacks %d MiB (+%d MiB margin)",
                     self.arena.nbytes // MiB, HOST_MARGIN // MiB)
            return
        self._preparing = threading.Thread(target=self._prepare, name="weights-staging", daemon=True)
        self._preparing.start()

    def _prepare(self) -> None:
        try:
            self.arena.prepare_staging()
        except Exception as exc:  # noqa: BLE001 - the step makes it when it runs
            log.warning("weights' host buffer not made ahead: %s", exc)

    @property
    def away(self) -> bool:
        return self.arena.on_host

    @property
    def host_bytes(self) -> int:
        return self.arena.host_bytes

    @property
    def device_bytes(self) -> int:
        return self.arena.device_bytes

    def step_aside(self) -> int:
        """Weights to host memory; bytes given back (0 when the host has no room for them)."""
        need = max(0, self.arena.nbytes - self.arena.staging_bytes)
        if not self.away and need and not host_has_room(need):
            log.info("weights stay on the device: the host lacks %d MiB (+%d MiB margin) for them",
                     need // MiB, HOST_MARGIN // MiB)
            return 0
        return self.arena.to_host()

    def bring_back(self) -> int:
        return self.arena.restore()

    def close(self) -> None:
        if self._preparing is not None:
            self._preparing.join()   # its buffer is the arena's to free
        self.arena.close()
