"""Device detection, the CPU/gloo compatibility layer and the distributed bootstrap."""
