"""Fine-tuning after the layer-wise pass: PV-tuning of additive codes (``pv`` math, ``trainable`` tensors,
``loop`` run, ``cli``)."""
