"""Efficient inference with trained nnU-Net v2 models (the FLARE22 winner's recipe).

`predictor.EfficientPredictor` is the entry point; the other modules are its parts:
`defaults` (mode and window defaults, no torch), `images` (reading a CT), `resample` (body crop,
normalisation, resampling both ways), `sliding_window` (window grids and the loop), `onednn`
(fast CPU convolutions), `backends` (the windows' network in OpenVINO or ONNX Runtime), `folds`
(which checkpoints to load), `case_report` (what a case cost), `folder` (a whole folder with
background I/O), `cluster_folder` (a folder's cases as Dask tasks, one per case), `stage` (the
inference stage), `runs` (several models on one folder) and `figures` (pictures of the windows
that ran).
"""
