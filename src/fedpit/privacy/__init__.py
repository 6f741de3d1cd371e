"""What leaks, and a bound on it. Leakage measurements: each attack is a function of (model with an
adapter loaded, examples) returning figures; runtimes decide what to attack (the global model, each
client's upload, the private adapter) and when. Differential privacy: `accounting` (Opacus's
accountants), `dp` (a client's DP-SGD budget and secret), `client_dp` (DP-FedAvg's noised mean).
Nothing here imports methods."""

from fedpit.privacy.canaries import Canary, exposure, make_canaries, plant_canaries
from fedpit.privacy.extraction import extraction_attack
from fedpit.privacy.membership import membership_attack

__all__ = ["Canary", "exposure", "extraction_attack", "make_canaries", "membership_attack", "plant_canaries"]
