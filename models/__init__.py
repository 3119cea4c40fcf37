"""The ResNet family in PyTorch, faithful to the papers.

Import from the submodules (`models.registry`, `models.checkpoint`, ...): this package's own
import stays torch-free so that the service can use `models.preprocessing` without loading torch.
"""
