"""LoRA adapters served on one base model: PEFT adapters read and checked (adapter), the
device slot pool and the layer hooks that add each token's adapter delta (layers), and the
registry with its CPU and device LRUs that the engine asks each step (manager)."""
