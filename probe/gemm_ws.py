import torch, os, sys
torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = True
res = {}
for m in (1, 8, 512, 4096):
    for (n, k) in ((4096, 4096), (14336, 4096), (4096, 14336), (6144, 4096), (49152, 576), (576, 1536)):
        a = torch.randn(m, k, dtype=torch.bfloat16, device="cuda"); w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda")
        for _ in range(3): torch.nn.functional.linear(a, w)
        s, e = torch.cuda.Event(True), torch.cuda.Event(True)
        s.record()
        for _ in range(20): torch.nn.functional.linear(a, w)
        e.record(); e.synchronize()
        res[(m, n, k)] = s.elapsed_time(e) / 20 * 1000
print(os.environ.get("CUBLAS_WORKSPACE_CONFIG"), " ".join(f"{m}x{n}x{k}:{v:.1f}" for (m, n, k), v in res.items()))
