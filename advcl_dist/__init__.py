"""advcl-dist: AdvCL adversarial contrastive pretraining at scale."""

__version__ = "0.1.0"
