"""N:M sparsity ramped over a pruning era, then frozen (SPEC §5, §7)."""
import math
import numbers

from torch import Tensor

from ..ops import distributed, nm_mask
from ..reference import spec_round
from .base import MaskMethod, local_rows


class NM(MaskMethod):
    """N:M (SPEC §5): in every group of ``m`` consecutive weights along the reduction dim (Linear:
    ``in``; Conv2d: ``C_in/groups`` at each ``(k, r, s)``) keep the ``n`` largest ``|w|``;
    final sparsity ``1 − n/m`` (2:4 is what sparse tensor cores run).

    The era ramps the pattern: at target ``s`` each group prunes ``round(m·s)`` weights
    (``nm_mask(w, m − round(m·s), m)``), so 2:4 passes through 3:4 and
    reaches 2:4 at the era's end, then freezes. Layers whose reduction dim is not divisible by
    ``m`` (typically the first conv, ``C_in = 3``) are skipped with a warning and stay dense.
    """

    name = "nm"

    def __init__(self, n: int = 2, m: int = 4, era=None, ramp: str = "cubic"):
        if not (isinstance(n, numbers.Integral) and isinstance(m, numbers.Integral) and not isinstance(n, bool)
                and not isinstance(m, bool) and 0 < n < m):
            raise ValueError(f"nm needs integers 0 < n < m, got n={n!r}, m={m!r}")
        self.n, self.m = int(n), int(m)
        super().__init__(1.0 - self.n / self.m, era, ramp)

    @classmethod
    def from_options(cls, final_sparsity, **options) -> "NM":
        meth = cls(**options)
        if final_sparsity is not None and not math.isclose(final_sparsity, meth.final_sparsity):
            raise ValueError(f"sparsity={final_sparsity} disagrees with {meth.n}:{meth.m} "
                             f"(sparsity {meth.final_sparsity}); leave sparsity out for nm")
        return meth

    def unsupported(self, weight: Tensor) -> str | None:
        if weight.shape[1] % self.m:
            return f"reduction dim (in, C_in/groups) {weight.shape[1]} not divisible by m={self.m}"
        return None

    def masks(self, weights: list[Tensor], sparsity: float) -> list[Tensor]:
        pruned = spec_round(self.m * sparsity)  # per group of m: 0 … m − n
        return [nm_mask(w, self.m - pruned, self.m) for w in weights]

    def sharded_masks(self, layers: list, sparsity: float, group) -> list[Tensor]:
        """Groups lie within an output row: each rank masks its own rows, then the masks are gathered."""
        pruned = spec_round(self.m * sparsity)
        out = []
        for layer in layers:
            local = local_rows(layer)
            if local is None:
                out += super().sharded_masks([layer], sparsity, group)
                continue
            w, _, rows = local
            mask = nm_mask(w, self.m - pruned, self.m) if w.shape[0] else w.new_zeros(w.shape, dtype=bool)
            out.append(distributed.gather_rows(mask, rows, group))
        return out

    def options(self) -> dict:
        return {"n": self.n, "m": self.m, **super().options()}
