"""trm-diag: audit the rollout/training policy mismatch with the math of Trust Region Masking."""

__version__ = "0.1.0"
