"""Training: one loop (:func:`vol3d.train.loop.fit`), task objectives, losses, checkpoints, DDP.

See docs/training.md. Importing this package is light; torch is loaded by the submodules.
"""
