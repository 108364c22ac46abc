"""Sparsity schedules over optimizer steps (SPEC §7) and the sparsity-value check they share."""
import numbers

from torch import Tensor


def check_sparsity(value, name: str = "sparsity") -> float:
    """``value`` as a float in [0, 1]; TypeError/ValueError naming ``name`` otherwise (SPEC §0)."""
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float in [0, 1], got {type(value).__name__}")
    value = float(value)
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value


class CubicSchedule:
    """Zhu & Gupta cubic ramp (SPEC §7): ``s(t) = s_f + (s_i − s_f)·(1 − (t − t0)/(t1 − t0))³``
    for ``t0 ≤ t ≤ t1``, ``s_i`` before, ``s_f`` after; ``t`` counts optimizer steps."""

    def __init__(self, start_step: int, end_step: int, final_sparsity: float, initial_sparsity: float = 0.0):
        if not (isinstance(start_step, numbers.Integral) and isinstance(end_step, numbers.Integral)
                and 0 <= start_step < end_step):
            raise ValueError(f"need integers 0 <= start_step < end_step, got {start_step!r}, {end_step!r}")
        self.start_step, self.end_step = int(start_step), int(end_step)
        self.final_sparsity = check_sparsity(final_sparsity, "final_sparsity")
        self.initial_sparsity = check_sparsity(initial_sparsity, "initial_sparsity")

    def __call__(self, step: int) -> float:
        if step <= self.start_step:
            return self.initial_sparsity
        if step >= self.end_step:
            return self.final_sparsity
        return self._ramp((step - self.start_step) / (self.end_step - self.start_step))

    def _ramp(self, frac: float) -> float:
        """The target a fraction ``frac`` ∈ (0, 1) into the ramp."""
        return self.final_sparsity + (self.initial_sparsity - self.final_sparsity) * (1.0 - frac) ** 3

    def __repr__(self) -> str:
        return (f"CubicSchedule(start_step={self.start_step}, end_step={self.end_step}, "
                f"final_sparsity={self.final_sparsity}, initial_sparsity={self.initial_sparsity})")


class LinearSchedule(CubicSchedule):
    """Linear ramp: ``s(t) = s_i + (s_f − s_i)·(t − t0)/(t1 − t0)`` for ``t0 ≤ t ≤ t1``, ``s_i``
    before, ``s_f`` after (STARFIRE's ``ramp="linear"``, SPEC §5)."""

    def _ramp(self, frac: float) -> float:
        return self.initial_sparsity + (self.final_sparsity - self.initial_sparsity) * frac

    def __repr__(self) -> str:
        return "Linear" + super().__repr__().removeprefix("Cubic")


#: STARFIRE / N:M ``ramp=`` names → schedule classes
RAMPS = {"cubic": CubicSchedule, "linear": LinearSchedule}
