"""The lens_fast trainer (installed as lens_fast.train)."""
