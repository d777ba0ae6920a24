"""Loading a trained checkpoint for inference, and the generation engine (batched, KV-cached
sampling with log-probabilities)."""
