"""Evaluation: FLARE22 DSC/NSD, folder evaluation and the efficiency monitor."""
