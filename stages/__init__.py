"""agent-flywheel pipeline stages. Data stages must not import torch/transformers/peft/trl."""
