import time, torch
from lens_fast.quant import fp8 as F8
from lens_fast.kernels import fp8_quant as K
x = torch.randn(2, 4352, 1536, device="cuda", dtype=torch.bfloat16)
def per_call(fn, n=300):
    for _ in range(20): fn()
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(n): fn()
    host = (time.perf_counter() - t) / n * 1e6
    torch.cuda.synchronize(); wall = (time.perf_counter() - t) / n * 1e6
    return round(host, 1), round(wall, 1)
print("quantize_rows (dispatch+custom op): host us/call, wall us/call", per_call(lambda: F8.quantize_rows(x)))
print("kernel launcher direct:", per_call(lambda: K.quantize_rows_fp8(x)))
print("torch ref (eager):", per_call(lambda: F8.quantize_rows_fp8_ref(x)))
print("bf16 copy x.clone():", per_call(lambda: x.clone()))
g = torch.cuda.CUDAGraph(); s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(s):
    for _ in range(3): K.quantize_rows_fp8(x)
torch.cuda.current_stream().wait_stream(s)
with torch.cuda.graph(g):
    for _ in range(50): K.quantize_rows_fp8(x)
print("kernel in a graph (50 per replay) us/call:", [v / 50 for v in per_call(g.replay, 20)])
