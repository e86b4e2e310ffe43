import threading, torch, pynvml, os
pynvml.nvmlInit(); h = pynvml.nvmlDeviceGetHandleByIndex(0)
def used():
    torch.cuda.synchronize()
    for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h):
        if p.pid == os.getpid(): return p.usedGpuMemory >> 20
def clean():
    torch._C._cuda_clearCublasWorkspaces(); torch.cuda.empty_cache()
def conc(fn, n=2):
    bar = threading.Barrier(n)
    def run(): fn(); bar.wait()
    ts = [threading.Thread(target=run) for _ in range(n)]; [t.start() for t in ts]; [t.join() for t in ts]; clean()
torch.zeros(1, device="cuda"); print("ctx", used())
conc(lambda: torch.cuda.current_blas_handle(), 1); print("1 cublas handle only", used())
conc(lambda: torch.cuda.current_blas_handle(), 2); print("2 cublas handles only", used())
conc(lambda: torch.cuda.current_blas_handle(), 3); print("3 cublas handles only", used())
a = torch.randn(256, 256, dtype=torch.bfloat16, device="cuda")
def mm():
    with torch.inference_mode(): (a @ a).sum().item()
conc(mm, 1); print("1 thread matmul", used())
conc(mm, 3); print("3 threads matmul", used())
def lin():
    with torch.inference_mode(): torch.nn.functional.linear(a[:1], a, a[0]).sum().item()
conc(lin, 3); print("3 threads addmm (Lt)", used())
conc(mm, 4); print("4 threads matmul", used())
print("cublas ws cfg", os.environ.get("CUBLAS_WORKSPACE_CONFIG"), torch.__version__)
