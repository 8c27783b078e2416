"""Machinery beside the method: config and files (common), datasets and the encoded format (data),
the SNCE target's statistics (calibrate), pretrained tokenizers, FID, the MNIST classifier, and the
support scripts (run from the repo root as `python -m support.<name>`)."""
