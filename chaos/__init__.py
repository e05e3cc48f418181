"""andon's reliability harness: ``make chaos`` (``python chaos/run.py``). See docs/chaos.md."""
