"""The ResNet family in PyTorch, faithful to the papers.

Import from the submodules (`models.registry`, `models.checkpoint`, ...). What the service also
needs (the preprocessing spec, file digests) lives in the torch-free `contract` package.
"""
