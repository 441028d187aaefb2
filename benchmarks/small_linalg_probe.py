"""How long small dense linear algebra takes on this machine, CPU and device (a diagnosis aid for the top-k basis).

    python benchmarks/small_linalg_probe.py
"""
import time

import torch


def t(fn, n=20):
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e3


def main():
    print("torch threads", torch.get_num_threads())
    for p in (7, 63):
        a = torch.randn(4096, p, dtype=torch.float64)
        g = a.T @ a
        print(f"p={p}: cpu eigh {t(lambda: torch.linalg.eigh(g)):.3f} ms, cpu cholesky "
              f"{t(lambda: torch.linalg.cholesky(g)):.3f} ms")
        if torch.cuda.is_available():
            gd = g.cuda()
            print(f"p={p}: cuda eigh {t(lambda: torch.linalg.eigh(gd)):.3f} ms, cuda cholesky_ex "
                  f"{t(lambda: torch.linalg.cholesky_ex(gd)):.3f} ms, to-cpu eigh back "
                  f"{t(lambda: torch.linalg.eigh(gd.cpu())[1].cuda()):.3f} ms")
    nt = torch.get_num_threads()
    torch.set_num_threads(1)
    g = (lambda a: a.T @ a)(torch.randn(4096, 63, dtype=torch.float64))
    print(f"1 thread: cpu eigh 63 {t(lambda: torch.linalg.eigh(g)):.3f} ms")
    torch.set_num_threads(nt)


if __name__ == "__main__":
    main()
