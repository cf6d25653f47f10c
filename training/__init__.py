"""Training with Q-Scorer: score-token fine-tuning and reward fine-tuning of diffusion models."""
