"""rdcd: image copy detection at scale (RDCD distillation, Ray Data, sharded FAISS, Ray Serve)."""

__version__ = "0.1.0"
