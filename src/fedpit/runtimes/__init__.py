"""Runtimes move adapters and metrics between clients and server; they hold no algorithm."""
