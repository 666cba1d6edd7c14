"""CoLLM-FL: federated LoRA fine-tuning and LLM serving on the same edge replicas."""

__version__ = "0.1.0"
