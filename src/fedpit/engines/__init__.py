"""The heavy work, done once and fast: training one adapter, batched generation, sequence scoring.

Everything above this package calls these three engines; nothing else runs a forward pass.
"""
