"""Privacy accounting with Opacus's accountants: epsilon of a history of Gaussian-mechanism steps,
and the noise that makes a planned history reach a target epsilon.

A history is a list of (noise_multiplier, sample_rate, steps), Opacus's own format, so it is plain
data that a client state or a server checkpoint stores as JSON and restores exactly. Both
accountants assume Poisson sampling at `sample_rate` (RDP: Mironov 2017 with the subsampled
Gaussian of Mironov et al. 2019; PRV: Gopi et al. 2021, numerically near-exact).
"""

from __future__ import annotations

import functools
import warnings

from fedpit.errors import ConfigError

History = list[tuple[float, float, int]]


def _accountant(name: str, history: History):
    from opacus.accountants import create_accountant

    accountant = create_accountant(mechanism=name)
    accountant.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return accountant


def step(history: History, noise_multiplier: float, sample_rate: float, accountant: str = "rdp") -> History:
    """`history` with one more step, merged into the last entry when it has the same noise and rate
    (the accountant's own bookkeeping)."""
    composed = _accountant(accountant, history)
    composed.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)
    return [(float(s), float(q), int(n)) for s, q, n in composed.history]


def epsilon(history: History, delta: float, accountant: str = "rdp") -> float:
    """(epsilon, delta)-DP of running every step of `history` (0 for an empty one)."""
    if not any(steps for _, _, steps in history):
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "optimal order is the largest alpha": the bound is still valid
        return float(_accountant(accountant, history).get_epsilon(delta=delta))


@functools.lru_cache(maxsize=256)  # a run's clients, and the prepare-time check before them, ask the same
def calibrate(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str,
              what: str) -> float:
    """The smallest noise multiplier (to 1%) whose `steps` steps at `sample_rate` spend at most
    `target_epsilon`; a ConfigError naming `what` was planned when no noise below 1e6 reaches it."""
    from opacus.accountants.utils import get_noise_multiplier

    if steps <= 0:
        raise ConfigError(f"{what}: nothing to calibrate the noise for (no training steps planned)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                              sample_rate=sample_rate, steps=steps, accountant=accountant,
                                              epsilon_tolerance=0.01 * target_epsilon))
    except ValueError:
        raise ConfigError(f"target epsilon {target_epsilon} cannot be reached: {what} spends more even with a "
                          f"noise multiplier of 1e6; raise the target, or plan fewer rounds, epochs or steps") from None
