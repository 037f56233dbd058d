"""Speed Limited Optimization as plain functions of tensor lists.

Tensors are assigned to layers by an integer tensor ``layer_index`` (one entry per tensor). All
per-layer quantities stay on the device: norms come from ``torch._foreach_norm`` per
(device, dtype) group, are combined per layer with ``index_add_`` and turned into coefficients with
``torch.where``; nothing here synchronises with the host (on the CPU, where reading a value waits
for nothing, :func:`layer_sq_norms` reads its float32 norms to find the few it recomputes in double).

* grad mode: ``g <- c_l g`` with ``c_l = C_l / (||g_l||_F + eps)`` (:func:`slo_coefficients`,
  :func:`scale_layers_`; :func:`slo_rescale_` does both for lists of layers);
* update mode: ``p <- p_old + k_l (p_new - p_old)`` with ``k_l = lr C_l / (||p_new - p_old||_l + eps)``
  (:func:`rescale_updates_`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

__all__ = [
    "layer_sq_norms", "slo_coefficients", "scale_layers_", "rescale_updates_", "slo_rescale_", "CoefficientBuffer",
    "accumulate_dtype", "applied_dtype", "coefficient_factors", "unrepresentable",
]


def accumulate_dtype(dtypes: Iterable[torch.dtype]) -> torch.dtype:
    """Real dtype in which norms of tensors of ``dtypes`` are accumulated: their own precision, at least float32.

    float64 if any is float64 or complex128, else float32 (half precision and complex64 included).
    """
    return torch.float64 if any(dt in (torch.float64, torch.complex128) for dt in dtypes) else torch.float32


def _norm_dtype(dt: torch.dtype, device: torch.device, scaled: bool) -> torch.dtype | None:
    """``dtype=`` for ``torch._foreach_norm`` of tensors of ``dt`` on ``device`` (None: their own).

    Double (complex128 for complex tensors) on accelerators, where the foreach kernel squares each
    element in double in its one pass over the data, and for scaled gradients (``||S g||^2`` cannot
    overflow). On the CPU that path is an order of magnitude slower (a shared 2-core machine: 20-50x
    the float32 kernel): tensors keep their own precision (half precision is accumulated in float32),
    summed in rows, and :func:`_cpu_norms` redoes the few norms it cannot trust.
    """
    if scaled or device.type != "cpu":
        return torch.complex128 if dt.is_complex else torch.float64
    return torch.float32 if dt in (torch.float16, torch.bfloat16) else None


# A finite float32-accumulated norm at least this large is exact: the element squares that underflow
# float32 (|x| < 2**-63) add at most numel * 2**-126 to ||t||^2 >= 2**-40, a relative 1.4e-14 for 2**40 elements
_CPU_TRUSTED_NORM = 2.0**-20
# The CPU's float32 norm kernel sums squares one after another (in a few vector lanes): it loses 8e-7 of
# the norm of 1024 equal entries, 6e-4 of 16M random ones. Longer tensors are summed in
# rows of this many entries (at most ~3e-7 lost), the row norms combined in double: 1.3-2.8x the time of the
# float32 kernel for a small GPT-2-config model's tensors (shared 2-core CPU), where double accumulation takes 20-50x.
_CPU_ROW = 512


def _single_norm(t: Tensor, dtype: torch.dtype | None) -> Tensor:
    """``||t||`` of one dense or sparse (coalesced values) tensor, accumulated in ``dtype``."""
    return torch.linalg.vector_norm(t.coalesce()._values() if t.is_sparse else t, dtype=dtype)


def _row_norms(t: Tensor, dtype: torch.dtype | None) -> list[Tensor]:
    """Norms, accumulated in ``dtype``, of the rows of :data:`_CPU_ROW` entries of ``t`` (and of the shorter
    rest): ``||t||² = Σ row norms²``. A complex tensor as its real view (the complex kernel sums with no float32
    kernel's vector lanes: 2e-6 at 512)."""
    v = t.coalesce()._values() if t.is_sparse else t
    v = (torch.view_as_real(v) if v.is_complex() else v).reshape(-1)
    n = v.numel() - v.numel() % _CPU_ROW
    m = v[:n].view(-1, _CPU_ROW)
    # 64 rows (32768 entries, torch's grain size) per call: each runs on one thread, with no parallel region
    # whose threads an oversubscribed CPU may not schedule (one call for all rows: 4-100x the float32 kernel there)
    rows = [torch.linalg.vector_norm(m[i:i + 64], dim=1, dtype=dtype) for i in range(0, m.shape[0], 64)]
    if n < v.numel() or not rows:  # the shorter rest; 0 for a tensor without entries (e.g. an empty sparse one)
        rows.append(torch.linalg.vector_norm(v[n:], dtype=dtype).reshape(1))
    return rows


def _cpu_norms(group: Sequence[Tensor], dtype: torch.dtype | None) -> Tensor:
    """Float64 norms of CPU tensors accumulated in ``dtype`` (None: their own, float32 or complex64): one
    ``torch._foreach_norm`` for the dense real tensors of at most :data:`_CPU_ROW` entries; for the others the
    norms of their rows of :data:`_CPU_ROW` entries (tensors of one size up to 64 rows stacked, 64 rows a call,
    else :func:`_row_norms`), squared and summed per tensor in double;
    then each one that may be inexact (below :data:`_CPU_TRUSTED_NORM`, zero included, or infinite) recomputed
    in double. Reading the values waits for nothing on the CPU."""
    short = [i for i, t in enumerate(group) if not (t.is_sparse or t.is_complex()) and t.numel() <= _CPU_ROW]
    out = torch.empty(len(group), dtype=torch.float64, device=group[0].device)
    if short:
        tensors = [group[i] for i in short]
        norms = torch._foreach_norm(tensors, 2, dtype=dtype) if dtype else torch._foreach_norm(tensors, 2)
        out[short] = torch.stack(norms).to(torch.float64)
    rest = sorted(set(range(len(group))) - set(short))
    # tensors of one size up to 64 rows (e.g. every weight of a stack of equal layers): their rows in stacked
    # kernel calls of at most 64 rows (as in _row_norms) instead of a few small calls per tensor
    by_size: dict[int, list[int]] = {}
    for i in rest:
        t = group[i]
        if not (t.is_sparse or t.is_complex()) and t.numel() % _CPU_ROW == 0 and t.numel() <= 64 * _CPU_ROW:
            by_size.setdefault(t.numel(), []).append(i)
    equal = [same for same in by_size.values() if len(same) > 1]
    for same in equal:
        per_call = max(1, 64 // (group[same[0]].numel() // _CPU_ROW))
        for j in range(0, len(same), per_call):
            part = same[j:j + per_call]
            stacked = torch.stack([group[i].reshape(-1) for i in part]).view(len(part), -1, _CPU_ROW)
            row_norms = torch.linalg.vector_norm(stacked, dim=2, dtype=dtype)
            out[part] = row_norms.to(torch.float64).square_().sum(dim=1).sqrt_()
    stacked_ids = {i for same in equal for i in same}
    long = [i for i in rest if i not in stacked_ids]
    if long:
        rows: list[Tensor] = []
        counts = []
        for i in long:
            parts = _row_norms(group[i], dtype)
            rows += parts
            counts.append(sum(p.numel() for p in parts))
        sq = torch.cat(rows).to(torch.float64).square_()
        owners = torch.repeat_interleave(torch.arange(len(long), device=sq.device), torch.tensor(counts, device=sq.device))
        out[long] = torch.zeros(len(long), dtype=torch.float64, device=sq.device).index_add_(0, owners, sq).sqrt_()
    for i in ((out < _CPU_TRUSTED_NORM) | torch.isinf(out)).nonzero().flatten().tolist():
        t = group[i]
        out[i] = _single_norm(t, torch.complex128 if t.is_complex() else torch.float64)
    return out


def to_device(t: Tensor, device: torch.device | str, dtype: torch.dtype | None = None) -> Tensor:
    """``t.to(device, dtype)``, asynchronous unless the target is the host.

    A non-blocking device-to-host copy lands in pinned memory that is read before the copy is done
    (CPU kernels do not wait for the device), so copies to the CPU stay blocking.
    """
    return t.to(device=device, dtype=dtype, non_blocking=torch.device(device).type != "cpu")


def tensor_list(tensors: Tensor | Iterable[Tensor]) -> list[Tensor]:
    """``[tensors]`` for one tensor, else ``list(tensors)`` (as ``torch.optim`` reads a param group's ``params``)."""
    return [tensors] if isinstance(tensors, Tensor) else list(tensors)


def index_tensor(indices: Sequence[int], device: torch.device | str) -> Tensor:
    """``torch.tensor(indices)`` on ``device`` without the host synchronisation of a blocking copy."""
    return to_device(torch.tensor(indices, dtype=torch.long), device)


def layer_sq_norms(
    tensors: Sequence[Tensor],
    layer_index: Tensor,
    num_layers: int,
    device: torch.device | None = None,
    grouped: dict | None = None,
    inv_scale: Tensor | None = None,
) -> Tensor:
    """Per-layer sums of squares, in float64: ``s_l = sum_{i: layer_index[i] = l} ||t_i||_F^2``.

    One ``torch._foreach_norm`` per (device, dtype) group, then a segment sum (``index_add_``) of the
    squared norms in double on ``device`` (default: the first tensor's). Norms are accumulated in
    double on accelerators; on the CPU in the tensors' own precision (at least float32), and a norm
    that may have lost precision there (below 2**-20, or infinite) is recomputed in double
    (:func:`_cpu_norms`; long tensors are summed in rows of 512 entries). So for float32, float16 and
    bfloat16 tensors (and complex64) every norm, square and sum is exact, whatever the scale (float32
    holds neither ``||t||^2`` below ~1e-38 nor above ~3e38); float64 tensors have double's own range
    (norms from ~1e-150 to ~1e150). Sparse tensors count their (coalesced) values. Returns a float64
    tensor of shape ``(num_layers,)``; ``layer_index`` lives on ``device``.
    ``grouped`` may pass a precomputed ``_group_tensors_by_device_and_dtype([tensors], True)``.
    ``inv_scale``: the tensors hold ``S t`` (e.g. GradScaler's scaled gradients) and
    ``1 / S`` is given; the result is ``sum ||t_i||^2 = sum (||S t_i|| / S)^2``, the per-tensor
    norms unscaled before squaring, so it is finite whenever the unscaled one is.
    """
    if device is None:
        device = layer_index.device
    out = torch.zeros(num_layers, dtype=torch.float64, device=device)
    if not tensors:
        return out
    if grouped is None:
        grouped = _group_tensors_by_device_and_dtype([list(tensors)], with_indices=True)  # type: ignore[arg-type]
    single = len(grouped) == 1
    for (dev, dt), ((group,), indices) in grouped.items():
        norm_dtype = _norm_dtype(dt, torch.device(dev), inv_scale is not None)
        if norm_dtype not in (torch.float64, torch.complex128) and dt not in (torch.float64, torch.complex128):
            stacked = _cpu_norms(group, norm_dtype)  # the CPU's own-precision (at least float32) norms
        else:
            try:
                norms = (torch._foreach_norm(group, 2, dtype=norm_dtype) if norm_dtype
                         else torch._foreach_norm(group, 2))
            except (RuntimeError, NotImplementedError):
                if not any(t.is_sparse for t in group):
                    raise
                norms = [_single_norm(t, norm_dtype) for t in group]
            stacked = torch.stack(norms)
        if inv_scale is not None:
            stacked = stacked * to_device(inv_scale, dev, stacked.dtype)
        sq = to_device(stacked, device, torch.float64).square_()
        idx = layer_index if single else layer_index[index_tensor(indices, device)]
        out.index_add_(0, idx, sq)
    return out


def slo_coefficients(norms: Tensor, targets: Tensor, eps: float = 0.0) -> Tensor:
    """Per-layer scale ``c_l = C_l / (||g_l|| + eps)``, and ``c_l = 1`` where ``||g_l|| = 0``.

    ``targets`` holds each layer's target norm ``C_l`` (``lr * C_l * u_l`` for update mode's updates).
    ``torch.where`` keeps it on the device; a zero layer therefore stays exactly zero.
    """
    denominator = norms + eps if eps else norms
    return torch.where(norms > 0, targets / denominator, 1.0)  # the 0/0 branch is never selected


def applied_dtype(dtypes: Iterable[torch.dtype]) -> torch.dtype:
    """The narrowest real dtype in which coefficients for tensors of ``dtypes`` are applied: float64 if all are
    float64 or complex128, else float32 (half precision is multiplied in float32)."""
    return torch.float64 if all(dt in (torch.float64, torch.complex128) for dt in dtypes) else torch.float32


def unrepresentable(coefficients: Tensor, dtype: torch.dtype) -> Tensor:
    """0-dim bool: some non-zero finite coefficient is outside ``dtype``'s normal range (it would round to
    inf, a subnormal or 0 there; e.g. ``C / ||g||`` for a float32 gradient of norm below ``3e-39 C``)."""
    info = torch.finfo(dtype)
    c = coefficients.abs()
    return ((c > info.max) | ((c < info.tiny) & (c > 0))).any()


def coefficient_factors(coefficients: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``c = hi * lo`` in ``dtype``: ``hi = 2^floor(e/2)`` for ``c = m 2^e`` (``m`` in [0.5, 1)), ``lo = c / hi``.

    Both are normal in float32 for ``c`` within 2^-250..2^250, so ``(t * hi) * lo`` applies a float64 ``c``
    outside float32's range with one rounding (the product by a power of two is exact).
    """
    mantissa, exponent = torch.frexp(coefficients)
    half = torch.div(exponent, 2, rounding_mode="floor")
    hi = torch.ldexp(torch.ones_like(coefficients), half)
    return hi.to(dtype), torch.ldexp(mantissa, exponent - half).to(dtype)


class CoefficientBuffer:
    """Reusable per-tensor coefficients for ``torch._foreach_mul_``: one 1-D buffer and its 0-dim views.

    Gathering the coefficients into it (``index_select(out=)``) and reusing its views saves an
    allocation and ``n`` view creations per call. Only for dense tensors on the buffer's device.
    """

    __slots__ = ("values", "views")

    def __init__(self, n: int, dtype: torch.dtype, device: torch.device) -> None:
        self.values = torch.empty(n, dtype=dtype, device=device)
        self.views = self.values.unbind(0)


def scale_layers_(
    tensors: Sequence[Tensor], layer_index: Tensor, coefficients: Tensor, buffer: CoefficientBuffer | None = None
) -> None:
    """In place ``t_i <- c_{layer_index[i]} * t_i``: one ``torch._foreach_mul_`` per (device, dtype).

    ``buffer`` (one entry per tensor, see :class:`CoefficientBuffer`) selects the fast path: no
    grouping, no allocation; the caller guarantees that the tensors are dense and on its device.
    Sparse tensors are scaled one by one. The values are the same on every path.
    """
    if not tensors:
        return
    if buffer is not None:
        torch.index_select(coefficients, 0, layer_index, out=buffer.values)
        torch._foreach_mul_(list(tensors), buffer.views)
        return
    per_tensor = coefficients[layer_index]
    if any(t.is_sparse for t in tensors):
        for t, c in zip(tensors, per_tensor.unbind(0)):
            t.mul_(c.to(t.device))
        return
    grouped = _group_tensors_by_device_and_dtype([list(tensors)], with_indices=True)  # type: ignore[arg-type]
    single = len(grouped) == 1
    for (dev, _dt), ((group,), indices) in grouped.items():
        coef = per_tensor if single else per_tensor[index_tensor(indices, per_tensor.device)]
        coef = to_device(coef, dev)
        torch._foreach_mul_(group, coef.unbind(0))


def rescale_updates_(
    deltas: Sequence[Tensor],
    old: Sequence[Tensor],
    layer_index: Tensor,
    coefficients: Tensor,
    buffer: CoefficientBuffer | None = None,
) -> None:
    """The update-mode rule in place: ``p <- p_old + k_l (p_new - p_old)``.

    ``deltas`` hold ``p_new - p_old`` on entry (typically the parameters after ``p -= p_old``) and
    ``p_old + k_l * delta`` on return; ``old`` holds ``p_old``. Adding ``p_old`` last keeps it exact
    for any update size (``p_new + (1 - k)(p_old - p_new)`` cancels ``p_old`` when the step is much
    larger than the parameters). ``buffer``: as in :func:`scale_layers_`.
    """
    scale_layers_(deltas, layer_index, coefficients, buffer)
    if deltas:
        torch._foreach_add_(list(deltas), list(old))


def slo_rescale_(
    layers: Sequence[Sequence[Tensor] | Tensor],
    speeds: Sequence[float] | Tensor,
    eps: float = 0.0,
) -> Tensor:
    """Rescale each layer's tensors jointly to norm ``C_l``: ``t <- C_l * t / (||t_l||_F + eps)``.

    ``layers[l]`` is a tensor or a list of tensors (e.g. the gradients of a weight and its bias);
    a layer of norm zero is left at zero. On the CPU a coefficient outside float32's normal range (for
    float32 or half-precision tensors) is applied exactly by :func:`coefficient_factors`. Returns the
    pre-rescaling norms ``||t_l||_F`` (float64, see
    :func:`layer_sq_norms`), shape ``(len(layers),)``. No host synchronisation.
    """
    flat: list[Tensor] = []
    index: list[int] = []
    for i, layer in enumerate(layers):
        members = tensor_list(layer)
        flat.extend(members)
        index.extend([i] * len(members))
    if not flat:
        return torch.zeros(0)
    device = flat[0].device
    layer_index = index_tensor(index, device)
    norms = layer_sq_norms(flat, layer_index, len(layers)).sqrt_()
    speed_t = to_device(torch.as_tensor(speeds, dtype=norms.dtype), device)
    if speed_t.shape != norms.shape:
        raise ValueError(f"speeds has {speed_t.numel()} entries, expected one per layer ({len(layers)})")
    coefficients = slo_coefficients(norms, speed_t, eps)  # float64
    dtype = accumulate_dtype(t.dtype for t in flat)
    narrow = applied_dtype(t.dtype for t in flat)
    # reading the flag waits for nothing on the CPU (on accelerators it would synchronise)
    if device.type == "cpu" and narrow != torch.float64 and bool(unrepresentable(coefficients, narrow)):
        hi, lo = coefficient_factors(coefficients, dtype)
        scale_layers_(flat, layer_index, hi)
        scale_layers_(flat, layer_index, lo)
    else:
        scale_layers_(flat, layer_index, coefficients.to(dtype))
    return norms
