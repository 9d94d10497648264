"""Efficient inference: the predictor, its sliding window, resampling, multi-model runs and figures."""
