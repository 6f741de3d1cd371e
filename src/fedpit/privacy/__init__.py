"""Leakage measurements: each attack is a function of (model with an adapter loaded, examples)
returning figures. Runtimes decide what to attack (the global model, each client's upload, the
private adapter) and when; attacks never import methods."""

from fedpit.privacy.canaries import Canary, exposure, make_canaries, plant_canaries
from fedpit.privacy.extraction import extraction_attack
from fedpit.privacy.membership import membership_attack

__all__ = ["Canary", "exposure", "extraction_attack", "make_canaries", "membership_attack", "plant_canaries"]
