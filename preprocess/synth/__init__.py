"""Synthetic hospital exports with ground truth (``vol3d synth``)."""
