"""Adapters that plug a `QScorer` into diffusers sampling loops, TRL trainers and DDPO-style loops."""
