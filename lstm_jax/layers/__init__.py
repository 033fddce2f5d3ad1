"""Layer 4, what users call: ``sequence`` (``scan_cell``: check, plan, run; ``RecurrentStack``),
``steps`` (``scan_steps``: several of your own train steps per call) and ``parallel`` (one mesh
with a ``data`` axis: the same jitted step on 1 or N devices and P processes)."""
