"""Speed and memory measurements against named baselines: `python -m benchmarks.NAME` from the checkout's root."""
