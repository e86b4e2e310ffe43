import threading, torch, pynvml, os
pynvml.nvmlInit(); h = pynvml.nvmlDeviceGetHandleByIndex(0)
def used():
    torch.cuda.synchronize()
    for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h):
        if p.pid == os.getpid(): return p.usedGpuMemory >> 20
def clean():
    torch._C._cuda_clearCublasWorkspaces(); torch.cuda.empty_cache()
def work(stream):
    with torch.inference_mode(), torch.cuda.stream(stream):
        a = torch.randn(256, 256, dtype=torch.bfloat16, device="cuda"); (a @ a).sum().item(); (a[:2] @ a).sum().item()
        torch.nn.functional.linear(a[:1], a).sum().item()
torch.cuda.init(); torch.zeros(1, device="cuda")
print("ctx", used())
s1 = torch.cuda.Stream()
t = threading.Thread(target=work, args=(s1,)); t.start(); t.join(); clean(); print("one thread", used())
t = threading.Thread(target=work, args=(s1,)); t.start(); t.join(); clean(); print("again seq", used())
bar = threading.Barrier(2)
def held(stream):
    work(stream); bar.wait()
ts = [threading.Thread(target=held, args=(s1,)) for _ in range(2)]
[x.start() for x in ts]; [x.join() for x in ts]; clean(); print("two concurrent threads, one stream", used())
s2 = torch.cuda.Stream()
ts = [threading.Thread(target=held, args=(s,)) for s in (s1, s2)]
[x.start() for x in ts]; [x.join() for x in ts]; clean(); print("two threads two streams", used())
ts = [threading.Thread(target=held, args=(s1,)) for _ in range(2)]
[x.start() for x in ts]; [x.join() for x in ts]; clean(); print("again two threads one stream", used())
