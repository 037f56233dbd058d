"""Quickstart: train a small MLP with Speed Limited Optimization and print its NFA before and after.

SLO over SGD moves the first layer by ``lr·C`` per step and every other layer by ``lr/C``; ``NFAMonitor``
measures each linear layer's UC-NFA ``ρ(W^T W, W^T K W)`` and C-NFA (the same with ``ΔW = W - W_0``).

    python quickstart.py
"""

import torch

from diagnostics import NFAMonitor
from diagnostics.datasets import chain_monomial_data
from diagnostics.experiments import bias_free_mlp
from slo_torch import SLOptimizer, promote

torch.manual_seed(0)
X, Y, X_test, Y_test = chain_monomial_data(n_train=512, n_test=512, d=10, r=3, seed=0)  # y = x1 x2 + x2 x3 + x3 x4
model = bias_free_mlp(d_in=10, width=64, depth=2, d_out=1)  # Linear layers "0", "2" and the readout "4"

optimizer = SLOptimizer(torch.optim.SGD(model.parameters(), lr=1e-3), model=model, speeds=promote(model, "0", 100.0))
monitor = NFAMonitor(model)  # snapshots W_0 of every linear layer
probe = X[:128]  # the points on which K is computed


def show(title: str) -> None:
    """One line per layer: UC-NFA and C-NFA (nan at init, where ΔW = 0)."""
    print(title)
    for name, rec in monitor.measure(probe).items():
        print(f"  layer {name}: UC-NFA {rec.uc_nfa:.3f}  C-NFA {rec.c_nfa:.3f}")


show("before training")
for step in range(300):
    idx = torch.randint(0, X.shape[0], (64,))
    loss = ((model(X[idx]) - Y[idx]) ** 2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
show("after 300 SLO steps")
with torch.no_grad():
    print(f"test MSE {((model(X_test) - Y_test) ** 2).mean():.3f} (target variance 3)")
monitor.detach()
