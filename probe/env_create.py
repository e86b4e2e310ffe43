import threading, torch, pynvml, os, sys
pynvml.nvmlInit(); h = pynvml.nvmlDeviceGetHandleByIndex(0)
def used():
    torch.cuda.synchronize()
    for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h):
        if p.pid == os.getpid(): return p.usedGpuMemory >> 20
def clean():
    torch._C._cuda_clearCublasWorkspaces(); torch.cuda.empty_cache()
def timing(tag):
    out = {}
    for m, n, k in ((1, 4096, 4096), (512, 4096, 4096), (512, 14336, 4096), (4096, 4096, 4096)):
        a = torch.randn(m, k, dtype=torch.bfloat16, device="cuda"); w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda")
        for _ in range(3): torch.nn.functional.linear(a, w)
        s, e = torch.cuda.Event(True), torch.cuda.Event(True); s.record()
        for _ in range(20): torch.nn.functional.linear(a, w)
        e.record(); e.synchronize(); out[f"{m}x{n}x{k}"] = round(s.elapsed_time(e) / 20 * 1000, 1)
    print(tag, out, flush=True)
mode = sys.argv[1]
torch.zeros(1, device="cuda"); base = used()
timing("main thread, default handle")
clean(); b = used()
def in_thread(bar):
    timing("thread")
    bar.wait()
if mode == "env_during_create":
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":0:0"
bar = threading.Barrier(2)
ts = [threading.Thread(target=in_thread, args=(bar,)) for _ in range(2)]
[t.start() for t in ts]; [t.join() for t in ts]
os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
clean(); print(mode, "two more handles MiB", used() - b)
