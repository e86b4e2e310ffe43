"""kvcached: GPU (or host) memory as virtual tensors whose pages come and go.

The core of Ebbtide. It knows nothing of models: it reserves address ranges,
maps physical pages into them on demand, lays out KV caches over them, and a
broker gives pages back when other applications need the memory.
"""
