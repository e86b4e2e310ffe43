import threading, torch, pynvml, os
pynvml.nvmlInit(); h = pynvml.nvmlDeviceGetHandleByIndex(0)
def used():
    torch.cuda.synchronize()
    for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h):
        if p.pid == os.getpid(): return p.usedGpuMemory >> 20
torch.zeros(1, device="cuda"); base = used()
print("allocated before", torch.cuda.memory_allocated(), torch.cuda.memory_reserved())
torch.cuda.current_blas_handle()
print("allocated after", torch.cuda.memory_allocated(), torch.cuda.memory_reserved())
torch._C._cuda_clearCublasWorkspaces(); torch.cuda.empty_cache()
print(os.environ.get("CUBLAS_WORKSPACE_CONFIG"), os.environ.get("CUBLASLT_WORKSPACE_SIZE"), "handle MiB", used() - base)
import ctypes, glob
libs = glob.glob("/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu*/lib/libcublas.so*") + glob.glob("/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cublas/lib/libcublas.so*")
print(libs[:3])
if libs:
    lib = ctypes.CDLL(libs[0]); hh = ctypes.c_void_p(); b = used()
    print("raw cublasCreate rc", lib.cublasCreate_v2(ctypes.byref(hh)), "MiB", used() - b)
    b = used(); print("raw destroy rc", lib.cublasDestroy_v2(hh), "MiB", used() - b)
