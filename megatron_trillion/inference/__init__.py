"""Loading a trained checkpoint for inference in one process, and greedy generation."""
